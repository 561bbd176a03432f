"""The exact phase: per partition, groups of equal original bytes -> duplicate_exact drops (and
eval_contaminated for a copy of an eval image)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.prefilter.dedup.common import DROPS, EVAL, EXACT, Settings, mark, write_by_unit
from pipeline.shuffle import read_partition
from pipeline.storage import as_path


def exact_partition(root: str, p: int, settings: Settings) -> dict:
    """Drops of partition p's groups of equal original bytes: every web sample of a group holding an
    eval image (`eval_contaminated`), else each but the group's smallest node (`duplicate_exact`)."""
    root = as_path(root)
    table = read_partition(root / "exact", p, EXACT)
    node, reason, keeper = np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, np.int64)
    if table.num_rows:
        groups = pc.dictionary_encode(table["exact"]).combine_chunks().indices.to_numpy()
        nodes = table["node"].to_numpy()
        order = np.lexsort((nodes, groups))
        groups, nodes = groups[order], nodes[order]
        new = np.r_[True, groups[1:] != groups[:-1]]
        group = np.cumsum(new) - 1
        last = np.r_[np.flatnonzero(new)[1:], len(nodes)] - 1
        with_eval = nodes[last][group] >= EVAL   # eval nodes sort after every web node of their group
        web = nodes < EVAL
        contaminated = web & with_eval & settings.decontaminate
        copy = web & ~new & ~contaminated & settings.exact   # a group's first node is its smallest
        starts = np.flatnonzero(new)
        # keepers: the group's first node; for a contaminated one, the group's first eval image
        first_eval = np.minimum.reduceat(np.where(web, len(nodes), np.arange(len(nodes))), starts)
        dropped = contaminated | copy
        node = nodes[dropped]
        reason = np.where(contaminated, "eval_contaminated", "duplicate_exact")[dropped]
        keeper = np.where(contaminated, nodes[np.minimum(first_eval, len(nodes) - 1)[group]], nodes[starts][group])[dropped]
    write_by_unit(root / "exact_out" / f"{p}.parquet", pa.table({
        "node": pa.array(node, pa.int64()), "reason": pa.array(reason, pa.string()), "keeper": pa.array(keeper, pa.int64()),
        "distance": pa.array(np.zeros(len(node)), pa.float64())}, schema=DROPS), node, settings.partitions)
    return mark(root, "exact", str(p), {"drops": len(node)})
