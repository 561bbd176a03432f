"""The run's inputs that no stage produces: the URL lists (the config's and the toy web's), the clean
seed set, the held-out evaluation set. Stages turn them into `Extra` inputs with fingerprints of their
content (stages/*.py, `extra_inputs`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pipeline import storage
from pipeline.config import RunConfig, UrlListConfig
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_json, read_json, sha256_file
from pipeline.runs import RunDir, fingerprint
from pipeline.storage import as_path


@dataclass(frozen=True)
class Sources:
    cfg: RunConfig
    run: RunDir
    lists: tuple[UrlListConfig, ...]
    toyweb: dict | None   # what pipeline.toyweb.service.prepare_toy_web wrote, or None
    # sha256 by path: the seed and eval sets are inputs of a stage in every round, hashed once a run
    _sha256: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def shard_fingerprints(self, kind: str, paths: list[str]) -> tuple[str, ...]:
        """One fingerprint per shard, of its name and content: a changed seed or eval set is a new input."""
        for path in paths:
            if path not in self._sha256:
                self._sha256[path] = sha256_file(path)
        return tuple(fingerprint(kind, as_path(p).name, [self._sha256[p]]) for p in paths)

    def list_fingerprints(self) -> tuple[str, ...]:
        """One fingerprint per URL list, of its settings and content. A list's sha256 is cached in the run
        directory by (path, size, mtime): a resume does not read 50 GB of LAION parquet again."""
        cache_path = self.run.root / ".cache" / "list-sha256.json"
        cache = read_json(cache_path) if cache_path.is_file() else {}
        fps, changed = [], False
        for spec in self.lists:
            path = storage.resolve(spec.path)
            key, stamp = str(path), storage.stamp(path)
            if cache.get(key, {}).get("stamp") != stamp:
                cache[key] = {"stamp": stamp, "sha256": sha256_file(path)}
                changed = True
            fps.append(fingerprint("url-list", asdict(spec) | {"path": path.name}, [cache[key]["sha256"]]))
        if changed:
            atomic_write_json(cache_path, cache)
        return tuple(fps)

    def seed_shards(self) -> list[str]:
        if self.cfg.data.seed_shards:
            return expand_shards("data.seed_shards", self.cfg.data.seed_shards)
        if self.toyweb is None:
            raise InputError("data.seed_shards: CapFilt and pretrain.with_seed need a clean seed set (a webdataset, "
                             "e.g. COCO); set data.seed_shards, or pretrain.with_seed: false without CapFilt")
        return self.toyweb["seed_shards"]

    def eval_shards(self, required: bool = True) -> list[str]:
        if self.cfg.evaluate.shards:
            return expand_shards("evaluate.shards", self.cfg.evaluate.shards)
        if self.toyweb is None:
            if not required:
                return []
            raise InputError("evaluate: set evaluate.shards (a held-out webdataset) or use the toy web")
        return self.toyweb["eval_shards"]

    def benchmarks(self, images_only: bool = False) -> tuple[list[dict], tuple[str, ...]]:
        """The standard evaluations to run (the toy web's, then the config's), as plain settings, and a
        fingerprint of each: its settings and the (size, mtime) of every file under it (a COCO image
        folder is not hashed on every resume). `images_only`: the fingerprint of which images the
        benchmark holds, for decontamination (a new rerank_k or template changes no image)."""
        from stages.evaluate.config import BenchmarkConfig
        from pipeline.configtree import build, to_plain

        toy = [build(BenchmarkConfig, b, source="the toy web") for b in (self.toyweb or {}).get("benchmarks", [])]
        chosen = [to_plain(b) for b in (*toy, *self.cfg.evaluate.benchmarks)]
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


# What decides which images a benchmark holds (decontamination screens the whole split: max_items
# only shortens the evaluation).
IMAGE_KEYS = ("format", "split")


def expand_shards(name: str, pattern: str) -> list[str]:
    import braceexpand

    shards = list(braceexpand.braceexpand(pattern))
    missing = [p for p in shards if not as_path(p).is_file()]
    if missing:
        raise InputError(f"{name}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return shards


