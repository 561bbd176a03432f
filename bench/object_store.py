"""Benchmark: the same download + prefilter run with its run directory on local disk and on an
S3-compatible server (moto's server mode on 127.0.0.1, started here), in one Ray session, alternating
(local, s3, local, s3, ...). Prints each stage's time per way, the median ratio s3/local, and whether
both ways committed the same bytes. Then the read side: every committed shard read back through
read_shard, local files against objects streamed from the server.

moto keeps objects in memory in one Python process: it stands for the protocol, not for S3's
throughput or latency; the ratio is vlp's own cost of going through fsspec (one PUT per shard, ledger
and stats, listing instead of stat) plus moto's.

    .venv/bin/python bench/object_store.py [--urls 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3() -> subprocess.Popen:
    port = _free_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL_S3"], timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


def run_once(cfg, run_dir) -> dict[str, float]:
    from pipeline import runner
    from pipeline.storage import as_path

    started = time.perf_counter()
    runner.execute(cfg, run_dir)
    seconds = {"total": time.perf_counter() - started}
    for stage in ("download", "prefilter"):
        manifest = json.loads((as_path(run_dir) / "round-0" / stage / "manifest.json").read_text())
        seconds[stage] = manifest["duration_s"]
        seconds[f"{stage}_digests"] = {s["shard"]: s["sha256"] for s in manifest["shards"]}
    return seconds


def read_all(run_dir) -> tuple[float, int]:
    from pipeline.data.shards import read_shard
    from pipeline.storage import as_path

    started = time.perf_counter()
    total = 0
    for shard in sorted(as_path(run_dir).glob("round-0/download/*.tar")):
        total += sum(len(s.get("jpg", b"")) for s in read_shard(shard))
    return time.perf_counter() - started, total


def main() -> None:
    import ray
    import s3fs

    from pipeline.config import DataConfig, RayConfig, RunConfig
    from pipeline.toyweb.config import ToyWebConfig

    from stages.download.config import DownloadConfig

    from stages.prefilter.config import PrefilterConfig
    from pipeline.toyweb.lists import write_toyweb
    from pipeline.toyweb.server import ToyWebServer

    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    s3 = start_s3()
    tmp = Path(tempfile.mkdtemp(prefix="vlp-bench-s3-"))
    web = ToyWebConfig(num_urls=args.urls, eval_size=40, seed_size=40, slow_seconds=0.5)  # slow, not timing out
    try:
        s3fs.S3FileSystem().mkdir("bench")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}})
        with ToyWebServer(web) as server:
            files = write_toyweb(web, tmp / "web", server.port)
            cfg = RunConfig(name="bench", stages=("download", "prefilter"), ray=RayConfig(num_cpus=2),
                            data=DataConfig(inputs=files.inputs),
                            download=DownloadConfig(samples_per_shard=200, thread_count=16, image_size=64,
                                                    timeout=5, allow_private_hosts=("127.0.0.1",)),
                            prefilter=PrefilterConfig(min_image_side=32))
            runs = {"local": [], "s3": []}
            for i in range(args.repeats):
                for way in ("local", "s3"):
                    run_dir = tmp / f"run-{i}" if way == "local" else f"s3://bench/run-{i}"
                    runs[way].append(run_once(cfg, run_dir) | {"read": read_all(run_dir)})
                    print(way, i, {k: round(v, 2) for k, v in runs[way][-1].items() if isinstance(v, float)}, flush=True)
        same = all(r[f"{s}_digests"] == runs["local"][0][f"{s}_digests"] for rs in runs.values() for r in rs
                   for s in ("download", "prefilter"))
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{args.urls} URLs, {len(runs['local'][0]['download_digests'])} shards, {args.repeats} runs per way")
        print(f"{'':>10} {'local s':>8} {'s3 s':>8} {'s3/local':>8}")
        for key in ("download", "prefilter", "total"):
            a = statistics.median(r[key] for r in runs["local"])
            b = statistics.median(r[key] for r in runs["s3"])
            print(f"{key:>10} {a:8.2f} {b:8.2f} {b / a:8.2f}x")
        a = statistics.median(r["read"][0] for r in runs["local"])
        b = statistics.median(r["read"][0] for r in runs["s3"])
        mb = runs["local"][0]["read"][1] / 1e6
        print(f"{'read':>10} {a:8.2f} {b:8.2f} {b / a:8.2f}x   ({mb:.1f} MB of images: "
              f"{mb / a:.0f} MB/s local, {mb / b:.0f} MB/s from the server)")
        print(f"same shards (sha256) on both ways, every run: {same}")
    finally:
        ray.shutdown()
        s3.terminate()
        s3.wait(timeout=30)


if __name__ == "__main__":
    main()
