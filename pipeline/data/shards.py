"""Webdataset tar shards: `{key}.jpg`, `{key}.txt`, `{key}.json`, members of a sample adjacent.

We write tars ourselves (sorted by key, mtime 0, no owner) so that the same samples always give the
same bytes: a killed-and-resumed run and an uninterrupted one produce identical shards. `webdataset`
and open_clip read them as any other webdataset shard.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.fsutil import atomic_path
from pipeline.storage import as_path, is_remote

Sample = dict  # {"__key__": str, "jpg": bytes, "txt": bytes, "json": bytes, ...}
# The members our stages write. Anything else in an input shard is dropped (and counted), never copied:
# webdataset's default decoders unpickle `.pyd`/`.pickle` and torch.load `.pth` members.
OWNED_MEMBERS = ("jpg", "txt", "json")
# Web shards are named by a 5-digit number (`00042.tar`), and the keys in them start with it.
SHARD_DIGITS = 5
STREAM_BLOCK = 8 << 20   # read-ahead of a shard streamed from an object store: few requests per shard


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}.tar"


def sample_key(shard_id: int, rank: int, samples_per_shard: int) -> str:
    """A web sample's key: its shard's number, then its rank in the shard (download assigns them)."""
    digits = max(1, math.ceil(math.log10(samples_per_shard)))
    return f"{shard_id:0{SHARD_DIGITS}d}{rank:0{digits}d}"


def encode_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


def write_shard(path: Path, samples: Iterable[Sample]) -> int:
    """Write `samples` sorted by key to `path` atomically; returns how many were written."""
    ordered = sorted(samples, key=lambda s: s["__key__"])
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in ordered:
                key = sample["__key__"]
                for ext in sorted(k for k in sample if k != "__key__"):
                    data = sample[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    return len(ordered)


def read_shard(path) -> Iterator[Sample]:
    """Yield samples of a tar shard (a local path or an object-store URL, read as one stream), grouping
    adjacent members by key (the webdataset convention)."""
    path = as_path(path)
    if is_remote(path):
        with path.open("rb", block_size=STREAM_BLOCK) as f:
            yield from _samples(tarfile.open(fileobj=f, mode="r|"))
    else:
        yield from _samples(tarfile.open(path, "r"))


def _samples(tar: tarfile.TarFile) -> Iterator[Sample]:
    current: Sample | None = None
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current
