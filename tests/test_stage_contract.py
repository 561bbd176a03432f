"""The stage contract: the registry declares the graph, the runner knows no stage by name, manifests
round-trip through their one reader and writer."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
from conftest import ROOT, load_config, write_config
from pipeline import graph
import stages
from pipeline.config import DEFAULT_STAGES, STAGE_ORDER, RunConfig
from pipeline.manifest import Accounting, Manifest
from pipeline.runs import RunDir
from pipeline.report import AFTER_ROUNDS

REGISTRY = stages.registry()


def test_the_registry_declares_every_configurable_stage():
    assert {s.name for s in REGISTRY} | set(AFTER_ROUNDS) == set(STAGE_ORDER)
    for stage in REGISTRY:
        assert stage.rounds in ("first", "later", "every") and callable(stage.run) and callable(stage.request)


def test_a_stage_is_named_once_in_the_registry():
    """The run config's sections, its stage list and the graph all come from stages/__init__.py's NAMES."""
    assert STAGE_ORDER == stages.NAMES + ("report",) and [s.name for s in REGISTRY] == list(stages.NAMES)
    fields = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    for name in stages.NAMES:
        assert fields[name] is stages.section(name).config
        assert (name in DEFAULT_STAGES) != stages.section(name).optional
    for folder in (ROOT / "stages").iterdir():   # a stage folder that the registry does not name is dead code
        if folder.is_dir() and folder.name != "__pycache__":
            assert folder.name in stages.NAMES, f"stages/{folder.name}/ is not in stages/__init__.py's NAMES"


def test_the_runner_knows_no_stage_by_name():
    source = (ROOT / "pipeline" / "runner.py").read_text()
    names = [s.name for s in REGISTRY]   # the report (AFTER_ROUNDS) is the engine's own step, not a stage
    found = [n for n in names if re.search(rf"\b{n}\b", source)]
    assert found == [], f"pipeline/runner.py names stages {found}: declare it in the stage's module instead"


def test_the_engine_finds_a_stage_by_what_it_declares():
    """What the engine asks the registry for (pipeline/stage.py: having, provided): one stage fetches the
    web, one trains the model, one evaluates it, and one provides the held-out data; a role nobody
    declares, or two that declare one, is an error, not a guess."""
    from pipeline.stage import having, provided

    assert having("fetches") == ["download"] and having("trains") == ["pretrain"]
    assert having("evaluates") == ["evaluate"]
    assert having("curates_web") == ["download", "prefilter", "score_filter", "balance"]
    assert provided("held_out") is stages.stage("evaluate").provides["held_out"]
    with pytest.raises(AssertionError, match="0 stages provide"):
        provided("a role no stage declares")
    with_report = [s.name for s in REGISTRY if s.report is not None]
    assert with_report == ["download", "score_filter", "balance", "capfilt", "pretrain"]


def test_rounds_come_from_what_each_stage_declares(tmp_path, toyweb):
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, stages=list(DEFAULT_STAGES), rounds=2))
    order = graph.schedule(cfg, list(cfg.stages))
    assert order == [("download", 0), ("prefilter", 0), ("pretrain", 0), ("evaluate", 0),
                     ("capfilt", 1), ("pretrain", 1), ("evaluate", 1),
                     ("capfilt", 2), ("pretrain", 2), ("evaluate", 2)]
    assert graph.upstreams(cfg, "capfilt", 2) == [("prefilter", 0), ("pretrain", 1)]
    no_bootstrap = load_config(write_config(tmp_path / "d.yaml", toyweb,
                                            stages=["download", "prefilter", "pretrain", "evaluate"]))
    assert [r for _, r in graph.schedule(no_bootstrap, list(no_bootstrap.stages))] == [0, 0, 0, 0]


def test_a_curation_operator_slots_in_between_the_web_stages_and_their_readers(tmp_path, toyweb):
    """An optional filter of the web's data reads the stage before it, and round 0's pretraining and
    CapFilt read the last: no stage names another's upstream."""
    both = load_config(write_config(tmp_path / "a.yaml", toyweb, rounds=1,
                                    stages=list(DEFAULT_STAGES) + ["score_filter", "balance"]))
    assert graph.upstreams(both, "score_filter", 0) == [("prefilter", 0)]
    assert graph.upstreams(both, "balance", 0) == [("score_filter", 0)]
    assert graph.upstreams(both, "pretrain", 0) == [("balance", 0)]
    assert graph.upstreams(both, "capfilt", 1) == [("balance", 0), ("pretrain", 0)]
    assert [s for s, r in graph.schedule(both, list(both.stages)) if r == 0] == \
        ["download", "prefilter", "score_filter", "balance", "pretrain", "evaluate"]
    one = load_config(write_config(tmp_path / "b.yaml", toyweb, stages=["download", "prefilter", "balance", "pretrain"]))
    assert graph.upstreams(one, "balance", 0) == [("prefilter", 0)] and graph.upstreams(one, "pretrain", 0) == [("balance", 0)]


def test_a_manifest_reads_back_what_was_written(tmp_path):
    out = RunDir(tmp_path / "run").stage("pretrain", 1)
    out.path.mkdir(parents=True)
    acc = Accounting(samples_in=5, samples_kept=3)
    acc.dropped["too_small"] = 2
    manifest = Manifest.build(out, "fp", {"steps": 3}, ["up"], [], 1.0, {"export": "model"}, totals=acc)
    out.commit(manifest)
    on_disk = json.loads((out.path / "manifest.json").read_text())
    assert on_disk["export"] == "model" and on_disk["totals"]["samples_dropped"] == 2  # details at the top level
    again = out.manifest()
    assert again == manifest and again.totals.samples_dropped == 2 and again.details == {"export": "model"}
