"""The decide, prune and near phases: per unit partition, eval_contaminated and duplicate_exact, then
the edges left between nodes no other rule dropped, resolved by the greedy rule in one task."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.prefilter.dedup.common import DROPS, EDGES, EVAL, Settings, mark, read_table, write_by_unit
from pipeline.fsutil import atomic_write_parquet, read_parquet
from pipeline.shuffle import read_partition
from pipeline.storage import as_path


def _unique_edges(edges: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct edges (a pair found by several bands once), each with its smallest distance."""
    a, b, d = edges["a"].to_numpy(), edges["b"].to_numpy(), edges["distance"].to_numpy()
    order = np.lexsort((d, b, a))
    a, b, d = a[order], b[order], d[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    return a[first], b[first], d[first]


def _closest(node: np.ndarray, keeper: np.ndarray, distance: np.ndarray):
    """One row per node: its closest keeper (the smaller node on a tie)."""
    order = np.lexsort((keeper, distance, node))
    node, keeper, distance = node[order], keeper[order], distance[order]
    first = np.r_[True, node[1:] != node[:-1]] if len(node) else np.zeros(0, bool)
    return node[first], keeper[first], distance[first]


def _drops(node, reason, keeper, distance) -> pa.Table:
    return pa.table([pa.array(node, pa.int64()), pa.array(reason, pa.string()), pa.array(keeper, pa.int64()),
                     pa.array(np.asarray(distance, np.float64), pa.float64())], schema=DROPS)


def decide_partition(root: str, u: int, settings: Settings) -> dict:
    """The drops decided before the near rule, of the nodes of unit partition u: `eval_contaminated`
    (an exact copy of an eval image, or an edge to one: before any other reason), `duplicate_exact`.
    Its edges whose first node is dropped already are left out (a dropped node is never kept, so it
    drops nothing); the rest go on, by their second node's unit partition."""
    root = as_path(root)
    exact = read_partition(root / "exact_out", u, DROPS)
    a, b, d = _unique_edges(read_partition(root / "edges", u, EDGES))
    to_eval = b >= EVAL   # pairs are (smaller, larger): an eval node is always the second
    # a copy of an eval image: its keeper is the exact copy, else the closest eval image it is near
    exact_eval = exact.filter(pc.equal(exact["reason"], "eval_contaminated"))
    node, keeper, distance = _closest(a[to_eval], b[to_eval], d[to_eval])
    near_eval = _drops(node, np.full(len(node), "eval_contaminated"), keeper, distance)
    near_eval = near_eval.filter(pa.array(~np.isin(near_eval["node"].to_numpy(), exact_eval["node"].to_numpy())))
    contaminated = np.concatenate([exact_eval["node"].to_numpy(), near_eval["node"].to_numpy()])
    others = exact.filter(pa.array(~np.isin(exact["node"].to_numpy(), contaminated)))   # duplicate_exact
    decided = pa.concat_tables([exact_eval, near_eval, others])
    decided = decided.take(pa.array(np.argsort(decided["node"].to_numpy(), kind="stable"), pa.int64()))
    atomic_write_parquet(root / "decided" / f"{u}.parquet", decided)
    web = ~to_eval & ~np.isin(a, decided["node"].to_numpy())
    write_by_unit(root / "free_first" / f"{u}.parquet", pa.table([a[web], b[web], d[web]], schema=EDGES), b[web],
                   settings.partitions)
    return mark(root, "decide", str(u), {"decided": decided.num_rows, "edges": len(a)})


def prune_partition(root: str, v: int, settings: Settings) -> dict:
    """The edges whose second node is in unit partition v, less those whose second node is dropped
    already: what is left is the graph the near rule runs on."""
    root = as_path(root)
    decided = read_parquet(root / "decided" / f"{v}.parquet", columns=["node"])["node"].to_numpy()
    pairs = read_partition(root / "free_first", v, EDGES)
    keep = ~np.isin(pairs["b"].to_numpy(), decided)
    atomic_write_parquet(root / "free" / f"{v}.parquet", pairs.filter(pa.array(keep)))
    return mark(root, "prune", str(v), {"edges": int(keep.sum())})


def near_resolve(root: str, unit: int, settings: Settings) -> dict:
    """(one task) The greedy near rule over the edges between nodes not dropped already, its drops (with
    the kept node each copies) by unit partition. Holds only those edges, as arrays (24 bytes an edge)."""
    root = as_path(root)
    edges = read_table(root / "free", EDGES)
    near, keeper, distance = greedy_keepers(edges["a"].to_numpy(), edges["b"].to_numpy(), edges["distance"].to_numpy())
    write_by_unit(root / "near" / "all.parquet", _drops(near, np.full(len(near), "duplicate_near"), keeper, distance),
                   near, settings.partitions)
    return mark(root, "near", "all", {"near": len(near), "near_graph_edges": edges.num_rows})


def greedy_drops(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The nodes the greedy rule drops over edges a < b (greedy_keepers without the keepers)."""
    return greedy_keepers(a, b, np.zeros(len(a), np.float32))[0]


def greedy_keepers(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dropped nodes, the kept node each copies, the distance) of the greedy rule over edges a < b of
    distance d: in node order, a node is dropped if a smaller node it copies was kept; its keeper is the
    closest kept one (the smaller on a tie). Decided in rounds, as arrays: a node whose sources are all
    decided is dropped if one was kept, else kept; each round drops the edges into decided nodes, so a
    chain of copies costs rounds, a clique two."""
    if not len(a):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    nodes, index = np.unique(np.concatenate([a, b]), return_inverse=True)
    src, dst = index[:len(a)], index[len(a):]
    order = np.argsort(dst, kind="stable")   # edges grouped by their second node
    src, dst, dist = src[order], dst[order], np.asarray(d, np.float64)[order]
    state = np.ones(len(nodes), np.int8)      # 1 kept, 2 dropped, 0 undecided: nodes with a source
    state[dst] = 0
    found = []                                # (dropped, keeper, distance) of the edges from a kept source
    while len(dst):
        first = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
        sources = state[src]
        any_kept = np.maximum.reduceat((sources == 1).astype(np.int8), first).astype(bool)
        any_open = np.maximum.reduceat((sources == 0).astype(np.int8), first).astype(bool)
        target = dst[first]
        by_kept = (sources == 1) & np.repeat(any_kept, np.diff(np.r_[first, len(dst)]))
        found.append((dst[by_kept], src[by_kept], dist[by_kept]))
        state[target[any_kept]] = 2
        state[target[~any_kept & ~any_open]] = 1
        still = state[dst] == 0
        src, dst, dist = src[still], dst[still], dist[still]
    dropped, keeper, distance = _closest(*(np.concatenate(col) for col in zip(*found)))
    return nodes[dropped], nodes[keeper], distance
