"""The shard map's two passes (pipeline/shardmap.py), measured on score_filter with a small random CLIP
model: pass 2 reading back the values pass 1 wrote to work/ (vlp) against pass 2 scoring every sample
again (what a stage without the cache would do), in one run, interleaved. Both must write the same shards
(checked by sha256). Then what the driver holds: the summaries' bytes per shard, and how they grow per
x10 of input (a fixed-size histogram per shard: with the shards, not the samples).

The shard-map functions run in this process (no Ray: the tasks' bodies, as Ray runs them), one thread.

    .venv/bin/python bench/shardmap.py [--shards 6] [--per-shard 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # tests/tinyclip.py

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline.data.shards import encode_json, write_shard as write_tar  # noqa: E402
from pipeline.fsutil import sha256_file  # noqa: E402
from pipeline.shardmap import Job, measure_shard, write_shard  # noqa: E402
from stages.score_filter.config import ScoreFilterConfig  # noqa: E402
from stages.score_filter.stage import ClipScore  # noqa: E402

WORDS = "a small large red green blue yellow circle square triangle star on white black background".split()


def build_model(folder: Path) -> None:
    from tinyclip import save_tiny_clip   # tests/tinyclip.py: the tests' tiny CLIP, here at 4 + 4 blocks of 128

    save_tiny_clip(folder, WORDS, width=128, layers=4, heads=4, intermediate=512, image_size=64, projection_dim=64,
                   max_positions=32)


def build_shards(folder: Path, shards: int, per_shard: int) -> list[dict]:
    rng, expected = random.Random(0), []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            img = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
            x, y = rng.randrange(40), rng.randrange(40)
            ImageDraw.Draw(img).rectangle([x, y, x + 20, y + 20], fill=tuple(rng.randrange(256) for _ in range(3)))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            key = f"{s:05d}{i:04d}"
            samples.append({"__key__": key, "jpg": buf.getvalue(), "txt": " ".join(rng.sample(WORDS, 6)).encode(),
                            "json": encode_json({"url": f"http://x/{key}.jpg"})})
        path = folder / f"{s:05d}.tar"
        write_tar(path, samples)
        expected.append({"shard": path.name, "samples": per_shard, "sha256": sha256_file(path),
                         "bytes": path.stat().st_size})
    return expected


def run(way: str, shards: list[dict], inputs: Path, model: Path, out: Path) -> tuple[float, dict]:
    cfg = ScoreFilterConfig(clip_model=str(model), keep_top=0.3, batch_size=64)
    settings = dataclasses.asdict(cfg)
    job = Job(ClipScore, ScoreFilterConfig, settings, 0, "score_filter")
    work = out / "work"
    started = time.perf_counter()
    summaries = [measure_shard(job, str(inputs / s["shard"]), s, i, str(work)) for i, s in enumerate(shards)]
    plan = ClipScore(cfg).plan(summaries)
    if way == "score again":   # pass 2 without the cache: an operator that measures inline, with the same plan
        job = dataclasses.replace(job, operator=_ScoreAgain)
    for i, s in enumerate(shards):
        write_shard(job, str(inputs / s["shard"]), s, i, str(work), plan, str(out), 0, None)
    elapsed = time.perf_counter() - started
    digests = {p.name: sha256_file(p) for p in sorted(out.glob("*.tar"))}
    return elapsed, {"digests": digests, "summary_bytes": [len(json.dumps(x)) for x in summaries]}


class _ScoreAgain(ClipScore):
    """The same rule, the values measured again in pass 2 instead of read back from work/."""

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        self.top = self.needs_plan
        self.needs_plan = False

    def decide(self, sample, value, plan):
        keep = value["score"] >= plan["threshold"]
        from pipeline.shardmap import Verdict
        return Verdict(keep, None if keep else "score_below_top", score=value["score"],
                       fields={"clip_score": value["score"]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-shardmap-"))
    try:
        build_model(root / "clip")
        (root / "in").mkdir()
        shards = build_shards(root / "in", args.shards, args.per_shard)
        times: dict[str, list[float]] = {"values read back (vlp)": [], "score again": []}
        outputs = {}
        for r in range(args.repeats):
            ways = list(times) if r % 2 == 0 else list(times)[::-1]
            for way in ways:
                out = root / f"out-{len(outputs)}"
                elapsed, result = run(way, shards, root / "in", root / "clip", out)
                times[way].append(elapsed)
                outputs[(way, r)] = result
                shutil.rmtree(out)
        digests = {json.dumps(o["digests"], sort_keys=True) for o in outputs.values()}
        samples = args.shards * args.per_shard
        print(f"score_filter keep_top 0.3, {args.shards} shards x {args.per_shard} samples, 1 thread, "
              f"median of {args.repeats}")
        for way, ts in times.items():
            med = sorted(ts)[len(ts) // 2]
            print(f"  {way:24s} {med:7.2f} s  ({samples / med:6.0f} samples/s; runs {', '.join(f'{t:.2f}' for t in ts)})")
        a, b = (sorted(ts)[len(ts) // 2] for ts in times.values())
        print(f"  ratio score again / read back: {b / a:.2f}x; the same shards: {len(digests) == 1}")
        per_shard = outputs[("values read back (vlp)", 0)]["summary_bytes"]
        print(f"  driver: {sum(per_shard) / len(per_shard):.0f} bytes of summary per shard "
              f"(a histogram of at most 2,000 bins: per x10 input at a fixed shard size, x10 shards, x10 bytes; "
              f"per x10 samples in a shard, x1)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
