"""The stage registry: every stage of the graph, in the order they run within a round. A new stage is
a module that declares its `Stage` (pipeline/stage.py) and a line here (and its config section in
pipeline/config.py's RunConfig)."""
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


def _report(run_root):
    from pipeline.report import write_report   # imported when it runs: the report reads the status

    return write_report(run_root)


# Steps that run once after every round and commit no manifest: (name in `stages:`, what it does).
AFTER_ROUNDS = {"report": _report}
