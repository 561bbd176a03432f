"""The stage registry: every stage of the graph, in the order they run within a round. A new stage is
a module that declares its `Stage` (pipeline/stage.py) and a line here (and its config section in
pipeline/config.py's RunConfig). The steps that run after every round and commit no manifest (the report)
are the engine's own: pipeline/report.py's AFTER_ROUNDS."""
from __future__ import annotations

from pipeline.stage import Stage
from stages import capfilt, download, evaluate, prefilter, pretrain

REGISTRY: tuple[Stage, ...] = (
    download.STAGE,
    prefilter.STAGE,
    capfilt.STAGE,
    pretrain.STAGE,
    evaluate.STAGE,
)
BY_NAME = {stage.name: stage for stage in REGISTRY}

