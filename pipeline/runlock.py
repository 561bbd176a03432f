"""One writer per run directory.

Two drivers in one run directory interleave their commits (measured: two `vlp run` with different
image sizes left 6 shards at 48 px and 2 at 64 px under one manifest). The first `vlp run`, `vlp resume`
or submitted job takes `<run>/.lock`: an exclusive `flock` on the file, which the kernel releases when
the process ends however it ends (kill -9 included), so a lock left by a dead process is simply free
again — there is no stale lock to break and no race in breaking one. The file also says who holds it
(host, PID, since when, command), for the error the next writer gets. flock works on local disks and
on NFSv4 (the client maps it to a POSIX lock); Lustre needs its `flock` mount option.

An object store (s3://) has no flock: there the lock is the object `<run>/.lock`, created with a
conditional PUT (If-None-Match: the store refuses it when the object exists) and renewed by the holder
every LEASE_S / 4 seconds. A lock not renewed for LEASE_S is a dead holder's and is taken over (deleted,
then created again conditionally, so of two takers at most one gets it — unless the first has
released it again in between, a window of one request). `holder` reports a live one only.

Ray's shard tasks write into the directory for the driver that holds the lock, and outlive a kill -9 of
it until Ray's reaper ends them. Such an orphan's shard is not harmless: a driver killed with its process
group takes the toy web (or a proxy, a mount) with it, and the orphan records every URL it still had as
`connection_refused` (measured: 40 of 40 in one shard, kept by a plain resume). So each holder has a
token, stage folders carry it to their tasks, and a task checks it (`check_writer`) before it commits: a
run whose lock is free (its holder died) or held under another token (a newer run) gets no commit.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from pipeline.errors import InputError
from pipeline.storage import as_path, is_remote

LOCK_NAME = ".lock"
LEASE_S = 60.0   # an object-store lock not renewed for this long is a dead holder's
log = logging.getLogger("vlp")


class RunInUse(InputError):
    """Another live process holds the run directory."""


class RunGone(RuntimeError):
    """The run a task works for no longer holds its run directory: the task must not commit."""


def RunLock(run_root, command: str | None = None) -> "FileLock | ObjectLock":
    """`with RunLock(run_root):` holds the run directory for this process."""
    root = as_path(run_root)
    return ObjectLock(root, command) if is_remote(root) else FileLock(root, command)


def _command() -> str:
    return " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))


def _holder_record(command: str, token: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command, "token": token}


class FileLock:
    def __init__(self, run_root: Path, command: str | None = None):
        self.path = Path(run_root) / LOCK_NAME
        self.command = command or _command()
        self.token = uuid.uuid4().hex
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
        holder = _holder_record(self.command, self.token)
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

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ObjectLock:
    """The lock of a run directory on an object store (module docstring)."""

    def __init__(self, run_root, command: str | None = None):
        self.path = run_root / LOCK_NAME
        self.command = command or _command()
        self.token = uuid.uuid4().hex
        self._stop: threading.Event | None = None

    def acquire(self) -> "ObjectLock":
        fs, key = self.path.fs, self.path.path
        for attempt in range(2):
            try:
                fs.pipe_file(key, self._record(), mode="create")
                break
            except FileExistsError:
                held = _read_object(self.path)
                if attempt == 0 and held is not None and _expired(held):
                    fs.rm_file(key)   # a holder that stopped renewing: dead (see LEASE_S)
                    continue
                raise RunInUse(f"{self.path.parent} is in use by {describe(held)}; wait for it, or stop it (a lock "
                               f"not renewed for {LEASE_S} s is taken over: no need to delete {self.path.name})") from None
        self._stop = threading.Event()
        threading.Thread(target=self._renew, name="vlp-run-lock", daemon=True).start()
        return self

    def _record(self) -> bytes:
        return (json.dumps({**_holder_record(self.command, self.token), "renewed": time.time()}) + "\n").encode()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            try:
                self.path.fs.pipe_file(self.path.path, self._record())
            except OSError as err:   # the store unreachable for a while: the next renewal tries again
                log.warning("run lock %s: could not renew it (%s)", self.path, err)

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        held = _read_object(self.path)
        if held is not None and held.get("token") == self.token:
            self.path.fs.rm_file(self.path.path)

    def __enter__(self) -> "ObjectLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_object(path) -> dict | None:
    try:
        return json.loads(path.read_bytes().decode())
    except (FileNotFoundError, ValueError):
        return None


def _expired(held: dict) -> bool:
    return time.time() - float(held.get("renewed", 0)) > LEASE_S


def holder(run_root) -> dict | None:
    """Who holds the run directory now, or None if nobody does (the lock is tried, not waited for)."""
    root = as_path(run_root)
    if is_remote(root):
        held = _read_object(root / LOCK_NAME)
        return None if held is None or _expired(held) else held
    path = root / LOCK_NAME
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


def check_writer(run_root, token: str) -> None:
    """Raise RunGone unless the run holding `run_root` now is the one whose lock has `token`. A free lock
    means its holder died (the kernel freed the flock; an object-store lease ran out)."""
    held = holder(run_root)
    if held is None:
        raise RunGone(f"{run_root}: the run this task works for has ended (its lock is free): not committing")
    if held.get("token") != token:   # another run's (or one that has not written its record yet)
        raise RunGone(f"{run_root}: now held by {describe(held)}, not by the run this task works for: "
                      "not committing")


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
