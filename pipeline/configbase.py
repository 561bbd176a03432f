"""What every config section checks with: the run config (pipeline/config.py) and each stage's own
section (stages/<name>/config.py) import these, never each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configtree import keeps_output

LIST_FIELDS = ("similarity", "punsafe", "pwatermark", "width", "height")
"""The numbers a URL list may carry per row (LAION's similarity, punsafe, ...), kept in the sample json."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def rate(name: str, value: float) -> None:
    require(0.0 <= value <= 1.0, f"{name}: must be a rate between 0 and 1, got {value}")


def drop_shares(max_share: float, limits: dict[str, float]) -> None:
    """Checks of a filtering stage's breaker settings (max_drop_share, drop_share_limits)."""
    require(0.0 < max_share <= 1.0, f"max_drop_share: must be in (0, 1] (1 turns the breaker off), got {max_share}")
    for reason, share in limits.items():
        require(0.0 < share <= 1.0, f"drop_share_limits.{reason}: must be in (0, 1] (1: no limit), got {share}")


@dataclass(frozen=True)
class Section:
    """What the run config knows of a stage before its code is imported: its settings' dataclass (the run
    config's `<name>:` section), the rounds it runs in, and whether a run has it unless its `stages` say
    otherwise. Declared as SECTION in stages/<name>/config.py; its Stage (stages/<name>/stage.py) reads it."""
    config: type
    rounds: Literal["first", "later", "every"] = "first"
    """first: round 0 only (the web's data); later: bootstrapping rounds 1.. only; every: all rounds.
    Bootstrapping rounds exist when a `later` stage is among the config's stages."""
    optional: bool = False
    """Off unless the config's `stages` list it (a curation operator a run asks for)."""


@dataclass(frozen=True, kw_only=True)
class ShardMapSettings:
    """The settings every shard-map stage has (pipeline/shardmap.py; its section's dataclass inherits them)."""
    cpus_per_task: float = keeps_output(1.0)
    """Ray CPUs one shard task reserves."""
    batch_size: int = 64
    """Samples the operator judges at once (one forward pass of a model: a model's scores may differ in
    their last bits with the batch, so it is part of the result)."""
    max_drop_share: float = keeps_output(0.5)
    """The breaker: when one drop reason removes more than this share of the input, the stage stops before
    its manifest (pipeline/breaker.py). A reason whose share the plan sets by design (a top fraction, a
    cap per concept) is held to that share instead (+ 0.02)."""
    drop_share_limits: dict[str, float] = keeps_output(default_factory=dict)
    """Per drop reason, a share that replaces `max_drop_share` for it."""

    def __post_init__(self) -> None:
        require(self.cpus_per_task > 0, "cpus_per_task: must be > 0")
        require(self.batch_size >= 1, "batch_size: must be >= 1")
        drop_shares(self.max_drop_share, self.drop_share_limits)
