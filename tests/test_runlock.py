"""One writer per run directory, with real processes: a holder, a second `vlp run` / `vlp resume` /
`vlp submit --resume` refused with the holder's name, and the lock free again once the holder is killed."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, vlp, write_config
from pipeline.runlock import RunGone, RunInUse, RunLock, check_writer, holder

HOLD = "import sys, time; from pipeline.runlock import RunLock; RunLock(sys.argv[1], 'vlp run (test holder)').acquire(); " \
       "print('held', flush=True); time.sleep(600)"


@pytest.fixture
def held(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_with_the_holders_name(held, tmp_path, toyweb):
    run_dir, proc = held
    config = write_config(tmp_path / "c.yaml", toyweb)
    done = vlp("run", str(config), "--run-dir", str(run_dir), check=False, timeout=120)
    assert done.returncode == 2
    assert f"PID {proc.pid} on {socket.gethostname()}" in done.stderr and "vlp run (test holder)" in done.stderr
    assert not (run_dir / "config.yaml").exists(), "the refused run changed nothing"
    (run_dir / "config.yaml").write_text(config.read_text())   # a run directory to resume
    done = vlp("resume", str(run_dir), check=False, timeout=120)
    assert done.returncode == 2 and f"PID {proc.pid}" in done.stderr
    done = vlp("submit", "--resume", str(run_dir), "--address", "http://127.0.0.1:9", check=False, timeout=120)
    assert done.returncode == 2 and f"PID {proc.pid}" in done.stderr   # refused before any cluster is asked
    assert holder(run_dir)["pid"] == proc.pid


def test_a_lock_whose_holder_died_is_free(held):
    run_dir, proc = held
    with pytest.raises(RunInUse, match=f"PID {proc.pid}"):
        RunLock(run_dir).acquire()
    os.kill(proc.pid, signal.SIGKILL)   # no clean-up runs: the kernel drops the lock
    proc.wait()
    assert holder(run_dir) is None
    with RunLock(run_dir, "taker") as lock:
        assert holder(run_dir)["command"] == "taker" and holder(run_dir)["pid"] == os.getpid()
        assert lock.fd is not None
    assert holder(run_dir) is None and (run_dir / ".lock").exists()


def test_a_task_commits_only_for_the_run_that_holds_the_directory(held, tmp_path):
    """check_writer, as a shard task calls it before its commit: the holder's own token passes; another
    token (a newer run) and a free lock (the holder died) are refused."""
    run_dir, proc = held
    token = holder(run_dir)["token"]
    check_writer(run_dir, token)
    with pytest.raises(RunGone, match=f"PID {proc.pid}"):
        check_writer(run_dir, "a-run-that-has-gone")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(RunGone, match="has ended"):
        check_writer(run_dir, token)
