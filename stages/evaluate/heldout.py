"""The held-out data: the eval shards (`evaluate.shards`, else the toy web's eval split) and the standard
benchmarks (the toy web's, then `evaluate.benchmarks`), as `Extra` inputs with fingerprints of their
content. The evaluation reads them; a stage that must not train on them (prefilter's decontamination)
asks the registry for them (Stage.provides: `held_out`), so it names no other stage."""
from __future__ import annotations

from pipeline import storage
from pipeline.configtree import build, to_plain
from pipeline.errors import InputError
from pipeline.runs import fingerprint
from pipeline.sources import Sources, expand_shards
from pipeline.stage import Extra
from pipeline.storage import as_path
from stages.evaluate.config import BenchmarkConfig

# What decides which images a benchmark holds (decontamination screens the whole split: max_items
# only shortens the evaluation).
IMAGE_KEYS = ("format", "split")


def held_out(cfg, sources: Sources, required: bool = True, images_only: bool = False) -> dict[str, Extra]:
    """{"eval_shards", "benchmarks"}. `required`: no eval set is an error (else none); `images_only`: a
    benchmark's fingerprint covers only which images it holds (for decontamination: a new rerank_k or
    template changes no image)."""
    shards = eval_shards(cfg.evaluate.shards, sources, required)
    chosen, fps = benchmarks(cfg.evaluate.benchmarks, sources, images_only)
    return {"eval_shards": Extra(shards, sources.shard_fingerprints("eval-shard", shards)),
            "benchmarks": Extra(chosen, fps)}


def eval_shards(pattern: str | None, sources: Sources, required: bool) -> list[str]:
    if pattern:
        return expand_shards("evaluate.shards", pattern)
    if sources.toyweb is None:
        if not required:
            return []
        raise InputError("evaluate: set evaluate.shards (a held-out webdataset) or use the toy web")
    return sources.toyweb["eval_shards"]


def benchmarks(configured, sources: Sources, images_only: bool) -> tuple[list[dict], tuple[str, ...]]:
    """The standard evaluations to run (the toy web's, then the config's), as plain settings, and a
    fingerprint of each: its settings and the (size, mtime) of every file under it (a COCO image
    folder is not hashed on every resume)."""
    toy = [build(BenchmarkConfig, b, source="the toy web") for b in (sources.toyweb or {}).get("benchmarks", [])]
    chosen = [to_plain(b) for b in (*toy, *configured)]
    fps = []
    for bench in chosen:
        files = []
        for root in (bench["path"], bench.get("images"), bench.get("classnames")):
            if root and as_path(root).is_dir():
                files += sorted(str(p) for p in as_path(root).rglob("*") if p.is_file())
            elif root:
                if not as_path(root).exists():
                    raise InputError(f"evaluate.benchmarks {bench['name']}: {root} does not exist")
                files.append(str(root))
        stamps = [[as_path(f).name, *storage.stamp(as_path(f))] for f in files]
        keys = IMAGE_KEYS if images_only else set(bench) - {"path"}
        fps.append(fingerprint("benchmark", {k: bench[k] for k in sorted(keys)}, [str(stamps)]))
    return chosen, tuple(fps)
