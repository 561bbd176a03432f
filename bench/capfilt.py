"""CapFilt benchmarks, each comparing two ways of doing the same work in one run.

(a) caption generation with vs without the KV cache (tokens/s and ratio; greedy, so both produce the
    same tokens, checked);
(b) filter (ITM) pairs/s at batch 1 vs batch 64;
(c) the capfilt stage's shard processing, shards/s with 1 vs 2 Ray actors (CPU; needs Ray, skipped
    with --no-actors);
(d) the same stage with each shard decoded whole before inference, one shard per actor (the way
    before streaming: prefetch_batches 0, shards_per_actor 1) vs streamed (a reader thread 2 batches
    ahead, 2 shards per actor), same shards checked (sha256);
(e) the same decode + caption + filter over the same shards with Ray Data (read_webdataset, then
    map_batches on a pool of 2 actors holding the same models) vs vlp's actor pool, images/s. Ray Data
    has no per-shard commit: its way scores and counts, vlp's also writes and commits every shard;
(f) an actor's two jobs, caption generation (KV cache, greedy) and match scoring (ITM + ITC,
    pipeline/model/scoring.py), on the same batches over fp32 weights in fp32 vs under bf16 autocast (the
    precision a bf16 fine-tune's models caption and score in), interleaved, median of --repeats each.

    .venv/bin/python bench/capfilt.py [--model demo] [--tokens 30] [--no-actors] [--only f]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import SIZES, MultiwayTransformer  # noqa: E402
from pipeline.model.generate import generate  # noqa: E402

CLS, SEP, PAD = 2, 3, 0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kv_cache(cfg, device, dtype, batch: int, tokens: int, repeats: int = 3) -> dict:
    model = MultiwayTransformer(cfg).to(device, dtype).eval()
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    prompt = torch.full((batch, 1), CLS, device=device)
    result = {}
    outputs = {}
    for use_cache in (True, False):
        generate(model, images, prompt, sep_id=-1, pad_id=PAD, max_len=tokens + 1, top_p=None, use_cache=use_cache)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            # sep_id -1: never stops early, so both ways generate exactly `tokens` tokens
            outputs[use_cache] = generate(model, images, prompt, sep_id=-1, pad_id=PAD, max_len=tokens + 1,
                                          top_p=None, use_cache=use_cache)
        _sync(device)
        result[use_cache] = batch * tokens * repeats / (time.perf_counter() - t0)
    same = bool((outputs[True] == outputs[False]).float().mean() > 0.99)
    return {"with": result[True], "without": result[False], "same_tokens": same}


def filter_batches(cfg, device, dtype, pairs: int = 256) -> dict:
    model = MultiwayTransformer(cfg).to(device, dtype).eval()
    images = torch.randn(pairs, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    ids = torch.randint(5, cfg.vocab_size, (pairs, cfg.max_text_len), device=device)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    out = {}
    with torch.no_grad():
        for bs in (1, 64):
            model("itm_logits", model("fuse", images[:bs], ids[:bs], mask[:bs]))
            _sync(device)
            t0 = time.perf_counter()
            for i in range(0, pairs, bs):
                model("itm_logits", model("fuse", images[i:i + bs], ids[i:i + bs], mask[i:i + bs])).softmax(-1)
            _sync(device)
            out[bs] = pairs / (time.perf_counter() - t0)
    return out


def precision_ab(cfg, device: str, batch: int, tokens: int, repeats: int) -> dict:
    """(f): {(job, precision): median seconds} of caption generation and match scoring of the same batch in
    fp32 and in bf16 autocast over the same fp32 weights (as an actor holds them), the two precisions
    interleaved (which goes first alternates), and how far bf16's outputs are from fp32's."""
    import statistics

    from pipeline.model.scoring import match_scores
    from pipeline.precision import resolve

    torch.manual_seed(0)
    model = MultiwayTransformer(cfg).to(device).eval()
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    prompt = torch.full((batch, 1), CLS, device=device)
    ids = torch.randint(5, cfg.vocab_size, (batch, cfg.max_text_len), device=device)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    precisions = {"fp32": resolve("fp32"), "bf16": resolve("bf16")}
    jobs = {"caption": lambda: generate(model, images, prompt, sep_id=-1, pad_id=PAD, max_len=tokens + 1, top_p=None),
            "match": lambda: match_scores(model, images, ids, mask)}
    times, outputs = {(j, p): [] for j in jobs for p in precisions}, {}
    for r in range(repeats + 1):   # round 0 warms up, untimed
        for job, run in jobs.items():
            for name in (list(precisions) if r % 2 else list(precisions)[::-1]):
                with precisions[name].autocast(managed_by_deepspeed=False):
                    _sync(device)
                    t0 = time.perf_counter()
                    outputs[job, name] = run()
                    _sync(device)
                if r:
                    times[job, name].append(time.perf_counter() - t0)
    new_tokens = [outputs["caption", name][:, 1:] for name in precisions]   # without the prompt's [CLS]
    same = (new_tokens[0] == new_tokens[1]).float().mean().item()
    diff = [(a - b).abs().max().item() for a, b in zip(outputs["match", "fp32"], outputs["match", "bf16"])]
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "same_tokens": same,
            "itm_diff": diff[0], "itc_diff": diff[1], "auto": resolve("auto")}


def actors(workdir: Path, variants: dict[str, list[str]], ray_data: bool = True) -> tuple[dict, dict]:
    """The real capfilt stage over the toy web's tiny run, once per variant (its --set overrides), twice
    each, alternating: ({variant: best shards/s}, {variant: shard digests})."""
    import ray
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import CAPFILT, PRETRAIN, TEST_WEB  # the tests' tiny web and settings
    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.toyweb.lists import write_toyweb
    from pipeline.toyweb.server import ToyWebServer

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    try:
        with ToyWebServer(TEST_WEB) as server:
            files = write_toyweb(TEST_WEB, workdir / "web", server.port)
            data = {"name": "bench", "ray": {"num_cpus": 2}, "rounds": 1,
                    "stages": ["download", "prefilter", "pretrain", "capfilt"],
                    "data": {"inputs": [{"path": str(s.path), "format": s.format, "name": s.name} for s in files.inputs],
                             "seed_shards": str(files.seed_shards[0])},
                    "download": {"samples_per_shard": 40, "image_size": 48, "timeout": 3,
                                 "allow_private_hosts": ["127.0.0.1"]},
                    # the demo model: with the tests' tiny one a shard is too little work to time
                    "pretrain": {**PRETRAIN, "model": "demo"},
                    "capfilt": {**CAPFILT, "threshold": 0.0, "prompt": "", "max_len": 16}}
            cfg_path = workdir / "c.yaml"
            cfg_path.write_text(yaml.safe_dump(data))
            base = workdir / "base"
            runner.execute(load_config(cfg_path, ["stages=[download, prefilter, pretrain]"]), base)
        out, digests = {}, {}
        for n in list(variants) * 2:  # alternate, keep the better of two
            run = workdir / f"variant-{n}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run)
            cfg = load_config(cfg_path, variants[n])
            runner.execute(cfg, run, ["capfilt"])  # fine-tunes, then processes the shards
            stage = run / "round-1" / "capfilt"
            manifest = json.loads((stage / "manifest.json").read_text())
            # time of the shard phase only: from the fine-tuned models' export to the manifest
            t_models = max((stage / r / "model.safetensors").stat().st_mtime for r in ("captioner", "filter"))
            rate = len(manifest["shards"]) / (manifest["finished"] - t_models)
            out[n] = max(out.get(n, 0.0), rate)
            digests[n] = {s["shard"]: s["sha256"] for s in manifest["shards"]}
            images = manifest["totals"]["samples_in"]
            out[f"{n} images/s"] = max(out.get(f"{n} images/s", 0.0), images / (manifest["finished"] - t_models))
            if ray_data and n == "2 streamed":
                seconds, scored = ray_data_way(stage, run / "round-0" / "prefilter", cfg.capfilt.batch_size)
                out["ray data images/s"] = max(out.get("ray data images/s", 0.0), scored / seconds)
                out["ray data images"] = scored
        return out, digests
    finally:
        ray.shutdown()


class RayDataScorer:
    """Ray Data's way (e): a map_batches actor holding the stage's two models (CapfiltWorker's own)."""

    def __init__(self, stage_dir: str, cfg: dict, calibration):
        from stages.capfilt.stage import CapfiltWorker

        self.worker = CapfiltWorker(f"{stage_dir}/captioner", f"{stage_dir}/filter", cfg, stage_dir, 1, 0,
                                    {"captioner": "-", "filter": "-"}, calibration)
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, batch: dict) -> dict:
        from pipeline.data.loader import decode_image

        size = self.worker.filter.cfg.image_size
        images = torch.stack([decode_image(bytes(b), size, None) for b in batch["jpg"]])
        texts = [bytes(t).decode("utf-8") for t in batch["txt"]]
        with torch.no_grad():
            synthetic = self.worker.caption(images, self.generator)
            web = self.worker.match(images, texts)
            syn = self.worker.match(images, synthetic)
        return {"web": web, "synthetic": syn}


def ray_data_way(stage_dir: Path, upstream: Path, batch: int) -> tuple[float, int]:
    """Images/s of Ray Data over the stage's input shards with the stage's fine-tuned models."""
    import ray

    manifest = json.loads((stage_dir / "manifest.json").read_text())
    cfg = {**manifest["config"]}
    calibration = manifest["models"]["filter"].get("calibration")
    paths = [str(upstream / s["shard"]) for s in json.loads((upstream / "manifest.json").read_text())["shards"]]
    started = time.perf_counter()
    # On 2 CPUs, two 1-CPU actors leave none for the read tasks and the pipeline waits forever (seen):
    # the actors take 0.75 each and the reads 0.25, the same 2 CPUs as vlp's two 1-CPU actors.
    ds = ray.data.read_webdataset(paths, decoder=None, suffixes=["jpg", "txt"], num_cpus=0.25)
    scored = ds.map_batches(RayDataScorer, fn_constructor_args=(str(stage_dir), cfg, calibration), batch_size=batch,
                            concurrency=2, num_cpus=0.75, batch_format="numpy")
    n = sum(len(b["web"]) for b in scored.iter_batches(batch_size=None, batch_format="numpy"))
    return time.perf_counter() - started, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo", choices=sorted(SIZES))
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-actors", action="store_true")
    parser.add_argument("--only", default="abcdef", help="which parts to run, e.g. f (c, d, e run together)")
    parser.add_argument("--repeats", type=int, default=15, help="(f): timed repeats of each job per precision")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = SIZES[args.model]
    cfg = cfg.replace(max_text_len=max(cfg.max_text_len, args.tokens + 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; model {args.model} ({dtype})")

    if "a" in args.only:
        kv = kv_cache(cfg, device, dtype, args.batch, args.tokens)
        print(f"\n(a) generation, batch {args.batch}, {args.tokens} tokens, greedy")
        print(f"    with KV cache    {kv['with']:9.0f} tokens/s\n    without KV cache {kv['without']:9.0f} tokens/s\n"
              f"    ratio {kv['with'] / kv['without']:.1f}x (target >= 3x); same tokens: {kv['same_tokens']}")

    if "b" in args.only:
        fb = filter_batches(cfg, device, dtype)
        print("\n(b) filter (ITM), 256 pairs")
        print(f"    batch 1  {fb[1]:8.0f} pairs/s\n    batch 64 {fb[64]:8.0f} pairs/s\n    ratio {fb[64] / fb[1]:.1f}x")

    if "f" in args.only:
        ab = precision_ab(cfg, device, args.batch, args.tokens, args.repeats)
        med = ab["median"]
        print(f"\n(f) fp32 vs bf16 autocast over the same fp32 weights, the same batch of {args.batch}, interleaved, "
              f"median of {args.repeats}; vlp's auto here: {ab['auto'].name} ({ab['auto'].reason})")
        for job, unit, work in (("caption", "tokens/s", args.batch * args.tokens), ("match", "pairs/s", args.batch)):
            for name in ("fp32", "bf16"):
                print(f"    {job} {name} {med[job, name] * 1e3:8.1f} ms {work / med[job, name]:9.0f} {unit}")
            print(f"    {job} ratio fp32/bf16 {med[job, 'fp32'] / med[job, 'bf16']:.2f}x")
        print(f"    caption: {args.tokens} tokens, KV cache, greedy; same tokens {ab['same_tokens']:.1%}\n"
              f"    match: ITM + ITC (match_scores); bf16 - fp32 at most {ab['itm_diff']:.4f} (ITM log-odds), "
              f"{ab['itc_diff']:.4f} (ITC cosine)")

    if args.no_actors or not set("cde") & set(args.only):
        return
    whole = ["capfilt.prefetch_batches=0", "capfilt.shards_per_actor=1"]
    with tempfile.TemporaryDirectory() as tmp:
        sp, digests = actors(Path(tmp), {"1 actor": ["capfilt.actors=1", *whole], "2 actors": ["capfilt.actors=2", *whole],
                                         "2 streamed": ["capfilt.actors=2"]})
    print("\n(c) capfilt stage on the tests' toy web (6 shards, ~180 images, demo model), from the fine-tuned "
          "models' export to the manifest (actor start included), best of 2")
    print(f"    1 actor  {sp['1 actor']:.2f} shards/s\n    2 actors {sp['2 actors']:.2f} shards/s\n"
          f"    ratio {sp['2 actors'] / sp['1 actor']:.2f}x")
    print("\n(d) 2 actors: each shard decoded whole, one shard per actor, vs streamed (reader thread 2 batches "
          "ahead, 2 shards per actor)")
    print(f"    whole    {sp['2 actors']:.2f} shards/s\n    streamed {sp['2 streamed']:.2f} shards/s\n"
          f"    ratio {sp['2 streamed'] / sp['2 actors']:.2f}x; same shards: "
          f"{digests['2 streamed'] == digests['2 actors'] == digests['1 actor']}")
    print("\n(e) decode + caption + filter, 2 actors: Ray Data map_batches (scores only) vs vlp's pool (streamed, "
          "with each shard written and committed), best of 2")
    print(f"    ray data {sp['ray data images/s']:.1f} images/s ({sp['ray data images']} images)\n"
          f"    vlp      {sp['2 streamed images/s']:.1f} images/s\n"
          f"    ratio vlp / ray data {sp['2 streamed images/s'] / sp['ray data images/s']:.2f}x")


if __name__ == "__main__":
    main()
