"""One writer per run directory.

Two drivers in one run directory interleave their commits (measured: two `vlp run` with different
image sizes left 6 shards at 48 px and 2 at 64 px under one manifest). The first `vlp run`, `vlp resume`
or submitted job takes `<run>/.lock`: an exclusive `flock` on the file, which the kernel releases when
the process ends however it ends (kill -9 included), so a lock left by a dead process is simply free
again — there is no stale lock to break and no race in breaking one. The file also says who holds it
(host, PID, since when, command), for the error the next writer gets. flock works on local disks and
on NFSv4 (the client maps it to a POSIX lock); Lustre needs its `flock` mount option.

Ray's shard tasks write into the directory for the driver that holds the lock; after a kill -9 of the
driver a task of the old run can still commit a shard (atomically) before Ray ends it: harmless.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import InputError

LOCK_NAME = ".lock"


class RunInUse(InputError):
    """Another live process holds the run directory."""


class RunLock:
    """`with RunLock(run_root):` holds the run directory for this process."""

    def __init__(self, run_root: Path, command: str | None = None):
        self.path = Path(run_root) / LOCK_NAME
        self.command = command or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunInUse(f"{self.path.parent} is in use by {describe(holder)}; wait for it, or stop it "
                           f"(a lock whose process has ended is free again: no need to delete {self.path.name})") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)   # the file stays (another process may be waiting on it); the holder goes
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_root: Path) -> dict | None:
    """Who holds the run directory now, or None if nobody does (the lock is tried, not waited for)."""
    path = Path(run_root) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not said which yet)"
    return f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({holder.get('command')})"


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0).decode()
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
