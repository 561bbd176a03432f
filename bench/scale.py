"""What the driver costs as the input grows: synthetic rows, no download.

  plan   N rows of LAION-like parquet (4 files) cut into shard inputs: in the driver (vlp before #14: every
         list read whole, a host-policy check per URL, the shard tables kept as task arguments) against
         the planning tasks (stages/download/listplan.py: the driver keeps (shard, file, rows)); and the
         planning tasks with URL dedup (download.dedup_urls, the default: stages/download/urldedup.py).
  scan   the resume scan and `vlp status` of a download folder of S committed shards of 1,000, their
         stats with the per-sample rejects inline (before #14, 10% of the samples) against counts only
         (the rejects in each shard's ledger).
  dedup  bench/dedup_scale.py's shuffle way (map + dedup phases over N synthetic signatures, its own
         process per N); its driver-side comparison runs there (`bench/dedup_scale.py`).

Each (part, N, way) runs in a fresh process, so its peak RSS (VmHWM) is that of one driver. Prints
wall time, driver peak RSS, rows/s, the ratio of the two ways, and growth per x10 of N.

    .venv/bin/python bench/scale.py [--rows 10000 ... 10000000] [--shards 400 4000 40000] [--parts plan scan dedup]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FILES = 4
PER_SHARD = 1_000     # download.samples_per_shard's default
OLD_WAY_MAX = 1_000_000   # the driver-side ways are not run beyond this (minutes, GBs): extrapolated


def synthetic_laion(folder: Path, rows: int) -> list[dict]:
    """`rows` LAION-like rows in FILES parquet files (URL, TEXT and LAION's float columns)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    specs = []
    for f in range(FILES):
        path = folder / f"part-{f:05d}.parquet"
        specs.append({"path": str(path), "format": "laion"})
        if path.is_file():
            continue
        n = rows // FILES + (f < rows % FILES)
        with pq.ParquetWriter(path, pa.schema([("URL", pa.string()), ("TEXT", pa.string()),
                                               ("similarity", pa.float32())])) as writer:
            for start in range(0, n, 1_000_000):
                ids = pa.array(np.arange(start, min(n, start + 1_000_000)) * FILES + f).cast(pa.string())
                urls = pc.binary_join_element_wise("https://img", pc.cast(pc.bit_wise_and(
                    pc.cast(ids, pa.int64()), 1023), pa.string()), ".example.com/photos/", ids, ".jpg", "")
                text = pc.binary_join_element_wise("a photo of item number ", ids, " on a table", "")
                sim = pa.array(np.random.default_rng(start).random(len(ids), dtype=np.float32))
                writer.write_table(pa.table({"URL": urls, "TEXT": text, "similarity": sim}))
    return specs


def plan_in_driver(specs: list[dict], stage: Path) -> int:
    """The plan before #14 (stages/download.py at 3304e73): everything in the driver, shards as tables."""
    import pyarrow as pa

    from pipeline.config import UrlListConfig
    from pipeline.data.urllists import read_url_list
    from pipeline.data.urlpolicy import HostPolicy

    rows = pa.concat_tables([read_url_list(UrlListConfig(**s)) for s in specs])
    policy = HostPolicy(())
    rows = rows.append_column("refusal", pa.array([policy.refusal(u) for u in rows.column("url").to_pylist()],
                                                  pa.string()))
    shards = [rows.slice(i * PER_SHARD, PER_SHARD) for i in range(math.ceil(rows.num_rows / PER_SHARD))]
    return len(shards)


def plan_in_tasks(specs: list[dict], stage: Path, dedup_urls: bool = False) -> int:
    from pipeline.config import UrlListConfig
    from stages.download.listplan import plan_shards

    return len(plan_shards(stage, tuple(UrlListConfig(**s) for s in specs), PER_SHARD, dedup_urls=dedup_urls))


def synthetic_stats(stage: Path, shards: int, inline_rejects: bool) -> None:
    """Committed download stats of `shards` shards of PER_SHARD samples, 10% of them failed."""
    from pipeline.data.shards import shard_name
    from pipeline.runs import StageDir

    out = StageDir(stage, "download", 0)
    stage.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        failed = PER_SHARD // 10
        stats = {"shard": shard_name(i), "samples": PER_SHARD - failed, "sha256": "0" * 64, "bytes": 1 << 24,
                 "accounting": {"samples_in": PER_SHARD, "samples_kept": PER_SHARD - failed, "samples_dropped": 0,
                                "samples_failed": failed, "dropped_by_reason": {},
                                "failed_by_reason": {"http_404": failed}}, "duration_s": 12.5}
        if inline_rejects:
            stats["rejects"] = [{"key": f"{i:05d}{j:03d}", "url": f"https://img{j}.example.com/photos/{i * 1000 + j}.jpg",
                                 "source": "part-00000.parquet", "source_row": i * 1000 + j, "outcome": "failed",
                                 "reason": "http_404", "error": "HTTP Error 404: Not Found"} for j in range(failed)]
        else:
            stats["ledger"] = f"{i:05d}.parquet"
        out.stats_path(shard_name(i)).write_text(json.dumps(stats))


def scan(stage: Path, shards: int) -> int:
    """What download's resume does before any task: read each committed shard's stats, check it for
    transient failures; then what `vlp status` adds up."""
    from pipeline.data.shards import shard_name
    from pipeline.manifest import Accounting
    from pipeline.runs import StageDir
    from stages.download.stage import transient_failures

    out, acc, again = StageDir(stage, "download", 0), Accounting(), 0
    for stats in out.committed_stats([shard_name(i) for i in range(shards)]).values():
        if "rejects" in stats:   # the old check walked the per-sample list
            again += sum(r["reason"] in ("timeout", "http_5xx") for r in stats["rejects"])
        else:
            again += transient_failures(stats)
        acc.add(stats["accounting"])
    return acc.samples_in


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM). Not ru_maxrss: Linux folds the RSS the parent had at
    fork into the child's ru_maxrss at exec, so a large parent would show in every child."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(part: str, way: str, rows: int, folder: Path) -> dict:
    started = time.perf_counter()
    if part == "plan":
        specs = synthetic_laion(folder, rows)
        if way in ("tasks", "urldedup"):   # Ray starts once a run, before any stage: not part of planning
            import ray

            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        base = peak_rss_mb()
        started = time.perf_counter()
        stage = Path(tempfile.mkdtemp(dir=folder))
        done = plan_in_driver(specs, stage) if way == "driver" else plan_in_tasks(specs, stage, way == "urldedup")
    else:
        shards = rows   # the scan's size is counted in shards
        stage = folder / f"stats-{way}-{shards}"
        if not stage.is_dir():
            synthetic_stats(stage, shards, inline_rejects=way == "inline")
        import stages.download.stage  # noqa: F401  (imports are not the scan)

        base = peak_rss_mb()
        started = time.perf_counter()
        done = scan(stage, shards)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base, "done": done}


def run(part: str, way: str, rows: int, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", part, way, str(rows), str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth(values: list[float]) -> str:
    steps = [b / a for a, b in zip(values, values[1:]) if a > 0]
    return "x" + (f"{math.exp(sum(map(math.log, steps)) / len(steps)):.2f}" if steps else "-")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--shards", type=int, nargs="+", default=[400, 4_000, 40_000], help="sizes of the scan")
    parser.add_argument("--parts", nargs="+", default=["plan", "scan", "dedup"], choices=["plan", "scan", "dedup"])
    parser.add_argument("--work", default=None, help="folder for the synthetic inputs (default: a temp folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, way, rows, folder = args.child
        print(json.dumps(child(part, way, int(rows), Path(folder))))
        return
    ways = {"plan": ("driver", "tasks", "urldedup"), "scan": ("inline", "counts")}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for part in args.parts:
            if part == "dedup":
                dedup_part(args.rows, Path(tmp))
                continue
            print(f"\n{part}: {' vs '.join(ways[part])}")
            unit = "rows" if part == "plan" else "shards"
            sizes = args.rows if part == "plan" else args.shards
            print(f"{unit:>10} {'way':>7} {'wall s':>8} {unit + '/s':>11} {'peak RSS MB':>12}   ratio (wall, RSS)")
            series = {w: {"wall": [], "rss": []} for w in ways[part]}
            for rows in sizes:
                folder = Path(tmp) / f"{part}-{rows}"
                folder.mkdir()
                if part == "plan":
                    synthetic_laion(folder, rows)   # here, so that no driver's peak RSS includes it
                got = {}
                for way in ways[part]:
                    if way == "driver" and rows > OLD_WAY_MAX:
                        continue
                    got[way] = r = run(part, way, rows, folder)
                    series[way]["wall"].append(r["wall_s"])
                    series[way]["rss"].append(r["peak_rss_mb"])
                    print(f"{rows:>10,} {way:>7} {r['wall_s']:>8.2f} {rows / r['wall_s']:>11,.0f} "
                          f"{r['peak_rss_mb']:>12,.0f}", end="")
                    old, new = (got.get(w) for w in ways[part][:2])
                    if way == "urldedup":   # what finding repeated URLs adds to planning in tasks
                        print(f"   x{r['wall_s'] / new['wall_s']:.2f} wall of planning without URL dedup")
                        continue
                    print(f"   x{old['wall_s'] / new['wall_s']:.1f}, x{old['peak_rss_mb'] / new['peak_rss_mb']:.2f}"
                          if old and new and way == ways[part][1] else "")
            for way, s in series.items():
                print(f"  {way}: growth per x10 of {unit}: wall {growth(s['wall'])}, peak RSS {growth(s['rss'])}")
            for way in ways[part][1:] if part == "plan" else ():
                new_rss = series[way]["rss"]
                if len(new_rss) >= 3:
                    print(f"  {way}: peak RSS at {sizes[-1]:,} / at {sizes[1]:,} rows: "
                          f"x{new_rss[-1] / new_rss[1]:.2f} (target <= 1.2)")


def dedup_part(sizes: list[int], tmp: Path) -> None:
    """Dedup of N synthetic signatures with a realistic share of low-information ones and blanks
    (bench/dedup_scale.py's data): wall of the map and the phases, the driver's peak RSS."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dedup_scale

    print("\ndedup: the shuffle (bench/dedup_scale.py)")
    print(f"{'rows':>10} {'map s':>7} {'dedup s':>8} {'total s':>8} {'rows/s':>9} {'peak RSS MB':>12}")
    walls, rss = [], []
    for rows in sizes:
        folder = tmp / f"dedup-{rows}"
        folder.mkdir()
        r = dedup_scale.run("shuffle", rows, folder)
        total = r["map_s"] + r["dedup_s"]
        walls.append(total)
        rss.append(r["peak_rss_mb"])
        print(f"{rows:>10,} {r['map_s']:>7.1f} {r['dedup_s']:>8.1f} {total:>8.1f} {rows / total:>9,.0f} {r['peak_rss_mb']:>12,.0f}")
        shutil.rmtree(folder, ignore_errors=True)
    print(f"  growth per x10 of rows: wall {growth(walls)}, peak RSS {growth(rss)}"
          + (f"; {sizes[-1]:,} rows in {walls[-1]:.0f} s (target <= 300 s at 10^7)" if sizes[-1] == 10_000_000 else ""))


if __name__ == "__main__":
    main()
