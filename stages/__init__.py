"""The stage registry: the name of every stage of the graph, one line each, in the order they run within
a round. A stage is the folder stages/<name>/: `config.py` declares its settings (SECTION: the run
config's `<name>:` section, the rounds it runs in, whether it is optional) and `stage.py` its `Stage`
(pipeline/stage.py: what it reads, its run, its resources) with its driver and worker code. The run
config gets its sections from here (pipeline/config.py), the runner its graph (pipeline/graph.py). The
steps that run after every round and commit no manifest (the report) are the engine's own:
pipeline/report.py's AFTER_ROUNDS.

This module imports no stage code: the config reads the light `config.py` modules, and a stage's
`stage.py` (Ray, torch) is imported only when a graph is walked.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.configbase import Section
    from pipeline.stage import Stage

NAMES: tuple[str, ...] = (
    "download",
    "prefilter",
    "score_filter",
    "balance",
    "capfilt",
    "pretrain",
    "evaluate",
)


def section(name: str) -> "Section":
    """The settings' declaration of stage `name` (stages/<name>/config.py: SECTION)."""
    return import_module(f"stages.{name}.config").SECTION


def stage(name: str) -> "Stage":
    """The declaration of stage `name` (stages/<name>/stage.py: STAGE); imports its code."""
    declared = import_module(f"stages.{name}.stage").STAGE
    if declared.name != name:
        raise AssertionError(f"stages/{name}/stage.py declares a stage named {declared.name!r}")
    return declared


def registry() -> "tuple[Stage, ...]":
    return tuple(stage(name) for name in NAMES)
