"""Dedup's resolve (pipeline/dedup.py's last phases): from the exact drops and the edges, each written
by the partition of its first node's shard, to the decisions per shard. Per partition, *decide* and
*prune* leave out every edge that touches a node dropped already (eval_contaminated, duplicate_exact);
one *near* task runs the greedy rule over the edges left, as arrays; every drop keeps the node it copies
(its keeper) and the distance; *drops* asks the keepers' partitions for their names, *names* reads them
from the keepers' scan files, *decisions* writes a file per shard.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dedup import (
    DECISIONS,
    DROPS,
    EDGES,
    EVAL,
    Settings,
    mark,
    partition_of,
    read_columns,
    read_table,
    unit_of,
    unit_partition,
    write_by_unit,
)
from pipeline.fsutil import (
    atomic_write_parquet,
    atomic_write_row_groups,
    read_parquet,
    read_partition,
    read_row_group,
    rows_by_partition,
)
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
    atomic_write_row_groups(root / "wanted" / f"{u}.parquet", [
        pa.table([keepers[rows]], schema=KEEPERS) for rows in rows_by_partition(unit_partition(keepers, settings.partitions),
                                                                                 settings.partitions)], KEEPERS)
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
