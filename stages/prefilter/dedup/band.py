"""The band phase: per partition, the nodes sharing an LSH key become candidate pairs (bounded per
bucket and per node); equal digests and blank pairs are copies at once, the rest go to the verifier."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.data import neardup
from stages.prefilter.dedup.common import BAND, EDGES, EVAL, PAIRS, Settings, mark, write_by_unit
from pipeline.shuffle import partition_of, read_partition, write_partitioned
from pipeline.storage import as_path


MAX_SIMHASH_BITS = 32


BUCKET_CAP = 1024


PAIRS_PER_NODE = 64


BLANK_PAIRS_PER_NODE = 8   # blanks of one colour are (nearly) a clique: their first copy decides


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
    a, b = unique_pairs([nodes[i[~same]]], [nodes[j[~same]]])
    firsts, seconds = [nodes[i[same]]], [nodes[j[same]]]
    hashes = words.view(np.uint8)
    for start, stop in zip(starts[blank], stops[blank]):
        for run in range(start, stop, BUCKET_CAP):
            end = min(stop, run + BUCKET_CAP)
            x, y, over = _blank_pairs(nodes[run:end], hashes[run:end], settings)
            firsts.append(x)
            seconds.append(y)
            left_out += over
    ea, eb = unique_pairs(firsts, seconds)
    # their distance: 0 for the same pixels (their heads are equal too), a blank pair's from the colours
    known, row = np.unique(nodes, return_index=True)
    head_a, head_b = head[row[np.searchsorted(known, ea)]], head[row[np.searchsorted(known, eb)]]
    limit = np.where(eb >= EVAL, settings.decontaminate_max_distance, settings.near_max_distance)
    ed = neardup.blank_distances(head_a, head_b).astype(np.float64) * limit
    write_partitioned(root / "pairs_a" / f"{p}.parquet", pa.table([a, b], schema=PAIRS),
                      partition_of(a >> 32, settings.partitions), settings.partitions, raw=False)
    write_by_unit(root / "edges" / f"band-{p}.parquet", pa.table([ea, eb, ed], schema=EDGES), ea, settings.partitions)
    return mark(root, "band", str(p), {"pairs": len(a), "copy_edges": len(ea), "buckets_cut": cut,
                                        "pairs_left_out": left_out})


def unique_pairs(firsts: list[np.ndarray], seconds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
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
