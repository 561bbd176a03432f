"""Benchmark: vlp's download stage vs a bare `img2dataset.download` call, same list, same settings.

Both fetch the same toy-web LAION parquet from one local server with 2 workers x 32 threads, resize
to 64 px, and write webdataset shards of 1000. Runs alternate (bare, ours, bare, ours, ...) so that
drift on the machine hits both; we report each run and the median ratio of images/s.

    .venv/bin/python bench/download.py [--urls 5000] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import DownloadConfig, RunConfig, ToyWebConfig, UrlListConfig, DataConfig, RayConfig
from pipeline.toyweb.lists import write_toyweb
from pipeline.toyweb.server import ToyWebServer

THREADS, WORKERS, SHARD, SIZE, TIMEOUT = 32, 2, 1000, 64, 5


def bare_img2dataset(parquet: Path, out: Path) -> tuple[float, int]:
    from img2dataset import download

    start = time.perf_counter()
    download(url_list=str(parquet), input_format="parquet", url_col="URL", caption_col="TEXT",
             output_folder=str(out), output_format="webdataset", processes_count=WORKERS, thread_count=THREADS,
             image_size=SIZE, resize_mode="keep_ratio", resize_only_if_bigger=True, timeout=TIMEOUT,
             number_sample_per_shard=SHARD, enable_wandb=False, incremental_mode="incremental",
             distributor="multiprocessing", extract_exif=False)
    seconds = time.perf_counter() - start
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def ours(parquet: Path, out: Path) -> tuple[float, int]:
    from pipeline import runner

    cfg = RunConfig(name="bench", stages=("download",), ray=RayConfig(num_cpus=WORKERS),
                    data=DataConfig(inputs=(UrlListConfig(path=str(parquet), format="laion"),)),
                    download=DownloadConfig(samples_per_shard=SHARD, thread_count=THREADS, image_size=SIZE,
                                            timeout=TIMEOUT, allow_private_hosts=("127.0.0.1",)))
    start = time.perf_counter()
    run = runner.execute(cfg, out)
    seconds = time.perf_counter() - start
    return seconds, json.loads((run.stage("download").path / "manifest.json").read_text())["totals"]["samples_kept"]


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    web = ToyWebConfig(num_urls=args.urls, eval_size=0, seed_size=0, eval_leaks=0, formats=("laion",), slow_seconds=30)
    tmp = Path(tempfile.mkdtemp(prefix="vlp-bench-"))
    results = {"bare": [], "ours": []}
    with ToyWebServer(web) as server:
        files = write_toyweb(web, tmp / "web", server.port)
        parquet = Path(files.inputs[0].path)
        n = pq.read_metadata(parquet).num_rows
        t0 = time.perf_counter()
        ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
        ray_start = time.perf_counter() - t0
        for rep in range(args.repeats):
            for name, fn in (("bare", bare_img2dataset), ("ours", ours)):
                out = tmp / f"{name}-{rep}"
                seconds, ok = fn(parquet, out)
                results[name].append((seconds, ok))
                print(f"{name:>4} run {rep}: {ok} images of {n} URLs in {seconds:.1f}s = {ok / seconds:.0f} images/s",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
        ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    rate = {k: statistics.median(ok / s for s, ok in v) for k, v in results.items()}
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}")
    print(f"settings: {n} URLs, {WORKERS} workers x {THREADS} threads, {SIZE} px, shards of {SHARD}, timeout {TIMEOUT}s")
    print(f"bare img2dataset (multiprocessing): {rate['bare']:.0f} images/s (median of {args.repeats})")
    print(f"vlp download stage (Ray tasks):     {rate['ours']:.0f} images/s (median of {args.repeats}; "
          f"Ray already up, its start took {ray_start:.1f}s once)")
    print(f"ratio ours / bare: {rate['ours'] / rate['bare']:.2f}")


if __name__ == "__main__":
    main()
