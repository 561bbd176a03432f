"""The pretrain stage's side of `vlp train` (pipeline/torchrun.py): whether this process was started by a
launcher (torchrun, deepspeed) rather than by Ray Train, and, on rank 0, handing each training's config to
every rank and training with them. Knows nothing of the runner, which calls the stage that calls this.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("vlp")


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    local_rank: int


_current: Launch | None = None


def launched() -> Launch | None:
    """This process's place while `vlp train` runs, else None (the stage then uses Ray Train)."""
    return _current


@contextlib.contextmanager
def launched_as(here: Launch) -> Iterator[None]:
    """While inside, `launched()` is `here`: the pretrain stage trains on the launcher's processes."""
    global _current
    _current = here
    try:
        yield
    finally:
        _current = None


def run_training(config: dict) -> None:
    """On rank 0, from the pretrain stage: send the workers' config to every rank, then train too."""
    import torch.distributed as dist

    from pipeline.train.loop import train_loop

    here = launched()
    dist.broadcast_object_list([config], src=0)
    log.info("pretrain: training on %d processes started by the launcher", here.world)
    train_loop(config, here.rank, here.world, here.local_rank)


def receive_training() -> dict | None:
    """On ranks other than 0: the next training's config from rank 0, None when the run is over."""
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
