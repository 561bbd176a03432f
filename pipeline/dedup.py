"""Deduplication as shuffles: exact and near copies are found by Ray tasks over partitions of files,
never in the driver, and the decisions do not depend on the number of workers or partitions.

Nodes: a sample is node `shard index << 32 | rank of its key in the shard`, the order prefilter reads
them in; an eval image is `EVAL | eval shard << 32 | position`. Among the samples the rules kept:
  1. `eval_contaminated`: an exact copy, or a near copy within `decontaminate_max_distance`, of an eval
     image;
  2. `duplicate_exact`: the same original bytes as a smaller node not contaminated (the smallest node
     of each group of equal bytes is kept);
  3. `duplicate_near`: of the rest, in node order, a verified near copy (`near_max_distance`) of a
     smaller node that was kept. This is the greedy rule prefilter applied in one pass before; it keeps
     C of a chain A~B~C where A and C are distinct, which "keep the minimum of each connected component"
     would drop.
Phases (a task per unit; each writes its files under `<stage>/dedup/` atomically, then its marker, so a
resumed stage redoes only the units without one). A task that hashes rows into the P partitions of the
next phase writes one file with P row groups (row group p: partition p), not P files: P times fewer
files, fsyncs and, on an object store, PUTs; a partition's task reads its row group of each file.
  scan    per shard: rule verdicts and signatures (`scan/<unit>.parquet`, in node order), rows hashed
          into P partitions: the original bytes' sha256 (`exact/`), one row per LSH key with the whole
          SimHash and a digest of the signature (`band/`);
  exact   per partition: groups of equal hashes -> drops;
  band    per partition: the nodes sharing a key; pairs whose SimHashes differ in at most
          MAX_SIMHASH_BITS bits (bench/dedup.py: verified copies differ in at most 17 of 128) are
          candidates. Candidates with equal signature digests (the same pixels in other bytes) and
          pairs of blanks (decided from their aspect and colour) are edges at once; the rest go on,
          partitioned by their first node's unit. A bucket over BUCKET_CAP nodes is cut into runs of
          BUCKET_CAP in node order (counted: `buckets_cut`), so a bucket costs at most BUCKET_CAP^2/2
          pair tests per run, and each node keeps its first PAIRS_PER_NODE partners before it
          (`pairs_left_out`): a clique of copies gives O(m), not O(m^2), pairs;
  join    per partition: each pair gets its first node's signature from its unit's scan file,
          repartitioned by its second node's unit (signatures never go through the shuffle: only the
          pairs that need the verifier read them);
  verify  per partition: with the second node's signature, pipeline/data/neardup.py verifies -> edges;
          (exact drops and edges are written by the unit partition of their first node: a shard's
          nodes are decided together; the phases below are pipeline/dedupresolve.py, and
          pipeline/dedupphases.py runs them all from the driver)
  decide  per unit partition: eval_contaminated and duplicate_exact; edges from a dropped node left out,
          the rest sent to their second node's unit partition;
  prune   per unit partition: edges into a dropped node left out;
  near    one task: the greedy rule over the edges left (between nodes no other rule dropped), as arrays;
  drops   per unit partition: its shards' drops; the nodes they copy (their keepers) asked of the
          keepers' unit partitions;
  names   per unit partition: the keepers' keys (an eval image's benchmark and item) from their units'
          scan files, answered by the asking partition;
  decisions per unit partition: its shards' drops with their keepers' names, one file each.
Every drop says what it copies: `keeper`, the node kept (duplicate_exact: the first of its group of equal
bytes; duplicate_near: the kept node it copies, the closest if several; eval_contaminated: the eval image,
the closest), and `distance` (near_copy_distance; 0 for equal bytes or pixels).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data import neardup
from pipeline.fsutil import (
    RAW,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_row_groups,
    read_json,
    read_parquet,
    read_partition,
    rows_by_partition,
)
from pipeline.storage import arrow, as_path

EVAL = 1 << 62
MAX_SIMHASH_BITS = 32
BUCKET_CAP = 1024
PAIRS_PER_NODE = 64
BLANK_PAIRS_PER_NODE = 8   # blanks of one colour are (nearly) a clique: their first copy decides
SCAN = pa.schema([("key", pa.string()), ("node", pa.int64()), ("outcome", pa.string()), ("reason", pa.string()),
                  ("error", pa.string()), ("signature", pa.binary())])
_MIX = np.uint64(0x9E3779B97F4A7C15)


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


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    """A partition per non-negative integer value (node, LSH key, hash prefix), by a multiplicative hash."""
    mixed = values.astype(np.uint64) * _MIX
    return ((mixed >> np.uint64(33)) % np.uint64(partitions)).astype(np.int64)


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


# --- scan: the shuffle's map side ------------------------------------------------------------------

EXACT = pa.schema([("exact", pa.string()), ("node", pa.int64())])
BAND = pa.schema([("key", pa.int32()), ("node", pa.int64()), ("h0", pa.uint64()), ("h1", pa.uint64()),
                  ("digest", pa.uint64()), ("head", pa.uint32())])


def unit_of(node: int) -> str:
    """The scan unit whose `scan/<unit>.parquet` holds a node's signature: a shard index or `eval-<i>`."""
    return f"eval-{(node - EVAL) >> 32}" if node >= EVAL else str(node >> 32)


def signature_digests(sigs: list[bytes]) -> np.ndarray:
    """64 bits of SipHash (pandas' C hash, the one URL dedup uses) of each signature: two candidates with
    equal digests have the same signature (the same pixels in other bytes) and are copies without the
    verifier (a false match: ~2^-64 a pair)."""
    values = np.empty(len(sigs), object)
    values[:] = sigs
    return pd.util.hash_array(values, hash_key="vlp-signature-01", categorize=False)


_HEX = np.full(256, -1, np.int64)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def hex_prefix(hashes: pa.Array) -> np.ndarray:
    """The first 15 hex digits (60 bits) of each hash, as integers."""
    digits = _HEX[np.frombuffer("".join(pc.utf8_slice_codeunits(hashes, 0, 15).to_pylist()).encode(), np.uint8)]
    if len(digits) != 15 * len(hashes) or (digits < 0).any():
        raise ValueError("dedup: an exact hash is not a hex digest of at least 15 digits")
    return digits.reshape(-1, 15) @ (np.int64(16) ** np.arange(14, -1, -1, dtype=np.int64))


def write_signatures(root: Path, unit: str, nodes: np.ndarray, sigs: list[bytes | None], items: list[str] | None = None,
                     benchmark: str | None = None) -> None:
    """A unit's scan file with only what the join reads: its nodes (ascending) and their signatures,
    and for an eval unit the name of each image (`items`) and of its benchmark, which a drop it causes
    reports. prefilter's web scan writes the same path with its verdicts and keys too (SCAN)."""
    columns = {"node": nodes, "signature": pa.array(sigs, pa.binary())}
    if items is not None:
        columns |= {"item": pa.array(items, pa.string()), "benchmark": pa.array([benchmark] * len(items), pa.string())}
    atomic_write_parquet(root / "scan" / f"{unit}.parquet", pa.table(columns))


def write_partitions(root: Path, unit: str, nodes: np.ndarray, exact: list[str | None], sigs: list[bytes | None],
                     settings: Settings) -> None:
    """Hash a shard's (or an eval shard's) kept samples (those with an `exact` hash) into the exact and
    band partitions. Their signatures stay in the unit's own scan file (`scan/<unit>.parquet`, node and
    signature columns, written by the caller): only pairs that need the verifier read them."""
    P = settings.partitions
    rows = np.flatnonzero(np.array([e is not None for e in exact], bool))
    exact_col = pa.array([exact[i] for i in rows], pa.string())
    where = partition_of(hex_prefix(exact_col), P)
    atomic_write_row_groups(root / "exact" / f"{unit}.parquet", [
        pa.table([exact_col.take(mine), nodes[rows[mine]]], schema=EXACT) for mine in rows_by_partition(where, P)], EXACT, **RAW)
    if not settings.searches_near:
        return
    with_sig = np.array([i for i in rows if sigs[i] is not None], np.int64)
    picked = [sigs[i] for i in with_sig]
    owner, keys, simhash = neardup.lsh_arrays(neardup.signature_matrix(picked))
    words = simhash.view("<u8")
    digest = signature_digests(picked)
    head = neardup.signature_matrix(picked)[:, :4].copy().view("<u4").ravel() if picked else np.zeros(0, np.uint32)
    tables = []
    for mine in rows_by_partition(partition_of(keys, P), P):
        of = owner[mine]
        tables.append(pa.table([keys[mine].astype(np.int32), nodes[with_sig[of]], words[of, 0], words[of, 1],
                                digest[of], head[of]], schema=BAND))
    atomic_write_row_groups(root / "band" / f"{unit}.parquet", tables, BAND, **RAW)


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
    atomic_write_row_groups(path, [table.take(rows) for rows in rows_by_partition(unit_partition(nodes, partitions), partitions)],
                            table.schema)


# --- exact -------------------------------------------------------------------------------------------

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


# --- band join ---------------------------------------------------------------------------------------

PAIRS = pa.schema([("a", pa.int64()), ("b", pa.int64())])
EDGES = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("distance", pa.float64())])   # verified copies
JOINED = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("sig_a", pa.binary())])


def band_partition(root: str, p: int, settings: Settings) -> dict:
    """Candidate pairs (first < second node) of the nodes sharing an LSH key in partition p. Pairs with
    equal signature digests, and pairs of blanks (their hashes hold all the rule needs), are copies:
    they go straight to the edges; the others go on to be verified, partitioned by their first node."""
    root = as_path(root)
    table = read_partition(root / "band", p, BAND)
    keys, nodes = table["key"].to_numpy(), table["node"].to_numpy()
    order = np.lexsort((nodes, keys))
    keys, nodes = keys[order], nodes[order]
    words = np.stack([table["h0"].to_numpy()[order], table["h1"].to_numpy()[order]], axis=1)
    digest = table["digest"].to_numpy()[order]
    head = table["head"].to_numpy()[order].astype("<u4").view(np.uint8).reshape(-1, 4)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    stops = np.r_[starts[1:], len(keys)]
    blank = (keys[starts] >> neardup.BAND_BITS) >= neardup.BANDS   # blanks are keyed by colour
    cut = int(((stops - starts) > BUCKET_CAP).sum())
    i, j, left_out = _picture_pairs(nodes, words, head, starts[~blank], stops[~blank], settings)
    same = digest[i] == digest[j]
    a, b = _unique_pairs([nodes[i[~same]]], [nodes[j[~same]]])
    firsts, seconds = [nodes[i[same]]], [nodes[j[same]]]
    hashes = words.view(np.uint8)
    for start, stop in zip(starts[blank], stops[blank]):
        for run in range(start, stop, BUCKET_CAP):
            end = min(stop, run + BUCKET_CAP)
            x, y, over = _blank_pairs(nodes[run:end], hashes[run:end], settings)
            firsts.append(x)
            seconds.append(y)
            left_out += over
    ea, eb = _unique_pairs(firsts, seconds)
    # their distance: 0 for the same pixels (their heads are equal too), a blank pair's from the colours
    known, row = np.unique(nodes, return_index=True)
    head_a, head_b = head[row[np.searchsorted(known, ea)]], head[row[np.searchsorted(known, eb)]]
    limit = np.where(eb >= EVAL, settings.decontaminate_max_distance, settings.near_max_distance)
    ed = neardup.blank_distances(head_a, head_b).astype(np.float64) * limit
    atomic_write_row_groups(root / "pairs_a" / f"{p}.parquet", [
        pa.table([a[rows], b[rows]], schema=PAIRS) for rows in rows_by_partition(partition_of(a >> 32, settings.partitions),
                                                                            settings.partitions)], PAIRS)
    write_by_unit(root / "edges" / f"band-{p}.parquet", pa.table([ea, eb, ed], schema=EDGES), ea, settings.partitions)
    return mark(root, "band", str(p), {"pairs": len(a), "copy_edges": len(ea), "buckets_cut": cut,
                                        "pairs_left_out": left_out})


def _unique_pairs(firsts: list[np.ndarray], seconds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (a pair sharing several keys is found once per key)."""
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    return a[first], b[first]


def _picture_pairs(nodes: np.ndarray, words: np.ndarray, head: np.ndarray, starts: np.ndarray, stops: np.ndarray,
                   settings: Settings) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows i, rows j, pairs left out) of the picture buckets [starts, stops) of the sorted rows: the
    pairs worth verifying, whose SimHashes differ in at most MAX_SIMHASH_BITS bits and whose aspect and
    mean colour (`head`) the verifier would not reject at once (neardup.headers_agree). A bucket over
    BUCKET_CAP nodes is cut into runs of BUCKET_CAP in node order, so a bucket costs at most
    BUCKET_CAP^2/2 tests a run; each node keeps its first PAIRS_PER_NODE partners before it in its run."""
    size = stops - starts
    runs = np.repeat(np.arange(len(starts)), -(-size // BUCKET_CAP))   # the bucket of each run
    first_run = np.repeat(np.cumsum(-(-size // BUCKET_CAP)) - -(-size // BUCKET_CAP), -(-size // BUCKET_CAP))
    run_start = starts[runs] + (np.arange(len(runs)) - first_run) * BUCKET_CAP
    run_size = np.minimum(stops[runs] - run_start, BUCKET_CAP)
    found_i, found_j = [], []
    for i, j in _close_pairs(words, run_start[run_size > 1], run_size[run_size > 1]):
        agree = neardup.headers_agree(head[i], head[j]) & _wanted(nodes[i], nodes[j], settings)
        found_i.append(i[agree])
        found_j.append(j[agree])
    i = np.concatenate(found_i) if found_i else np.zeros(0, np.int64)
    j = np.concatenate(found_j) if found_j else np.zeros(0, np.int64)
    return _first_partners(np.arange(len(nodes)), i, j, PAIRS_PER_NODE)   # rows, not nodes (a row is in one run)


BLOCK_PAIRS = 1 << 18   # pair tests per array operation in _close_pairs (~2 MB temporaries: in cache)


def _close_pairs(words: np.ndarray, run_start: np.ndarray, run_size: np.ndarray):
    """Yield (rows i, rows j), i < j in one run, whose SimHashes (`words`: two uint64 a row) differ in
    at most MAX_SIMHASH_BITS bits. Runs of the same size n are stacked and each tested as a whole n x n
    block by broadcasting, the upper triangle kept: no gathers of index pairs, one array operation for
    many runs (~5 ns a pair on this machine against ~9-40 ns for the n(n-1)/2 pairs gathered by index,
    slower the bigger n). A run too big for one block is tested in bands of rows against the rows after
    them."""
    for n in np.unique(run_size).tolist():
        mine = run_start[run_size == n]
        if n * n <= BLOCK_PAIRS:
            upper = np.triu(np.ones((n, n), bool), k=1)
            step = BLOCK_PAIRS // (n * n)
            for lo in range(0, len(mine), step):
                rows = mine[lo:lo + step, None] + np.arange(n)[None, :]
                hit = np.flatnonzero(_close(words[rows], words[rows]) & upper)   # flat: nonzero's 3-d index is slow
                block, i, j = hit // (n * n), hit // n % n, hit % n
                yield rows[block, i], rows[block, j]
            continue
        band = max(1, BLOCK_PAIRS // n)
        for start in mine.tolist():
            for lo in range(0, n - 1, band):
                first = np.arange(start + lo, start + min(n, lo + band))      # a band of rows ...
                later = np.arange(first[0], start + n)                       # ... against itself and the rest
                hit = np.flatnonzero(_close(words[first][None], words[later][None])[0]
                                     & (later[None, :] > first[:, None]))
                yield first[hit // len(later)], later[hit % len(later)]


def _close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, n, m) whether row i of a[k] and row j of b[k] (each (B, rows, 2) uint64) are within
    MAX_SIMHASH_BITS bits."""
    diff = np.bitwise_count(a[:, :, None, 0] ^ b[:, None, :, 0])
    diff += np.bitwise_count(a[:, :, None, 1] ^ b[:, None, :, 1])
    return diff <= MAX_SIMHASH_BITS


def _wanted(first: np.ndarray, second: np.ndarray, settings: Settings) -> np.ndarray:
    against_eval = second >= EVAL   # nodes are sorted: an eval node is always the second
    return ((against_eval & settings.decontaminate) | (~against_eval & settings.near)) & (first < EVAL)


def _first_partners(nodes: np.ndarray, i: np.ndarray, j: np.ndarray, limit: int):
    order = np.lexsort((i, j))   # by second node, then first: rank each node's partners
    i, j = i[order], j[order]
    starts = np.flatnonzero(np.r_[True, j[1:] != j[:-1]]) if len(j) else np.zeros(0, np.int64)
    rank = np.arange(len(j)) - np.repeat(starts, np.diff(np.r_[starts, len(j)]))
    first = rank < limit
    return nodes[i[first]], nodes[j[first]], int((~first).sum())


def _blank_pairs(nodes: np.ndarray, hashes: np.ndarray, settings: Settings):
    """A blank bucket by its distinct colours: blanks of one aspect and colour are copies of each other,
    so only the colours are compared pairwise; each node's partners are the first
    BLANK_PAIRS_PER_NODE nodes before it among the colours that copy its own."""
    colours, group = np.unique(hashes[:, :4], axis=0, return_inverse=True)
    group = group.ravel()
    gi, gj = np.meshgrid(np.arange(len(colours)), np.arange(len(colours)), indexing="ij")
    copies = neardup.blank_copies(colours[gi.ravel()], colours[gj.ravel()]).reshape(len(colours), len(colours))
    firsts, seconds, left_out = [], [], 0
    for g in range(len(colours)):
        union = np.flatnonzero(copies[g][group])   # positions of the copies of colour g (nodes are sorted)
        pool = union[:BLANK_PAIRS_PER_NODE + 1]
        mine = np.flatnonzero(group == g)
        left_out += int(np.maximum(np.searchsorted(union, mine) - BLANK_PAIRS_PER_NODE, 0).sum())
        i, j = np.meshgrid(pool, mine, indexing="ij")
        i, j = i.ravel(), j.ravel()
        keep = (i < j) & _wanted(nodes[i], nodes[j], settings)
        a, b, _ = _first_partners(nodes, i[keep], j[keep], BLANK_PAIRS_PER_NODE)
        firsts.append(a)
        seconds.append(b)
    return np.concatenate(firsts), np.concatenate(seconds), left_out


# --- join and verify -----------------------------------------------------------------------------------

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
    a, b = _unique_pairs([pairs["a"].to_numpy()], [pairs["b"].to_numpy()])   # found by several bands
    joined = pa.table([a, b, _signatures_of(root, a)], schema=JOINED)
    atomic_write_row_groups(root / "pairs_b" / f"{q}.parquet", [
        joined.take(rows) for rows in rows_by_partition(partition_of(b >> 32, settings.partitions), settings.partitions)],
        JOINED)
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
