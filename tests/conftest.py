"""Session fixtures: one real Ray, one real toy-web server on 127.0.0.1, both stopped by their handles."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.toyweb.config import ToyWebConfig
from pipeline.configtree import to_plain
from pipeline.toyweb.lists import write_toyweb
from pipeline.toyweb.server import ToyWebServer

ROOT = Path(__file__).resolve().parents[1]
VLP = [sys.executable, "-m", "pipeline.cli"]

# The tests' web: every fault and noise kind occurs; slow URLs answer long after the 3 s timeout.
TEST_WEB = ToyWebConfig(num_urls=240, eval_size=40, seed_size=40, slow_seconds=20, world_seed=7,
                         exact_duplicates=0.08, near_duplicates=0.08, eval_leaks=0.04)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The S3-compatible server the object-store tests start (moto's server mode, a real HTTP server on
# 127.0.0.1). Its endpoint and (any) credentials are in the environment from the start, the standard
# variables of the AWS SDK, so that Ray's workers, the CLI's subprocesses and the test clusters of
# test_submit.py all inherit them, as the nodes of a real cluster would have them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "vlp-test", "AWS_SECRET_ACCESS_KEY": "vlp-test", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_free_port()}"}
os.environ.update(S3_ENV)


@pytest.fixture(scope="session")
def s3_server():
    """A live moto S3 server on 127.0.0.1 for this session; yields its endpoint. Stopped by its handle."""
    import urllib.request

    endpoint = S3_ENV["AWS_ENDPOINT_URL_S3"]
    port = endpoint.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return True
        except OSError:
            return proc.poll() is not None   # exited: fail below, not by timing out
    wait_for(up, 60, "the moto S3 server", interval=0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"moto's server exited with {proc.returncode}")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new, empty bucket on the session's S3 server: `s3://<bucket>`."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 10000}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", **S3_ENV}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def toyweb(tmp_path_factory):
    """The toy web's lists (laion, cc3m, sbu) and a live server for them."""
    folder = tmp_path_factory.mktemp("toyweb")
    with ToyWebServer(TEST_WEB) as server:
        files = write_toyweb(TEST_WEB, folder, server.port)
        yield files


def write_config(path: Path, toyweb_files, **sections) -> Path:
    """A tiny run config over the session's toy web; `sections` replace top-level sections."""
    import yaml

    data = {
        "name": "test", "ray": {"num_cpus": 2}, "stages": ["download", "prefilter"],
        "data": {"inputs": [{"path": str(s.path), "format": s.format, "name": s.name} for s in toyweb_files.inputs]},
        "download": {"samples_per_shard": 40, "thread_count": 16, "image_size": 48, "timeout": 3,
                     "max_image_area": 4_000_000, "allow_private_hosts": ["127.0.0.1"]},
        "prefilter": {"min_image_side": 32},
        # prefilter decontaminates against the eval split and the benchmarks' images (the toy COCO and
        # ImageNet hold the eval split's pictures): every tiny config has the same prefilter this way
        "evaluate": {"shards": str(toyweb_files.eval_shards[0]), "benchmarks": list(toyweb_files.benchmarks)},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    return path


# Every objective; the fusion ones on even steps only, and a queue of ITM negatives, so the exact-resume
# tests also cover the alternation, the queue's restore and the ITC negatives freshly encoded from it.
PRETRAIN = {"model": "tiny", "vocab_size": 200, "num_workers": 2, "zero_stage": 2, "micro_batch": 16, "steps": 12,
            "warmup_steps": 2, "checkpoint_every": 4, "keep_checkpoints": 3, "log_every": 1,
            "loss_weights": {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "lm": 1.0, "bow": 1.0}, "fusion_every": 2,
            "text_queue": 48, "itc_hard_negatives": 1}
# BLIP's ITM-probability rule: the tests set its threshold to keep all, half or none of the texts.
CAPFILT = {"prompt": "a picture of ", "batch_size": 16, "actors": 2, "rule": "itm",
           "captioner": {"steps": 4, "batch_size": 16, "warmup_steps": 1},
           "filter": {"steps": 4, "batch_size": 16, "warmup_steps": 1}}


def pretrain_config(path: Path, toyweb_files, stages=("download", "prefilter", "pretrain", "evaluate"), **pretrain):
    """The tiny config through round 0's pretrain and evaluate, with the toy web's seed and eval splits."""
    return write_config(path, toyweb_files, pretrain={**PRETRAIN, **pretrain}, stages=list(stages),
                        data={"seed_shards": str(toyweb_files.seed_shards[0])},
                        evaluate={"shards": str(toyweb_files.eval_shards[0]), "rerank_k": 4,
                                  "benchmarks": [{**b, "rerank_k": 4} if b["format"] == "karpathy" else b
                                                 for b in toyweb_files.benchmarks]})


def vlp(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    # As a user's shell has it: the session's own ray.init() put RAY_AUTH_MODE=token here, which hid a CLI
    # that could not start its local Ray without it.
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.run(VLP + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"vlp {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


__all__ = ["CAPFILT", "ROOT", "TEST_WEB", "VLP", "load_config", "pretrain_config", "to_plain", "vlp", "wait_for", "write_config"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, toyweb, ray_cluster):
    """An uninterrupted download + prefilter run over the session's toy web (the yardstick)."""
    from pipeline import runner

    tmp = tmp_path_factory.mktemp("reference")
    cfg = load_config(write_config(tmp / "c.yaml", toyweb))
    return runner.execute(cfg, tmp / "run")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, toyweb, reference_run):
    """The reference run plus round 0's pretraining (tiny model, 12 steps) and evaluation."""
    from pipeline import runner

    tmp = tmp_path_factory.mktemp("pretrain")
    run_dir = tmp / "run"
    shutil.copytree(reference_run.root, run_dir)
    runner.execute(load_config(pretrain_config(tmp / "c.yaml", toyweb)), run_dir)
    return run_dir


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def shard_digests(stage_dir: Path) -> dict[str, str]:
    """{shard name: sha256} of the committed shards of a stage."""
    import json

    return {s["shard"]: s["sha256"] for s in json.loads((stage_dir / "manifest.json").read_text())["shards"]}
