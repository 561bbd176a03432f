"""Atomic writes: every file vlp produces appears whole under its final name or not at all.

On a filesystem: a temporary name beside the target, fsync, rename. On an object store (the run
directory is an s3:// URL, pipeline/storage.py): the file is written locally, then put as one object,
which the store makes visible whole or not at all."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from pipeline.storage import as_path, is_remote, upload


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary local path for `path`; when the block succeeds, rename it into place (after
    fsync), or upload it (an object store: one PUT per file)."""
    path = as_path(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="vlp-put-") as folder:
            tmp = Path(folder) / path.name
            yield tmp
            if tmp.exists():
                upload(tmp, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# Writer options for columns of hashes: random bits neither compress nor repeat, and parquet's defaults
# (zstd, a dictionary tried then dropped, min/max statistics) cost ~3x the plain write for nothing.
RAW = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def atomic_write_parquet(path: str | Path, table, row_group_size: int | None = None, compression: str = "zstd",
                         **options) -> None:
    """A pyarrow table as a (zstd) parquet file, atomically (ledgers, decisions, the dedup shuffle);
    `options` go to pyarrow's writer (RAW for hashes)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression, row_group_size=row_group_size, **options)


def atomic_write_row_groups(path: str | Path, tables: list, schema, compression: str = "zstd", **options) -> None:
    """Tables as the row groups of one parquet file, in order (an empty table is an empty row group),
    atomically: a shuffle writes one file per task with a row group per partition, not a file per
    (task, partition) — on an object store each file is a PUT."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression=compression, **options) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=max(1, table.num_rows))


def read_row_group(path, index: int, columns: list[str] | None = None):
    """One row group of a parquet file, local or on an object store (a ranged read of that part)."""
    import pyarrow.parquet as pq

    from pipeline.storage import arrow

    name, filesystem = arrow(as_path(path))
    with pq.ParquetFile(name, filesystem=filesystem) as f:
        return f.read_row_group(index, columns=columns)


def read_json(path) -> Any:
    with as_path(path).open() as f:
        return json.load(f)


def read_parquet(path, **kwargs):
    """pq.read_table for a local path or an object-store URL."""
    import pyarrow.parquet as pq

    from pipeline.storage import arrow

    name, filesystem = arrow(as_path(path))
    return pq.read_table(name, filesystem=filesystem, **kwargs)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_temporary(path) -> bool:
    return path.name.startswith(".") and ".tmp-" in path.name
