"""Chaos: SIGKILL the driver (with everything it started) or a Ray worker at random points of a tiny
run, N times, resuming after each; then finish and compare with an uninterrupted run of the same
config. Checks: every shard (download, prefilter) byte-identical, the exported model and the eval
metrics identical, accounting adding up in every manifest, no temporary files, no half-published
rebuilds, nothing superseded. Prints each kill and what it interrupted.

    .venv/bin/python bench/chaos.py [--kills 8] [--seed 0] [--budget 1500] [--worker-share 0.3]

Bounded: each attempt gets at most --attempt-timeout seconds, the whole at most --budget.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
VLP = [sys.executable, "-m", "pipeline.cli"]
STAGES = "[download,prefilter,pretrain,evaluate]"
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "VLP_LOG_LEVEL": "WARNING"}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(VLP + args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def run_args(run_dir: Path, first: bool, port: int) -> list[str]:
    # One port for every run: the URLs (and so the shards' json) contain it.
    if first:
        return ["run", "configs/tiny.yaml", "--run-dir", str(run_dir), "--set", f"stages={STAGES}",
                "--set", "rounds=0", "--set", f"data.toyweb.port={port}"]
    return ["resume", str(run_dir)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the driver's process group and every process it started (Ray's live in other sessions)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    return len(family)


def a_ray_worker(proc: subprocess.Popen, rng: random.Random) -> psutil.Process | None:
    try:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if any(tag in " ".join(p.cmdline()) for tag in ("download_shard", "scan_shard", "write_shard_task",
                                                                    "RayTrainWorker"))]
    except psutil.Error:
        return None
    return rng.choice(workers) if workers else None


def where(run_dir: Path) -> str:
    done = [p.parent.name for p in sorted(run_dir.glob("round-0/*/manifest.json"))]
    return "committed: " + (", ".join(done) or "nothing")


def digests(run_dir: Path) -> dict:
    out = {}
    for stage in ("download", "prefilter"):
        manifest = json.loads((run_dir / "round-0" / stage / "manifest.json").read_text())
        out[stage] = {s["shard"]: s["sha256"] for s in manifest["shards"]}
        out[f"{stage} totals"] = manifest["totals"]
    from pipeline.fsutil import sha256_file

    out["model"] = sha256_file(run_dir / "round-0" / "pretrain" / "model" / "model.safetensors")
    out["metrics"] = json.loads((run_dir / "round-0" / "evaluate" / "manifest.json").read_text())["metrics"]
    return out


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if ".tmp-" in p.name or p.name.startswith(".next-") or p.parent.name == "superseded")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=1500, help="seconds for the whole")
    parser.add_argument("--attempt-timeout", type=float, default=300)
    parser.add_argument("--worker-share", type=float, default=0.3,
                        help="share of kills aimed at one Ray worker (a shard task or a train worker) instead of the driver")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="vlp-chaos-"))

    port = free_port()
    started = time.time()
    reference = start(run_args(tmp / "reference", True, port))
    _, err = reference.communicate(timeout=args.attempt_timeout)
    if reference.returncode != 0:
        sys.exit(f"the uninterrupted run failed: {err[-2000:]}")
    span = time.time() - started
    want = digests(tmp / "reference")
    print(f"uninterrupted run: {span:.0f} s", flush=True)

    # Kill runs at random points until N kills; a run that completes is finished, compared, and a new one
    # started (a run only has so many points to be killed at).
    kills, results = [], []
    while len(kills) < args.kills and time.time() - t0 < args.budget:
        run_dir, first = tmp / f"chaos-{len(results)}", True
        while len(kills) < args.kills and time.time() - t0 < args.budget:
            proc = start(run_args(run_dir, first, port))
            first = False
            delay = rng.uniform(1.0, 0.9 * span)
            try:
                proc.wait(timeout=delay)
                print(f"attempt ended by itself after {delay:.1f} s (exit {proc.returncode}); {where(run_dir)}",
                      flush=True)
                if proc.returncode == 0:
                    break
                continue
            except subprocess.TimeoutExpired:
                pass
            target = "a Ray worker" if rng.random() < args.worker_share else "the driver"
            if target == "a Ray worker" and (worker := a_ray_worker(proc, rng)) is not None:
                name = " ".join(worker.cmdline())[:40]
                worker.kill()
                kills.append(f"{run_dir.name} at {delay:5.1f} s: a Ray worker ({name}); {where(run_dir)}")
                proc.wait(timeout=args.attempt_timeout)   # Ray retries the task or restarts the train worker
            else:
                n = kill_tree(proc)
                kills.append(f"{run_dir.name} at {delay:5.1f} s: the driver and {n} processes it started; "
                             f"{where(run_dir)}")
            print(f"kill {len(kills)}: {kills[-1]}", flush=True)
        final = start(run_args(run_dir, first, port))
        _, err = final.communicate(timeout=args.attempt_timeout)
        if final.returncode != 0:
            sys.exit(f"the final resume of {run_dir.name} failed: {err[-2000:]}")
        got = digests(run_dir)
        results.append((run_dir.name, [k for k in want if want[k] != got[k]], leftovers(run_dir)))

    print(f"\n{len(kills)} kills over {len(results)} runs in {time.time() - t0:.0f} s (seed {args.seed}); "
          "after each run's final resume:")
    bad = False
    for name, differ, left in results:
        bad = bad or bool(differ or left)
        print(f"  {name}: download and prefilter shards, their totals, the model, the eval metrics identical to "
              f"the uninterrupted run: {'yes' if not differ else 'NO: ' + ', '.join(differ)}; temporary files, "
              f"unpublished rebuilds, superseded results left: {left or 'none'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
