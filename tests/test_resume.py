"""Resume: kill -9 mid-download, a worker killed mid-shard, and config changes.

The yardstick is the uninterrupted reference run: committed shards must hold the same bytes."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import ROOT, TEST_WEB, VLP, _free_port, shard_digests, to_plain, vlp, wait_for, write_config
from pipeline import graph, runner, status
from pipeline.config import DEFAULT_STAGES
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.runs import RunDir


def _totals(run_dir, stage):
    return json.loads((run_dir / "round-0" / stage / "manifest.json").read_text())["totals"]


def _own_web_config(tmp_path, toyweb, port: int):
    """A download-only config whose toy web the driver serves itself (on a fixed port, so that two run
    directories get the same URLs). The web runs in a session of its own and outlives a killed driver until
    the run's lock is free (test below)."""
    web = to_plain(dataclasses.replace(TEST_WEB, port=port))
    return write_config(tmp_path / "own-web.yaml", toyweb, stages=["download", "prefilter"],
                        data={"inputs": [], "toyweb": web})


def test_kill_9_of_the_driver_group_then_a_plain_resume_gives_the_same_shards(tmp_path, toyweb):
    """The driver's process group (the driver, its local Ray) gets SIGKILL mid-download. Ray's shard tasks
    live in their own session and outlive it: they must not commit once the run's lock is free, and a plain
    `vlp resume` then finishes what `vlp run --only download` was asked to do — download alone —
    byte-identical to an uninterrupted run."""
    config = _own_web_config(tmp_path, toyweb, _free_port())
    reference = tmp_path / "reference"
    vlp("run", str(config), "--run-dir", str(reference), "--only", "download")
    run_dir = tmp_path / "run"
    download_dir = run_dir / "round-0" / "download"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_AUTH_MODE", None)   # as vlp() runs it: the CLI's own local Ray
    proc = subprocess.Popen(VLP + ["run", str(config), "--run-dir", str(run_dir), "--only", "download"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for(lambda: len(list(download_dir.glob("*.stats.json"))) >= 1, 120, "a first committed shard")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # Wait until the folder is still for 3 s: an orphaned task would commit in that time.
    committed, still_since = -1, time.time()
    while time.time() - still_since < 3:
        now = len(list(download_dir.glob("*.stats.json")))
        if now != committed:
            committed, still_since = now, time.time()
        time.sleep(0.2)
    assert not (download_dir / "manifest.json").exists(), "the kill came too late to test anything"
    assert 1 <= committed < 6
    status = json.loads(vlp("status", str(run_dir), "--json").stdout)["stages"][0]
    assert status["state"] == "incomplete" and status["shards_done"] == committed
    assert status["samples_in"] == status["samples_kept"] + status["samples_dropped"] + status["samples_failed"]

    vlp("resume", str(run_dir))
    assert shard_digests(download_dir) == shard_digests(reference / "round-0" / "download")
    assert _totals(run_dir, "download") == _totals(reference, "download")
    assert not (run_dir / "round-0" / "prefilter").exists(), "the run was asked for download only"
    assert not [p for p in download_dir.iterdir() if ".tmp-" in p.name], "temporary files were cleaned up"


def _our_download_workers():
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if "download_shard" in cmd and me in {p.pid for p in proc.parents()}:
                found.append(proc)
        except psutil.Error:  # it ended while we looked
            pass
    return found


def test_a_worker_killed_mid_shard_is_retried(tmp_path, toyweb, reference_run):
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb))
    errors = []

    def run():
        try:
            runner.execute(cfg, tmp_path / "run", ["download"])
        except Exception as err:  # noqa: BLE001 (re-raised in the test thread)
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: bool(_our_download_workers()), 60, "a download worker")
        victim = _our_download_workers()[0]
        victim.kill()
    finally:
        thread.join(timeout=300)
    assert not errors, errors
    stage = tmp_path / "run" / "round-0" / "download"
    assert shard_digests(stage) == shard_digests(reference_run.stage("download").path)
    assert _totals(tmp_path / "run", "download") == _totals(reference_run.root, "download")


def test_changed_config_reruns_that_stage_and_downstream(tmp_path, toyweb, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    download_manifest = run_dir / "round-0" / "download" / "manifest.json"
    before = download_manifest.stat().st_mtime_ns
    old_fp = json.loads((run_dir / "round-0" / "prefilter" / "manifest.json").read_text())["fingerprint"]

    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, prefilter={"min_caption_words": 8}))
    runner.execute(cfg, run_dir)
    assert download_manifest.stat().st_mtime_ns == before, "download was committed and must be skipped"
    new = json.loads((run_dir / "round-0" / "prefilter" / "manifest.json").read_text())
    assert new["fingerprint"] != old_fp
    assert new["totals"]["dropped_by_reason"]["caption_too_short"] > \
        _totals(reference_run.root, "prefilter")["dropped_by_reason"].get("caption_too_short", 0)

    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, download={"image_size": 40}))
    runner.execute(cfg, run_dir)
    assert download_manifest.stat().st_mtime_ns != before
    prefilter = json.loads((run_dir / "round-0" / "prefilter" / "manifest.json").read_text())
    download = json.loads(download_manifest.read_text())
    # its inputs: the download, then the eval shard and the two toy benchmarks it decontaminates against
    assert prefilter["inputs"][0] == download["fingerprint"], "prefilter re-ran on the new download"
    assert len(prefilter["inputs"]) == 1 + len(toyweb.eval_shards) + len(toyweb.benchmarks) == 4
    assert [r["state"] for r in status.status(run_dir)] == ["done", "done"]


def test_only_a_stage_whose_input_is_missing_is_a_clear_error(tmp_path, toyweb):
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb))
    with pytest.raises(InputError, match=r"prefilter \(round 0\) needs the output of download \(round 0\)"):
        runner.execute(cfg, tmp_path / "run", ["prefilter"])


def test_only_round_zero_stages_run_round_zero(tmp_path, toyweb):
    """`--only download,prefilter,pretrain,evaluate` on a bootstrapping config, as a new user asks for a
    round-0 model: the later rounds (whose capfilt is neither selected nor committed) are left out."""
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, stages=list(DEFAULT_STAGES), rounds=2))
    selected = graph.select(cfg, ["download", "prefilter", "pretrain", "evaluate"])
    order = graph.rounds_that_can_run(cfg, RunDir(tmp_path / "run"), graph.schedule(cfg, selected))
    assert order == [("download", 0), ("prefilter", 0), ("pretrain", 0), ("evaluate", 0)]
    everything = graph.schedule(cfg, list(cfg.stages))
    assert everything[4:7] == [("capfilt", 1), ("pretrain", 1), ("evaluate", 1)] and len(everything) == 10
    assert graph.rounds_that_can_run(cfg, RunDir(tmp_path / "run"), everything) == everything


def test_an_upstream_shard_changed_after_its_commit_is_refused(tmp_path, toyweb, reference_run):
    """A download shard cut at a member boundary (fewer samples, still a valid tar) used to pass through
    prefilter with rc 0; now the size (driver) and sha256 (task) checks name it."""
    from pipeline.data.shards import read_shard, write_shard

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    shard = run_dir / "round-0" / "download" / "00001.tar"
    samples = list(read_shard(shard))
    shard.chmod(0o644)
    write_shard(shard, samples[: len(samples) // 2])
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, prefilter={"min_caption_words": 3}))
    with pytest.raises(InputError, match=r"00001\.tar: .* but download \(round 0\) committed it with"):
        runner.execute(cfg, run_dir)
    prefilter = run_dir / "round-0" / "prefilter"
    assert json.loads((prefilter / "manifest.json").read_text()) == \
        json.loads((reference_run.stage("prefilter").path / "manifest.json").read_text()), "the old result stands"


def test_a_killed_drivers_toy_web_serves_until_its_run_lock_is_free(tmp_path):
    """Why the kill test above can trust its shards: the toy web a run serves is not in the driver's
    process group, and when the driver dies it serves on until the run's lock is free. Were it killed
    with the driver, a task that outlived them could see only refused connections while the lock still
    looked held (the driver's files close a moment after), and commit a shard of false failures (seen in
    CI: shard 00001 committed with 40 connection_refused)."""
    import http.client

    from pipeline.runlock import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = RunLock(run_dir).acquire()   # held here: it stays held after the driver's death, as its would a moment
    driver_code = ("import sys, time; sys.path.insert(0, sys.argv[2])\n"
                   "from pipeline.toyweb.config import ToyWebConfig\n"
                   "from pipeline.toyweb.server import ToyWebServer\n"
                   "web = ToyWebServer(ToyWebConfig(num_urls=10, eval_size=10), 0, sys.argv[1]).start()\n"
                   "print(web.port, web.proc.pid, flush=True)\n"
                   "time.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", driver_code, str(run_dir), str(ROOT)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    port, web_pid = map(int, driver.stdout.readline().split())
    web = psutil.Process(web_pid)

    def answers() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            return conn.getresponse().status > 0
        except OSError:
            return False

    try:
        assert answers()
        os.killpg(driver.pid, signal.SIGKILL)   # the driver's whole group, as a kill -9 of `vlp run` would
        driver.wait(timeout=30)
        wait_for(lambda: web.ppid() != driver.pid, 30, "the web to learn of its parent's death")
        assert web.is_running() and answers(), "the web went with its driver while the run's lock was held"
        lock.release()
        wait_for(lambda: not web.is_running() or web.status() == psutil.STATUS_ZOMBIE, 30,
                 "the web to stop once the lock is free")
    finally:
        lock.release()
        if web.is_running():
            web.kill()
