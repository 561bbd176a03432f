"""`vlp train CONFIG --run-dir DIR`: the pretrain stage under torchrun or the deepspeed launcher, with no
Ray, for clusters that schedule with Slurm. For example, on each of N nodes (Slurm's srun):

    torchrun --nnodes N --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \\
        -m pipeline.cli train CONFIG --run-dir DIR

Every process runs the command. Rank 0 is the driver: it runs the runner for the pretrain stage only,
so the fingerprints, tokenizer, initial weights, checkpoints, consolidation, export and manifest are
the Ray path's, file for file (a run trained here resumes or continues under `vlp run`, and the other
way round). The runner's executor is this process (pipeline/executor.py's LocalExecutor with the
launcher's ranks): for each training it broadcasts the workers' config; every rank then runs the same
`train_loop` Ray Train runs. The data stages run before, with `vlp run --only
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
    from pipeline.train.deepspeed_config import build_comm_op, import_deepspeed
    from pipeline.train.loop import train_loop

    if "RANK" not in os.environ:   # no launcher: a world of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    here = Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    cfg = load_config(config_path, overrides)   # on every rank: a bad config stops all of them at once
    if cfg.pretrain.num_workers != here.world:
        raise ConfigError(f"pretrain.num_workers is {cfg.pretrain.num_workers}, but the launcher started "
                          f"{here.world} processes; they must agree (the global batch and the data split depend "
                          f"on it): --set pretrain.num_workers={here.world}, or launch {cfg.pretrain.num_workers}")
    if torch.cuda.is_available():
        torch.cuda.set_device(here.local_rank)
    build_comm_op()   # before the process group, as in the Ray path (pipeline/train/loop.py)
    import_deepspeed().init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                        auto_mpi_discovery=False)
    try:
        if here.rank == 0:
            run = runner.execute(cfg, run_dir or runner.default_run_dir(cfg), ["pretrain"],
                                 executor=LocalExecutor(launch=here))
            dist.broadcast_object_list([None], src=0)   # the end; after an error torchrun stops the others
            print(f"run directory: {run.root}")
        else:
            while (config := _receive_training()) is not None:
                train_loop(config, here.rank, here.world, here.local_rank)
    finally:
        dist.destroy_process_group()
    return 0


def _receive_training() -> dict | None:
    """On ranks other than 0: the next training's config from rank 0 (LocalExecutor.train), None at the end."""
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
