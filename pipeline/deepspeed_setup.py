"""DeepSpeed in this process: importing it with the right accelerator, and building the op its CPU
backend compiles at its first start (the training stages, `vlp train` and the benches start it)."""
from __future__ import annotations

import os
from pathlib import Path


def import_deepspeed():
    """Import deepspeed, telling it to use the CPU accelerator where there is no GPU (it must be told
    before its first import)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def build_comm_op() -> None:
    """Build (or load) the op DeepSpeed's CPU backend JIT-compiles at its first `init_distributed`,
    under a lock the kernel releases when its holder dies.

    torch guards a JIT build with a lock *file* (`<build dir>/lock`, FileBaton) and every other process
    waits for it to disappear, forever. bench/chaos.py found a SIGKILL during a first pretraining start
    leaving it behind: every later pretraining on that machine hung in `init_distributed`. Every vlp
    build goes through the flock here, so a baton file found while holding it is a dead builder's and
    is removed. The module loaded here is cached by DeepSpeed: `init_distributed` then builds nothing."""
    import fcntl
    import logging

    import_deepspeed()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils import cpp_extension

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return   # what init_distributed checks too: no such op on this accelerator
    build_dir = Path(cpp_extension._get_build_directory(builder.NAME, verbose=False))
    with open(build_dir.parent / f".{builder.NAME}.vlp-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        baton = build_dir / "lock"
        if baton.exists():
            logging.getLogger("vlp").warning("%s: removing the build lock a killed build left", baton)
            baton.unlink()
        builder.load(verbose=False)
