"""No silent loss: a rebuilt stage keeps its old result complete until the new one commits, then moves
it to superseded/ (listed by vlp status, removed only by vlp gc); a kill between the two leaves one of
them complete, and the next run finishes the move. `vlp run` says what it will rebuild and why."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, VLP, shard_digests, vlp, write_config


def _run_killed_at(point: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "VLP_CRASH_AT": point}
    env.pop("RAY_AUTH_MODE", None)   # as conftest.vlp: the CLI sets up its own auth
    return subprocess.run(VLP + list(args), capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _fingerprint(stage_dir) -> str:
    return json.loads((stage_dir / "manifest.json").read_text())["fingerprint"]


@pytest.fixture
def changed(tmp_path, toyweb, reference_run):
    """A copy of the reference run and a config whose prefilter setting differs from the one it was made with."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    config = write_config(tmp_path / "c.yaml", toyweb, prefilter={"min_caption_words": 8})
    return run_dir, config, reference_run.stage("prefilter").path


def test_a_rebuild_says_why_and_keeps_the_old_result_until_gc(changed):
    run_dir, config, reference = changed
    done = vlp("run", str(config), "--run-dir", str(run_dir))
    assert "prefilter (round 0) will be rebuilt: prefilter.min_caption_words: 2 -> 8" in done.stderr
    assert "download (round 0) will be rebuilt" not in done.stderr
    [old] = list((run_dir / "superseded").iterdir())
    assert old.name.startswith("round-0-prefilter-") and old.name.endswith("-complete")
    assert shard_digests(old) == shard_digests(reference), "the old result moved whole"
    assert _fingerprint(run_dir / "round-0" / "prefilter") != _fingerprint(old)
    status = vlp("status", str(run_dir)).stdout
    assert "superseded results" in status and old.name in status
    listing = vlp("gc", str(run_dir)).stdout
    assert "would delete" in listing and old.exists(), "gc without --yes deletes nothing"
    vlp("gc", str(run_dir), "--yes")
    assert not old.exists() and (run_dir / "round-0" / "prefilter" / "manifest.json").is_file()


@pytest.mark.parametrize("point", ["committed", "superseded"])
def test_a_kill_between_the_new_commit_and_the_move_loses_nothing(changed, point):
    run_dir, config, reference = changed
    killed = _run_killed_at(point, "run", str(config), "--run-dir", str(run_dir))
    assert killed.returncode == -9, killed.stderr[-2000:]
    staged = run_dir / "round-0" / ".next-prefilter"
    assert (staged / "manifest.json").is_file(), "the new result is complete"
    current = run_dir / "round-0" / "prefilter"
    if point == "committed":   # the old result still in place, complete
        assert shard_digests(current) == shard_digests(reference)
    else:                      # the old one already aside, complete
        [old] = list((run_dir / "superseded").iterdir())
        assert shard_digests(old) == shard_digests(reference) and not current.exists()
    new_fp = _fingerprint(staged)
    done = vlp("resume", str(run_dir))
    assert "finished putting its new result in place" in done.stderr
    assert _fingerprint(current) == new_fp and not staged.exists()
    [old] = list((run_dir / "superseded").iterdir())
    assert shard_digests(old) == shard_digests(reference)
