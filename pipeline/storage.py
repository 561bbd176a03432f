"""Where a run lives: a local (or NFS) path, or an object-store URL (`s3://bucket/prefix`).

`as_path` turns what a user or a task was given into a path object: `pathlib.Path` for a filesystem,
`upath.UPath` (fsspec) for a URL. Both answer `/`, `name`, `exists`, `is_file`, `iterdir`, `glob`,
`open`, `read_text`, `write_bytes`, `stat`; the few operations whose meaning differs go through here:

* a file is written whole: on a filesystem under a temporary name then renamed (pipeline/fsutil.py),
  on an object store as one PUT (an object appears whole or not at all; a multipart upload too);
* a folder "move" on an object store is a server-side copy of each object then a delete, with the
  folder's `manifest.json` copied last and deleted last, so a kill part-way leaves the source complete
  (copy phase) or the target complete (delete phase) — `RunDir.recover` finishes either;
* libraries that want a file name (tokenizers, safetensors, DeepSpeed) get a local copy.

Credentials and endpoints are the standard ones of the store's own SDK (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 for MinIO/R2/Ceph ...), read on every node that touches
the run; nothing of them is written into the run or its config. Listings are never cached: shards are
committed by other processes, and a cached listing would hide them from the resume scan.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

from upath import UPath

from pipeline.errors import InputError

AnyPath = Union[Path, UPath]
MANIFEST_NAME = "manifest.json"    # copied last and deleted last by move_tree (see the module docstring)
LOCAL_ONLY = ("memory",)           # a store each process has its own copy of cannot hold a run


def is_url(value: Any) -> bool:
    return "://" in str(value) and not str(value).startswith("file://")


def as_path(value: Any) -> AnyPath:
    """A path object for `value` (a str, a Path, or an already remote path)."""
    if isinstance(value, Path):
        return value
    if isinstance(value, UPath):
        return value
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" not in text:
        return Path(text)
    protocol = text.split("://", 1)[0]
    if protocol in LOCAL_ONLY:
        raise InputError(f"{text}: a {protocol}:// store is private to one process; a run needs one every "
                         "process can reach (a path, or s3:// ...)")
    try:
        return UPath(text, use_listings_cache=False)
    except (ImportError, ValueError) as err:   # no fsspec implementation for the protocol
        raise InputError(f"{text}: no filesystem for {protocol}:// ({err}); s3:// needs s3fs "
                         "(installed with vlp), other stores their fsspec package") from None


def children(path: AnyPath) -> list[AnyPath]:
    """A folder's entries; none for a folder that does not exist (on an object store a folder exists
    only while it holds an object, so a folder just "made" has no entries rather than being absent)."""
    return list(path.iterdir()) if path.is_dir() else []


def make_dir(path: AnyPath) -> None:
    """Make a folder (and its parents). On an object store folders need no making, but the bucket must
    exist already: a mistyped bucket name is an error, not a new bucket."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)
        return
    bucket = key(path).split("/", 1)[0]
    try:
        found = path.fs.exists(bucket)
    except OSError as err:
        raise InputError(f"{path}: cannot reach its store ({err})") from None
    if not found:
        raise InputError(f"{path}: bucket {bucket!r} does not exist, or these credentials cannot see it "
                         "(vlp does not create buckets)")


def is_remote(path: AnyPath) -> bool:
    return not isinstance(path, Path)


def resolve(value: Any) -> AnyPath:
    """`as_path`, with a local path made absolute (tasks on other nodes get it as it is)."""
    path = as_path(value)
    return path if is_remote(path) else path.expanduser().resolve()


def key(path: AnyPath) -> str:
    """The path as the store's filesystem names it (bucket/prefix/... for S3)."""
    return path.path if is_remote(path) else str(path)


def arrow(path: AnyPath) -> tuple[str, Any]:
    """(path, filesystem) for pyarrow's readers: the local path and None, or the object key and the
    fsspec filesystem (pyarrow wraps it)."""
    return (path.path, path.fs) if is_remote(path) else (str(path), None)


def stamp(path: AnyPath) -> list:
    """What changes when a file's content changes, without reading it: size and mtime, or size and the
    object's ETag."""
    if is_remote(path):
        info = path.fs.info(key(path))
        return [info["size"], str(info.get("ETag") or info.get("LastModified"))]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".lz4": "lz4"}


def input_stream(path: AnyPath):
    """A pyarrow input stream of a (possibly compressed, by its suffix) file, local or remote."""
    import pyarrow as pa

    if not is_remote(path):
        return pa.input_stream(str(path), compression="detect")
    return pa.input_stream(pa.PythonFile(path.open("rb", block_size=8 << 20), mode="r"),
                           compression=COMPRESSION.get(path.suffix))


def upload(local: Path, target: AnyPath) -> None:
    """Put a local file (one PUT) or folder (one PUT per file) at `target`."""
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        # the manifest, if the folder has one, goes last: it says the rest is there
        for file in sorted(files, key=lambda p: p.name == MANIFEST_NAME):
            target.fs.put_file(str(file), key(target / file.relative_to(local).as_posix()))
    else:
        target.fs.put_file(str(local), key(target))


@contextlib.contextmanager
def local_copy(path: AnyPath) -> Iterator[Path]:
    """A local path holding `path`'s bytes (a file or a folder), for libraries that only open files.
    A local path is given as it is."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vlp-copy-") as tmp:
        local = Path(tmp) / path.name
        if path.is_dir():
            download_tree(path, local)
        else:
            path.fs.get_file(key(path), str(local))
        yield local


def work_dir(remote: AnyPath) -> Path:
    """A node-local folder standing in for a remote one while a library that writes files by name
    (DeepSpeed, TensorBoard) works in it; the same path on every node. $VLP_WORK_DIR, else the
    system's temporary folder. It only ever holds copies: the remote folder is what counts."""
    import hashlib

    base = Path(os.environ.get("VLP_WORK_DIR") or tempfile.gettempdir()) / "vlp-work"
    return base / hashlib.sha256(str(remote).encode()).hexdigest()[:16]


def download_tree(path: AnyPath, local: Path) -> None:
    """Copy a remote folder into `local`, every file fetched again (a same-sized local file may be a
    stale copy from an earlier build of the same stage folder)."""
    base = key(path).rstrip("/")
    for name in sorted(path.fs.find(base)):
        target = local / name[len(base) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        path.fs.get_file(name, str(target))


def move_tree(src: AnyPath, dst: AnyPath) -> None:
    """Move a folder: a rename on a filesystem; on an object store, copy then delete (module docstring)."""
    if not is_remote(src):
        src.rename(dst)
        return
    fs, base = src.fs, key(src).rstrip("/")
    names = sorted(fs.find(base))
    last = [n for n in names if n.rsplit("/", 1)[-1] == MANIFEST_NAME and n.count("/") == base.count("/") + 1]
    ordered = [n for n in names if n not in last] + last
    target = key(dst).rstrip("/")
    for name in ordered:
        fs.copy(name, target + name[len(base):])
    for name in ordered:
        fs.rm_file(name)


def remove_tree(path: AnyPath) -> None:
    """Delete a folder and everything in it (only ever on the user's request: `vlp gc`)."""
    if is_remote(path):
        path.fs.rm(key(path).rstrip("/"), recursive=True)
    else:
        shutil.rmtree(path)


def tree_bytes(path: AnyPath) -> int:
    if is_remote(path):
        return sum(info["size"] for info in path.fs.find(key(path), detail=True).values())
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def relative_to(path: AnyPath, root: AnyPath) -> str | None:
    """`path` relative to `root` if it is inside it, else None."""
    if is_remote(path) != is_remote(root):
        return None
    if is_remote(path):
        inner, outer = str(path).rstrip("/"), str(root).rstrip("/")
        return inner[len(outer) + 1:] if inner.startswith(outer + "/") else None
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else None
