"""Fingerprints hash meaning: execution-only settings (parallelism, retries, logging, checkpoint
intervals, safety limits) stay out, so changing one and resuming keeps every committed shard and
checkpoint (a new logging interval over a half-trained pretrain: test_pretrain.py's resume test);
settings that change a stage's output, and the run's seed for the seeded stages, go in."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from conftest import load_config, write_config
import stages
from pipeline.configtree import CHANGES_OUTPUT, to_plain
from pipeline.runs import STATS_SUFFIX

# Every field that does not change its stage's output, by stage, with another value to try. Adding a
# field here is a decision: the test below checks that this table is exactly what the config marks.
EXECUTION_ONLY = {
    "download": {"thread_count": 4, "cpus_per_task": 0.5, "shard_retries": 5, "per_host_connections": 4,
                 "per_host_rate": 2.0, "host_rates": {"127.0.0.1": 5.0}, "max_drop_share": 0.9,
                 "drop_share_limits": {"duplicate_url": 0.9}, "max_failed_share": 0.9, "failed_share_min_urls": 50},
    "prefilter": {"cpus_per_task": 0.5, "max_drop_share": 0.9, "drop_share_limits": {"duplicate_near": 0.9},
                  "dedup_partitions": 7},
    "pretrain": {"cpus_per_worker": 2.0, "activation_checkpointing": True, "checkpoint_every": 7,
                 "keep_checkpoints": 5, "log_every": 3, "max_failures": 4, "peak_tflops": 100.0, "loader_prefetch": 0},
    "evaluate": {"batch_size": 16},
    "capfilt": {"actors": 1, "cpus_per_actor": 0.5, "shard_retries": 0, "max_drop_share": 0.9,
                "drop_share_limits": {"filter_rejected": 0.9}, "prefetch_batches": 0, "shards_per_actor": 1},
    # the model's and the entry list's content enter as inputs (their fingerprints), not their paths
    "score_filter": {"cpus_per_task": 0.5, "max_drop_share": 0.9,
                     "drop_share_limits": {"score_below_threshold": 0.9}, "clip_model": "/elsewhere/clip"},
    "balance": {"cpus_per_task": 0.5, "max_drop_share": 0.9,
                "drop_share_limits": {"balance_no_entry": 0.9}, "entries": "/elsewhere/entries.txt"},
}
# Some that do change it: they must move the fingerprint.
OUTPUT = {
    "download": {"image_size": 40, "timeout": 4.0, "max_body_bytes": 2**20, "allow_private_hosts": ["127.0.0.2"],
                 "dedup_urls": False, "rate_limit_retries": 1},
    "prefilter": {"min_caption_words": 3, "near_max_distance": 0.05, "list_max": {"punsafe": 0.5}},
    "pretrain": {"steps": 301, "num_workers": 1, "micro_batch": 8, "zero_stage": 1},
    "evaluate": {"rerank_k": 2},
    "capfilt": {"batch_size": 8, "top_p": 0.8, "threshold": 0.7},
    "score_filter": {"keep_top": 0.5, "batch_size": 8},
    "balance": {"t": 5, "min_count": 3, "keep_unmatched": True},
}


def _config_for(tmp_path, toyweb):
    return load_config(write_config(tmp_path / "c.yaml", toyweb, stages=["download", "prefilter"]))


def _output_view(cfg, stage: str, field: str, value):
    section = getattr(cfg, stage)
    return to_plain(section, output_only=True), to_plain(dataclasses.replace(section, **{field: _typed(section, field, value)}),
                                                        output_only=True)


def _typed(section, field: str, value):
    current = getattr(section, field)
    if isinstance(current, tuple):
        return tuple(value)
    return value


def test_every_stage_is_in_the_tables():
    assert set(EXECUTION_ONLY) == set(OUTPUT) == set(stages.NAMES)


@pytest.mark.parametrize("stage", sorted(EXECUTION_ONLY))
def test_the_table_is_what_the_config_marks(stage):
    cls = stages.section(stage).config
    marked = {f.name for f in dataclasses.fields(cls) if f.metadata.get(CHANGES_OUTPUT) is False}
    assert marked == set(EXECUTION_ONLY[stage])


@pytest.mark.parametrize("stage, field, value", [(s, f, v) for s, fields in EXECUTION_ONLY.items()
                                                 for f, v in fields.items()])
def test_an_execution_only_setting_keeps_the_fingerprint(tmp_path, toyweb, stage, field, value):
    before, after = _output_view(_config_for(tmp_path, toyweb), stage, field, value)
    assert before == after


@pytest.mark.parametrize("stage, field, value", [(s, f, v) for s, fields in OUTPUT.items() for f, v in fields.items()])
def test_an_output_setting_moves_the_fingerprint(tmp_path, toyweb, stage, field, value):
    before, after = _output_view(_config_for(tmp_path, toyweb), stage, field, value)
    assert before != after


def test_more_threads_on_a_half_done_download_keep_its_committed_shards(tmp_path, toyweb, reference_run):
    """The measured loss: `--set download.thread_count=8` used to delete and re-download every shard."""
    from pipeline import runner

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    stage = run_dir / "round-0" / "download"
    (stage / "manifest.json").unlink()
    stats = sorted(stage.glob(f"*{STATS_SUFFIX}"))
    for s in stats[3:]:   # only the first three shards are committed now
        s.unlink()
        (stage / s.name.replace(STATS_SUFFIX, ".tar")).unlink()
    # Committed shards are final, transient failures included (`--retry-failed` retries those).
    untouched = stats[:3]
    kept = {s.name: s.stat().st_mtime_ns for s in untouched}
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, stages=["download"], download={"thread_count": 3}))
    runner.execute(cfg, run_dir)
    assert {s.name: s.stat().st_mtime_ns for s in untouched} == kept, "committed shards were redone"
    assert json.loads((stage / "manifest.json").read_text())["shards"] == \
        json.loads((reference_run.stage("download").path / "manifest.json").read_text())["shards"]


def test_status_marks_everything_downstream_of_a_change_stale(tmp_path, trained_run):
    from pipeline import status

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    manifest = run_dir / "round-0" / "prefilter" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["fingerprint"] = "0" * 20   # prefilter was rebuilt since pretrain read it
    manifest.write_text(json.dumps(data))
    states = {r["stage"]: r["state"] for r in status.status(run_dir)}
    assert states == {"download": "done", "prefilter": "done", "pretrain": "stale", "evaluate": "stale"}
