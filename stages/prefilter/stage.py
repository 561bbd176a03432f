"""prefilter: cheap rules, decontamination and deduplication before any model sees the data.

Three passes, so that deduplication is global across the stage and still deterministic:
  1. scan (a Ray task per shard): rule verdicts (image size, aspect ratio, the URL list's own numbers
     such as LAION's similarity and punsafe, caption rules, caption language) and fingerprints (sha256 of the original bytes, near-duplicate signature), hashed into
     the dedup partitions; the eval images are fingerprinted the same way (a task per eval shard and per part of
     each benchmark's split: COCO's test images, an ImageNet folder);
  2. dedup (tasks per partition, stages/prefilter/dedup/): copies of eval images are dropped
     (`eval_contaminated`), then exact copies (same original bytes) and near copies
     (pipeline/data/neardup.py) of a kept image, in (shard, key) order, whatever the number of workers;
  3. write (a Ray task per shard): kept samples into a new shard, committed atomically with its ledger;
     their near-duplicate signatures into `signatures/<shard>.parquet` (not the sample json).
The driver holds only per-shard summaries. A resumed run redoes the units of work without a marker
in `dedup/` and writes only the missing shards; once every shard is committed, `dedup/` is removed.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import re
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from stages.prefilter.config import SECTION, PrefilterConfig
from pipeline.configtree import build
from pipeline.data import language, samplejson
from pipeline import benchmarks as benchmarks_lib
from stages.prefilter.dedup import common as dedup, phases as dedup_phases, scan as dedup_scan
from pipeline.data.neardup import signature
from pipeline.data.shards import OWNED_MEMBERS, encode_json, read_shard
from pipeline.errors import ConfigError, InputError
from pipeline.executor import Executor
from pipeline.fsutil import atomic_write_parquet, read_parquet
from pipeline.ledger import SIGNATURES_SCHEMA, signatures_path, write_records
from pipeline.parallel import Progress, run_missing_shards, run_shard_tasks
from pipeline.manifest import Manifest
from pipeline.runs import StageDir, verify_shard
from pipeline.shardcommit import ShardOutput, settle
from pipeline.sources import Sources
from pipeline.stage import Extra, Inputs, Stage, StageContext, Upstream, provided, shard_tasks, web_data
from pipeline.storage import as_path, remove_tree

DEDUP = "dedup"   # the shuffle's working folder inside the stage's, removed once every shard is committed


def run(cfg: PrefilterConfig, inputs: Inputs, ctx: StageContext) -> Manifest:
    """Filter download's shards; `inputs.extra["eval_shards"]` and `["benchmarks"]`: the evaluation
    images training must not contain (both empty: nothing to decontaminate)."""
    started = time.time()
    _check_languages(cfg)
    upstream_dir, eval_shards = inputs.first().path, inputs.extra["eval_shards"]
    benchmarks = inputs.extra.get("benchmarks", [])
    shards = list(inputs.first().manifest.shards)
    samples_in = sum(s["samples"] for s in shards)
    ctx.out.begin(ctx.fingerprint, {"shards_total": len(shards), "samples_in": samples_in})
    stage_cfg = dataclasses.asdict(cfg)
    executor, options = ctx.executor, {"cpus": cfg.cpus_per_task, "retries": 2, "retry_exceptions": True}
    root = ctx.out.path / DEDUP
    details = {}
    if cfg.decontaminate and (eval_shards or benchmarks):   # where the report finds a copy's eval twin
        details["eval_sources"] = {EVAL_SHARDS: {"format": "shards", "shards": list(eval_shards)},
                                   **{b["name"]: b for b in benchmarks}}
    # Once every shard is committed (a resume after the breaker, or a kill before the manifest), the
    # decisions are in the shards: nothing is scanned again.
    todo = {s["shard"] for s in shards} - set(ctx.out.committed_stats([s["shard"] for s in shards]))
    if todo:
        settings = dedup.load_settings(root, dedup.Settings(
            dedup.partitions_for(samples_in, cfg.dedup_partitions), cfg.dedup_exact, cfg.dedup_near,
            cfg.decontaminate and bool(eval_shards or benchmarks), cfg.near_max_distance,
            cfg.decontaminate_max_distance))
        scans = {s["shard"]: (str(upstream_dir / s["shard"]), stage_cfg, s, i, str(root), settings)
                 for i, s in enumerate(shards) if not dedup.done_marker(root, "scan", str(i)).is_file()}
        run_shard_tasks(executor, executor.task(scan_shard, **options), scans,
                        Progress("prefilter/scan", len(shards), samples_in), lambda summary: summary["samples"])
        if settings.decontaminate:
            _fingerprint_eval_images(executor, eval_shards, benchmarks, root, settings, options)
        details["dedup"] = dedup_phases.run_phases(executor, root, len(shards), settings, options)
    jobs = {s["shard"]: (str(upstream_dir / s["shard"]), str(ctx.out.path), s["shard"], i, str(root), ctx.out.writer)
            for i, s in enumerate(shards)}
    write = executor.task(write_shard_task, **options)
    results = run_missing_shards(executor, ctx.out, write, jobs, Progress("prefilter/write", len(shards), samples_in))
    summaries = settle(ctx.out, [results[name] for name in jobs], cfg.max_drop_share, cfg.drop_share_limits)
    if root.exists():
        remove_tree(root)   # the shuffle's files: every decision is in the shards now
    return ctx.manifest(stage_cfg, summaries, started, details)


def _fingerprint_eval_images(executor: Executor, eval_shards: list[str], benchmarks: list[dict], root, settings,
                             options: dict) -> None:
    """Hash the eval split's and every benchmark's images into the dedup partitions as eval nodes: a task
    per eval shard and per part of a benchmark (unit numbers: the eval shards, then the parts in order)."""
    units = {p: (eval_shard_items, (p,), EVAL_SHARDS) for p in eval_shards}
    count = executor.task(benchmarks_lib.image_parts, cpus=options["cpus"])
    try:
        parts = executor.get([count.remote(b) for b in benchmarks])
    except Exception as err:   # a benchmark that cannot be read: its own message
        cause = executor.cause(err)
        raise (cause if isinstance(cause, InputError) else err) from None
    units |= {f"{b['name']} part {k}": (benchmarks_lib.part_items, (b, k), b["name"]) for b, n in zip(benchmarks, parts)
              for k in range(n)}
    task = executor.task(_fingerprint_unit, **options)
    todo = {name: (fn, args, i, str(root), settings, bench) for i, (name, (fn, args, bench)) in enumerate(units.items())
            if not dedup.done_marker(root, "scan", f"eval-{i}").is_file()}
    run_shard_tasks(executor, task, todo, Progress("prefilter/eval", len(units), None), lambda summary: 0)


def _eval_shards(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    # training images that copy an eval or benchmark image are dropped; with neither, nothing to compare
    if not cfg.prefilter.decontaminate:
        return {"eval_shards": Extra([]), "benchmarks": Extra([])}
    return provided("held_out")(cfg, sources, required=False, images_only=True)


STAGE = Stage("prefilter", SECTION, curates_web=True, conserves=True, run=run,
              request=lambda cfg, urls: shard_tasks(cfg, cfg.prefilter.cpus_per_task, urls),
              upstreams=lambda cfg, round_: [web_data(cfg, before="prefilter")], extra_inputs=_eval_shards)


def _check_languages(cfg: PrefilterConfig) -> None:
    """A language code the identifier does not know would drop every caption: refuse it up front."""
    if cfg.languages:
        unknown = sorted(set(cfg.languages) - language.known_languages())
        if unknown:
            raise ConfigError(f"prefilter.languages: {', '.join(unknown)} not known to the language identifier "
                              f"(py3langid); it knows {', '.join(sorted(language.known_languages()))}")


# --- inside the Ray tasks -------------------------------------------------------------------------

def scan_shard(shard_path: str, stage_cfg: dict, expected: dict, index: int, root: str,
               settings: dedup.Settings) -> dict:
    """Rule verdicts and signatures of every sample of an upstream shard (verified against its manifest),
    written to dedup/scan/ and hashed into the dedup partitions (stages/prefilter/dedup/scan.py)."""
    verify_shard(as_path(shard_path), expected)
    cfg = build(PrefilterConfig, stage_cfg, source="prefilter task")
    patterns = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate_patterns]
    records = sorted((_scan_sample(sample, cfg, patterns) for sample in read_shard(as_path(shard_path))),
                     key=lambda r: r["key"])
    nodes = (index << 32) + np.arange(len(records), dtype=np.int64)
    root_path = as_path(root)
    kept = [r["outcome"] == "kept" for r in records]
    dedup_scan.write_partitions(root_path, str(index), nodes, [r["exact"] if k else None for r, k in zip(records, kept)],
                           [r["signature"] if k else None for r, k in zip(records, kept)], settings)
    table = pa.table({"key": [r["key"] for r in records], "node": nodes, "outcome": [r["outcome"] for r in records],
                      "reason": [r["reason"] for r in records], "error": [r.get("error") for r in records],
                      "signature": [r["signature"] for r in records]}, schema=dedup.SCAN)
    atomic_write_parquet(root_path / "scan" / f"{index}.parquet", table)
    return dedup.mark(root_path, "scan", str(index), {"samples": len(records)})


def _scan_sample(sample: dict, cfg: PrefilterConfig, patterns) -> dict:
    rec = {"key": sample["__key__"], "outcome": "kept", "reason": None, "signature": None, "exact": None}
    try:
        meta = samplejson.parse(sample.get("json"))
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            img.load()
            width, height = img.size
            rec["signature"] = signature(img)
    except Exception as err:  # noqa: BLE001 (a bad sample is counted, never crashes the shard)
        rec.update(outcome="failed", reason="image_unreadable" if "jpg" in sample else "image_missing",
                   error=f"{type(err).__name__}: {err}")
        return rec
    # The original bytes' hash (img2dataset's sha256) finds copies that differ only after re-encoding.
    rec["exact"] = meta.get("sha256") or hashlib.sha256(sample["jpg"]).hexdigest()
    width = meta.get("original_width") or width
    height = meta.get("original_height") or height
    reason = image_rule(width, height, cfg) or list_rule(meta.get("list") or {}, cfg) \
        or caption_rule(sample.get("txt"), meta, cfg, patterns)
    if reason:
        rec.update(outcome="dropped", reason=reason)
    return rec


def image_rule(width: int, height: int, cfg: PrefilterConfig) -> str | None:
    if min(width, height) < cfg.min_image_side:
        return "image_too_small"
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "aspect_ratio_too_large"
    return None


def list_rule(listed: dict, cfg: PrefilterConfig) -> str | None:
    """The URL list's own numbers for the sample (LAION's similarity, punsafe, ...) against list_min/max."""
    for bounds, outside in ((cfg.list_min, lambda v, b: v < b), (cfg.list_max, lambda v, b: v > b)):
        for field, bound in bounds.items():
            value = listed.get(field)
            if samplejson.is_missing(value):   # NaN in the json (None or absent: an older download's)
                if cfg.list_missing == "drop":
                    return f"list_{field}_missing"
            elif outside(value, bound):
                return f"list_{field}"
    return None


def caption_rule(txt: bytes | None, meta: dict, cfg: PrefilterConfig, patterns) -> str | None:
    if meta.get("caption_error") == "not_utf8":
        return "caption_not_utf8"
    try:
        text = (txt or b"").decode("utf-8").strip()
    except UnicodeDecodeError:
        return "caption_not_utf8"
    if not text:
        return "caption_empty"
    if any(p.search(text) for p in patterns):  # before length: "IMG_2931.JPG" is boilerplate, not just short
        return "caption_boilerplate"
    if len(text) < cfg.min_caption_chars or _words(text) < cfg.min_caption_words:
        return "caption_too_short"
    if len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    if cfg.languages and language.in_other_language(text, cfg.languages, cfg.language_min_confidence):
        return "caption_language"
    return None


def _words(text: str) -> int:
    """Words separated by spaces, plus one per Chinese or Japanese character: those scripts write no spaces
    (a 14-character Chinese caption is one 'word' to str.split)."""
    return len(text.split()) + sum(1 for ch in text if "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff")


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # how webdatasets (ours, COCO's, open_clip's) name images


EVAL_SHARDS = "evaluate.shards"   # the benchmark name prefilter's ledger gives a copy of an image of the eval shards


def eval_shard_items(shard_path: str):
    """(`<shard>/<key>`, image bytes) of every image of an eval shard."""
    name = as_path(shard_path).name
    for sample in read_shard(as_path(shard_path)):
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is not None:
            yield f"{name}/{sample['__key__']}", data


def _fingerprint_unit(items_of, args: tuple, index: int, root: str, settings: dedup.Settings,
                      benchmark: str | None = None) -> dict:
    """(sha256 of the bytes, near-duplicate signature) of every readable image `items_of(*args)` yields
    (as (name, bytes)), hashed into the dedup partitions as the eval nodes of unit `index`; the names and
    `benchmark` go into its scan file, for the ledger of a sample that copies one."""
    exact, sigs, names = [], [], []
    for name, data in items_of(*args):
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                sigs.append(signature(img))
                exact.append(hashlib.sha256(data).hexdigest())
                names.append(name)
        except Exception:  # noqa: BLE001 (an unreadable eval image cannot leak into training either)
            continue
    nodes = dedup.EVAL + (index << 32) + np.arange(len(exact), dtype=np.int64)
    dedup_scan.write_partitions(as_path(root), f"eval-{index}", nodes, exact, sigs, settings)
    dedup_scan.write_signatures(as_path(root), f"eval-{index}", nodes, sigs, names, benchmark)
    return dedup.mark(as_path(root), "scan", f"eval-{index}", {"images": len(exact)})


def write_shard_task(in_path: str, stage_path: str, name: str, index: int, root: str,
                     writer: tuple | None = None) -> dict:
    out = StageDir(as_path(stage_path), "prefilter", 0, writer)   # writer: commit only for a live run
    if (done := out.shard_stats(name)) is not None:
        return done
    started = time.time()
    scanned = {r["key"]: r for r in read_parquet(as_path(root) / "scan" / f"{index}.parquet").to_pylist()}
    dropped = dedup.drops_of(as_path(root), index)
    output, foreign, signatures = ShardOutput(), collections.Counter(), []
    for sample in read_shard(as_path(in_path)):
        key = sample["__key__"]
        verdict = scanned[key]
        # the ledger says where the sample came from (download's json) and, for a copy, what it copies:
        # the kept sample's key (or the eval image's benchmark and item) and the distance (0: the same bytes)
        meta = samplejson.parse(sample.get("json"))
        row = {"key": key, "url": meta.get("url"), "source": meta.get("source"), "source_row": meta.get("source_row")}
        if verdict["outcome"] == "kept" and verdict["node"] in dropped:
            copy = dropped[verdict["node"]]
            row |= {k: copy.get(k) for k in ("keeper", "distance", "benchmark", "item")}
            verdict = {**verdict, "outcome": "dropped", "reason": copy["reason"]}
        if verdict["outcome"] == "dropped":
            output.dropped(row, verdict["reason"], verdict["error"])
        elif verdict["outcome"] == "failed":
            output.failed(row, verdict["reason"], verdict["error"])
        else:
            meta = samplejson.stable(meta)   # one schema, whatever download wrote it
            # the near-duplicate signature, for dedup across runs and datasets: in the side file, raw (as
            # base64 in the json it was 3/4 of it, and made prefilter's tars larger than download's)
            signatures.append({"key": key, "signature": verdict["signature"]})
            # Only the members this stage owns: a planted `.pyd` or `.pth` member would run code in
            # whoever reads the shards with webdataset's default decoders.
            foreign.update(ext for ext in sample if ext != "__key__" and ext not in OWNED_MEMBERS)
            output.kept(row, {"__key__": key, "jpg": sample["jpg"], "txt": sample.get("txt", b""), "json": encode_json(meta)})
    # before the shard's commit (its stats, last): a kill between them redoes the shard, file and all
    write_records(signatures_path(out.path, name), sorted(signatures, key=lambda r: r["key"]), SIGNATURES_SCHEMA)
    return output.commit(out, name, started, {"members_dropped": dict(sorted(foreign.items()))})
