"""The join and verify phases: each candidate pair gets both signatures (from their units' scan files,
never through the shuffle) and pipeline/data/neardup.py verifies it -> edges."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import neardup
from stages.prefilter.dedup.band import unique_pairs
from stages.prefilter.dedup.common import EDGES, EVAL, JOINED, PAIRS, Settings, mark, unit_of, write_by_unit
from pipeline.fsutil import read_parquet
from pipeline.shuffle import partition_of, read_partition, write_partitioned
from pipeline.storage import as_path


def _signatures_of(root: Path, nodes: np.ndarray) -> pa.Array:
    """The signatures of `nodes`, in their order, from their units' scan files (one read per unit)."""
    out = np.empty(len(nodes), object)
    units = nodes >> 32
    for unit in np.unique(units).tolist():
        mine = np.flatnonzero(units == unit)
        table = read_parquet(root / "scan" / f"{unit_of(int(nodes[mine[0]]))}.parquet", columns=["node", "signature"])
        rows = np.searchsorted(table["node"].to_numpy(), nodes[mine])   # a scan file is in node order
        out[mine] = table["signature"].take(rows).to_pylist()
    return pa.array(out.tolist(), pa.binary())


def join_partition(root: str, q: int, settings: Settings) -> dict:
    """Pairs whose first node's unit hashes to q, with its signature, sent on to their second node's."""
    root = as_path(root)
    pairs = read_partition(root / "pairs_a", q, PAIRS)
    a, b = unique_pairs([pairs["a"].to_numpy()], [pairs["b"].to_numpy()])   # found by several bands
    joined = pa.table([a, b, _signatures_of(root, a)], schema=JOINED)
    write_partitioned(root / "pairs_b" / f"{q}.parquet", joined, partition_of(b >> 32, settings.partitions),
                      settings.partitions, raw=False)
    return mark(root, "join", str(q), {"pairs": joined.num_rows})


def verify_partition(root: str, r: int, settings: Settings) -> dict:
    """Verified near copies among the pairs whose second node's unit hashes to r: edges/<r>.parquet."""
    root = as_path(root)
    pairs = read_partition(root / "pairs_b", r, JOINED)
    edges = {"a": [], "b": [], "distance": []}
    decoded: dict[int, neardup.Signature] = {}

    def signature(node: int, raw: bytes) -> neardup.Signature:
        if node not in decoded:
            decoded[node] = neardup.decode(raw)
        return decoded[node]

    sig_b = _signatures_of(root, pairs["b"].to_numpy()).to_pylist()
    for a, b, sig_a, raw_b in zip(pairs["a"].to_pylist(), pairs["b"].to_pylist(), pairs["sig_a"].to_pylist(), sig_b):
        limit = settings.decontaminate_max_distance if b >= EVAL else settings.near_max_distance
        distance = neardup.near_copy_distance(signature(a, sig_a), signature(b, raw_b), limit)
        if distance is not None:
            edges["a"].append(a)
            edges["b"].append(b)
            edges["distance"].append(distance)
    a = np.array(edges["a"], np.int64)
    write_by_unit(root / "edges" / f"{r}.parquet", pa.table([a, np.array(edges["b"], np.int64),
                                                              np.array(edges["distance"], np.float64)], schema=EDGES),
                   a, settings.partitions)
    return mark(root, "verify", str(r), {"edges": len(edges["a"])})
