"""The run's inputs that no stage produces: the URL lists (the config's and the toy web's), the clean
seed set, and what the toy web serves (its eval split and benchmarks: the stage that evaluates reads
them, stages/evaluate/heldout.py). Stages turn them into `Extra` inputs with fingerprints of their
content (stages/<name>/stage.py, `extra_inputs`)."""
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


def expand_shards(name: str, pattern: str) -> list[str]:
    import braceexpand

    shards = list(braceexpand.braceexpand(pattern))
    missing = [p for p in shards if not as_path(p).is_file()]
    if missing:
        raise InputError(f"{name}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return shards


