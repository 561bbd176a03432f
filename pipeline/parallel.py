"""Run one task per shard (or an actor pool over shards) on an executor (pipeline/executor.py), with
retries, progress and per-shard failure reports."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pipeline.errors import StageFailed
from pipeline.executor import ActorDied, Executor

log = logging.getLogger("vlp")


class Progress:
    """Logs shards done and samples/s, at most every `interval` seconds."""

    def __init__(self, stage: str, shards_total: int, samples_total: int | None, interval: float = 2.0):
        """`samples_total`: None where it is not known before the shards run (then no "of N" is shown)."""
        self.stage, self.shards_total, self.samples_total = stage, shards_total, samples_total
        self.interval, self.started, self.last = interval, time.time(), 0.0
        self.shards_done = self.samples_done = 0

    def update(self, shards: int, samples: int, force: bool = False) -> None:
        self.shards_done += shards
        self.samples_done += samples
        now = time.time()
        if force or now - self.last >= self.interval:
            self.last = now
            rate = self.samples_done / max(now - self.started, 1e-9)
            of = f"/{self.samples_total}" if self.samples_total is not None else ""
            log.info("%s: %d/%d shards, %d%s samples, %.0f samples/s", self.stage, self.shards_done,
                     self.shards_total, self.samples_done, of, rate)


def task_window(cluster_cpus: float) -> int:
    """How many shard tasks are in flight at once: about twice the cluster's CPU slots, so every slot
    has its next task queued while the driver holds (and waits on) a bounded number of refs."""
    return max(4, 2 * int(cluster_cpus))


def run_shard_tasks(executor: Executor, remote_fn: Callable, jobs: dict[str, tuple], progress: Progress,
                    samples_of: Callable[[Any], int], window: int | None = None,
                    on_result: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run `remote_fn.remote(*args)` (an `executor.task`) for each shard name in `jobs`, at most `window`
    (default `task_window` of the cluster's CPUs) at a time, refilled as results arrive, and wait for all of them.
    `on_result(name, result)` sees each result as it comes; if it raises StageFailed (a breaker), no
    more tasks start, the running ones finish and commit, and that error is raised.

    Submitting every task at once would put every task's arguments in the object store together and
    make each wait cost O(pending) (O(shards²) over a stage). Shards that succeed are committed by
    their task, so a failure elsewhere loses nothing: we let every task finish, then raise StageFailed
    naming the shards that failed after their retries.
    """
    window = window or task_window(executor.resources().get("CPU", 1.0))
    queue = iter(jobs.items())
    pending: dict[Any, str] = {}
    results, failures = {}, {}
    stopped: StageFailed | None = None

    def refill() -> None:
        while len(pending) < window and stopped is None:
            item = next(queue, None)
            if item is None:
                return
            pending[remote_fn.remote(*item[1])] = item[0]

    refill()
    while pending:
        ready, _ = executor.wait(list(pending), timeout=progress.interval)
        for ref in ready:
            name = pending.pop(ref)
            try:
                results[name] = executor.get(ref)
                progress.update(1, samples_of(results[name]))
            except Exception as err:  # noqa: BLE001 (reported below)
                failures[name] = err
                log.error("%s: shard %s failed after its retries: %s", progress.stage, name, _short(err))
                continue
            if on_result is not None and stopped is None:
                try:
                    on_result(name, results[name])
                except StageFailed as err:
                    stopped = err
                    log.error("%s: stopping: %d running shard tasks finish first", progress.stage, len(pending))
        refill()
        if not ready:
            progress.update(0, 0)
    progress.update(0, 0, force=True)
    if stopped is not None:
        raise stopped
    _raise_failures(progress.stage, failures, len(jobs))
    return results


def _committed(out, jobs: dict[str, tuple], progress: Progress) -> dict[str, dict]:
    """Stats of the shards in `jobs` that `out` already committed (reported as progress)."""
    done = out.committed_stats(list(jobs))
    progress.update(len(done), sum(s["accounting"]["samples_in"] for s in done.values()), force=True)
    return done


def _raise_failures(stage: str, failures: dict[str, BaseException], total: int) -> None:
    if failures:
        first = next(iter(failures.items()))
        raise StageFailed(f"{stage}: {len(failures)} of {total} shards failed "
                          f"({', '.join(sorted(failures))}); first error, shard {first[0]}: {_short(first[1])}. "
                          "Committed shards are kept: fix the cause and run `vlp resume`.")


def run_missing_shards(executor: Executor, out, remote_fn: Callable, jobs: dict[str, tuple],
                       progress: Progress) -> dict[str, dict]:
    """Stats of every shard in `jobs`: committed ones as they are, the rest by running their task."""
    done = _committed(out, jobs, progress)
    todo = {name: args for name, args in jobs.items() if name not in done}
    return done | run_shard_tasks(executor, remote_fn, todo, progress, lambda s: s["accounting"]["samples_in"])


def run_on_actor_pool(executor: Executor, out, make_actor: Callable, jobs: dict[str, tuple], actors: int,
                      retries: int, progress: Progress, per_actor: int = 1) -> tuple[dict[str, dict], int]:
    """Stats of every shard in `jobs`: committed ones as they are, the rest by `actor.process(*args)` on a
    pool of up to `actors` actors, each given up to `per_actor` shards at once (an actor made with
    max_concurrency >= per_actor works on the next while the current one infers). An actor that dies is
    replaced and its shards given to the next free actor, up to `retries` times per shard. Returns
    (stats by shard, actors replaced)."""
    done = _committed(out, jobs, progress)
    queue = [name for name in jobs if name not in done]
    pool = [make_actor() for _ in range(min(actors, len(queue)))]
    generation = [0] * len(pool)   # which actor of a slot a call went to: only its first death replaces it
    inflight: dict[Any, tuple[int, int, str]] = {}
    attempts: dict[str, int] = {}
    failures: dict[str, BaseException] = {}
    restarts = 0

    def submit(slot: int) -> None:
        name = queue.pop(0)
        inflight[pool[slot].process.remote(*jobs[name])] = (slot, generation[slot], name)

    for _ in range(per_actor):
        for slot in range(len(pool)):
            if queue:
                submit(slot)
    while inflight:
        ready, _ = executor.wait(list(inflight), timeout=progress.interval)
        for ref in ready:
            slot, gen, name = inflight.pop(ref)
            try:
                done[name] = executor.get(ref)
                progress.update(1, done[name]["accounting"]["samples_in"])
            except ActorDied as err:  # the process died: a new actor redoes its shards
                attempts[name] = attempts.get(name, 0) + 1
                if gen == generation[slot]:
                    restarts += 1
                    log.warning("%s: the actor working on shard %s died (%s); replaced, shard redone",
                                progress.stage, name, _short(err))
                    executor.kill(pool[slot])
                    pool[slot] = make_actor()
                    generation[slot] += 1
                if attempts[name] > retries:
                    failures[name] = err
                else:
                    queue.insert(0, name)
            except Exception as err:  # noqa: BLE001 (an error in our code or the data: not retried)
                failures[name] = err
                log.error("%s: shard %s failed: %s", progress.stage, name, _short(err))
            if queue:
                submit(slot)
        if not ready:
            progress.update(0, 0)
    progress.update(0, 0, force=True)
    for actor in pool:
        executor.kill(actor)
    _raise_failures(progress.stage, failures, len(jobs))
    return done, restarts


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
