"""Benchmark: vlp's download stage vs a bare `img2dataset.download` call, same list, same settings.

Two webs (`--web toy`, `--web zoo`, or `--web both`, the default):
  - toy: the toy-web LAION parquet from one local server (pipeline/toyweb): JPEGs, with the toy web's
    faults (~9% of URLs fail, 1% are slower than the timeout);
  - zoo: the image zoo of tests/imagezoo.py (47 files written by real encoders: JPEG variants and EXIF
    orientations, 16-bit and palette PNG, animated GIF/PNG/WebP, BMP, TIFF, AVIF, HEIC, ...) served by
    Debian's nginx on loopback (tests/realservers.py), each file listed `--copies` times with its own
    query string (so that vlp's URL dedup keeps every copy). Besides the speed, it prints per zoo file
    what each side accepted and whether the stored JPEG shows the picture upright, at the right size
    and in its colours (transparency on white).

Both sides fetch with 2 workers x 32 threads, resize to 64 px (keep_ratio, only if bigger) and write
webdataset shards of 1000. Runs alternate (bare, ours, bare, ours, ...) so that drift on the machine
hits both; we report each run and the median ratio of images/s.

    .venv/bin/python bench/download.py [--web both|toy|zoo] [--urls 5000] [--copies 40] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig, UrlListConfig, DataConfig, RayConfig
from pipeline.toyweb.config import ToyWebConfig

from stages.download.config import DownloadConfig
from pipeline.toyweb.lists import write_toyweb
from pipeline.toyweb.server import ToyWebServer

# The zoo (tests/imagezoo.py), its checks (tests/test_imagezoo.py) and the nginx harness
# (tests/realservers.py) live with the tests, which import them by this same path; nothing is moved.
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))

# albumentations (imported by img2dataset) asks the network for a newer version in every process unless
# told not to: vlp's Ray workers are told (runtime_env below), and so are img2dataset's processes.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

THREADS, WORKERS, SHARD, SIZE, TIMEOUT = 32, 2, 1000, 64, 5
TOLERANCE = 24   # per channel on a quadrant's mean, as tests/test_imagezoo.py


def bare_img2dataset(parquet: Path, out: Path, url_col: str = "URL", caption_col: str = "TEXT") -> tuple[float, int, Path]:
    """(seconds, images kept, the folder of its tars and parquet files)."""
    from img2dataset import download

    start = time.perf_counter()
    download(url_list=str(parquet), input_format="parquet", url_col=url_col, caption_col=caption_col,
             output_folder=str(out), output_format="webdataset", processes_count=WORKERS, thread_count=THREADS,
             image_size=SIZE, resize_mode="keep_ratio", resize_only_if_bigger=True, timeout=TIMEOUT,
             number_sample_per_shard=SHARD, enable_wandb=False, incremental_mode="incremental",
             distributor="multiprocessing", extract_exif=False)
    seconds = time.perf_counter() - start
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok, out


def ours(parquet: Path, out: Path, fmt: str = "laion") -> tuple[float, int, Path]:
    """(seconds, images kept, the download stage's folder: its tars and ledgers)."""
    from pipeline import runner

    cfg = RunConfig(name="bench", stages=("download",), ray=RayConfig(num_cpus=WORKERS),
                    data=DataConfig(inputs=(UrlListConfig(path=str(parquet), format=fmt),)),
                    download=DownloadConfig(samples_per_shard=SHARD, thread_count=THREADS, image_size=SIZE,
                                            timeout=TIMEOUT, allow_private_hosts=("127.0.0.1",)))
    start = time.perf_counter()
    run = runner.execute(cfg, out)
    seconds = time.perf_counter() - start
    stage = run.stage("download").path
    return seconds, json.loads((stage / "manifest.json").read_text())["totals"]["samples_kept"], stage


def start_ray() -> float:
    """Starts a local Ray for vlp's runs (once: a cluster is up before a real download); its start in s."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    return time.perf_counter() - t0


def print_rates(results: dict[str, list[tuple[float, int]]], repeats: int, ray_start: float, n: int) -> None:
    rate = {k: statistics.median(ok / s for s, ok in v) for k, v in results.items()}
    url_rate = {k: statistics.median(n / s for s, _ in v) for k, v in results.items()}
    print(f"bare img2dataset (multiprocessing): {rate['bare']:.0f} images/s, {url_rate['bare']:.0f} URLs/s "
          f"(median of {repeats})")
    print(f"vlp download stage (Ray tasks):     {rate['ours']:.0f} images/s, {url_rate['ours']:.0f} URLs/s "
          f"(median of {repeats}; Ray already up, its start took {ray_start:.1f}s once)")
    print(f"ratio ours / bare: {rate['ours'] / rate['bare']:.2f} (images/s), "
          f"{url_rate['ours'] / url_rate['bare']:.2f} (URLs/s)")


# ---- the toy web -------------------------------------------------------------------------------------------

def toy(args, tmp: Path, ray_start: float) -> None:
    web = ToyWebConfig(num_urls=args.urls, eval_size=0, seed_size=0, eval_leaks=0, formats=("laion",), slow_seconds=30)
    results = {"bare": [], "ours": []}
    print(f"== toy web: {args.urls} URLs ==", flush=True)
    with ToyWebServer(web) as server:
        files = write_toyweb(web, tmp / "web", server.port)
        parquet = Path(files.inputs[0].path)
        n = pq.read_metadata(parquet).num_rows
        for rep in range(args.repeats):
            for name, fn in (("bare", bare_img2dataset), ("ours", ours)):
                out = tmp / f"toy-{name}-{rep}"
                seconds, ok, _ = fn(parquet, out)
                results[name].append((seconds, ok))
                print(f"{name:>4} run {rep}: {ok} images of {n} URLs in {seconds:.1f}s = {ok / seconds:.0f} images/s",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    print(f"settings: {n} URLs, {WORKERS} workers x {THREADS} threads, {SIZE} px, shards of {SHARD}, timeout {TIMEOUT}s")
    print_rates(results, args.repeats, ray_start, n)


# ---- the image zoo behind nginx ----------------------------------------------------------------------------

def verdict(jpg: bytes, entry: dict) -> str | None:
    """What is wrong with a stored JPEG of a zoo file (None: upright, at the right size, in its colours)."""
    from imagezoo import HEIGHT, WIDTH, expected_quadrants
    from test_imagezoo import quadrant_means

    size, means = quadrant_means(jpg)
    want = (WIDTH * SIZE // HEIGHT, SIZE)   # keep_ratio, only if bigger: the short side 80 -> 64
    if size != want:
        return f"stored {size[0]}x{size[1]}, not {want[0]}x{want[1]}" + (" (turned)" if size == want[::-1] else "")
    expected = expected_quadrants(entry)
    worst = max(range(4), key=lambda q: max(abs(a - b) for a, b in zip(means[q], expected[q])))
    off = max(abs(a - b) for a, b in zip(means[worst], expected[worst]))
    if off > TOLERANCE:
        corner = ("TL", "TR", "BL", "BR")[worst]
        return f"{corner} is {_rgb(means[worst])}, not {_rgb(expected[worst])}"
    return None


def _rgb(colour) -> str:
    return "(" + ",".join(str(c) for c in colour) + ")"


def bare_outcomes(out: Path) -> tuple[dict[str, str | None], dict[str, bytes]]:
    """img2dataset's ({url: None if success else its error message}, {url: stored jpg})."""
    status = {}
    for p in sorted(out.glob("*.parquet")):
        for row in pq.read_table(p, columns=["url", "status", "error_message"]).to_pylist():
            status[row["url"]] = None if row["status"] == "success" else \
                f"{row['status']}: {row['error_message'] or ''}".strip()
    return status, _stored(out)


def our_outcomes(stage: Path) -> tuple[dict[str, str | None], dict[str, bytes]]:
    """vlp's ({url: None if kept else the ledger's reason}, {url: stored jpg})."""
    from pipeline.ledger import stage_ledger

    status = {r["url"]: None if r["outcome"] == "kept" else r["reason"]
              for r in stage_ledger(stage, columns=["url", "outcome", "reason"]).to_pylist()}
    return status, _stored(stage)


def _stored(folder: Path) -> dict[str, bytes]:
    from pipeline.data.shards import read_shard

    return {json.loads(s["json"])["url"]: s["jpg"] for tar in sorted(folder.glob("*.tar"))
            for s in read_shard(tar) if "jpg" in s}


def tally(urls: dict[str, str], zoo: dict[str, dict], status: dict, stored: dict) -> dict[str, dict]:
    """Per zoo file over its copies: accepted, stored right, and the commonest failure / wrongness."""
    out = {name: {"accepted": 0, "right": 0, "failed": Counter(), "wrong": Counter()} for name in zoo}
    for url, name in urls.items():
        t = out[name]
        if url not in status:
            t["failed"]["no outcome recorded"] += 1
        elif status[url] is not None:
            t["failed"][status[url]] += 1
        elif url not in stored:
            t["failed"]["accepted, but no jpg in the tar"] += 1
        else:
            t["accepted"] += 1
            problem = verdict(stored[url], zoo[name])
            if problem is None:
                t["right"] += 1
            else:
                t["wrong"][problem] += 1
    return out


def cell(t: dict, copies: int, width: int = 60) -> str:
    """One side's outcome for one zoo file over its copies, in a table cell."""
    common = lambda counter: counter.most_common(1)[0][0]   # noqa: E731
    if t["accepted"] == 0:
        text = f"no: {common(t['failed'])}"
    elif t["accepted"] == copies and (t["right"] == copies or len(t["wrong"]) == 1 and not t["right"]):
        text = "yes, right" if t["right"] == copies else f"yes, WRONG: {common(t['wrong'])}"
    else:   # mixed over the copies
        parts = [f"{t['accepted']}/{copies} accepted, {t['right']} right"]
        if t["wrong"]:
            parts.append(f"WRONG: {common(t['wrong'])}")
        if t["failed"]:
            parts.append(f"else {common(t['failed'])}")
        text = "; ".join(parts)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def zoo(args, tmp: Path, ray_start: float) -> None:
    from imagezoo import build_zoo
    from realservers import Nginx, nginx_binary

    if nginx_binary() is None:
        message = "nginx is not installed (Debian's nginx package: `make test` installs it)"
        if args.web == "zoo":
            raise SystemExit(message)
        print(f"== zoo behind nginx: skipped, {message} ==")
        return
    zoo_dir = tmp / "zoo-src"
    manifest = build_zoo(zoo_dir)
    files = {f"/zoo/{name}": (zoo_dir / name).read_bytes() for name in manifest}
    results = {"bare": [], "ours": []}
    tallies: dict[str, list[dict]] = {"bare": [], "ours": []}
    print(f"== zoo behind nginx: {len(manifest)} files x {args.copies} copies ==", flush=True)
    with Nginx(tmp / "nginx", extra_files=files) as server:
        urls = {server.url(f"/zoo/{name}?copy={c}"): name for c in range(args.copies) for name in manifest}
        parquet = tmp / "zoo.parquet"
        pq.write_table(pa.table({"url": list(urls), "caption": [f"{name} copy {i // len(manifest)}"
                                                                for i, name in enumerate(urls.values())]}), parquet)
        n = len(urls)
        for rep in range(args.repeats):
            for name in ("bare", "ours"):
                out = tmp / f"zoo-{name}-{rep}"
                if name == "bare":
                    seconds, ok, folder = bare_img2dataset(parquet, out, "url", "caption")
                    status, stored = bare_outcomes(folder)
                else:
                    seconds, ok, folder = ours(parquet, out, "parquet")
                    status, stored = our_outcomes(folder)
                results[name].append((seconds, ok))
                tallies[name].append(tally(urls, manifest, status, stored))
                print(f"{name:>4} run {rep}: {ok} images of {n} URLs in {seconds:.1f}s = {ok / seconds:.0f} images/s, "
                      f"{n / seconds:.0f} URLs/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    print(f"settings: {n} URLs ({len(manifest)} zoo files x {args.copies}), nginx {server_version()}, "
          f"{WORKERS} workers x {THREADS} threads, {SIZE} px, shards of {SHARD}, timeout {TIMEOUT}s; vlp at its "
          f"default per_host_connections={DownloadConfig().per_host_connections} per task (one host here)")
    print_rates(results, args.repeats, ray_start, n)
    # What each side accepted, from the first run of each; later runs are checked for the same outcome.
    for side, runs in tallies.items():
        for i, later in enumerate(runs[1:], 1):
            changed = [f for f in manifest if (later[f]["accepted"], later[f]["right"]) !=
                       (runs[0][f]["accepted"], runs[0][f]["right"])]
            if changed:
                print(f"note: {side} run {i} accepted or stored differently from run 0: {', '.join(changed)}")
    bare, ours_ = tallies["bare"][0], tallies["ours"][0]
    print(f"\nper zoo file (run 0; {args.copies} copies each; \"right\": upright, {SIZE} px high, quadrant colours "
          f"within {TOLERANCE} of the picture's, transparency on white):")
    print(f"| {'file':<28} | {'zoo expects':<18} | {'img2dataset':<60} | {'vlp':<60} |")
    print(f"|{'-' * 30}|{'-' * 20}|{'-' * 62}|{'-' * 62}|")
    for name, entry in manifest.items():
        print(f"| {name:<28} | {entry['expect']:<18} | {cell(bare[name], args.copies):<60} | "
              f"{cell(ours_[name], args.copies):<60} |")

    def names(pred) -> list[str]:
        return [f for f in manifest if pred(bare[f], ours_[f])]

    accepted = lambda t: t["accepted"] > 0   # noqa: E731
    wrong = lambda t: t["accepted"] > t["right"]   # noqa: E731
    print(f"\naccepted by both: {len(names(lambda b, o: accepted(b) and accepted(o)))} files; "
          f"by neither: {', '.join(names(lambda b, o: not accepted(b) and not accepted(o))) or '-'}")
    print(f"only img2dataset accepted: {', '.join(names(lambda b, o: accepted(b) and not accepted(o))) or '-'}")
    print(f"only vlp accepted: {', '.join(names(lambda b, o: accepted(o) and not accepted(b))) or '-'}")
    print(f"img2dataset stored wrong: {', '.join(names(lambda b, o: wrong(b))) or '-'}")
    print(f"vlp stored wrong: {', '.join(names(lambda b, o: wrong(o))) or '-'}")

    def as_expected(t: dict, expect: str) -> bool:
        return t["right"] == args.copies if expect == "kept" else t["failed"][expect] == args.copies

    differs = [f for f in manifest if not as_expected(ours_[f], manifest[f]["expect"])]
    print(f"vlp not as the zoo expects: {', '.join(differs) or '-'}")


def server_version() -> str:
    import subprocess
    from realservers import nginx_binary

    out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().rsplit("/", 1)[-1]


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", choices=("both", "toy", "zoo"), default="both")
    parser.add_argument("--urls", type=int, default=5000, help="toy web: URLs in the list")
    parser.add_argument("--copies", type=int, default=40, help="zoo: times each zoo file is listed")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vlp-bench-"))
    try:
        ray_start = start_ray()
        if args.web in ("both", "toy"):
            toy(args, tmp, ray_start)
        if args.web in ("both", "zoo"):
            zoo(args, tmp, ray_start)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
