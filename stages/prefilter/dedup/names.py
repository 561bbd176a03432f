"""The drops, names and decisions phases: each unit partition's drops, the names of what they copy (a
kept sample's key, an eval image's benchmark and item), and one decisions file per shard."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.prefilter.dedup.common import DECISIONS, EVAL, Settings, mark, read_columns, unit_of, unit_partition
from pipeline.fsutil import atomic_write_parquet, atomic_write_row_groups, read_parquet, read_row_group
from pipeline.shuffle import partition_of, read_partition, write_partitioned
from pipeline.storage import as_path


KEEPERS = pa.schema([("keeper", pa.int64())])


def drops_partition(root: str, u: int, settings: Settings) -> dict:
    """The drops of the shards in unit partition u (`drops/<u>.parquet`, by node), and the keepers they
    name, asked of the keepers' unit partitions (`wanted/<u>.parquet`, a row group each)."""
    root = as_path(root)
    decided = read_parquet(root / "decided" / f"{u}.parquet")
    near = read_row_group(root / "near" / "all.parquet", u)
    drops = pa.concat_tables([decided, near])
    drops = drops.take(pa.array(np.argsort(drops["node"].to_numpy(), kind="stable"), pa.int64()))
    atomic_write_parquet(root / "drops" / f"{u}.parquet", drops)
    keepers = np.unique(drops["keeper"].to_numpy())
    write_partitioned(root / "wanted" / f"{u}.parquet", pa.table([keepers], schema=KEEPERS),
                      unit_partition(keepers, settings.partitions), settings.partitions, raw=False)
    return mark(root, "drops", str(u), {"drops": drops.num_rows, "keepers": len(keepers)})


NAMES = pa.schema([("keeper", pa.int64()), ("key", pa.string()), ("benchmark", pa.string()), ("item", pa.string())])


def names_partition(root: str, v: int, settings: Settings) -> dict:
    """The names of the keepers in unit partition v, from their units' scan files (each read once): a web
    sample's key, an eval image's benchmark and item. Answered by the asking partition u:
    `names/<v>.parquet`, row group u."""
    root = as_path(root)
    asked = {u: read_row_group(root / "wanted" / f"{u}.parquet", v)["keeper"].to_numpy() for u in range(settings.partitions)}
    wanted = np.unique(np.concatenate(list(asked.values()))) if asked else np.zeros(0, np.int64)
    key, benchmark, item = (np.full(len(wanted), None, object) for _ in range(3))
    units = wanted >> 32
    for unit in np.unique(units).tolist():
        mine = np.flatnonzero(units == unit)
        table = read_columns(root / "scan" / f"{unit_of(int(wanted[mine[0]]))}.parquet", ["node", "key", "benchmark", "item"])
        rows = np.searchsorted(table["node"].to_numpy(), wanted[mine])   # a scan file is in node order
        for name, out in (("key", key), ("benchmark", benchmark), ("item", item)):
            if name in table.column_names:
                out[mine] = table[name].take(pa.array(rows, pa.int64())).to_pylist()
    names = pa.table([pa.array(wanted, pa.int64()), pa.array(key.tolist(), pa.string()),
                      pa.array(benchmark.tolist(), pa.string()), pa.array(item.tolist(), pa.string())], schema=NAMES)
    atomic_write_row_groups(root / "names" / f"{v}.parquet", [
        names.take(pa.array(np.searchsorted(wanted, asked[u]), pa.int64())) for u in range(settings.partitions)], NAMES)
    return mark(root, "names", str(v), {"keepers": len(wanted)})


def decisions_partition(root: str, u: int, settings: Settings, shards: int) -> dict:
    """The decisions of the shards in unit partition u, one file each (decisions/<index>.parquet, DECISIONS):
    each drop with its reason, distance and keeper named."""
    root = as_path(root)
    drops = read_parquet(root / "drops" / f"{u}.parquet")
    names = read_partition(root / "names", u, NAMES)
    known = names["keeper"].to_numpy()
    order = np.argsort(known, kind="stable")
    at = order[np.searchsorted(known[order], drops["keeper"].to_numpy())] if len(known) else np.zeros(0, np.int64)
    named = names.take(pa.array(at, pa.int64()))
    web = pa.array(drops["keeper"].to_numpy() < EVAL)
    key = pc.if_else(web, named["key"], pa.scalar(None, pa.string()))   # an eval keeper: its benchmark and item
    table = pa.table([drops["node"], drops["reason"], key, drops["distance"], named["benchmark"], named["item"]],
                     schema=DECISIONS)
    nodes = table["node"].to_numpy()
    bounds = np.searchsorted(nodes >> 32, np.arange(shards + 1))   # sorted: each shard's drops are a run
    mine = np.flatnonzero(partition_of(np.arange(shards), settings.partitions) == u)
    for index in mine.tolist():
        lo, hi = int(bounds[index]), int(bounds[index + 1])
        atomic_write_parquet(root / "decisions" / f"{index}.parquet", table.slice(lo, hi - lo))
    return mark(root, "decisions", str(u), {"dropped": len(nodes), "shards": len(mine)})
