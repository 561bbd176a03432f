"""pretrain: Ray Train `TorchTrainer` + DeepSpeed ZeRO over the upstream shards, then export.

The driver (this module) prepares the tokenizer, launches the workers (stages/pretrain/train/loop.py), and
after training consolidates the last complete checkpoint with DeepSpeed's zero_to_fp32 into
`model/` (safetensors + config.yaml + tokenizer), loadable without DeepSpeed. A killed run resumes
from its last complete checkpoint, with the same fingerprint.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch

from pipeline import storage
from stages.pretrain.config import SECTION, OBJECTIVES, PretrainConfig
from pipeline.configtree import to_plain
from pipeline.data.shards import ShardCheck, check_input_shards, read_input_shard
from pipeline.data.tokenizer import load_tokenizer, train_tokenizer
from pipeline.errors import InputError, StageFailed
from pipeline.model import SIZES, ModelConfig
from pipeline.modelio import read_info, save_pretrained
from pipeline.manifest import Accounting, Manifest
from pipeline.sources import Sources
from pipeline.stage import Extra, Inputs, Request, Stage, StageContext, Upstream, web_data
from stages.pretrain.train import checkpoints
from stages.pretrain.train.metrics import read_metrics
from pipeline.storage import as_path

log = logging.getLogger("vlp")


def run(cfg: PretrainConfig, inputs: Inputs, ctx: StageContext) -> Manifest:
    """Train on the upstream shards (plus the seed set). In rounds after 0, `previous_model` is the model
    that cleaned the data: its tokenizer is kept (the synthetic captions are written in it), and with
    `init: previous` its weights are the starting point."""
    started = time.time()
    upstream, upstream_dir = inputs.first().manifest, inputs.first().path
    seed_shards, previous_model = inputs.extra["seed_shards"], inputs.extra["previous_model"]
    web_samples = sum(s["samples"] for s in upstream.shards)
    # the seed set is the user's: each shard read whole once here (InputError names a cut one), and the
    # samples the loader will skip (no image or caption) and the members it never hands on are counted
    seed = check_input_shards(seed_shards)
    seed.warn("pretrain: seed shards")
    seed_samples = seed.samples
    samples = web_samples + seed_samples
    global_batch = cfg.micro_batch * cfg.grad_accum * cfg.num_workers
    if samples < global_batch:
        raise InputError(f"pretrain: {samples} training samples in {upstream_dir} is fewer than one global batch "
                         f"({global_batch} = micro_batch x grad_accum x num_workers)")
    ctx.out.begin(ctx.fingerprint, {"steps": cfg.steps, "samples_in": samples, "seed_samples": seed_samples,
                                    "seed_shards": seed.to_json()})
    shards = [str(upstream_dir / s["shard"]) for s in upstream.shards if s["samples"] > 0] + list(seed_shards)
    # DeepSpeed, TensorBoard and tokenizers write files by name: for an object-store run directory they
    # work in a node-local folder whose results are put in the stage folder (pipeline/storage.py)
    work = storage.work_dir(ctx.out.path) if storage.is_remote(ctx.out.path) else ctx.out.path
    tokenizer_dir = _tokenizer(cfg, shards, work / "tokenizer", previous_model, ctx.seed)
    if work != ctx.out.path:
        storage.upload(tokenizer_dir, ctx.out.path / "tokenizer")
        tokenizer_dir = ctx.out.path / "tokenizer"
    model_cfg = SIZES[cfg.model].replace(vocab_size=len(load_tokenizer(tokenizer_dir)))
    init_from, init_note = None, None
    if previous_model is not None and cfg.init == "previous":
        init_from = previous_model
        model_cfg = ModelConfig(**read_info(previous_model)["model"])
        init_note = ctx.run.relative(previous_model)
    elif cfg.init_from.vision or cfg.init_from.text:
        model_cfg, init_from = _hf_init(cfg, model_cfg, ctx)
        init_note = {"vision": cfg.init_from.vision, "text": cfg.init_from.text}
    _train(cfg, model_cfg, shards, tokenizer_dir, ctx, init_from, work)

    ckpt = checkpoints.latest_complete(ctx.out.path / "checkpoints")
    if ckpt is None or ckpt[0] != cfg.steps:
        raise StageFailed(f"pretrain: training ended without a complete checkpoint at step {cfg.steps}")
    with storage.local_copy(ckpt[1]) as tag_dir:
        state = consolidate(tag_dir, cfg.zero_stage)
    n_params = sum(t.numel() for t in state.values())
    save_pretrained(ctx.out.path / "model", model_cfg, state, tokenizer_dir,
                    {"pretrain": to_plain(cfg), "fingerprint": ctx.fingerprint, "parameters": n_params})
    history = read_metrics(ctx.out.path / "metrics.jsonl")
    plot_curves(history, ctx.out.path / "training_curves.png")
    if work != ctx.out.path:   # the node-local stand-in: everything in it is in the run directory now
        shutil.rmtree(work, ignore_errors=True)
    epochs = cfg.steps * global_batch / samples
    totals = Accounting(samples_in=samples + sum(seed.skipped.values()), samples_kept=samples,
                        failed=collections.Counter(seed.skipped))
    return ctx.manifest(to_plain(cfg), [], started,
                        {"model": dataclasses.asdict(model_cfg), "parameters": n_params, "epochs": round(epochs, 3),
                         "seed_samples": seed_samples, "seed_shards": seed.to_json(), "init_from": init_note,
                         "final": history[-1] if history else {}, "export": "model"}, totals=totals)


def _hf_init(cfg: PretrainConfig, model_cfg: ModelConfig, ctx: StageContext) -> tuple[ModelConfig, Path]:
    """The model config the checkpoints dictate, and a folder whose model.safetensors is the complete
    initial state the workers load (written once; the workers need no transformers checkpoint)."""
    from safetensors.torch import save_file

    from pipeline.fsutil import atomic_path
    from stages.pretrain.hfinit import init_state

    model_cfg, state = init_state(model_cfg, cfg.init_from.vision, cfg.init_from.text, ctx.seed)
    folder = ctx.out.path / "init"
    with atomic_path(folder / "model.safetensors") as tmp:   # one PUT on an object store
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    log.info("pretrain: starting from %s", ", ".join(f"{k} {v}" for k, v in
                                                     (("vision", cfg.init_from.vision), ("text", cfg.init_from.text)) if v))
    return model_cfg, folder


def _extra_inputs(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    from stages.pretrain.hfinit import checkpoint_files

    seed = sources.seed_shards() if cfg.pretrain.with_seed else []
    # after round 0 the data was cleaned by a model (capfilt's manifest says which; its fingerprint has it)
    previous = None if round_ == 0 else sources.run.resolve(upstream[0].manifest.details["base_model"])
    # a replaced checkpoint under the same folder name is a new input
    init = cfg.pretrain.init_from
    init_files = [f for folder in (init.vision, init.text) if folder for f in checkpoint_files(folder)]
    return {"seed_shards": Extra(seed, sources.shard_fingerprints("seed-shard", seed)), "previous_model": Extra(previous),
            "init_checkpoints": Extra(None, sources.shard_fingerprints("init-checkpoint", init_files))}


def _upstreams(cfg, round_: int) -> list[tuple[str, int]]:
    return [web_data(cfg)] if round_ == 0 else [("capfilt", round_)]


def _request(cfg, urls: int | None) -> Request:
    p = cfg.pretrain
    batch = p.micro_batch * p.grad_accum * p.num_workers
    return Request({"CPU": p.cpus_per_worker, **({"GPU": 1.0} if p.use_gpu else {})}, p.num_workers, True, None,
                   f"{p.steps} steps x global batch {batch} = {p.steps * batch} samples seen"
                   + (" (data + seed set)" if p.with_seed else ""))


def _figures(folder, manifest, truth) -> dict:
    return {"train_samples": manifest.totals.samples_in}


def _report(page) -> str:
    """The report's section: each round's training curves (the PNG a finished training wrote)."""
    parts = []
    for d in page.dirs:
        curves = d.path / "training_curves.png"
        if curves.is_file():
            name = f"training_round{d.round}.png"
            (page.out / name).write_bytes(curves.read_bytes())
            parts.append(f'<h3>Training curves, round {d.round}</h3><img src="{name}" alt="training curves round {d.round}">')
    return "<h2>Training</h2>" + "".join(parts) if parts else ""


STAGE = Stage("pretrain", SECTION, upstreams=_upstreams, run=run, request=_request,
              extra_inputs=_extra_inputs, seeded=True, trains=True, models=("model",), figures=_figures, report=_report)


def _tokenizer(cfg: PretrainConfig, shards: list[str], folder: Path, previous_model: Path | None,
               seed: int) -> Path:
    if cfg.tokenizer or cfg.init_from.text:
        load_tokenizer(cfg.tokenizer or cfg.init_from.text).save_pretrained(str(folder))
    elif previous_model is not None:
        load_tokenizer(previous_model / "tokenizer").save_pretrained(str(folder))
    elif not (folder / "tokenizer.json").is_file():
        seen = []   # sample_captions appends how many it gave
        captions = sample_captions(shards, cfg.tokenizer_captions, seed, seen)
        tok = train_tokenizer(captions, cfg.vocab_size, folder, cfg.tokenizer_min_count)
        log.info("pretrain: trained a WordPiece tokenizer of %d tokens on %d of the run's captions", len(tok),
                 seen[0])
    return folder


def sample_captions(shards: list[str], limit: int, seed: int, seen: list | None = None) -> Iterator[str]:
    """Up to `limit` captions, whole shards at a time in an order seeded by `seed` and each shard's name
    and place (not its path: a moved run samples the same), so the driver reads a bounded share of a
    large run's tars."""
    def rank(item):
        index, path = item
        return hashlib.sha256(f"{seed}:{index}:{as_path(path).name}".encode()).digest()

    taken, check = 0, ShardCheck()   # samples with no caption are skipped (the driver counted the seed set's)
    try:
        for _, shard in sorted(enumerate(shards), key=rank):
            for sample in read_input_shard(as_path(shard), check, needed=("txt",)):
                yield sample["txt"].decode("utf-8", errors="replace")
                taken += 1
                if taken >= limit:
                    return
    finally:
        if seen is not None:
            seen.append(taken)


def _train(cfg: PretrainConfig, model_cfg, shards: list[str], tokenizer_dir: Path, ctx: StageContext,
           init_from: Path | None, work: Path) -> None:
    from stages.pretrain.train.loop import train_loop

    config = {"pretrain": to_plain(cfg), "model": dataclasses.asdict(model_cfg), "shards": shards,
              "tokenizer_dir": str(tokenizer_dir), "out": str(ctx.out.path), "work": str(work), "seed": ctx.seed,
              "init_from": str(init_from / "model.safetensors") if init_from else None,
              "tracking": ctx.tracking and {**ctx.tracking, "run_name": f"pretrain-r{ctx.out.round}",
                                            "key": ctx.fingerprint}}
    # a gang of num_workers processes: Ray Train's workers, or (`vlp train`) the launcher's processes
    try:
        ctx.executor.train(train_loop, config, workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
                           use_gpu=cfg.use_gpu, storage=str(work / "_ray"), max_failures=cfg.max_failures,
                           name=ctx.out.stage)
    except Exception as err:  # noqa: BLE001 (the executor wraps the worker's error; we say what to do)
        raise StageFailed(f"pretrain: training failed after {cfg.max_failures} restarts: {err}. "
                          "Complete checkpoints are kept: `vlp resume` continues from the last one.") from err


def consolidate(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint (zero_to_fp32 for ZeRO 1-3)."""
    from stages.pretrain.train.checkpoints import safe_loads

    if zero_stage == 0:
        with safe_loads():
            return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    from pipeline.deepspeed_setup import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.fsutil import atomic_path

    seen = {k for h in history for k in h}
    names = [k for k in ("loss", *OBJECTIVES) if k in seen]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(h["step"], h[name]) for h in history if name in h]  # see fusion_every
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
