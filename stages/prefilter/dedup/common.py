"""What every dedup phase shares: the settings, the node numbering, the files' schemas, the done
markers (a unit of work with one is not redone) and the readers of a unit's decisions."""
from __future__ import annotations

from pathlib import Path
import dataclasses
import math

import numpy as np
import pyarrow as pa

from pipeline.fsutil import atomic_write_json, read_json, read_parquet
from pipeline.shuffle import partition_of, write_partitioned
from pipeline.storage import arrow, as_path


EVAL = 1 << 62


SCAN = pa.schema([("key", pa.string()), ("node", pa.int64()), ("outcome", pa.string()), ("reason", pa.string()),
                  ("error", pa.string()), ("signature", pa.binary())])


@dataclasses.dataclass(frozen=True)
class Settings:
    partitions: int
    exact: bool            # dedup_exact
    near: bool             # dedup_near
    decontaminate: bool
    near_max_distance: float
    decontaminate_max_distance: float

    @property
    def searches_near(self) -> bool:
        return self.near or self.decontaminate


def partitions_for(samples: int, configured: int | None) -> int:
    """About one partition per 500k samples (at least 2, so the shuffle is always exercised): a sig
    partition then holds ~700 MB of signatures for its join and verify tasks."""
    return configured or max(2, min(1024, math.ceil(samples / 500_000)))


def read_table(folder: Path, schema: pa.Schema | None = None) -> pa.Table:
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []
    tables = [read_parquet(p) for p in files]
    if not tables:
        return schema.empty_table() if schema is not None else pa.table({})
    return pa.concat_tables(tables)


def done_marker(root: Path, phase: str, unit: str) -> Path:
    """A unit's marker: written last, so a resumed stage redoes only the units without one."""
    return root / "done" / f"{phase}-{unit}"


def mark(root: Path, phase: str, unit: str, summary: dict | None = None) -> dict:
    atomic_write_json(done_marker(root, phase, unit), summary or {})
    return summary or {}


EXACT = pa.schema([("exact", pa.string()), ("node", pa.int64())])


BAND = pa.schema([("key", pa.int32()), ("node", pa.int64()), ("h0", pa.uint64()), ("h1", pa.uint64()),
                  ("digest", pa.uint64()), ("head", pa.uint32())])


def unit_of(node: int) -> str:
    """The scan unit whose `scan/<unit>.parquet` holds a node's signature: a shard index or `eval-<i>`."""
    return f"eval-{(node - EVAL) >> 32}" if node >= EVAL else str(node >> 32)


# A drop: the node, why, the node it copies (its keeper: see the module's docstring) and how far apart.
DROPS = pa.schema([("node", pa.int64()), ("reason", pa.string()), ("keeper", pa.int64()), ("distance", pa.float64())])


# decisions/<shard index>.parquet: a shard's drops, the keeper named (a web sample's key; an eval image's
# benchmark and item)
DECISIONS = pa.schema([("node", pa.int64()), ("reason", pa.string()), ("keeper", pa.string()),
                       ("distance", pa.float64()), ("benchmark", pa.string()), ("item", pa.string())])


def unit_partition(nodes: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of each web node's unit (its shard): where its drops, edges and decisions meet."""
    return partition_of(nodes >> 32, partitions)


def write_by_unit(path: Path, table: pa.Table, nodes: np.ndarray, partitions: int) -> None:
    """`table` as one file, row group u holding the rows whose `nodes` are in unit partition u."""
    write_partitioned(path, table, unit_partition(nodes, partitions), partitions, raw=False)


PAIRS = pa.schema([("a", pa.int64()), ("b", pa.int64())])


EDGES = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("distance", pa.float64())])   # verified copies


JOINED = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("sig_a", pa.binary())])


def decisions_of(root: Path, index: int) -> dict[int, str]:
    """{node: reason} of the drops of shard `index`."""
    table = read_parquet(root / "decisions" / f"{index}.parquet", columns=["node", "reason"])
    return dict(zip(table["node"].to_pylist(), table["reason"].to_pylist()))


def drops_of(root: Path, index: int) -> dict[int, dict]:
    """{node: {reason, keeper, distance, benchmark, item}} of the drops of shard `index` (DECISIONS; the
    fields a file from an older vlp lacks are None)."""
    rows = read_parquet(root / "decisions" / f"{index}.parquet").to_pylist()
    return {r["node"]: {name: r.get(name) for name in DECISIONS.names[1:]} for r in rows}


def read_columns(path: Path, columns: list[str]) -> pa.Table:
    """`columns` of a parquet file, those it has (a scan file an older vlp or a bench wrote lacks names)."""
    import pyarrow.parquet as pq

    name, filesystem = arrow(as_path(path))
    with pq.ParquetFile(name, filesystem=filesystem) as f:
        return f.read(columns=[c for c in columns if c in f.schema_arrow.names])


def load_settings(root: Path, settings: Settings) -> Settings:
    """The settings this dedup folder was started with (the partition count must not change mid-way)."""
    path = root / "settings.json"
    if path.is_file():
        return Settings(**read_json(path))
    atomic_write_json(path, dataclasses.asdict(settings))
    return settings
