"""URL dedup before download, as a shuffle: each URL is fetched once, whichever lists repeat it.

Web lists repeat URLs (LAION-400M's parquet parts overlap; CC12M repeats a CDN's placeholder), and
fetching one twice costs the host a request and the run a duplicate that image dedup must catch later.
The planning task of each list (listplan.py) also writes, per row, a 128-bit hash of its URL (as written,
surrounding whitespace trimmed) and its node, `list << 40 | source_row` (list order, then row order), into
P partitions by hash (one file per batch, a row group per partition). One task per partition finds the
rows whose URL an earlier node has; one task merges those (few) rows, sorted by node, into
`inputs/duplicate-urls.parquet` with the key of the row that is fetched. A download task reads the rows of its node range (row-group statistics skip the rest)
and drops them as `duplicate_url` without fetching. The decisions depend on neither P nor the workers.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.fsutil import atomic_write_parquet, read_parquet
from pipeline.shuffle import partition_of, read_partition, write_partitioned
from pipeline.storage import as_path

NODE_BITS = 40                       # rows per list: up to 10^12
DUPLICATES = "duplicate-urls.parquet"
HASHES, FOUND = "url-hashes", "url-duplicates"
_KEYS = ("vlp-url-hash-one", "vlp-url-hash-two")   # two 64-bit SipHash keys: a 128-bit hash
LIST_BYTES_PER_PARTITION = 64 << 20


def partitions_for(list_bytes: int) -> int:
    """About one partition per 64 MB of list (~0.5-2M rows), at least 2 (so the shuffle always runs)."""
    return max(2, min(1024, math.ceil(list_bytes / LIST_BYTES_PER_PARTITION)))


def url_hashes(urls: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(h1, h2): 128 bits of SipHash of each URL, whitespace trimmed; a missing URL hashes as ''."""
    # As bytes, not str: the same hash (SipHash of the UTF-8), without decoding every URL into a Python
    # str and encoding it again per key (~3x faster)
    values = pc.fill_null(pc.utf8_trim_whitespace(urls), "").cast(pa.binary()).to_numpy(zero_copy_only=False)
    return tuple(pd.util.hash_array(values, hash_key=k, categorize=False) for k in _KEYS)


HASH_SCHEMA = pa.schema([("h1", pa.uint64()), ("h2", pa.uint64()), ("node", pa.int64())])


def write_hash_partitions(folder: Path, list_index: int, urls: pa.Array | pa.ChunkedArray, rows: np.ndarray, partitions: int,
                          part: int) -> None:
    """(planning task) One batch's URL hashes into `folder/url-hashes/<list>-<part>.parquet`, row group p
    holding partition p: one file (one fsync, one PUT on an object store) per batch, not one per partition."""
    h1, h2 = url_hashes(urls)
    nodes = (np.int64(list_index) << NODE_BITS) | rows.astype(np.int64)
    write_partitioned(folder / HASHES / f"{list_index:04d}-{part:06d}.parquet", pa.table([h1, h2, nodes], schema=HASH_SCHEMA),
                      partition_of(h1, partitions), partitions)


def find_duplicates(folder: str, p: int) -> int:
    """(Ray task) The rows of partition p whose URL a smaller node has: (node, first node), to
    `url-duplicates/<p>.parquet`. Returns how many."""
    folder = as_path(folder)
    table = read_partition(folder / HASHES, p, HASH_SCHEMA)
    node, first = np.empty(0, np.int64), np.empty(0, np.int64)
    if table.num_rows:
        h1, h2, nodes = (table[c].to_numpy() for c in ("h1", "h2", "node"))
        # Only rows sharing their first 64 bits with another can repeat a URL (a few percent): find them
        # with one plain sort, then order just those by (hash, node).
        order = np.argsort(h1)
        s1 = h1[order]
        same = s1[1:] == s1[:-1]
        shared = order[np.r_[same, False] | np.r_[False, same]]
        h1, h2, nodes = h1[shared], h2[shared], nodes[shared]
        order = np.lexsort((nodes, h2, h1))
        h1, h2, nodes = h1[order], h2[order], nodes[order]
        new = np.r_[True, (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])] if len(nodes) else np.empty(0, bool)
        group_first = nodes[np.flatnonzero(new)][np.cumsum(new) - 1]
        dup = ~new
        node, first = nodes[dup], group_first[dup]
    atomic_write_parquet(folder / FOUND / f"{p}.parquet", pa.table({"node": node, "first": first}))
    return len(node)


def merge_duplicates(folder: str, partitions: int, list_first_shard: list[int], samples_per_shard: int) -> int:
    """(Ray task) All partitions' duplicates in one file sorted by node, each with the sample key of the
    row that is fetched (`first_key`); returns how many rows are duplicates."""
    from pipeline.data.shards import sample_key

    folder = as_path(folder)
    table = pa.concat_tables([read_parquet(folder / FOUND / f"{p}.parquet") for p in range(partitions)])
    table = table.sort_by("node")
    firsts = table["first"].to_numpy()
    lists, rows = firsts >> NODE_BITS, firsts & ((1 << NODE_BITS) - 1)
    shards = np.asarray(list_first_shard, np.int64)[lists] + rows // samples_per_shard
    keys = [sample_key(int(s), int(r), samples_per_shard) for s, r in zip(shards, rows % samples_per_shard)]
    atomic_write_parquet(folder / DUPLICATES, pa.table({"node": table["node"], "first_key": pa.array(keys, pa.string())}),
                         row_group_size=65_536)
    return table.num_rows


def duplicates_in(folder: Path, list_index: int, first_row: int, last_row: int) -> dict[int, str]:
    """{source_row: key of the row fetched instead} for the rows first_row..last_row of a list."""
    path = folder / DUPLICATES
    if not path.is_file():
        return {}
    base = list_index << NODE_BITS
    table = read_parquet(path, filters=[("node", ">=", base + first_row), ("node", "<=", base + last_row)])
    return {node - base: key for node, key in zip(table["node"].to_pylist(), table["first_key"].to_pylist())}
