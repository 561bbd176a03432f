"""vlp submit / jobs / logs / stop against a real Ray cluster: a head started with `ray start --head`
(token auth, dashboard on 127.0.0.1) and a second node joined to it, both stopped by their PIDs."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, pretrain_config, shard_digests, vlp, wait_for, write_config
from pipeline.storage import as_path
from stages.download.stage import transient_failures

RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    def __init__(self):
        self.token = secrets.token_hex(32)
        self.temp = tempfile.mkdtemp(prefix="vlpray", dir="/tmp")  # short: Ray's socket paths have a limit
        gcs, dash, client, *agents = _free_ports(9)
        self.gcs, self.address = gcs, f"http://127.0.0.1:{dash}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"}
        common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
        self.head = self._start(["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                 f"--ray-client-server-port={client}", "--include-dashboard=true",
                                 f"--temp-dir={self.temp}", *self._agent_ports(agents[:3]), *common])
        wait_for(lambda: self._alive_nodes() >= 1, 120, "the head", interval=1)
        self.node = self._start([f"--address=127.0.0.1:{gcs}", *self._agent_ports(agents[3:6]), *common])
        wait_for(lambda: self._alive_nodes() >= 2, 120, "the second node", interval=1)

    @staticmethod
    def _agent_ports(ports):
        return [f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
                f"--runtime-env-agent-port={ports[2]}"]

    def _start(self, args):
        return subprocess.Popen([RAY, "start", *args], env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _alive_nodes(self) -> int:
        code = ("import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.gcs)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0

    def stop_node(self):
        _stop(self.node)

    def stop(self):
        _stop(self.node)
        _stop(self.head)
        shutil.rmtree(self.temp, ignore_errors=True)

    def vlp(self, *args, token=None, check=True, **kw):
        env_token = self.token if token is None else token
        old = os.environ.get("RAY_AUTH_TOKEN")
        os.environ["RAY_AUTH_TOKEN"] = env_token
        try:
            return vlp(*args, "--address", self.address, check=check, **kw)
        finally:
            os.environ.pop("RAY_AUTH_TOKEN") if old is None else os.environ.__setitem__("RAY_AUTH_TOKEN", old)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def wait_job(self, job_id, timeout=600):
        c = self.client()
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = c.get_job_status(job_id)
            if status.is_terminal():
                return status.value
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still running after {timeout}s")


def _stop(proc):
    """`ray start --block` ends its node on SIGTERM; its process group is killed if it lingers (a head
    with its dashboard and job history took the whole 20 s once allowed; nothing of it is kept)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.stop()


def _job_id(out: str) -> str:
    return out.split("job: ")[1].split()[0]


def test_bad_token_no_token_and_unreachable_address_are_clear_errors(cluster, tmp_path, s3_server):
    proc = cluster.vlp("jobs", token="0" * 64, check=False)
    assert proc.returncode == 2 and "token was refused" in proc.stderr
    missing = tmp_path / "no-token"
    env_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(missing)  # never the developer's ~/.ray/auth_token
    try:
        proc = cluster.vlp("jobs", token="", check=False)
    finally:
        os.environ.pop("RAY_AUTH_TOKEN_PATH") if env_path is None else os.environ.__setitem__("RAY_AUTH_TOKEN_PATH", env_path)
    assert proc.returncode == 2 and "no token was found" in proc.stderr
    # Port 1 on loopback: privileged, so no Ray process (they bind ephemeral ports) can be listening there.
    # A port merely held bound was once reached anyway: some Ray agent of the session answered on it.
    proc = vlp("jobs", "--address", "http://127.0.0.1:1", check=False)
    assert proc.returncode == 2 and "cannot reach the Ray dashboard" in proc.stderr
    proc = cluster.vlp("submit", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", "s3://no-such-bucket/run",
                       check=False)
    assert proc.returncode == 2 and "bucket 'no-such-bucket' does not exist" in proc.stderr
    proc = cluster.vlp("logs", "raysubmit_doesnotexist", check=False)
    assert proc.returncode == 2 and "no job raysubmit_doesnotexist" in proc.stderr


def test_the_job_refuses_a_run_directory_it_cannot_see(tmp_path):
    from cluster.jobs import claim_marker
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="not visible from this node"):
        claim_marker(str(tmp_path / "elsewhere" / ".submitted-x"))


def test_submit_runs_the_tiny_pipeline_into_an_s3_run_directory_and_logs_show_progress(cluster, tmp_path, toyweb,
                                                                                      s3_bucket):
    # The run directory is a bucket on the S3 server both nodes reach; the two training workers run one
    # on each node, each putting its own checkpoint files (stages/pretrain/train/checkpoints.py).
    steps = 4   # the steps themselves are test_pretrain's; here: where the two ranks put their files
    cfg = pretrain_config(tmp_path / "c.yaml", toyweb, stages=("download", "prefilter", "pretrain", "evaluate"),
                          steps=steps, checkpoint_every=steps)
    run_dir = f"{s3_bucket}/runs/tiny"
    out = cluster.vlp("submit", str(cfg), "--run-dir", run_dir).stdout
    job = _job_id(out)
    assert f"run directory: {run_dir}" in out
    assert cluster.wait_job(job) == "SUCCEEDED", cluster.vlp("logs", job).stdout[-3000:]
    logs = cluster.vlp("logs", job).stdout
    assert "download: committed 6 shards" in logs and "pretrain: committed" in logs and "evaluate: committed" in logs
    listed = cluster.vlp("jobs").stdout
    assert job in listed and run_dir in listed
    status = json.loads(vlp("status", run_dir, "--json").stdout)
    assert [s["state"] for s in status["stages"]] == ["done"] * 4
    pretrain = as_path(run_dir) / "round-0" / "pretrain"
    for name in ("model/model.safetensors", "model/tokenizer/tokenizer.json", "metrics.jsonl", "training_curves.png"):
        assert (pretrain / name).is_file(), name
    logged = [json.loads(line)["step"] for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    complete = sorted(p.parent.name for p in (pretrain / "checkpoints").glob("*/COMPLETE"))
    assert complete == [f"step-{steps:08d}"]
    tag = pretrain / "checkpoints" / complete[-1]
    assert {"rank-0.pt", "rank-1.pt"} <= {p.name for p in tag.iterdir()}, "each rank put its own files"


def test_stop_mid_run_then_resume_does_not_redo_committed_shards(cluster, tmp_path, toyweb, reference_run):
    cfg = write_config(tmp_path / "c.yaml", toyweb, download={"thread_count": 1})  # slow enough to stop midway
    run_dir = tmp_path / "run"
    job = _job_id(cluster.vlp("submit", str(cfg), "--run-dir", str(run_dir)).stdout)
    stage = run_dir / "round-0" / "download"
    wait_for(lambda: len(list(stage.glob("*.stats.json"))) >= 1, 300, "a committed download shard")
    assert cluster.vlp("stop", job).stdout.strip().endswith("STOPPED")
    time.sleep(2)  # a running shard task may still commit after its driver stopped (atomic: harmless)
    committed = list(stage.glob("*.stats.json"))
    assert 1 <= len(committed) < 6, "the stop came too late to test anything"
    # With --retry-failed, shards with transient failures (the toy web's slow URLs time out) fetch just
    # those URLs again (docs/architecture.md); every other committed shard must stay untouched.
    before = {p.name: p.stat().st_mtime_ns for p in committed if not transient_failures(json.loads(p.read_text()))}
    job2 = _job_id(cluster.vlp("submit", "--resume", str(run_dir), "--retry-failed").stdout)
    assert cluster.wait_job(job2) == "SUCCEEDED", cluster.vlp("logs", job2).stdout[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.stats.json")}
    assert all(after[name] == mtime for name, mtime in before.items()), "committed shards were redone"
    assert shard_digests(stage) == shard_digests(reference_run.stage("download").path)
    assert shard_digests(run_dir / "round-0" / "prefilter") == shard_digests(reference_run.stage("prefilter").path)


def test_plan_prints_requests_and_fails_early_on_what_the_cluster_cannot_grant(cluster, tmp_path, toyweb):
    cfg = pretrain_config(tmp_path / "c.yaml", toyweb)
    os.environ["RAY_AUTH_TOKEN"] = cluster.token
    try:
        ok = vlp("plan", str(cfg), "--address", f"127.0.0.1:{cluster.gcs}")
        gpu = vlp("plan", str(cfg), "--address", f"127.0.0.1:{cluster.gcs}", "--set", "pretrain.use_gpu=true",
                  check=False)
        big = vlp("plan", str(cfg), "--address", f"127.0.0.1:{cluster.gcs}", "--set", "pretrain.num_workers=3",
                  check=False)
    finally:
        os.environ.pop("RAY_AUTH_TOKEN")
    assert "pretrain   2 x {CPU 1} together" in ok.stdout and "every request fits" in ok.stdout
    assert "download   6 x {CPU 1}" in ok.stdout and "240 URLs in" in ok.stdout
    assert gpu.returncode == 2 and "no node has {'CPU': 1.0, 'GPU': 1.0}" in gpu.stderr
    assert big.returncode == 2 and "needs 3 x {'CPU': 1.0} at once, the cluster has CPU 2" in big.stderr


def test_second_node_stopped_mid_download_still_completes_with_exact_accounting(cluster, tmp_path, toyweb,
                                                                                 reference_run):
    cfg = write_config(tmp_path / "c.yaml", toyweb, download={"thread_count": 2})
    run_dir = tmp_path / "run"
    job = _job_id(cluster.vlp("submit", str(cfg), "--run-dir", str(run_dir)).stdout)
    stage = run_dir / "round-0" / "download"
    wait_for(lambda: len(list(stage.glob("*.stats.json"))) >= 1, 300, "a committed download shard")
    cluster.stop_node()
    assert cluster.wait_job(job) == "SUCCEEDED", cluster.vlp("logs", job).stdout[-3000:]
    manifest = json.loads((stage / "manifest.json").read_text())
    reference = json.loads((reference_run.stage("download").path / "manifest.json").read_text())
    assert manifest["totals"] == reference["totals"]
    assert shard_digests(stage) == shard_digests(reference_run.stage("download").path)


def test_a_run_fails_early_when_ray_cannot_grant_a_request(tmp_path, toyweb, reference_run, ray_cluster):
    from conftest import load_config
    from pipeline import runner
    from pipeline.errors import InputError

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    cfg = load_config(pretrain_config(tmp_path / "c.yaml", toyweb, use_gpu=True))
    with pytest.raises(InputError, match="cannot satisfy"):
        runner.execute(cfg, run_dir, ["pretrain"])
    assert not (run_dir / "round-0" / "pretrain").exists()


def test_a_run_directory_on_a_store_no_process_shares_is_refused_with_a_clear_error(tmp_path):
    proc = vlp("run", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", "memory://runs/tiny", check=False)
    assert proc.returncode == 2 and "private to one process" in proc.stderr
