"""The hash shuffle both deduplications run on (URL dedup before download: stages/download/urldedup.py;
image dedup in prefilter: stages/prefilter/dedup/).

A task that sends rows to the P partitions of the next phase writes ONE file whose row group p holds
partition p's rows (`write_partitioned`): P times fewer files, fsyncs and, on an object store, PUTs than a
file per (task, partition). A partition's task then reads its row group of every task's file
(`read_partition`; on an object store a ranged read). Rows go to a partition by a hash of a
non-negative integer (`partition_of`: a node, an LSH key, a hash prefix, a URL hash), so a partition's
content — and the decisions made on it — depend on the rows alone, not on which task wrote them.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.fsutil import RAW, atomic_write_row_groups, read_row_group
from pipeline.storage import as_path

_MIX = np.uint64(0x9E3779B97F4A7C15)   # Fibonacci hashing: consecutive values spread over the partitions


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    """A partition per non-negative integer value, by a multiplicative hash."""
    mixed = values.astype(np.uint64) * _MIX
    return ((mixed >> np.uint64(33)) % np.uint64(partitions)).astype(np.int64)


def rows_by_partition(where: np.ndarray, partitions: int) -> list[np.ndarray]:
    """The row numbers of each partition 0..partitions-1 (`where`: each row's partition), in row order."""
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(partitions + 1))
    return [order[bounds[p]:bounds[p + 1]] for p in range(partitions)]


def write_partitioned(path, table: pa.Table, where: np.ndarray, partitions: int, raw: bool = True) -> None:
    """`table`'s rows as one file, row group p holding those whose `where` is p (in row order), atomically.
    `raw`: uncompressed, no dictionary, no statistics (files read once, by the next phase)."""
    atomic_write_row_groups(path, [table.take(rows) for rows in rows_by_partition(where, partitions)], table.schema,
                            **(RAW if raw else {}))


def read_partition(folder, p: int, schema: pa.Schema) -> pa.Table:
    """Partition p of a shuffle folder: row group p of each writing task's file (hidden and temporary
    files skipped); an empty table of `schema` if there are none."""
    folder = as_path(folder)
    files = sorted(f for f in folder.glob("*.parquet") if not f.name.startswith(".")) if folder.is_dir() else []
    tables = [read_row_group(f, p) for f in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()
