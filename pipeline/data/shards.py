"""Webdataset tar shards: `{key}.jpg`, `{key}.txt`, `{key}.json`, members of a sample adjacent.

We write tars ourselves (sorted by key, mtime 0, no owner) so that the same samples always give the
same bytes: a killed-and-resumed run and an uninterrupted one produce identical shards. `webdataset`
and open_clip read them as any other webdataset shard.

Every read checks that the shard is a whole archive (`read_shard`): Python's tarfile stops without a
word where a file ends after a member, so a copy cut at a member boundary (37 of 40 samples, no
end-of-archive blocks) read as a valid shorter shard. The shards a stage commits are also checked
against their manifest (sha256, bytes: `pipeline.runs.verify_shard`); the user's own shards (the seed
and eval sets) have no manifest, and are read through `read_input_shard`: the archive whole, only the
members we own, only samples with what the stage reads, everything left out counted (`ShardCheck`).
"""
from __future__ import annotations

import collections
import io
import json
import logging
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import InputError
from pipeline.fsutil import atomic_path
from pipeline.storage import as_path, is_remote

log = logging.getLogger("vlp")

Sample = dict  # {"__key__": str, "jpg": bytes, "txt": bytes, "json": bytes, ...}
# The members our stages write. Anything else in an input shard is dropped (and counted), never copied:
# webdataset's default decoders unpickle `.pyd`/`.pickle` and torch.load `.pth` members.
OWNED_MEMBERS = ("jpg", "txt", "json")
# What training and evaluation read of a sample: one without them is skipped, counted as `missing_<ext>`.
NEEDED_MEMBERS = ("jpg", "txt")
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
    adjacent members by key (the webdataset convention). Raises InputError naming the shard when it is
    not a whole archive: cut inside a member or a header, or after a member (no end-of-archive blocks),
    or with bytes that are no tar header where the next member should start."""
    path = as_path(path)
    try:
        if is_remote(path):
            with path.open("rb", block_size=STREAM_BLOCK) as f:
                yield from _samples(tarfile.open(fileobj=f, mode="r|", tarinfo=_Member), path)
        else:
            yield from _samples(tarfile.open(path, "r", tarinfo=_Member), path)
    except tarfile.TarError as err:   # cut inside a member's data, or no archive at all
        raise InputError(f"{path}: not a whole tar archive ({err}); copy or rebuild the shard") from None


class _Member(tarfile.TarInfo):
    """TarInfo that notes on its archive why reading headers stopped: tarfile ends its iteration the
    same way at the end-of-archive blocks and at a file that just ends, and only the first is whole."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.stopped_by = err
            raise


def _samples(tar: tarfile.TarFile, path) -> Iterator[Sample]:
    current: Sample | None = None
    last = None
    with tar:
        for member in tar:
            last = member.name
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
        _check_end(tar, path, last)   # before the close: a stream's reader goes with it
    if current is not None:
        yield current


def _check_end(tar: tarfile.TarFile, path, last: str | None) -> None:
    """The archive read so far must end with its two zero blocks (POSIX; tarfile, GNU tar and bsdtar
    write them): the first is the header block tarfile stopped at, the second the block after it."""
    stopped = getattr(tar, "stopped_by", None)
    after = f"after member {last}" if last else "before any member"
    if isinstance(stopped, tarfile.EOFHeaderError):
        if tar.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE:
            return
        why = f"one end-of-archive block of two {after}"
    elif isinstance(stopped, tarfile.EmptyHeaderError):
        why = f"it ends {after} with no end-of-archive blocks: cut at a member boundary"
    elif isinstance(stopped, tarfile.TruncatedHeaderError):
        why = f"it ends inside the header {after}"
    elif isinstance(stopped, tarfile.InvalidHeaderError):
        why = f"the bytes {after} are no tar header ({stopped})"
    else:
        why = f"reading stopped {after} ({stopped})"
    raise InputError(f"{path}: not a whole tar archive: {why}; copy or rebuild the shard")


# --- the user's shards (seed and eval sets) ----------------------------------------------------------

@dataclass
class ShardCheck:
    """What reading input shards found: the samples given to the stage, the samples skipped (by reason:
    `missing_jpg`, `missing_txt`, or what the stage adds, e.g. `decode_error`), and the members left out
    of the samples given (by extension: `.pyd`, `.pth` ... are never handed on)."""
    shards: int = 0
    samples: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    members_dropped: collections.Counter = field(default_factory=collections.Counter)

    @property
    def samples_read(self) -> int:
        return self.samples + sum(self.skipped.values())

    def reject(self, reason: str) -> None:
        """A sample given turned out unusable (e.g. `decode_error`): skipped after all, counted."""
        self.samples -= 1
        self.skipped[reason] += 1

    def to_json(self) -> dict:
        return {"shards": self.shards, "samples": self.samples, "samples_skipped": sum(self.skipped.values()),
                "skipped_by_reason": dict(sorted(self.skipped.items())),
                "members_dropped": dict(sorted(self.members_dropped.items()))}

    def warn(self, what: str) -> None:
        """One warning saying what was left out of `what`, if anything was."""
        parts = [f"{n} sample(s) {reason}" for reason, n in sorted(self.skipped.items())]
        parts += [f"{n} .{ext} member(s)" for ext, n in sorted(self.members_dropped.items())]
        if parts:
            log.warning("%s: skipped %s of %d samples in %d shard(s)", what, ", ".join(parts), self.samples_read,
                        self.shards)


def read_input_shard(path, check: ShardCheck, needed: tuple[str, ...] = NEEDED_MEMBERS) -> Iterator[Sample]:
    """The samples of a user's shard as our stages read them: the archive whole (`read_shard` raises
    InputError naming a cut shard), only the members we own (others dropped, counted by extension),
    only samples that hold every `needed` member (others skipped, counted as `missing_<ext>`)."""
    check.shards += 1
    for sample in read_shard(path):
        check.members_dropped.update(ext for ext in sample if ext != "__key__" and ext not in OWNED_MEMBERS)
        missing = next((ext for ext in needed if ext not in sample), None)
        if missing is not None:
            check.skipped[f"missing_{missing}"] += 1
            continue
        check.samples += 1
        yield {k: v for k, v in sample.items() if k == "__key__" or k in OWNED_MEMBERS}


def check_input_shards(paths, needed: tuple[str, ...] = NEEDED_MEMBERS) -> ShardCheck:
    """Read every shard of a user's set once: counts, or InputError naming the first one that is cut."""
    check = ShardCheck()
    for path in paths:
        for _ in read_input_shard(path, check, needed):
            pass
    return check
