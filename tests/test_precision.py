"""Training precision (pipeline/precision.py): what `auto` chooses, bf16 on a CPU through
DeepSpeed, attention in fp32 and a channels_last stem under bf16 autocast, and loss curves that agree
with fp32 within the gap between two fp32 seeds. No timings here (bench/train.py has them)."""
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from stages.pretrain.config import PretrainConfig
from pipeline.model import SIZES, MultiwayTransformer
from pipeline.model import multiway
from pipeline.model.objectives import Batch, SpecialTokens, TextQueue
from stages.pretrain.train.loop import micro_step
from pipeline.precision import Precision, cpu_bf16_instructions, resolve

CFG = SIZES["tiny"]
SPECIAL = SpecialTokens(pad=0, cls=2, sep=3, mask=4)
WEIGHTS = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "lm": 1.0, "bow": 0.05}   # BoW sums over the vocabulary
UNIMODAL = {"itc": 1.0, "bow": 0.05}
BF16_CPU = resolve("bf16", cuda=False)
FP32_CPU = resolve("fp32", cuda=False)


def test_auto_chooses_bf16_where_the_machine_has_it():
    assert resolve("auto", cuda=True).name == "bf16" and resolve("auto", cuda=True).deepspeed_bf16
    for found in ("AMX-BF16", "AVX512-BF16"):
        chosen = resolve("auto", cuda=False, instructions=found)
        assert (chosen.name, chosen.deepspeed_bf16, chosen.input_dtype) == ("bf16", False, torch.float32)
        assert found in chosen.reason
    plain = resolve("auto", cuda=False, instructions=None)
    assert plain.name == "fp32" and "no bf16 instructions" in plain.reason
    assert resolve("fp32", cuda=True).name == "fp32" and resolve("bf16", cuda=False).name == "bf16"
    emulated = resolve("bf16", cuda=False, instructions=None)   # as asked, with a word on why it is slow
    assert emulated.name == "bf16" and "no bf16 instructions" in emulated.reason
    with pytest.raises(ValueError, match="precision"):
        resolve("fp16")
    # this machine's answer agrees with the kernel's flags (torch's probe or /proc/cpuinfo)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert cpu_bf16_instructions() in ("AMX-BF16", "AVX512-BF16")


def test_autocast_is_for_the_weights_that_are_not_bf16():
    assert not torch.is_autocast_enabled("cpu")
    with BF16_CPU.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with FP32_CPU.autocast():
        assert not torch.is_autocast_enabled("cpu")
    gpu = Precision("bf16", "cuda", "test")
    assert isinstance(gpu.autocast(), type(FP32_CPU.autocast()))   # DeepSpeed's bf16 weights: no autocast
    with warnings.catch_warnings():   # on a machine without CUDA torch warns that it would disable it
        warnings.simplefilter("ignore")
        assert isinstance(gpu.autocast(managed_by_deepspeed=False), torch.autocast)


def _batch(seed: int, b: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CFG.vocab_size, (b, CFG.max_text_len), generator=g)
    ids[:, 0] = SPECIAL.cls
    return Batch(torch.randn(b, 3, CFG.image_size, CFG.image_size, generator=g), ids, torch.ones_like(ids))


def test_attention_runs_in_fp32_under_cpu_autocast(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        seen.append((q.dtype, torch.is_autocast_enabled("cpu"), out.dtype))
        return out
    monkeypatch.setattr(multiway.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = MultiwayTransformer(CFG.replace(rel_pos_bias="shared"))
    b = _batch(0)
    with BF16_CPU.autocast():
        hidden = model("fuse", b.images, b.ids, b.mask)
    assert seen and all(s == (torch.float32, False, torch.float32) for s in seen), set(seen)
    assert hidden.dtype == torch.float32   # the last LayerNorm runs in fp32 under autocast
    hidden.float().sum().backward()         # and the backward goes through the fp32 attention
    assert model.blocks[0].attn.qkv.weight.grad is not None
    seen.clear()
    monkeypatch.setattr(multiway.Attention, "fp32_under_cpu_autocast", False)
    with BF16_CPU.autocast():
        model("encode_text", b.ids, b.mask)
    assert {s[0] for s in seen} == {torch.bfloat16}, "the switch bench/train.py uses for 'bf16 as is'"


def test_the_conv_stem_runs_channels_last_under_bf16_autocast_only():
    torch.manual_seed(0)
    stem = MultiwayTransformer(CFG).patch_embed
    layouts = []
    stem.convs[0].register_forward_pre_hook(
        lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    images = _batch(0).images
    with BF16_CPU.autocast():
        out = stem(images)
    assert layouts == [True] and images.is_contiguous()   # the caller's tensor is left as it was
    stem(images)
    assert layouts == [True, False], "fp32 keeps the contiguous layout (and an fp32 run its bits)"
    stem.channels_last_under_cpu_autocast = False
    with BF16_CPU.autocast():
        plain = stem(images)
    assert layouts == [True, False, False]
    assert torch.allclose(out.float(), plain.float(), atol=0.05), "the same convolutions, in another layout"


class _PlainEngine:
    """What micro_step needs of a DeepSpeed engine, in plain torch (AdamW, clipping, LR schedule), so the
    loss-curve test runs vlp's own step function without a process group."""

    def __init__(self, model, cfg: PretrainConfig):
        from pipeline.optim import lr_lambda, param_groups

        self.module = model
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                           eps=1e-6)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.clip = cfg.grad_clip

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


COLOURS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float32)


def _learnable_batch(g: torch.Generator, b: int = 32) -> Batch:
    """A square of one of 6 colours in one of 4 quadrants on noise; the caption names both (ids 10+colour,
    20+quadrant) in a random order, so every objective has something to learn."""
    colour, quadrant = torch.randint(6, (b,), generator=g), torch.randint(4, (b,), generator=g)
    size = CFG.image_size
    images = 0.3 * torch.randn(b, 3, size, size, generator=g)
    half = size // 2
    for i in range(b):
        y, x = (quadrant[i] // 2) * half, (quadrant[i] % 2) * half
        images[i, :, y + 4:y + half - 4, x + 4:x + half - 4] += (COLOURS[colour[i]] * 2 - 1)[:, None, None]
    ids = torch.full((b, CFG.max_text_len), SPECIAL.pad)
    mask = torch.zeros_like(ids)
    swap = torch.rand(b, generator=g) < 0.5
    for i in range(b):
        words = [10 + int(colour[i]), 20 + int(quadrant[i])]
        words = words[::-1] if swap[i] else words
        seq = [SPECIAL.cls, 30, *words, 31, SPECIAL.sep]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return Batch(images, ids, mask)


def _trajectory(precision: Precision, seed: int, steps: int = 60) -> dict[str, list[float]]:
    """{objective: its losses} over `steps` steps of vlp's micro_step on the tiny model: every objective
    on even steps, ITC + BoW on odd ones (fusion_every 2), a text queue, seeded init and data."""
    cfg = PretrainConfig(model="tiny", steps=steps, warmup_steps=5, lr=3e-3, micro_batch=32, num_workers=1,
                         itm_easy_negatives=0.5, text_queue=64)
    torch.manual_seed(seed)
    engine = _PlainEngine(MultiwayTransformer(CFG), cfg)
    data, objectives = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    queue = TextQueue(cfg.text_queue)
    losses = {}
    for step in range(1, steps + 1):
        weights = WEIGHTS if step % 2 == 0 else UNIMODAL
        out = micro_step(engine, _learnable_batch(data), SPECIAL, weights, objectives, cfg, queue, precision)
        assert torch.isfinite(out["loss"])
        for name in weights:
            losses.setdefault(name, []).append(float(out[name].detach()))
    return losses


def _smoothed(losses: list[float], window: int = 6) -> torch.Tensor:
    """Means of `window` consecutive losses, windows half overlapping."""
    t = torch.tensor(losses)
    return torch.stack([t[i:i + window].mean() for i in range(0, len(t) - window + 1, window // 2)])


def test_bf16_loss_curves_agree_with_fp32_within_the_gap_between_two_fp32_seeds():
    """Per objective, the mean distance between bf16's and fp32's smoothed loss curves (same seed) is
    below the distance between fp32's curves for two seeds: precision moves the curve less than a
    different initialisation and data order do."""
    torch.set_num_threads(2)
    fp32, bf16, other_seed = _trajectory(FP32_CPU, 0), _trajectory(BF16_CPU, 0), _trajectory(FP32_CPU, 1)
    assert bf16 != fp32, "bf16 did run (autocast on)"
    for name in WEIGHTS:
        a, b, c = _smoothed(fp32[name]), _smoothed(bf16[name]), _smoothed(other_seed[name])
        if name in ("mlm", "lm", "bow"):   # in 60 steps ITC and ITM leave their prior in some seeds only
            assert b[-1] < 0.7 * b[0] and a[-1] < 0.7 * a[0], (name, "learns", a.tolist(), b.tolist())
        precision_gap, seed_gap = (b - a).abs().mean().item(), (c - a).abs().mean().item()
        assert precision_gap < seed_gap, (name, precision_gap, seed_gap, a.tolist(), b.tolist(), c.tolist())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_rank(_: int, port: int, old_way: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from pipeline.deepspeed_setup import build_comm_op, import_deepspeed
    from stages.pretrain.train.loop import make_engine

    deepspeed = import_deepspeed()
    build_comm_op()   # as train_loop does: DeepSpeed's CPU backend builds an op at its first init
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    cfg = PretrainConfig(model="tiny", micro_batch=8, num_workers=1, steps=10, warmup_steps=1, precision="bf16")
    # the old way: DeepSpeed's bf16 mode (bf16 weights) and bf16 images, as on a GPU
    precision = Precision("bf16", "cuda", "before #30") if old_way else resolve(cfg.precision, cuda=False)
    model = MultiwayTransformer(CFG)
    engine = make_engine(model, cfg, 1, precision)
    g = torch.Generator().manual_seed(0)
    try:
        losses = []
        for i in range(3):
            b = _batch(i)
            b = Batch(b.images.to(precision.input_dtype), b.ids, b.mask)
            losses.append(float(micro_step(engine, b, SPECIAL, WEIGHTS, g, cfg, None, precision)["loss"].detach()))
        bn = model.patch_embed.convs[1]
        results["out"] = (losses, bn.running_mean.dtype, model.blocks[0].attn.qkv.weight.dtype)
    except RuntimeError as err:
        results["out"] = str(err)


@pytest.mark.parametrize("old_way", [False, True])
def test_bf16_trains_through_deepspeed_on_a_cpu(old_way):
    """`pretrain.precision: bf16` on a CPU: DeepSpeed's bf16 mode stays off (it cast the weights but not
    BatchNorm's running statistics: "expected scalar type BFloat16 but found Float"); autocast runs the
    forward in bf16 over fp32 weights. The True case is the old way, kept to show why."""
    results = mp.get_context("spawn").Manager().dict()   # never fork this process: it may be a Ray driver
    mp.spawn(_deepspeed_rank, args=(_free_port(), old_way, results), nprocs=1, join=True)
    out = results["out"]
    if old_way:
        assert isinstance(out, str) and "BFloat16" in out and "Float" in out, out
        return
    losses, bn_dtype, weight_dtype = out
    assert all(torch.isfinite(torch.tensor(losses))) and (bn_dtype, weight_dtype) == (torch.float32, torch.float32)
