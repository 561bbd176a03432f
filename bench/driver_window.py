"""The driver's cost of running S shard tasks: every task submitted at once (vlp before #14) vs a window
of about twice the cluster's CPU slots refilled as results arrive (pipeline/parallel.py). The tasks do
nothing, so what is timed is the driver: submission, `ray.wait` over the pending refs, results.
Prints driver CPU seconds and wall seconds per S, the ratio, and the growth per x10 of S.

    .venv/bin/python bench/driver_window.py [--shards 1000 10000]
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from pipeline.executor import RAY  # noqa: E402
from pipeline.parallel import Progress, run_shard_tasks, task_window  # noqa: E402


def noop(i: int) -> int:
    return i


def all_at_once(remote_fn, jobs: dict) -> None:
    """The old loop: every task in flight, each wait over all of them."""
    pending = {remote_fn.remote(*args): name for name, args in jobs.items()}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            ray.get(ref)
            pending.pop(ref)


def driver_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float]:
    cpu, wall = driver_cpu(), time.perf_counter()
    fn()
    return driver_cpu() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    task = ray.remote(noop).options(num_cpus=1)
    logging.getLogger("vlp").setLevel(logging.WARNING)
    print(f"window: {task_window(ray.cluster_resources()['CPU'])} tasks (2 x {ray.cluster_resources()['CPU']:.0f} CPUs)")
    rows = []
    for shards in args.shards:
        jobs = {f"{i:06d}": (i,) for i in range(shards)}
        old = timed(lambda: all_at_once(task, jobs))
        new = timed(lambda: run_shard_tasks(RAY, task, jobs, Progress("bench", shards, 0, interval=3600), lambda r: 0))
        rows.append((shards, old, new))
        print(f"S={shards:>6}: all at once {old[0]:6.2f} s driver CPU ({old[1]:6.2f} s wall); window "
              f"{new[0]:6.2f} s CPU ({new[1]:6.2f} s wall); all-at-once / window CPU x{old[0] / new[0]:.2f}",
              flush=True)
    for (s0, o0, n0), (s1, o1, n1) in zip(rows, rows[1:]):
        per10 = (s1 / s0)
        print(f"S {s0} -> {s1} (x{per10:g}): driver CPU grows x{o1[0] / o0[0]:.1f} all at once, "
              f"x{n1[0] / n0[0]:.1f} with the window")
    ray.shutdown()


if __name__ == "__main__":
    main()
