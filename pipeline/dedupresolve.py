"""Dedup's resolve (pipeline/dedup.py's last phases): from the exact drops and the edges, each written
by the partition of its first node's shard, to the decisions per shard. Per partition, *decide* and
*prune* leave out every edge that touches a node dropped already (eval_contaminated, duplicate_exact);
one *near* task runs the greedy rule over the edges left, as arrays; *decisions* writes a file per shard.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.dedup import (
    DROPS,
    EVAL,
    PAIRS,
    Settings,
    _read,
    _unique_pairs,
    _write_by_unit,
    mark,
    partition_of,
)
from pipeline.fsutil import (
    atomic_write_parquet,
    read_parquet,
    read_partition,
    read_row_group,
)
from pipeline.storage import as_path


def decide_partition(root: str, u: int, settings: Settings) -> dict:
    """The drops decided before the near rule, of the nodes of unit partition u: `eval_contaminated`
    (an exact copy of an eval image, or an edge to one: before any other reason), `duplicate_exact`.
    Its edges whose first node is dropped already are left out (a dropped node is never kept, so it
    drops nothing); the rest go on, by their second node's unit partition."""
    root = as_path(root)
    exact = read_partition(root / "exact_out", u, DROPS)
    edges = read_partition(root / "edges", u, PAIRS)
    a, b = _unique_pairs([edges["a"].to_numpy()], [edges["b"].to_numpy()])   # a pair found in several bands
    to_eval = b >= EVAL   # pairs are (smaller, larger): an eval node is always the second
    contaminated = np.unique(a[to_eval])
    exact_nodes = exact["node"].to_numpy()
    rest = ~np.isin(exact_nodes, contaminated)
    nodes = np.concatenate([contaminated, exact_nodes[rest]])
    reasons = pa.concat_arrays([pa.array(np.full(len(contaminated), "eval_contaminated"), pa.string()),
                                exact["reason"].combine_chunks().filter(pa.array(rest))])
    order = np.argsort(nodes)
    atomic_write_parquet(root / "decided" / f"{u}.parquet",
                         pa.table([nodes[order], reasons.take(pa.array(order, pa.int64()))], schema=DROPS))
    web = ~to_eval & ~np.isin(a, nodes)
    _write_by_unit(root / "free_first" / f"{u}.parquet", pa.table([a[web], b[web]], schema=PAIRS), b[web],
                   settings.partitions)
    return mark(root, "decide", str(u), {"decided": len(nodes), "edges": len(a)})


def prune_partition(root: str, v: int, settings: Settings) -> dict:
    """The edges whose second node is in unit partition v, less those whose second node is dropped
    already: what is left is the graph the near rule runs on."""
    root = as_path(root)
    decided = read_parquet(root / "decided" / f"{v}.parquet", columns=["node"])["node"].to_numpy()
    pairs = read_partition(root / "free_first", v, PAIRS)
    keep = ~np.isin(pairs["b"].to_numpy(), decided)
    atomic_write_parquet(root / "free" / f"{v}.parquet", pairs.filter(pa.array(keep)))
    return mark(root, "prune", str(v), {"edges": int(keep.sum())})


def near_resolve(root: str, unit: int, settings: Settings) -> dict:
    """(one task) The greedy near rule over the edges between nodes not dropped already, its drops by
    unit partition. Holds only those edges, as arrays (16 bytes an edge)."""
    root = as_path(root)
    edges = _read(root / "free", PAIRS)
    near = greedy_drops(edges["a"].to_numpy(), edges["b"].to_numpy())
    _write_by_unit(root / "near" / "all.parquet", pa.table({"node": near}), near, settings.partitions)
    return mark(root, "near", "all", {"near": len(near), "near_graph_edges": edges.num_rows})


def decisions_partition(root: str, u: int, settings: Settings, shards: int) -> dict:
    """The decisions of the shards in unit partition u, one file each: decisions/<index>.parquet."""
    root = as_path(root)
    decided = read_parquet(root / "decided" / f"{u}.parquet")
    near = read_row_group(root / "near" / "all.parquet", u)["node"].to_numpy()
    nodes = np.concatenate([decided["node"].to_numpy(), near])
    reasons = pa.concat_arrays([decided["reason"].combine_chunks(),
                                pa.array(np.full(len(near), "duplicate_near"), pa.string())])
    order = np.argsort(nodes)
    nodes, reasons = nodes[order], reasons.take(pa.array(order, pa.int64()))
    bounds = np.searchsorted(nodes >> 32, np.arange(shards + 1))   # sorted: each shard's drops are a run
    mine = np.flatnonzero(partition_of(np.arange(shards), settings.partitions) == u)
    for index in mine.tolist():
        lo, hi = int(bounds[index]), int(bounds[index + 1])
        atomic_write_parquet(root / "decisions" / f"{index}.parquet",
                             pa.table([nodes[lo:hi], reasons.slice(lo, hi - lo)], schema=DROPS))
    return mark(root, "decisions", str(u), {"dropped": len(nodes), "shards": len(mine)})


def greedy_drops(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The nodes the greedy rule drops over edges a < b: in node order, a node is dropped if a smaller
    node it copies was kept. Decided in rounds, as arrays: a node whose sources are all decided is
    dropped if one was kept, else kept; each round drops the edges into decided nodes, so a chain of
    copies costs rounds, a clique two."""
    if not len(a):
        return np.zeros(0, np.int64)
    nodes, index = np.unique(np.concatenate([a, b]), return_inverse=True)
    src, dst = index[:len(a)], index[len(a):]
    order = np.argsort(dst, kind="stable")   # edges grouped by their second node
    src, dst = src[order], dst[order]
    state = np.ones(len(nodes), np.int8)      # 1 kept, 2 dropped, 0 undecided: nodes with a source
    state[dst] = 0
    while len(dst):
        first = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
        sources = state[src]
        any_kept = np.maximum.reduceat((sources == 1).astype(np.int8), first).astype(bool)
        any_open = np.maximum.reduceat((sources == 0).astype(np.int8), first).astype(bool)
        target = dst[first]
        state[target[any_kept]] = 2
        state[target[~any_kept & ~any_open]] = 1
        still = state[dst] == 0
        src, dst = src[still], dst[still]
    return nodes[state == 2]
