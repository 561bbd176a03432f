"""The run directory: `<run>/round-<r>/<stage>/` with shards, per-shard stats and a manifest.

Commit protocol (DESIGN.md, "The stage contract"):
  * a shard is written under a temporary name and renamed into place, then its stats file is written;
    a shard without its stats file does not exist;
  * the stage's `manifest.json` is written last, atomically; its fingerprint is a hash of the stage
    name, the stage config and the input fingerprints. Same fingerprint = already done = skipped.
A stage folder holds `.fingerprint` while it is being built.

No silent loss: when a stage must be rebuilt for another fingerprint (an output-changing setting
changed), its old folder stays where it is, complete, while the new one is built beside it in
`round-<r>/.next-<stage>/`. Once the new manifest commits, `publish` moves the old folder to
`<run>/superseded/` and the new one into place (two renames; `recover` finishes them after a kill, the
committed manifest deciding). Superseded folders are listed by `vlp status` and removed only by
`vlp gc`. A kill at any point leaves the old or the new result complete under the stage's name.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import InputError
from pipeline.faults import crash_point
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, is_temporary, read_json
from pipeline.ledger import SIDE_FOLDERS, SUFFIX as LEDGER_SUFFIX
from pipeline.manifest import Accounting, Manifest

MANIFEST = "manifest.json"
PLAN = "plan.json"
RETRY = "retry.json"        # the pass of `vlp resume --retry-failed` the stage folder is at
FINGERPRINT = ".fingerprint"
STATS_SUFFIX = ".stats.json"
NEXT_PREFIX = ".next-"      # round-<r>/.next-<stage>/: a rebuild in progress beside the result it replaces
SUPERSEDED = "superseded"   # <run>/superseded/: replaced results, kept until `vlp gc`
SELECTED = "stages.json"    # <run>/stages.json: the stages the run was last asked for (what `vlp resume` resumes)


def fingerprint(stage: str, stage_config: Any, input_fingerprints: list[str]) -> str:
    blob = json.dumps({"stage": stage, "config": stage_config, "inputs": input_fingerprints}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class StageDir:
    """One stage's folder for one round."""

    def __init__(self, path: Path, stage: str, round_: int, writer: tuple | None = None):
        self.path, self.stage, self.round = path, stage, round_
        self.writer = writer   # (run root, lock token) of the run that builds it: see check_writer

    def shard_path(self, name: str) -> Path:
        return self.path / name

    def stats_path(self, shard_name: str) -> Path:
        return self.path / (shard_name.split(".")[0] + STATS_SUFFIX)

    def shard_stats(self, shard_name: str) -> dict | None:
        """The committed stats of a shard, or None if the shard is not committed."""
        path = self.stats_path(shard_name)
        return read_json(path) if path.is_file() else None

    def committed_stats(self, shard_names) -> dict[str, dict]:
        """{shard: stats} of the shards among `shard_names` that are committed: one listing of the folder
        (a few LIST requests on an object store, not a HEAD per shard), then the stats files that exist,
        read by a few threads (on an object store each read is a request of its own)."""
        from concurrent.futures import ThreadPoolExecutor

        present = {p.name for p in self.path.glob(f"*{STATS_SUFFIX}")} if self.path.is_dir() else set()
        wanted = [n for n in shard_names if self.stats_path(n).name in present]
        if not storage.is_remote(self.path):
            return {n: read_json(self.stats_path(n)) for n in wanted}
        with ThreadPoolExecutor(16) as pool:
            return dict(zip(wanted, pool.map(lambda n: read_json(self.stats_path(n)), wanted)))

    def ledger_path(self, shard_name: str) -> Path:
        return self.path / (shard_name.split(".")[0] + LEDGER_SUFFIX)

    def commit_shard(self, name: str, samples: list[dict], acc: Accounting, records: list[dict],
                     started: float, extra: dict | None = None) -> dict:
        """Write shard `name` atomically, then its ledger (`records`: every sample that went in, with its
        outcome; pipeline/ledger.py), then its stats (the commit); returns the stats."""
        from pipeline.data.shards import write_shard
        from pipeline.fsutil import sha256_file
        from pipeline.ledger import write_ledger

        acc.check(f"{self.stage} shard {name}")
        if len(records) != acc.samples_in:
            raise AssertionError(f"{self.stage} shard {name}: {acc.samples_in} samples in, {len(records)} in its ledger")
        self.check_writer()
        path = self.shard_path(name)
        write_shard(path, samples)
        write_ledger(self.ledger_path(name), records)
        self.check_writer()   # again just before the commit: the shard took a while to write
        stats = {"shard": name, "samples": len(samples), "sha256": sha256_file(path), "bytes": path.stat().st_size,
                 "accounting": acc.to_json(), "ledger": self.ledger_path(name).name,
                 "duration_s": round(time.time() - started, 3), **(extra or {})}
        atomic_write_json(self.stats_path(name), stats)
        return stats

    def check_writer(self) -> None:
        """A task of a run that has died or been replaced commits nothing (pipeline/runlock.py)."""
        if self.writer is not None:
            from pipeline.runlock import check_writer

            check_writer(*self.writer)

    def write_sizes(self, summaries: list[dict]) -> None:
        """sizes.json, open_clip's convention: {shard: samples}."""
        atomic_write_json(self.path / "sizes.json", {s["shard"]: s["samples"] for s in summaries})

    def manifest(self) -> Manifest | None:
        path = self.path / MANIFEST
        return Manifest.from_json(read_json(path)) if path.is_file() else None

    def plan(self) -> dict | None:
        path = self.path / PLAN
        return read_json(path) if path.is_file() else None

    def fingerprint(self) -> str | None:
        """The fingerprint this folder is (being) built for, or None."""
        marker = self.path / FINGERPRINT
        return marker.read_text().strip() if marker.is_file() else None

    def begin(self, fp: str, plan: dict) -> None:
        """Claim the folder for fingerprint `fp` (RunDir.build_dir chose it: empty, or fp's own)."""
        if self.path.exists() and self.fingerprint() not in (None, fp):
            raise AssertionError(f"{self.path} holds fingerprint {self.fingerprint()}, not {fp}: use RunDir.build_dir")
        self.path.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, *(self.path / side for side in SIDE_FOLDERS)):  # temp files of a killed run
            for leftover in storage.children(folder):
                if is_temporary(leftover):
                    storage.remove_tree(leftover) if leftover.is_dir() else leftover.unlink()
        atomic_write_bytes(self.path / FINGERPRINT, fp.encode())
        atomic_write_json(self.path / PLAN, {"fingerprint": fp, **plan})

    def update_plan(self, **fields) -> None:
        """Add what the stage learnt once it started (e.g. how many shards its inputs make) to its plan."""
        atomic_write_json(self.path / PLAN, {**(self.plan() or {}), **fields})

    def retry_pass(self) -> int:
        """How many times `vlp resume --retry-failed` reopened this result (0: never)."""
        path = self.path / RETRY
        return read_json(path)["pass"] if path.is_file() else 0

    def start_retry_pass(self) -> int:
        """Reopen this result for another try of its failed samples: the pass goes up by one, then its
        manifest (if it was complete) moves aside to `manifest.pass-<n>.json`, kept as the record of what
        the earlier pass committed. Its shards stay; the stage re-commits each one it retries, atomically."""
        n = self.retry_pass() + 1
        atomic_write_json(self.path / RETRY, {"pass": n})
        if (self.path / MANIFEST).is_file():
            (self.path / MANIFEST).rename(self.path / f"manifest.pass-{n - 1}.json")
        return n

    def commit(self, manifest: Manifest) -> None:
        atomic_write_json(self.path / MANIFEST, manifest.to_json())


def check_run_dir(run_dir):
    """A run directory is a path on a filesystem (local for one machine, shared by every node for a
    cluster) or an object-store URL every node reaches (s3://bucket/prefix; pipeline/storage.py)."""
    return storage.resolve(run_dir)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = check_run_dir(root)
        self.writer: tuple | None = None   # (root, lock token) while a run holds it: passed to its stage folders

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def select(self, stages: list[str]) -> None:
        """Record the stages this run was asked for (`vlp run --only`, `vlp resume --stage`)."""
        atomic_write_json(self.root / SELECTED, {"stages": list(stages)})

    def selected(self) -> list[str] | None:
        """The stages the run was last asked for, or None (a run from before this was recorded: all)."""
        path = self.root / SELECTED
        return read_json(path)["stages"] if path.is_file() else None

    def relative(self, path) -> str:
        """`path` as a manifest records it: relative to the run directory when inside it (so the run can be
        moved or copied), absolute (or a URL) otherwise."""
        path = storage.as_path(path)
        inside = storage.relative_to(path, self.root)
        return inside if inside is not None else str(path if storage.is_remote(path) else path.resolve())

    def resolve(self, recorded: str):
        """The path a manifest recorded (see `relative`)."""
        if storage.is_url(recorded) or Path(recorded).is_absolute():
            return storage.as_path(recorded)
        return self.root / recorded

    def stage(self, stage: str, round_: int = 0) -> StageDir:
        return StageDir(self.root / f"round-{round_}" / stage, stage, round_, self.writer)

    def _next(self, stage: str, round_: int) -> StageDir:
        return StageDir(self.root / f"round-{round_}" / f"{NEXT_PREFIX}{stage}", stage, round_, self.writer)

    def staged(self, stage: str, round_: int) -> StageDir | None:
        """The rebuild of (stage, round) in progress beside its current result, if there is one."""
        staged = self._next(stage, round_)
        return staged if staged.path.is_dir() else None

    def build_dir(self, stage: str, round_: int, fp: str) -> StageDir:
        """Where (stage, round) is built for fingerprint `fp`: its own folder if that is free or already
        fp's, else `.next-<stage>` beside it (the old result stays until the new one commits)."""
        current = self.stage(stage, round_)
        if not current.path.exists() or current.fingerprint() in (None, fp):
            return current
        staged = self._next(stage, round_)
        if staged.path.exists() and staged.fingerprint() not in (None, fp):
            self._supersede(staged)   # an unfinished build for yet another config: its shards are kept
        return staged

    def publish(self, out: StageDir) -> Path | None:
        """After `out`'s manifest committed: put it in place, moving the result it replaces aside.
        Returns where the replaced result went, or None if it replaced nothing."""
        current = self.stage(out.stage, out.round)
        if out.path == current.path:
            return None
        moved = None
        if current.path.exists():
            moved = self._supersede(current)
            crash_point("superseded")   # the old result moved aside, the new one not yet in place
        storage.move_tree(out.path, current.path)
        return moved

    def recover(self) -> list[str]:
        """Finish the publishes a kill interrupted (a committed `.next-<stage>` wins); returns what it did."""
        done = []
        for staged in self.root.glob(f"round-*/{NEXT_PREFIX}*"):
            out = StageDir(staged, staged.name[len(NEXT_PREFIX):], int(staged.parent.name.split("-")[1]))
            new = out.manifest()
            if new is None:
                continue
            current = self.stage(out.stage, out.round).manifest()
            if current is not None and current.fingerprint == new.fingerprint and storage.is_remote(staged):
                # an object store's move was killed while deleting the source: the target is complete
                storage.remove_tree(out.path)   # what is left are copies of objects the target holds
            else:
                self.publish(out)
            done.append(f"{out.stage} (round {out.round})")
        return done

    def _supersede(self, sd: StageDir) -> Path:
        """Move a stage folder to <run>/superseded/ under a name that says what it was."""
        kind = "complete" if sd.manifest() is not None else "partial"
        name = f"round-{sd.round}-{sd.stage}-{sd.fingerprint() or 'unknown'}-{kind}"
        target = self.root / SUPERSEDED / name
        n = 1
        while target.exists():
            n += 1
            target = self.root / SUPERSEDED / f"{name}-{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.move_tree(sd.path, target)
        return target

    def superseded(self) -> list[dict]:
        """What <run>/superseded/ holds, kept until `vlp gc`: name, path, size in bytes, complete or not,
        and its `kind`: `result` (a folder: a result a rebuild replaced), `link` (a symlink, `target` named,
        never followed: what it points to is not the run's) or `file` (a stray file: no result). A
        `superseded` that is itself a symlink is listed as that one link."""
        folder = self.root / SUPERSEDED
        if _is_link(folder):
            return [_entry(folder)]
        return [_entry(path) for path in sorted(storage.children(folder))]

    def remove_superseded(self, row: dict) -> None:
        """Delete one entry of `superseded()` (`vlp gc --yes`): a result's folder with all it holds, a
        symlink as a link (never what it points to), a stray file; nothing outside the run directory."""
        path = storage.as_path(row["path"])
        folder = self.root / SUPERSEDED
        if path != folder and path.parent != folder:
            raise InputError(f"{path}: not in {folder}; vlp gc deletes nothing else")
        if _is_link(path) or not path.is_dir():
            path.unlink()   # a link (dangling or not) or a file: only that name goes
        else:
            storage.remove_tree(path)   # removes the links inside a folder without following them

    def require(self) -> "RunDir":
        if not self.config_path.is_file():
            raise InputError(f"{self.root}: not a vlp run directory (no config.yaml)")
        return self

    def rounds(self) -> list[int]:
        """The rounds with a folder, in order."""
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("round-*") if p.name.split("-")[1].isdigit())

    def stage_dirs(self) -> list[StageDir]:
        found = []
        for round_ in self.rounds():
            for stage_path in sorted((self.root / f"round-{round_}").iterdir()):
                if stage_path.is_dir() and not stage_path.name.startswith((".", "_")):
                    found.append(StageDir(stage_path, stage_path.name, round_))
        return found


def _is_link(path) -> bool:
    return not storage.is_remote(path) and path.is_symlink()   # an object store has no links


def _entry(path) -> dict:
    """One entry of <run>/superseded/, as `RunDir.superseded` lists it."""
    row = {"name": path.name, "path": str(path), "complete": False}
    if _is_link(path):
        return {**row, "kind": "link", "bytes": 0, "target": os.readlink(path)}
    if path.is_dir():
        return {**row, "kind": "result", "bytes": storage.tree_bytes(path), "complete": (path / MANIFEST).is_file()}
    return {**row, "kind": "file", "bytes": path.stat().st_size}


def verify_shard(path: Path, expected: dict) -> None:
    """An input shard must be the bytes its stage committed (manifest: sha256, bytes): a shard cut or
    rewritten since would pass through a stage as if its samples never existed."""
    from pipeline.fsutil import sha256_file

    size = path.stat().st_size if path.is_file() else None
    if size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
        found = "missing" if size is None else f"{size} bytes, sha256 {sha256_file(path)[:12]}"
        raise InputError(f"{path}: not the shard its stage committed ({found}; the manifest says "
                         f"{expected['bytes']} bytes, sha256 {expected['sha256'][:12]}): rebuild that stage")
