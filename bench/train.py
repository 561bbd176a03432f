"""Training benchmarks, each comparing two ways of doing the same work in one run.

(a) step time of DeepSpeed ZeRO-2 vs plain torch DDP, same model and batch, 2 CPU ranks (gloo);
(b) memory per rank for ZeRO 0/1/2/3 next to the ZeRO paper's model-state formulas;
(c) activation checkpointing (fairscale checkpoint_wrapper): activation memory saved vs time added;
(d) on a GPU: `base` in bf16 on one GPU, samples/s and MFU (skipped without CUDA).

    .venv/bin/python bench/train.py [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PretrainConfig  # noqa: E402
from pipeline.model import SIZES, MultiwayTransformer, count_parameters  # noqa: E402
from pipeline.model.objectives import Batch, SpecialTokens, pretrain_losses  # noqa: E402

SPECIAL = SpecialTokens(pad=0, cls=2, sep=3, mask=4)
WEIGHTS = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "lm": 1.0}
MEMORY_MODEL = SIZES["demo"].replace(width=384, depth=6, heads=6, vl_layers=2, vocab_size=8000, embed_dim=256)


def batch(cfg, b, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
    ids[:, 0] = SPECIAL.cls
    images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    return Batch(images.to(device, dtype), ids.to(device), torch.ones_like(ids).to(device))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_tensor_mb() -> float:
    """MB held by every live tensor storage in this process (each storage counted once): after a
    step, with activations freed, that is the model states (params, grads, optimizer state) plus
    whatever buffers the framework keeps."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen and storage.nbytes():
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except (RuntimeError, ReferenceError):
            pass
    return total / 2**20


def _rank(rank, world, port, mode, cfg, micro, steps, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    torch.manual_seed(0)
    model = MultiwayTransformer(cfg)
    if mode == "ddp":
        dist.init_process_group("gloo", rank=rank, world_size=world)
        engine = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(engine.parameters(), lr=1e-4)

        def step(b):
            opt.zero_grad(set_to_none=True)
            pretrain_losses(engine.module, b, SPECIAL, WEIGHTS)["loss"].backward()  # DDP hooks average grads
            torch.nn.utils.clip_grad_norm_(engine.parameters(), 1.0)
            opt.step()
    else:
        import deepspeed

        from pipeline.train.deepspeed_config import deepspeed_config

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        pcfg = PretrainConfig(zero_stage=int(mode[-1]), micro_batch=micro, num_workers=world)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=deepspeed_config(pcfg, world, bf16=False))

        def step(b):
            engine.backward(pretrain_losses(engine, b, SPECIAL, WEIGHTS)["loss"])
            engine.step()
    for i in range(2):  # warm-up: allocations, optimizer state creation
        step(batch(cfg, micro, 100 * rank + i))
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        step(batch(cfg, micro, 100 * rank + 10 + i))
    dist.barrier()
    elapsed = (time.perf_counter() - t0) / steps
    import gc

    gc.collect()
    results[(mode, rank)] = (elapsed, live_tensor_mb())
    dist.destroy_process_group()


def run_ranks(mode, cfg, micro, steps, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(world, port, mode, cfg, micro, steps, results), nprocs=world, join=True)
    times = [results[(mode, r)][0] for r in range(world)]
    mems = [results[(mode, r)][1] for r in range(world)]
    return max(times), max(mems)


def _peak_rss(ckpt, steps, results):
    from pipeline.train.loop import build_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model(SIZES["demo"], ckpt)
    b = batch(SIZES["demo"], 64, 0)
    before = rss_mb()
    t0 = time.perf_counter()
    for _ in range(steps):
        model.zero_grad()
        pretrain_losses(model, b, SPECIAL, WEIGHTS)["loss"].backward()
    results[ckpt] = (rss_mb() - before, (time.perf_counter() - t0) / steps)


def activation_checkpointing(steps):
    """Each mode in a fresh process, so that its peak RSS is its own."""
    results = mp.Manager().dict()
    for ckpt in (False, True):
        proc = mp.get_context("spawn").Process(target=_peak_rss, args=(ckpt, steps, results))
        proc.start()
        proc.join()
    return dict(results)


def gpu_base_bf16(steps):
    if not torch.cuda.is_available():
        return None
    from torch.utils.flop_counter import FlopCounterMode

    cfg = SIZES["base"]
    model = MultiwayTransformer(cfg).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    micro = 64
    b = batch(cfg, micro, 0, "cuda", torch.bfloat16)
    with FlopCounterMode(display=False) as fc:
        pretrain_losses(model, b, SPECIAL, WEIGHTS)["loss"].backward()
    flops = fc.get_total_flops()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        pretrain_losses(model, b, SPECIAL, WEIGHTS)["loss"].backward()
        opt.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        pretrain_losses(model, b, SPECIAL, WEIGHTS)["loss"].backward()
        opt.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    name = torch.cuda.get_device_name()
    peak = 989e12 if ("H100" in name or "H200" in name) else None  # dense bf16 tensor-core peak (both)
    return name, micro / dt, flops / dt, (flops / dt / peak if peak else None), torch.cuda.max_memory_allocated() / 2**30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gpu-only", action="store_true", help="only (d): for a GPU machine without DeepSpeed")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    if not args.gpu_only:
        cpu_benchmarks(args)
    print("\n(d) base (bf16) on one GPU")
    gpu = gpu_base_bf16(args.steps)
    if gpu is None:
        print("    not measured: no GPU on this machine")
    else:
        name, sps, fps, mfu, mem = gpu
        print(f"    {name}: {sps:.0f} samples/s, {fps / 1e12:.0f} TFLOP/s, "
              f"MFU {mfu:.1%} of dense bf16 peak, peak memory {mem:.1f} GiB" if mfu else f"    {name}: {sps:.0f} samples/s")


def cpu_benchmarks(args) -> None:

    demo = SIZES["demo"]
    print(f"\n(a) demo model ({count_parameters(MultiwayTransformer(demo)) / 1e6:.2f}M params), 2 ranks x 32, "
          f"all four objectives, {args.steps} steps after 2 warm-up")
    t_ddp, _ = run_ranks("ddp", demo, 32, args.steps)
    t_z2, _ = run_ranks("zero2", demo, 32, args.steps)
    print(f"    torch DDP       {t_ddp:.3f} s/step\n    DeepSpeed ZeRO-2 {t_z2:.3f} s/step\n"
          f"    ratio ZeRO-2 / DDP: {t_z2 / t_ddp:.2f}")

    psi = count_parameters(MultiwayTransformer(MEMORY_MODEL))
    n = 2
    mb = psi / 2**20
    print(f"\n(b) memory per rank, model of {psi / 1e6:.1f}M params (Psi), N = {n} ranks, fp32 on CPU, "
          f"micro-batch 8: bytes in live tensors after a step (activations freed), max over ranks")
    print("    stage  measured  | paper (mixed precision, Adam)  | fp32 analogue (4+4+8 bytes)")
    paper = {0: 16, 1: 4 + 12 / n, 2: 2 + 14 / n, 3: 16 / n}
    fp32 = {0: 16, 1: 8 + 8 / n, 2: 4 + 12 / n, 3: 16 / n}
    for stage in range(4):
        _, mem = run_ranks(f"zero{stage}", MEMORY_MODEL, 8, 2)
        print(f"    ZeRO-{stage} {mem:7.0f} MB ({mem / mb:4.1f} Psi) | {paper[stage]:5.1f} Psi = {paper[stage] * mb:5.0f} MB "
              f"| {fp32[stage]:5.1f} Psi = {fp32[stage] * mb:5.0f} MB")

    print("\n(c) activation checkpointing, demo model, batch 64, one process per mode (2 threads)")
    ac = activation_checkpointing(args.steps)
    (m0, t0), (m1, t1) = ac[False], ac[True]
    print(f"    peak RSS growth over a step: {m0:.0f} MB without, {m1:.0f} MB with ({1 - m1 / m0:.0%} less)")
    print(f"    step time:          {t0:.3f} s without, {t1:.3f} s with ({t1 / t0 - 1:+.0%})")


if __name__ == "__main__":
    main()
