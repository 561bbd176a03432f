"""Dedup at scale on synthetic signatures: the one-pass rule in the driver (prefilter before #14)
against the shuffle (stages/prefilter/dedup/: Ray tasks over partitions), in one run.

Synthetic rows, made from their index alone (no table of them anywhere): 85% distinct textured images
(random coefficients and detail), 6% near copies of an earlier row (the same signature in other bytes,
as a re-encoded copy is), 4% exact copies of an earlier row, 4% images of little information (no LSH
keys: exact dedup only), 1% blanks in 8 colours (keyed by colour: big buckets). A near copy here has
the very signature of its original, which the shuffle accepts without running the verifier; the
verifier's own cost per pair is measured apart (a copy ~9 ms, a similar non-copy ~0.4 ms, BENCHMARKS.md).

Per N: the map side (tasks hashing each shard of 10,000 signatures into the partitions: part of
prefilter's scan), the dedup phases, the driver's peak RSS (VmHWM), and the decisions of both ways
compared where the driver way runs (N <= --driver-max).

    .venv/bin/python bench/dedup_scale.py [--rows 10000 100000 1000000 10000000] [--driver-max 100000]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import neardup  # noqa: E402

SHARD = 10_000
KINDS = np.array([0.85, 0.06, 0.04, 0.04, 0.01]).cumsum()   # distinct, near copy, exact copy, low-info, blank
WORDS = -(-neardup.SIZE // 8)


def splitmix(x: np.ndarray) -> np.ndarray:
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def origins(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kind, row whose signature each row has, row whose bytes it has), following copies of copies."""
    u = splitmix(index * np.uint64(3)).astype(np.float64) / 2.0**64
    kind = np.searchsorted(KINDS, u, side="right").clip(0, 4)
    source = (splitmix(index * np.uint64(3) + np.uint64(1)) % np.maximum(index, 1).astype(np.uint64)).astype(np.int64)
    copy = ((kind == 1) | (kind == 2)) & (index > 0)
    sig_of, bytes_of = index.copy(), index.copy()
    sig_of[copy], bytes_of[kind == 2] = source[copy], source[kind == 2]
    for _ in range(64):   # resolve chains: a copy of a copy has its original's signature
        k = np.searchsorted(KINDS, splitmix(sig_of * np.uint64(3)).astype(np.float64) / 2.0**64, side="right")
        again = ((k == 1) | (k == 2)) & (sig_of > 0)
        if not again.any():
            break
        sig_of[again] = (splitmix(sig_of[again] * np.uint64(3) + np.uint64(1)) % sig_of[again].astype(np.uint64)).astype(np.int64)
    for _ in range(64):
        k = np.searchsorted(KINDS, splitmix(bytes_of * np.uint64(3)).astype(np.float64) / 2.0**64, side="right")
        again = (k == 2) & (bytes_of > 0)
        if not again.any():
            break
        bytes_of[again] = (splitmix(bytes_of[again] * np.uint64(3) + np.uint64(1)) % bytes_of[again].astype(np.uint64)).astype(np.int64)
    return kind, sig_of, bytes_of


def signatures(sig_of: np.ndarray) -> list[bytes]:
    """Decodable synthetic signatures of the rows `sig_of` (their kind decides the content)."""
    kind = np.searchsorted(KINDS, splitmix(sig_of * np.uint64(3)).astype(np.float64) / 2.0**64, side="right").clip(0, 4)
    words = splitmix(sig_of[:, None] * np.uint64(WORDS) + np.arange(WORDS, dtype=np.uint64)[None] + np.uint64(7))
    raw = words.view(np.uint8)[:, :neardup.SIZE].copy()
    raw[:, 0] = 0                                                   # square
    raw[:, 4:6] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)
    raw[:, 6] = 0
    coarse = slice(neardup.HEADER, neardup.COARSE_SIZE)
    low = kind == 3
    raw[low, coarse] = (raw[low, coarse] % 3).astype(np.int8).view(np.uint8) - 1   # |coefficient| <= 1
    w, h = neardup.detail_shape(64, 64)
    d = neardup.COARSE_SIZE
    raw[:, d:d + 2] = (w, h)
    raw[:, d + 2:d + 8] = (0, 255, 0, 255, 0, 255)
    blank = kind == 4
    raw[blank, coarse] = 0
    grey = (sig_of[blank] % 8 * 30 + 10).astype(np.uint8)
    raw[blank, 1:4] = np.stack([grey, np.full_like(grey, 128), np.full_like(grey, 128)], axis=1)
    raw[blank, d + 2:d + 8] = np.repeat(grey, 6).reshape(-1, 6)     # flat: min = max in every plane
    return [row.tobytes() for row in raw]


def shard_rows(shard: int, rows: int) -> tuple[np.ndarray, list[str], list[bytes]]:
    index = np.arange(shard * SHARD, min(rows, (shard + 1) * SHARD), dtype=np.int64)
    _, sig_of, bytes_of = origins(index)
    exact = [f"{x:016x}{y:016x}" for x, y in zip(splitmix(bytes_of).tolist(), splitmix(bytes_of + (1 << 40)).tolist())]
    return index, exact, signatures(sig_of)


def map_shard(root: str, shard: int, rows: int, settings) -> dict:
    """(Ray task) What prefilter's scan adds for dedup: hash one shard's signatures into the partitions."""
    from stages.prefilter.dedup import scan as dedup_scan

    index, exact, sigs = shard_rows(shard, rows)
    nodes = (shard << 32) + (index - shard * SHARD)
    dedup_scan.write_partitions(Path(root), str(shard), nodes, exact, sigs, settings)
    dedup_scan.write_signatures(Path(root), str(shard), nodes, sigs)   # prefilter's scan file holds them
    return {"rows": len(index)}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def shuffle_way(rows: int, folder: Path) -> dict:
    import ray

    from stages.prefilter.dedup import common as dedup, phases as dedup_phases
    from pipeline.executor import RAY
    from pipeline.parallel import Progress, run_shard_tasks

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    shards = math.ceil(rows / SHARD)
    settings = dedup.Settings(dedup.partitions_for(rows, None), True, True, False, 0.08, 0.1)
    root = folder / "dedup"
    started = time.perf_counter()
    run_shard_tasks(RAY, ray.remote(map_shard).options(num_cpus=1),
                    {str(s): (str(root), s, rows, settings) for s in range(shards)},
                    Progress("map", shards, rows), lambda r: r["rows"])
    mapped = time.perf_counter()
    summary = dedup_phases.run_phases(RAY, root, shards, settings, {"cpus": 1})
    done = time.perf_counter()
    decisions = {}
    if rows <= 200_000:
        for s in range(shards):
            decisions.update({str(k): v for k, v in dedup.decisions_of(root, s).items()})
    return {"map_s": mapped - started, "dedup_s": done - mapped, "summary": summary, "decisions": decisions}


def driver_way(rows: int, folder: Path) -> dict:
    """prefilter's `deduplicate` before #14: every signature in the driver, one pass in order."""
    started = time.perf_counter()
    near, seen, decisions = neardup.NearDuplicateIndex(0.08), set(), {}
    for shard in range(math.ceil(rows / SHARD)):
        index, exact, sigs = shard_rows(shard, rows)
        records = list(zip(index.tolist(), exact, sigs))
        for i, e, sig in records:
            node = (shard << 32) + i - shard * SHARD
            if e in seen:
                decisions[str(node)] = "duplicate_exact"
            else:
                seen.add(e)
        for i, e, sig in records:
            node = (shard << 32) + i - shard * SHARD
            if str(node) in decisions:
                continue
            if near.find(sig) is not None:
                decisions[str(node)] = "duplicate_near"
            else:
                near.add(sig)
    return {"map_s": 0.0, "dedup_s": time.perf_counter() - started, "summary": {"dropped": len(decisions)},
            "decisions": decisions}


def run(way: str, rows: int, folder: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", way, str(rows), str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--driver-max", type=int, default=100_000)
    parser.add_argument("--work", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, rows, folder = args.child
        result = (shuffle_way if way == "shuffle" else driver_way)(int(rows), Path(folder))
        print(json.dumps(result | {"peak_rss_mb": peak_rss_mb()}))
        return
    print(f"{'rows':>10} {'way':>8} {'map s':>7} {'dedup s':>8} {'total s':>8} {'rows/s':>9} {'RSS MB':>7}  dropped, pairs, edges")
    totals, rss = [], []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for rows in args.rows:
            got = {}
            for way in ("driver", "shuffle"):
                if way == "driver" and rows > args.driver_max:
                    continue
                folder = Path(tmp) / f"{way}-{rows}"
                folder.mkdir()
                got[way] = r = run(way, rows, folder)
                total = r["map_s"] + r["dedup_s"]
                s = r["summary"]
                print(f"{rows:>10,} {way:>8} {r['map_s']:>7.1f} {r['dedup_s']:>8.1f} {total:>8.1f} {rows / total:>9,.0f} "
                      f"{r['peak_rss_mb']:>7,.0f}  {s['dropped']:,}, {s.get('candidate_pairs', '-')}, "
                      f"{s.get('verified_edges', '-')} verified+{s.get('copy_edges', '-')} copy, cut {s.get('buckets_cut', '-')}, "
                      f"left out {s.get('pairs_left_out', '-')}")
                if way == "shuffle":
                    print(f"{'':>10} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
                    totals.append(total)
                    rss.append(r["peak_rss_mb"])
                os.system(f"rm -rf {folder}")
            if len(got) == 2:
                old, new = got["driver"], got["shuffle"]
                same = old["decisions"] == new["decisions"]
                print(f"{'':>10} ratio driver/shuffle wall x{(old['dedup_s']) / (new['map_s'] + new['dedup_s']):.2f}; "
                      f"decisions {'identical' if same else 'DIFFER'} ({len(old['decisions']):,})")
    steps = [b / a for a, b in zip(totals, totals[1:])]
    if steps:
        print(f"shuffle: growth per x10 of rows: wall x{math.exp(sum(map(math.log, steps)) / len(steps)):.2f}, "
              f"driver RSS x{math.exp(sum(math.log(b / a) for a, b in zip(rss, rss[1:])) / len(steps)):.2f}")


if __name__ == "__main__":
    main()
