"""`vlp train CONFIG --run-dir DIR`: the training stage (the registry's stage that declares `trains`) under
torchrun or the deepspeed launcher, with no Ray, for clusters that schedule with Slurm. For example, on
each of N nodes (Slurm's srun):

    torchrun --nnodes N --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
        -m pipeline.cli train CONFIG --run-dir DIR

Every process runs the command. Rank 0 is the driver: it runs the runner for the training stage only,
so the fingerprints, tokenizer, initial weights, checkpoints, consolidation, export and manifest are
the Ray path's, file for file (a run trained here resumes or continues under `vlp run`, and the other
way round). The runner's executor is this process (pipeline/executor.py's LocalExecutor with the
launcher's ranks): for each training it broadcasts the worker and its config; every rank then runs the
worker Ray Train runs. The data stages run before, with `vlp run --only
download,prefilter`. A killed process: torchrun stops the others; start the command again (or use
torchrun's --max-restarts) and training resumes from the last complete checkpoint.
"""
from __future__ import annotations

import os
import socket

import torch

from pipeline.errors import ConfigError
from pipeline.executor import Launch, LocalExecutor


def train_command(config_path: str, run_dir: str | None, overrides: list[str]) -> int:
    import torch.distributed as dist

    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.deepspeed_setup import build_comm_op, import_deepspeed
    from pipeline.stage import having

    if "RANK" not in os.environ:   # no launcher: a world of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    here = Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    cfg = load_config(config_path, overrides)   # on every rank: a bad config stops all of them at once
    (name,) = having("trains")
    workers = getattr(cfg, name).num_workers
    if workers != here.world:
        raise ConfigError(f"{name}.num_workers is {workers}, but the launcher started {here.world} processes; they "
                          f"must agree (the global batch and the data split depend on it): --set "
                          f"{name}.num_workers={here.world}, or launch {workers}")
    if torch.cuda.is_available():
        torch.cuda.set_device(here.local_rank)
    build_comm_op()   # before the process group, as the Ray path's workers do
    import_deepspeed().init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                        auto_mpi_discovery=False)
    try:
        if here.rank == 0:
            run = runner.execute(cfg, run_dir or runner.default_run_dir(cfg), [name],
                                 executor=LocalExecutor(launch=here))
            dist.broadcast_object_list([None], src=0)   # the end; after an error torchrun stops the others
            print(f"run directory: {run.root}")
        else:
            while (training := _receive_training()) is not None:
                worker, config = training
                worker(config, here.rank, here.world, here.local_rank)
        # every rank through its last collective before any tears the group down: once, in CI, rank 1
        # aborted in teardown ("terminate called without an active exception") as rank 0 destroyed its
        # group right after the end's broadcast. Only on success: after an error a barrier would hang.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _receive_training() -> tuple | None:
    """On ranks other than 0: the next training's (worker, config) from rank 0 (LocalExecutor.train; the
    worker travels by its module and name, as pickle sends a function), None at the end."""
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
