"""The one door to the cluster: every task, actor, shared object and gang of training workers vlp starts
goes through an `Executor`, and no other module of pipeline/ or stages/ imports Ray (tests/
test_import_graph.py checks it; cluster/ is the Ray Jobs client of `vlp submit`).

- `RayExecutor` is what `vlp run` uses: Ray tasks (retried, resources reserved), actors, the object store,
  Ray Train's TorchTrainer for gang-scheduled training, and the session (a local Ray, or a cluster's).
- `LocalExecutor` runs the same calls in this process, one after another: what `vlp train` needs under
  torchrun or the deepspeed launcher (their processes are the training gang: `launch` says this one's
  rank), and a way to run a stage with no Ray at all (tests/test_operators.py runs the shard map on it).

A stage gets its executor in its context (`StageContext.executor`); the shard loops (pipeline/parallel.py)
take it as an argument. Submitting returns a handle (`Ref`) that `wait` and `get` accept; an error a task
raised comes back from `get` as the task's own exception where the executor can (`cause`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pipeline.threads import cpu_threads, pin_cpu_threads

log = logging.getLogger("vlp")


def _on_its_cpus(fn: Callable, cpus: float) -> Callable:
    """`fn`, computing on `cpus` threads for each call: a pooled Ray worker keeps another task's count."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with cpu_threads(cpus):
            return fn(*args, **kwargs)
    return call


def _actor_on_its_cpus(cls: type, cpus: float) -> type:
    """`cls`, whose process computes on `cpus` threads from its start (the process is the actor's)."""
    def __init__(self, *args, **kwargs):
        pin_cpu_threads(cpus)
        cls.__init__(self, *args, **kwargs)
    return type(cls.__name__, (cls,), {"__init__": __init__, "__qualname__": cls.__qualname__,
                                       "__module__": cls.__module__, "__doc__": cls.__doc__})


@dataclass(frozen=True)
class Launch:
    """A training process started by a launcher (torchrun, deepspeed): its place in the gang."""
    rank: int
    world: int
    local_rank: int


class ActorDied(Exception):
    """The process of an actor ended (it is replaced and its work redone: pipeline/parallel.py)."""


class Executor:
    """What the stages ask of a cluster. Resources: `cpus`, `gpus`, `memory` (bytes) reserved per task or
    actor; `retries`: times a task whose process died (or, with `retry_exceptions`, that raised) runs again."""
    name = "executor"

    def session(self, ray_cfg: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def task(self, fn: Callable, *, cpus: float = 1.0, gpus: float = 0.0, memory: int | None = None,
             retries: int = 0, retry_exceptions: bool = False) -> Any:
        """A remote function: `.remote(*args)` submits it and returns a Ref."""
        raise NotImplementedError

    def actor(self, cls: type, *, cpus: float = 1.0, gpus: float = 0.0, concurrency: int = 1) -> Any:
        """An actor class: `.remote(*args)` starts one; `handle.method.remote(*args)` returns a Ref."""
        raise NotImplementedError

    def put(self, value: Any) -> Any:
        raise NotImplementedError

    def get(self, refs: Any) -> Any:
        raise NotImplementedError

    def wait(self, refs: list, timeout: float) -> tuple[list, list]:
        """(ready, not ready): at least one ready, or none after `timeout` seconds."""
        raise NotImplementedError

    def kill(self, actor: Any) -> None:
        raise NotImplementedError

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (CPU, GPU, ...)."""
        raise NotImplementedError

    def nodes(self) -> list[dict[str, float]]:
        """Each live node's resources."""
        return [self.resources()]

    def cause(self, err: BaseException) -> BaseException:
        """The exception the task itself raised, if `err` wraps one."""
        return err

    def is_actor_death(self, err: BaseException) -> bool:
        return isinstance(err, ActorDied)

    def train(self, worker: Callable[[dict, int, int, int], None], config: dict, *, workers: int,
              cpus_per_worker: float, use_gpu: bool, storage: str, max_failures: int, name: str = "train") -> None:
        """Run `worker(config, rank, world, local_rank)` on a gang of `workers` processes started together."""
        raise NotImplementedError


# --- Ray ------------------------------------------------------------------------------------------

class RayExecutor(Executor):
    name = "ray"

    @contextlib.contextmanager
    def session(self, ray_cfg: Any) -> Iterator[None]:
        """Use the Ray this process is already connected to, else connect or start one for the run."""
        import ray

        if ray.is_initialized():
            yield
            return
        # Ray workers inherit these; albumentations (imported by img2dataset) would otherwise phone home.
        env = {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore::UserWarning"}
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": True, "runtime_env": {"env_vars": env}}
        if os.environ.get("VLP_RAY_JOB"):  # set by `vlp submit` in the job's runtime_env
            # Inside a Ray Job (vlp submit): join its cluster with the job's own runtime_env (code, env vars).
            kwargs.pop("runtime_env")
            ray.init(address=ray_cfg.address or "auto", **kwargs)
        elif ray_cfg.address:
            from cluster.auth import use_token_if_available

            use_token_if_available()
            ray.init(address=ray_cfg.address, **kwargs)
        else:
            from cluster.auth import loopback_only, secure_local_token

            secure_local_token()  # token auth on, token file 0600 (cluster/auth.py)
            loopback_only()       # no port on other interfaces: a local run serves no one else
            if not ray_cfg.include_dashboard:   # no State API: Ray Train's cleaner would warn every second
                kwargs["runtime_env"]["worker_process_setup_hook"] = "pipeline.rayworker.quiet_known_noise"
            ray.init(address="local", num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard,
                     dashboard_host="127.0.0.1", **kwargs)
        try:
            yield
        finally:
            ray.shutdown()

    @contextlib.contextmanager
    def connected(self, address: str) -> Iterator[None]:
        """A short connection to a cluster (`vlp plan --address`), quiet."""
        import ray

        from cluster.auth import use_token_if_available

        use_token_if_available()
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()

    def task(self, fn, *, cpus=1.0, gpus=0.0, memory=None, retries=0, retry_exceptions=False):
        import ray

        options = {"num_cpus": cpus, "max_retries": retries, "retry_exceptions": retry_exceptions}
        if gpus:
            options["num_gpus"] = gpus
        if memory is not None:
            options["memory"] = memory
        return ray.remote(_on_its_cpus(fn, cpus)).options(**options)

    def actor(self, cls, *, cpus=1.0, gpus=0.0, concurrency=1):
        import ray

        return ray.remote(_actor_on_its_cpus(cls, cpus)).options(num_cpus=cpus, num_gpus=gpus,
                                                                 max_concurrency=concurrency)

    def put(self, value):
        import ray

        return ray.put(value)

    def get(self, refs):
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as err:
            raise ActorDied(str(err)) from err

    def wait(self, refs, timeout):
        import ray

        return ray.wait(refs, num_returns=1, timeout=timeout)

    def kill(self, actor):
        import ray

        ray.kill(actor)

    def resources(self):
        import ray

        return dict(ray.cluster_resources())

    def nodes(self):
        import ray

        return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]

    def cause(self, err):
        import ray

        if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
            return err.cause
        return err

    def train(self, worker, config, *, workers, cpus_per_worker, use_gpu, storage, max_failures, name="train"):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = _interruptible(TorchTrainer)(
            _RayTrainWorker(worker, cpus_per_worker),
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if main_thread else None
        try:
            trainer.fit()
        except Exception:
            if trainer.interrupted:
                raise KeyboardInterrupt from None   # the aborted controller's death is the interrupt's doing
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        if trainer.interrupted:
            raise KeyboardInterrupt


def _interruptible(trainer_class):
    """Ray Train's fit() puts its own Ctrl-C handler on the main thread and leaves it there when it
    returns: Ctrl-C during training ended `vlp run` with exit code 1 and no word of what was kept, and any
    Ctrl-C later in the run (CapFilt, evaluate) went to that stale handler and was lost. This subclass's
    handler asks the controller to abort, as Ray's does (the workers stop; checkpoints stay), and the
    caller raises KeyboardInterrupt once fit() is back; a second Ctrl-C stops waiting for the abort.
    `train` puts the previous handler back either way. (It overrides Ray's private
    `_register_sigint_handler`; tests/test_pretrain.py fails if a Ray upgrade renames it.)"""

    class InterruptibleTrainer(trainer_class):
        interrupted = False

        def _register_sigint_handler(self, controller) -> None:
            def on_ctrl_c(signum, frame):
                if self.interrupted:
                    raise KeyboardInterrupt
                self.interrupted = True
                log.warning("interrupted: stopping the training workers (Ctrl-C again to stop waiting for them)")
                controller.abort.remote()

            signal.signal(signal.SIGINT, on_ctrl_c)

    return InterruptibleTrainer


@dataclass(frozen=True)
class _RayTrainWorker:
    """Ray Train's entry point in each worker: the rank and world Ray Train gives, then the worker, on as
    many threads as the worker has CPUs (its process is the worker's)."""
    worker: Callable[[dict, int, int, int], None]
    cpus: float

    def __call__(self, config: dict) -> None:
        import ray.train

        pin_cpu_threads(self.cpus)
        ctx = ray.train.get_context()
        self.worker(config, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
        ray.train.report({"done": True})


# --- in this process ------------------------------------------------------------------------------

class _Done:
    """A Ref of the local executor: the call already ran; its value or its exception."""

    def __init__(self, call: Callable[[], Any]):
        try:
            self.value, self.error = call(), None
        except Exception as err:  # noqa: BLE001 (handed back by get, as Ray does)
            self.value, self.error = None, err


class _LocalTask:
    def __init__(self, fn: Callable):
        self.fn = fn

    def remote(self, *args) -> _Done:
        return _Done(lambda: self.fn(*args))


class _LocalMethod:
    def __init__(self, method: Callable):
        self.method = method

    def remote(self, *args) -> _Done:
        return _Done(lambda: self.method(*args))


class _LocalActor:
    """An actor's instance in this process: its calls on its CPUs' threads, and this process's after."""

    def __init__(self, instance: Any, cpus: float):
        self._instance, self._cpus = instance, cpus

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(_on_its_cpus(getattr(self._instance, name), self._cpus))


class _LocalActorClass:
    def __init__(self, cls: type, cpus: float):
        self.cls, self.cpus = cls, cpus

    def remote(self, *args) -> _LocalActor:
        with cpu_threads(self.cpus):
            return _LocalActor(self.cls(*args), self.cpus)


class LocalExecutor(Executor):
    """Everything in this process, in the order it is asked for. `launch`: this process's place in a
    training gang its launcher started (`vlp train`); training then runs on those processes."""
    name = "local"

    def __init__(self, launch: Launch | None = None, cpus: float | None = None):
        self.launch = launch
        self.cpus = float(cpus or os.cpu_count() or 1)

    def task(self, fn, *, cpus=1.0, **resources):
        return _LocalTask(_on_its_cpus(fn, cpus))

    def actor(self, cls, *, cpus=1.0, **resources):
        return _LocalActorClass(cls, cpus)

    def put(self, value):
        return value   # passed to calls as is (Ray resolves a Ref in a call's arguments the same way)

    def get(self, refs):
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if not isinstance(refs, _Done):
            return refs   # a value passed where a Ref may be (Ray resolves Refs in arguments)
        if refs.error is not None:
            raise refs.error
        return refs.value

    def wait(self, refs, timeout):
        return refs[:1], refs[1:]

    def kill(self, actor):
        return None

    def resources(self):
        return {"CPU": self.cpus}

    def train(self, worker, config, *, workers, cpus_per_worker, use_gpu, storage, max_failures, name="train"):
        if self.launch is None:
            raise RuntimeError("the local executor trains on a launcher's processes (vlp train); none started this one")
        import torch.distributed as dist

        # rank 0 runs the stage: every other rank waits for the worker and its config (pipeline/torchrun.py)
        dist.broadcast_object_list([(worker, config)], src=0)
        log.info("%s: training on %d processes started by the launcher", name, self.launch.world)
        worker(config, self.launch.rank, self.launch.world, self.launch.local_rank)


RAY = RayExecutor()
