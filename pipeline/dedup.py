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
resumed stage redoes only the units without one):
  scan    per shard: rule verdicts and signatures (`scan/`), rows hashed into P partitions: the
          original bytes' sha256 (`exact/`), one row per LSH key with the whole SimHash (`band/`), the
          signatures by node (`sig/`);
  exact   per partition: groups of equal hashes -> drops;
  band    per partition: the nodes sharing a key; pairs whose SimHashes differ in at most
          MAX_SIMHASH_BITS bits (bench/dedup.py: verified copies differ in at most 17 of 128) go on,
          partitioned by their first node; pairs of blanks are decided here from their aspect and
          colour; a bucket over BUCKET_CAP nodes is cut into runs of BUCKET_CAP in node order
          (counted: `buckets_cut`), so a bucket costs at most BUCKET_CAP^2/2 pair tests per run, and
          each node keeps its first PAIRS_PER_NODE partners before it (`pairs_left_out`): a clique of
          copies gives O(m), not O(m^2), pairs to verify;
  join    per partition: each pair gets its first node's signature, repartitioned by its second node;
  verify  per partition: with the second node's signature, pipeline/data/neardup.py verifies -> edges;
  resolve one task: the drops of `exact` and the edges, in node order -> decisions per shard.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.data import neardup
from pipeline.fsutil import atomic_write_json, atomic_write_parquet, read_json, read_parquet
from pipeline.parallel import Progress, run_shard_tasks
from pipeline.storage import as_path

log = logging.getLogger("vlp")
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


def _read(folder: Path, schema: pa.Schema | None = None) -> pa.Table:
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

def write_partitions(root: Path, unit: str, nodes: np.ndarray, exact: list[str | None], sigs: list[bytes | None],
                     settings: Settings) -> None:
    """Hash a shard's (or an eval shard's) kept samples (those with an `exact` hash) into the exact,
    band and sig partitions."""
    P = settings.partitions
    keep = np.array([e is not None for e in exact], bool)
    rows = np.flatnonzero(keep)
    nodes = nodes[rows]
    exact_col = pa.array([exact[i] for i in rows], pa.string())
    sig_col = pa.array([sigs[i] for i in rows], pa.binary())
    where = partition_of(np.array([int(exact[i][:15], 16) for i in rows], np.int64), P)
    if settings.searches_near:
        with_sig = np.array([i for i, r in enumerate(rows) if sigs[r] is not None], np.int64)
        hashed = neardup.lsh_many([sigs[rows[i]] for i in with_sig])
        counts = np.array([len(keys) for keys, _ in hashed], np.int64)
        owner = np.repeat(with_sig, counts)    # the row (of `rows`) each key belongs to
        band_keys = np.fromiter((k for keys, _ in hashed for k in keys), np.int64, count=int(counts.sum()))
        simhash = pa.array([h for _, h in hashed], pa.binary(neardup.SIMHASH_BYTES)).take(np.repeat(np.arange(len(hashed)), counts))
        band_where = partition_of(band_keys, P)
        sig_where = partition_of(nodes, P)
    for p in range(P):
        mine = np.flatnonzero(where == p)
        atomic_write_parquet(root / "exact" / str(p) / f"{unit}.parquet", pa.table({"exact": exact_col.take(mine), "node": nodes[mine]}))
        if settings.searches_near:
            picked = np.flatnonzero(band_where == p)
            atomic_write_parquet(root / "band" / str(p) / f"{unit}.parquet", pa.table(
                {"key": band_keys[picked], "node": nodes[owner[picked]], "simhash": simhash.take(picked)}))
            mine = np.flatnonzero(sig_where == p)
            atomic_write_parquet(root / "sig" / str(p) / f"{unit}.parquet", pa.table({"node": nodes[mine], "signature": sig_col.take(mine)}))


# --- exact -------------------------------------------------------------------------------------------

def exact_partition(root: str, p: int, settings: Settings) -> dict:
    root = as_path(root)
    table = _read(root / "exact" / str(p))
    drops = {"node": [], "reason": []}
    if table.num_rows:
        groups = pc.dictionary_encode(table["exact"]).combine_chunks().indices.to_numpy()
        nodes = table["node"].to_numpy()
        order = np.lexsort((nodes, groups))
        groups, nodes = groups[order], nodes[order]
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(nodes)]):
            members = nodes[start:stop]
            web = members[members < EVAL]
            if len(web) == 0:
                continue
            if settings.decontaminate and len(web) < len(members):
                drops["node"] += web.tolist()
                drops["reason"] += ["eval_contaminated"] * len(web)
            elif settings.exact and len(web) > 1:
                drops["node"] += web[1:].tolist()
                drops["reason"] += ["duplicate_exact"] * (len(web) - 1)
    atomic_write_parquet(root / "exact_out" / f"{p}.parquet", pa.table({"node": pa.array(drops["node"], pa.int64()),
                                                           "reason": pa.array(drops["reason"], pa.string())}))
    return mark(root, "exact", str(p), {"drops": len(drops["node"])})


# --- band join ---------------------------------------------------------------------------------------

def band_partition(root: str, p: int, settings: Settings) -> dict:
    """Candidate pairs (first < second node) of the nodes sharing an LSH key in partition p. Pairs of
    blanks are decided here (their hashes hold all the rule needs): they go straight to the edges."""
    root = as_path(root)
    table = _read(root / "band" / str(p))
    found = {"pairs": ([], []), "blank": ([], [])}
    cut = left_out = 0
    if table.num_rows:
        keys, nodes = table["key"].to_numpy(), table["node"].to_numpy()
        hashes = np.frombuffer(b"".join(table["simhash"].to_pylist()), np.uint8).reshape(-1, neardup.SIMHASH_BYTES)
        order = np.lexsort((nodes, keys))
        keys, nodes, hashes = keys[order], nodes[order], hashes[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        stops = np.r_[starts[1:], len(keys)]
        blank_key = (keys >> neardup.BAND_BITS) >= neardup.BANDS   # blanks are keyed by colour
        size = np.repeat(stops - starts, stops - starts)
        small = ~blank_key & (size <= PAIRS_PER_NODE + 1)   # where the per-node cap cannot bind
        a, b = _small_bucket_pairs(keys, nodes, hashes, small, settings)
        found["pairs"][0].append(a)
        found["pairs"][1].append(b)
        many = (stops - starts > 1) & ~small[starts]
        for start, stop in zip(starts[many], stops[many]):
            cut += stop - start > BUCKET_CAP
            blank = (int(keys[start]) >> neardup.BAND_BITS) >= neardup.BANDS   # blanks: keyed by colour
            for run in range(start, stop, BUCKET_CAP):
                end = min(stop, run + BUCKET_CAP)
                a, b, over = _bucket_pairs(nodes[run:end], hashes[run:end], blank, settings)
                found["blank" if blank else "pairs"][0].append(a)
                found["blank" if blank else "pairs"][1].append(b)
                left_out += over
    (a, b), (ba, bb) = (_unique_pairs(*found[k]) for k in ("pairs", "blank"))
    where = partition_of(a, settings.partitions)
    for q in range(settings.partitions):
        rows = where == q
        atomic_write_parquet(root / "pairs_a" / str(q) / f"{p}.parquet", pa.table({"a": a[rows], "b": b[rows]}))
    atomic_write_parquet(root / "edges" / f"blank-{p}.parquet", pa.table({"a": ba, "b": bb}))
    return mark(root, "band", str(p), {"pairs": int(len(a)), "blank_edges": int(len(ba)), "buckets_cut": int(cut),
                                        "pairs_left_out": left_out})


def _unique_pairs(firsts: list[np.ndarray], seconds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (a pair sharing several keys is found once per key)."""
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _small_bucket_pairs(keys: np.ndarray, nodes: np.ndarray, hashes: np.ndarray, small: np.ndarray,
                        settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Every pair worth verifying of the buckets of at most PAIRS_PER_NODE + 1 nodes (rows sorted by key,
    then node), at once: for each offset d, row r pairs with row r + d of the same key."""
    words = hashes.view(np.uint64)
    firsts, seconds = [], []
    for d in range(1, PAIRS_PER_NODE + 1):
        i = np.flatnonzero(small[:-d] & (keys[:-d] == keys[d:]))
        if len(i) == 0:
            break
        j = i + d
        keep = _wanted(nodes[i], nodes[j], settings)
        keep &= np.bitwise_count(words[i] ^ words[j]).sum(axis=1) <= MAX_SIMHASH_BITS
        firsts.append(nodes[i[keep]])
        seconds.append(nodes[j[keep]])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def _bucket_pairs(nodes: np.ndarray, hashes: np.ndarray, blank: bool, settings: Settings):
    """Pairs (i < j in node order) of one bucket: for blanks, those that are copies; else those whose
    SimHashes are close enough to be worth verifying. Never two eval images; for each node, only its
    first PAIRS_PER_NODE partners before it (a clique of m copies would be m^2/2 pairs, and the greedy
    rule needs only one kept partner). Returns (firsts, seconds, pairs left out)."""
    if blank:
        return _blank_pairs(nodes, hashes, settings)
    i, j = np.triu_indices(len(nodes), k=1)
    keep = _wanted(nodes[i], nodes[j], settings)
    words = hashes.view(np.uint64)
    keep &= np.bitwise_count(words[i] ^ words[j]).sum(axis=1) <= MAX_SIMHASH_BITS
    return _first_partners(nodes, i[keep], j[keep], PAIRS_PER_NODE)


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

def join_partition(root: str, q: int, settings: Settings) -> dict:
    """Pairs whose first node hashes to q, with its signature, sent on to their second node's partition."""
    root = as_path(root)
    pairs = _read(root / "pairs_a" / str(q), pa.schema([("a", pa.int64()), ("b", pa.int64())]))
    pairs = pairs.group_by(["a", "b"]).aggregate([])   # a pair found by several bands is verified once
    sigs = _read(root / "sig" / str(q), pa.schema([("node", pa.int64()), ("signature", pa.binary())]))
    joined = pairs.join(sigs.rename_columns(["a", "sig_a"]), "a", join_type="inner")
    where = partition_of(joined["b"].to_numpy(), settings.partitions)
    for r in range(settings.partitions):
        atomic_write_parquet(root / "pairs_b" / str(r) / f"{q}.parquet", joined.filter(pa.array(where == r)))
    return mark(root, "join", str(q), {"pairs": joined.num_rows})


def verify_partition(root: str, r: int, settings: Settings) -> dict:
    """Verified near copies among the pairs whose second node hashes to r: edges/<r>.parquet."""
    root = as_path(root)
    pairs = _read(root / "pairs_b" / str(r))
    sigs = _read(root / "sig" / str(r), pa.schema([("node", pa.int64()), ("signature", pa.binary())]))
    edges = {"a": [], "b": []}
    if pairs.num_rows:
        joined = pairs.join(sigs.rename_columns(["b", "sig_b"]), "b", join_type="inner")
        # equal signatures (the same pixels in other bytes) are copies: only images with keys get here
        same = pc.equal(joined["sig_a"], joined["sig_b"]).to_numpy(zero_copy_only=False)
        edges["a"] += joined["a"].to_numpy()[same].tolist()
        edges["b"] += joined["b"].to_numpy()[same].tolist()
        joined = joined.filter(pa.array(~same))
        decoded: dict[int, neardup.Signature] = {}

        def signature(node: int, raw: bytes) -> neardup.Signature:
            if node not in decoded:
                decoded[node] = neardup.decode(raw)
            return decoded[node]

        for a, b, sig_a, sig_b in zip(*(joined[c].to_pylist() for c in ("a", "b", "sig_a", "sig_b"))):
            limit = settings.decontaminate_max_distance if b >= EVAL else settings.near_max_distance
            if neardup.near_copy_distance(signature(a, sig_a), signature(b, sig_b), limit) is not None:
                edges["a"].append(a)
                edges["b"].append(b)
    atomic_write_parquet(root / "edges" / f"{r}.parquet", pa.table({"a": pa.array(edges["a"], pa.int64()),
                                                       "b": pa.array(edges["b"], pa.int64())}))
    return mark(root, "verify", str(r), {"edges": len(edges["a"])})


# --- resolve ------------------------------------------------------------------------------------------

def resolve(root: str, unit: int, shards: int) -> dict:
    """(one task) The drops of every phase, in node order, written per shard: decisions/<index>.parquet."""
    root = as_path(root)
    exact = _read(root / "exact_out", pa.schema([("node", pa.int64()), ("reason", pa.string())]))
    reason = dict(zip(exact["node"].to_pylist(), exact["reason"].to_pylist()))
    edges = _read(root / "edges", pa.schema([("a", pa.int64()), ("b", pa.int64())]))
    a, b = _unique_pairs([edges["a"].to_numpy()], [edges["b"].to_numpy()])
    to_eval = b >= EVAL   # pairs are (smaller, larger): an eval node is always the second
    for node in np.unique(a[to_eval]).tolist():
        reason[node] = "eval_contaminated"   # before any exact or near duplicate: the order of the rules
    web = ~to_eval
    a, b = a[web], b[web]
    # greedy in node order: b is dropped if a smaller node it copies was kept
    order = np.lexsort((a, b))
    a, b = a[order], b[order]
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]]) if len(b) else np.zeros(0, np.int64)
    sources = {int(b[s]): a[s:e].tolist() for s, e in zip(starts, np.r_[starts[1:], len(b)])}
    kept: set[int] = set()
    near = 0
    for node in np.unique(np.concatenate([a, b])).tolist():
        if node in reason:
            continue
        if any(x in kept for x in sources.get(node, ())):
            reason[node] = "duplicate_near"
            near += 1
        else:
            kept.add(node)
    dropped = np.array(sorted(reason), np.int64)
    bounds = np.searchsorted(dropped >> 32, np.arange(shards + 1))   # sorted: each shard's drops are a run
    for index in range(shards):
        mine = dropped[bounds[index]:bounds[index + 1]]
        atomic_write_parquet(root / "decisions" / f"{index}.parquet",
               pa.table({"node": mine, "reason": pa.array([reason[int(n)] for n in mine], pa.string())}))
    summary = {"dropped": len(reason), "near": near, "edges": int(len(a)) + int(to_eval.sum())}
    return mark(root, "resolve", "all", summary)


def decisions_of(root: Path, index: int) -> dict[int, str]:
    table = read_parquet(root / "decisions" / f"{index}.parquet")
    return dict(zip(table["node"].to_pylist(), table["reason"].to_pylist()))


# --- the driver's side ------------------------------------------------------------------------------

def run_phases(root: Path, shards: int, settings: Settings, options: dict) -> dict:
    """Run exact, band, join, verify and resolve (the scans are done); returns their summaries."""
    P = settings.partitions
    summary: dict = {"partitions": P}

    seconds: dict[str, float] = {}

    def phase(name: str, fn, units: list[int], *args) -> list[dict]:
        started = time.perf_counter()
        done = {u: read_json(done_marker(root, name, str(u))) for u in units if done_marker(root, name, str(u)).is_file()}
        todo = {str(u): (str(root), u, *args) for u in units if u not in done}
        got = run_shard_tasks(ray.remote(fn).options(**options), todo, Progress(f"prefilter/{name}", len(units), 0),
                              lambda s: 0) if todo else {}
        seconds[name] = round(time.perf_counter() - started, 2)
        return list(done.values()) + list(got.values())

    summary["exact_drops"] = sum(s["drops"] for s in phase("exact", exact_partition, list(range(P)), settings))
    if settings.searches_near:
        bands = phase("band", band_partition, list(range(P)), settings)
        summary["candidate_pairs"] = sum(s["pairs"] for s in bands)
        summary["blank_edges"] = sum(s["blank_edges"] for s in bands)
        summary["buckets_cut"] = sum(s["buckets_cut"] for s in bands)
        summary["pairs_left_out"] = sum(s["pairs_left_out"] for s in bands)
        phase("join", join_partition, list(range(P)), settings)
        summary["edges"] = sum(s["edges"] for s in phase("verify", verify_partition, list(range(P)), settings))
    summary |= phase("resolve", resolve, [0], shards)[0]
    summary["seconds"] = seconds
    log.info("prefilter: dedup over %d partitions: %s", P, json.dumps(summary))
    return summary


def load_settings(root: Path, settings: Settings) -> Settings:
    """The settings this dedup folder was started with (the partition count must not change mid-way)."""
    path = root / "settings.json"
    if path.is_file():
        return Settings(**read_json(path))
    atomic_write_json(path, dataclasses.asdict(settings))
    return settings
