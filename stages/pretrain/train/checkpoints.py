"""Checkpoint commit protocol on top of DeepSpeed's.

DeepSpeed writes its `latest` file before its final barrier, so `latest` can name a checkpoint that
some rank never finished. Ours: every rank saves (DeepSpeed's files + its own RNG and data position),
all ranks meet at a barrier, then rank 0 writes `COMPLETE`. Only checkpoints with `COMPLETE` are ever
resumed from.

On an object-store run directory (pipeline/storage.py) DeepSpeed writes into a node-local folder; each
rank then puts the files it wrote (DeepSpeed names them by rank) into the run's checkpoints folder,
all meet again, and rank 0 writes `COMPLETE` there first, then locally. A resume fetches the latest
checkpoint complete in the run directory into the node-local folder and loads it from there.

Loading never unpickles code: whoever can write the run directory must not run code in the train
workers. Our rank state holds only tensors, numbers and strings (RNG states are converted), and every
checkpoint file — ours and DeepSpeed's, whose loaders pass `weights_only=False` themselves — is read
with `torch.load(weights_only=True)` (`safe_loads`), which admits tensors, containers and the three
plain DeepSpeed classes its checkpoints hold, and refuses any other global.
"""
from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path

import numpy as np

import torch
import torch.distributed as dist

from pipeline.fsutil import atomic_path, atomic_write_json, read_json
from pipeline.storage import download_tree, remove_tree, upload

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


def writer_of(name: str) -> int:
    """The rank that wrote a checkpoint file: DeepSpeed's per-rank files say it (zero_pp_rank_<r>_...),
    ours too (rank-<r>.pt); the rest (mp_rank_00_model_states.pt) rank 0 writes."""
    m = re.match(r"^(?:zero_pp_rank_|rank-)(\d+)", name)
    return int(m.group(1)) if m else 0


def save(engine, folder: Path, step: int, rank: int, rank_state: dict, keep: int, remote=None) -> Path:
    """Save a checkpoint in `folder` (node-local), and put it in `remote` (the run's folder) if given."""
    tag = tag_for(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step})
    with atomic_path(folder / tag / f"rank-{rank}.pt") as tmp:
        torch.save(rank_state, tmp)
    dist.barrier()
    if remote is not None:   # on several nodes a file is only on the node of the rank that wrote it
        for file in sorted((folder / tag).iterdir()):
            if file.is_file() and writer_of(file.name) == rank:
                upload(file, remote / tag / file.name)
        dist.barrier()
    if rank == 0:
        meta = {"step": step, "world_size": dist.get_world_size()}
        for target in (remote, folder) if remote is not None else (folder,):
            atomic_write_json(target / tag / COMPLETE, meta)
            for _, old in complete_checkpoints(target)[:-keep]:
                remove_tree(old)
    dist.barrier()
    return folder / tag


def fetch_latest(remote, folder: Path, local_rank: int) -> int | None:
    """The step of the latest checkpoint complete in `remote`, fetched into `folder` by each node's
    first rank (the others wait); None if there is none."""
    latest = latest_complete(remote)
    if latest is not None and local_rank == 0:
        download_tree(latest[1], folder / latest[1].name)
    dist.barrier()
    return latest[0] if latest is not None else None


def load(engine, folder: Path, step: int, rank: int) -> dict:
    """Restore model, optimizer and LR schedule (DeepSpeed) and return this rank's own state."""
    tag = tag_for(step)
    meta = read_json(folder / tag / COMPLETE)
    if meta["world_size"] != dist.get_world_size():
        raise RuntimeError(f"checkpoint {tag} was written by {meta['world_size']} ranks; this run has "
                           f"{dist.get_world_size()} (resuming on another world size is not supported)")
    with safe_loads():
        path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {folder / tag}")
        return torch.load(folder / tag / f"rank-{rank}.pt")


def _deepspeed_globals() -> list:
    """The plain classes DeepSpeed's checkpoints pickle (no code of theirs runs on load: the unpickler
    only makes the object and sets its fields)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_loads():
    """Every torch.load in the block is `weights_only=True`, whatever its caller asked (DeepSpeed's
    checkpoint and zero_to_fp32 loaders ask for False), with DeepSpeed's plain classes admitted."""
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    finally:
        torch.load = original


def rng_state(generator: torch.Generator) -> dict:
    """This process's RNG states as tensors and numbers (no numpy arrays or pickled objects)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "objective": generator.get_state(),
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["objective"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
