"""Shard tasks run in a bounded window, refilled as results arrive; failures are reported, not lost."""
from __future__ import annotations

import time

import pytest
import ray

from pipeline.errors import StageFailed
from pipeline.executor import RAY, LocalExecutor
from pipeline.parallel import Progress, run_shard_tasks, task_window
from pipeline.threads import prefetched


def test_no_more_than_the_window_is_in_flight_and_every_shard_is_answered(ray_cluster):
    # defined in here, so that Ray ships them by value (the workers cannot import the tests)
    @ray.remote
    class InFlight:
        def __init__(self):
            self.now = self.most = 0

        def enter(self):
            self.now += 1
            self.most = max(self.most, self.now)

        def leave(self):
            self.now -= 1

        def peak(self):
            return self.most


    def _shard(counter, i: int) -> int:
        ray.get(counter.enter.remote())
        time.sleep(0.05)
        ray.get(counter.leave.remote())
        if i == 5:
            raise ValueError("shard 5 is broken")
        return i

    counter = InFlight.remote()
    task = ray.remote(_shard).options(num_cpus=0.1, max_retries=0)
    jobs = {f"{i:05d}.tar": (counter, i) for i in range(12)}
    with pytest.raises(StageFailed, match=r"1 of 12 shards failed \(00005.tar\)"):
        run_shard_tasks(RAY, task, jobs, Progress("test", 12, 0), lambda r: 1, window=3)
    assert ray.get(counter.peak.remote()) <= 3   # 12 tasks of 0.1 CPU would all fit on 2 CPUs at once
    good = {k: v for k, v in jobs.items() if k != "00005.tar"}
    assert run_shard_tasks(RAY, task, good, Progress("test", 11, 0), lambda r: 1, window=3) == \
        {k: int(k[:5]) for k in good}
    assert task_window(2.0) == 4 and task_window(64.0) == 128


@pytest.mark.parametrize("where", ["ray", "local"])
def test_both_executors_hand_back_a_tasks_own_error_and_an_actors_death(where, request):
    """What the stages rely on from an executor: `cause` gives the exception the task raised (a stage turns an
    InputError into its own message), `get` of a call to a dead actor raises ActorDied (the pool replaces it)."""
    from pipeline.errors import InputError
    from pipeline.executor import ActorDied, LocalExecutor

    if where == "ray":
        request.getfixturevalue("ray_cluster")
    executor = RAY if where == "ray" else LocalExecutor()

    def broken(path: str) -> None:
        raise InputError(f"{path}: not a whole tar archive")

    with pytest.raises(Exception) as err:
        executor.get(executor.task(broken, cpus=0.1).remote("x.tar"))
    cause = executor.cause(err.value)
    assert isinstance(cause, InputError) and str(cause) == "x.tar: not a whole tar archive"
    def count(items: list) -> int:
        return len(items)

    assert executor.get(executor.task(count, cpus=0.1).remote([1, 2, 3])) == 3
    assert executor.get(executor.put({"plan": 1})) == {"plan": 1}
    if where == "ray":   # only a process can die
        class Mortal:
            def die(self):
                import os
                os._exit(1)

        actor = executor.actor(Mortal, cpus=0.1).remote()
        with pytest.raises(ActorDied):
            executor.get(actor.die.remote())


def test_prefetched_keeps_order_runs_ahead_by_its_depth_raises_where_the_error_was_and_stops_early():
    import threading

    produced = []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"item {i} is bad")
            produced.append(i)
            yield i

    assert list(prefetched(items(50), 3)) == list(range(50))
    produced.clear()
    got = []
    with pytest.raises(ValueError, match="item 5 is bad"):
        for x in prefetched(items(10, fail_at=5), 2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4], "every item before the error arrives first"
    produced.clear()
    stream = prefetched(items(1000), 2)
    assert next(stream) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + 2 + 1, "the producer waits: at most depth items ahead (+1 in hand)"
    stream.close()   # the consumer stops early: the producer thread ends too
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "vlp-prefetch"]


def _probes() -> tuple:
    """A task and an actor that tell their threads, made here so that Ray ships them by value."""
    def threads() -> tuple[int, int]:
        import os

        import torch

        return os.getpid(), torch.get_num_threads()

    class Probe:
        def __init__(self):
            self.at_start = threads()[1]

        def threads(self) -> tuple[int, int]:
            return self.at_start, threads()[1]

    return threads, Probe


def test_a_ray_task_or_actor_computes_on_as_many_threads_as_it_has_cpus(ray_cluster):
    # Ray runs tasks in pooled workers whatever CPUs they ask for, and torch kept the thread count of the
    # first task a worker ran: 2-CPU CapFilt fine-tunes computed on one thread after 1-CPU evaluate tasks
    _threads, Probe = _probes()
    one, two = RAY.task(_threads, cpus=1), RAY.task(_threads, cpus=2)
    seen: dict[int, set] = {1: set(), 2: set()}
    for _ in range(4):
        for cpus, task in ((1, one), (2, two)):
            seen[cpus].add(RAY.get(task.remote())[1])
    assert seen == {1: {1}, 2: {2}}
    for cpus in (2, 1):
        actor = RAY.actor(Probe, cpus=cpus).remote()
        assert RAY.get(actor.threads.remote()) == (cpus, cpus)
        RAY.kill(actor)


def test_a_local_task_or_actor_computes_on_its_cpus_and_gives_the_process_its_threads_back():
    import os

    import torch

    _threads, Probe = _probes()
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    local = LocalExecutor()
    cpus = before + 1
    assert local.get(local.task(_threads, cpus=cpus).remote())[1] == cpus
    actor = local.actor(Probe, cpus=cpus).remote()
    assert torch.get_num_threads() == before
    assert local.get(actor.threads.remote()) == (cpus, cpus)
    assert torch.get_num_threads() == before and os.environ.get("OMP_NUM_THREADS") == env
