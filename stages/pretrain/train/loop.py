"""The training loop each Ray Train worker runs: DeepSpeed engine, exact resume, logging, checkpoints.

Ray Train restarts this function on every worker after a worker dies (FailureConfig); it then resumes
from the last *complete* checkpoint, restoring model, optimizer, LR schedule, RNG and data position.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from pipeline.deepspeed_setup import build_comm_op, import_deepspeed
from stages.pretrain.train.deepspeed_config import deepspeed_config
from stages.pretrain.config import OBJECTIVES, UNIMODAL_OBJECTIVES, PretrainConfig
from pipeline.configtree import build
from pipeline.data.loader import StreamSpec, make_loader
from pipeline.data.tokenizer import load_tokenizer
from pipeline.fsutil import atomic_write_bytes
from pipeline.model import ModelConfig, MultiwayTransformer
from pipeline.model.objectives import Batch, SpecialTokens, TextQueue, pretrain_losses
from pipeline.storage import as_path, is_remote, local_copy, upload
from stages.pretrain.train import checkpoints
from pipeline.optim import lr_lambda, param_groups
from pipeline.precision import Precision, resolve
from stages.pretrain.train.metrics import read_metrics

log = logging.getLogger("vlp")


def build_model(model_cfg: ModelConfig, activation_checkpointing: bool) -> MultiwayTransformer:
    model = MultiwayTransformer(model_cfg)
    if activation_checkpointing:
        from fairscale.nn.checkpoint import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    return model


def train_loop(config: dict, rank: int, world: int, local_rank: int) -> None:
    """One rank's training, in a gang of `world` processes the executor started (Ray Train's workers, or a
    launcher's: torchrun, deepspeed; pipeline/executor.py) that set up the rendezvous (MASTER_ADDR, ...)
    in the environment."""
    deepspeed = import_deepspeed()
    cfg = build(PretrainConfig, config["pretrain"], source="pretrain")
    model_cfg = ModelConfig(**config["model"])
    out = as_path(config["out"])              # the stage folder: a path, or an object-store URL
    work = Path(config.get("work") or out)   # where DeepSpeed and TensorBoard write (node-local for a URL)
    remote = out if is_remote(out) else None
    build_comm_op()   # before init_distributed, which would build it under a lock a kill can orphan
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    seed = config["seed"]
    torch.manual_seed(seed)  # the same initial weights on every rank
    precision = resolve(cfg.precision)
    if not torch.cuda.is_available():   # rank 0's choice for all: a cluster's nodes may differ in CPU
        box = [precision]
        dist.broadcast_object_list(box, src=0)
        precision = box[0]
    if rank == 0:
        log.info("pretrain: precision %s (%s)", precision.name, precision.reason)
    model = build_model(model_cfg, cfg.activation_checkpointing)
    if config.get("init_from"):  # continue from the previous round's model (a checkpoint, if any, wins)
        from safetensors.torch import load_file

        with local_copy(as_path(config["init_from"])) as weights:
            model.load_state_dict(load_file(str(weights)))
    engine = make_engine(model, cfg, world, precision)
    device = engine.device
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    random.seed(seed * 1000 + rank)
    np.random.seed(seed * 1000 + rank)

    queue = TextQueue(cfg.text_queue) if cfg.text_queue else None
    ckpt_dir = work / "checkpoints"
    start, consumed = 0, {}
    if remote is not None:
        step = checkpoints.fetch_latest(remote / "checkpoints", ckpt_dir, local_rank)
        latest = None if step is None else (step, ckpt_dir / checkpoints.tag_for(step))
    else:
        latest = checkpoints.latest_complete(ckpt_dir)
    if latest is not None:
        start = latest[0]
        state = checkpoints.load(engine, ckpt_dir, start, rank)
        checkpoints.restore_rng(state["rng"], generator)
        consumed = state["consumed"]
        if queue is not None:
            queue.load_state_dict(state["text_queue"])
        if rank == 0:
            log.info("pretrain: resumed from the complete checkpoint at step %d", start)
            if state.get("precision", "fp32") != precision.name:   # checkpoints before #30 were all fp32 on CPU
                log.warning("pretrain: the checkpoint at step %d was trained in %s, this run continues in %s: "
                            "the steps after it are not those of an uninterrupted run", start,
                            state.get("precision", "fp32"), precision.name)

    tok = load_tokenizer(config["tokenizer_dir"])
    special = SpecialTokens(pad=tok.pad_token_id, cls=tok.cls_token_id, sep=tok.sep_token_id, mask=tok.mask_token_id)
    spec = StreamSpec(shards=tuple(config["shards"]), rank=rank, world=world, seed=seed, batch_size=cfg.micro_batch,
                      image_size=model_cfg.image_size, max_text_len=model_cfg.max_text_len,
                      tokenizer_dir=config["tokenizer_dir"], augment=cfg.augment, num_workers=cfg.loader_workers)
    batches = iter(make_loader(spec, consumed, cfg.loader_prefetch))
    metrics = MetricsLog(work, rank, start, remote, config.get("tracking"))
    weights = dict(cfg.loss_weights)
    unimodal = {k: w for k, w in weights.items() if k in UNIMODAL_OBJECTIVES}
    window, steps_in_window, t0, bad = {}, 0, time.time(), 0
    # FLOPs of one micro-batch's forward + backward per kind of step, counted by torch's FlopCounterMode
    # on its first occurrence (every later one does the same matmuls), for TFLOP/s and MFU
    flops_of, window_flops, peak = {}, 0.0, peak_flops(cfg, precision.name == "bf16")
    for step in range(start + 1, cfg.steps + 1):
        for _ in range(cfg.grad_accum):
            raw = next(batches)
            consumed[raw["worker"]] = raw["consumed"]
            bad = raw["bad"]
            images = raw["images"].to(device, precision.input_dtype)
            batch = Batch(images, raw["ids"].to(device), raw["mask"].to(device))
            phase = weights if step % cfg.fusion_every == 0 else unimodal
            kind = "fusion" if phase is weights else "unimodal"
            counter = FlopCounterMode(display=False) if kind not in flops_of else contextlib.nullcontext()
            losses = micro_step(engine, batch, special, phase, generator, cfg, queue, precision, counter)
            if kind not in flops_of:
                flops_of[kind] = float(counter.get_total_flops())
            window_flops += flops_of[kind]
            for k, v in losses.items():
                window.setdefault(k, [0.0, 0])[0] += float(v.detach()) / cfg.grad_accum
        for k in losses:  # a mean per objective over the steps that ran it (see fusion_every)
            window[k][1] += 1
        steps_in_window += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            samples = steps_in_window * cfg.micro_batch * cfg.grad_accum * world
            seconds = time.time() - t0
            achieved = window_flops * world / seconds   # every rank does the same work
            speed = {"samples_per_s": samples / seconds, "tflops": achieved / 1e12}
            if peak:
                speed["mfu"] = achieved / (peak * world)
            metrics.write(step, _mean_over_ranks(window), engine.get_lr()[0], **speed, bad_samples=bad,
                          **precision.to_json())
            window, steps_in_window, t0, window_flops = {}, 0, time.time(), 0.0
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoints.save(engine, ckpt_dir, step, rank, {
                "rng": checkpoints.rng_state(generator), "consumed": dict(consumed),
                "text_queue": queue.state_dict() if queue else None, "precision": precision.name},
                cfg.keep_checkpoints,
                remote / "checkpoints" if remote is not None else None)
            metrics.publish()
    metrics.close()
    if hasattr(batches, "close"):
        batches.close()


def make_engine(model: torch.nn.Module, cfg: PretrainConfig, world: int, precision: Precision):
    """The DeepSpeed engine over `model`: ZeRO, AdamW, warmup + cosine LR, clipping, accumulation (in a
    process group already set up). DeepSpeed's bf16 mode only where the precision wants bf16 weights."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, world, precision.deepspeed_bf16), dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    return engine


def micro_step(engine, batch: Batch, special: SpecialTokens, weights: dict[str, float], generator: torch.Generator,
               cfg: PretrainConfig, queue: TextQueue | None, precision: Precision,
               counter: contextlib.AbstractContextManager | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch: the forward in `precision` (bf16 autocast on a CPU), backward, and DeepSpeed's
    step (which applies the optimizer at the end of a gradient-accumulation cycle). `counter` wraps the
    forward and backward (FLOPs). bench/train.py times this very function against bare torch loops."""
    with counter or contextlib.nullcontext():
        with precision.autocast():
            losses = pretrain_losses(engine, batch, special, weights, generator, cfg.itm_easy_negatives, queue,
                                     cfg.queue_in_itc, cfg.itc_hard_negatives)
        engine.backward(losses["loss"])
    engine.step()
    return losses


# Dense bf16 peak FLOP/s per device, for MFU (vendor data sheets, SXM parts); others: pretrain.peak_tflops
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(cfg: PretrainConfig, bf16: bool) -> float | None:
    """One device's peak FLOP/s: the config's, else the table's for a known GPU in bf16, else None (a
    CPU, whose peak depends on cores and vector units: TFLOP/s is logged, MFU is not)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if bf16 and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16.items() if k in name), None)
    return None


def _mean_over_ranks(window: dict[str, list]) -> dict:
    """{objective: mean over the window's steps that ran it, averaged over ranks} (every rank runs the
    same objectives at the same steps, so the names agree)."""
    names = sorted(window)
    t = torch.tensor([window[n][0] / window[n][1] for n in names], dtype=torch.float64)
    dist.all_reduce(t)
    return {n: float(v) / dist.get_world_size() for n, v in zip(names, t)}


class MetricsLog:
    """Rank 0 writes metrics.jsonl and TensorBoard events; a resumed run first drops the lines past
    its checkpoint, so the file always tells one consistent history."""

    def __init__(self, out: Path, rank: int, start: int, remote=None, tracking: dict | None = None):
        self.rank, self.path, self.remote = rank, out / "metrics.jsonl", remote
        self.tb = self.tracker = None
        if rank != 0:
            return
        if tracking:   # MLflow / W&B: a training run under the pipeline's (pipeline/tracking.py)
            from pipeline.tracking import training_tracker

            self.tracker = training_tracker(tracking, tracking["run_name"], tracking["key"], "pretrain")
        if remote is not None and (remote / self.path.name).is_file():   # the history as the run has it
            atomic_write_bytes(self.path, (remote / self.path.name).read_bytes())
        kept = [json.dumps(r) for r in read_metrics(self.path) if r["step"] <= start]
        atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)

    def write(self, step: int, losses: dict, lr: float, **extra) -> None:
        if self.rank != 0:
            return
        record = {"step": step, "lr": lr, **{k: round(v, 6) for k, v in losses.items()}, **extra}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if k != "step" and not isinstance(v, str)}
        for k, v in numbers.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        if self.tracker is not None:
            self.tracker.metrics({f"train/{k}": v for k, v in numbers.items()}, step)
        log.info("pretrain step %d: loss %.4f (%s), %.1f samples/s, %.3f TFLOP/s%s", step, losses["loss"],
                 ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k in OBJECTIVES),
                 extra["samples_per_s"], extra["tflops"], f", MFU {extra['mfu']:.1%}" if "mfu" in extra else "")

    def publish(self) -> None:
        """Put the metrics and TensorBoard events in the run's folder (an object store's run directory)."""
        if self.rank != 0 or self.remote is None:
            return
        self.tb.flush()
        upload(self.path, self.remote / self.path.name)
        upload(self.path.parent / "tensorboard", self.remote / "tensorboard")

    def close(self) -> None:
        if self.tb is not None:
            self.publish()
            self.tb.close()
        if self.tracker is not None:
            self.tracker.close()
