"""Checkpoint commit protocol on top of DeepSpeed's.

DeepSpeed writes its `latest` file before its final barrier, so `latest` can name a checkpoint that
some rank never finished. Ours: every rank saves (DeepSpeed's files + its own RNG and data position),
all ranks meet at a barrier, then rank 0 writes `COMPLETE`. Only checkpoints with `COMPLETE` are ever
resumed from.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.fsutil import atomic_path, atomic_write_json, read_json

TAG = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            m = TAG.match(path.name)
            if m and (path / COMPLETE).is_file():
                found.append((int(m.group(1)), path))
    return sorted(found)


def latest_complete(folder: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def save(engine, folder: Path, step: int, rank: int, rank_state: dict, keep: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step})
    with atomic_path(folder / tag / f"rank-{rank}.pt") as tmp:
        torch.save(rank_state, tmp)
    dist.barrier()
    if rank == 0:
        atomic_write_json(folder / tag / COMPLETE, {"step": step, "world_size": dist.get_world_size()})
        for _, old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder / tag


def load(engine, folder: Path, step: int, rank: int) -> dict:
    """Restore model, optimizer and LR schedule (DeepSpeed) and return this rank's own state."""
    tag = tag_for(step)
    meta = read_json(folder / tag / COMPLETE)
    if meta["world_size"] != dist.get_world_size():
        raise RuntimeError(f"checkpoint {tag} was written by {meta['world_size']} ranks; this run has "
                           f"{dist.get_world_size()} (resuming on another world size is not supported)")
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder / tag}")
    return torch.load(folder / tag / f"rank-{rank}.pt", weights_only=False)
