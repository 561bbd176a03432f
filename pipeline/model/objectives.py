"""Pretraining objectives: ITC over the global batch, ITM with hard negatives, MLM, LM.

Distributed ITC: every rank gathers all ranks' features and computes the loss of the *whole* global
batch, so each rank's loss equals the single-process loss on the concatenated batch. Only the local
slice of the gathered features carries gradient, and that gradient is multiplied by the world size W:
data-parallel training averages gradients over W ranks, and each rank holds only 1/W of the paths
from the loss to the encoder, so after averaging the encoder's gradient equals the single-process one.
(Replicated parameters used on the gathered features, such as the temperature, already get the full
gradient on every rank and are not scaled.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.model.multiway import MultiwayTransformer


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor          # [B, 3, H, W], normalised
    ids: torch.Tensor             # [B, T] token ids, [CLS] first
    mask: torch.Tensor            # [B, T] 1 = token, 0 = padding


@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    cls: int
    sep: int
    mask: int


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor, with_grad_local: bool = True) -> torch.Tensor:
    """Concatenate `x` from all ranks (rank order). The local slice keeps its gradient."""
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    if with_grad_local:
        parts[rank] = _ScaleGrad.apply(x, float(size))
    return torch.cat(parts)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, scale: torch.Tensor):
    """Symmetric InfoNCE over the global batch, `scale` = 1 / temperature. Returns (loss, global i2t
    logits, offset of the local rows in the global batch)."""
    rank, _ = world()
    all_img, all_txt = gather(image_feat), gather(text_feat)
    logits = scale * all_img @ all_txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return loss, logits.detach(), rank * image_feat.shape[0]


def hard_negatives(sim_i2t: torch.Tensor, all_ids: torch.Tensor, offset: int, local: int,
                   generator: torch.Generator | None = None, easy: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local pair, one negative text index and one negative image index into the global batch,
    sampled with probability softmax(similarity) — never the positive, nor a pair whose text is
    identical to the positive's (a false negative). `easy` mixes in that share of uniform probability:
    a small model trained from scratch sees ITM stay at its prior on hard negatives alone."""
    same_text = (all_ids[:, None, :] == all_ids[None, :, :]).all(-1)  # [global, global], diagonal included
    rows = slice(offset, offset + local)

    def weights(sim: torch.Tensor) -> torch.Tensor:
        p = F.softmax(sim.float(), dim=1)
        return ((1 - easy) * p + easy / p.shape[1]).masked_fill(same_text[rows], 0)

    w_i2t, w_t2i = weights(sim_i2t[rows]), weights(sim_i2t.t()[rows])
    neg_text = _sample(w_i2t, generator)
    neg_image = _sample(w_t2i, generator)
    return neg_text, neg_image


def _sample(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # a row whose every candidate was masked (a batch of one caption) falls back to uniform over others
    empty = weights.sum(1) <= 0
    if empty.any():
        weights = weights.clone()
        weights[empty] = 1.0
    return torch.multinomial(weights + 1e-12 * (weights > 0), 1, generator=generator).squeeze(1)


def mask_tokens(ids: torch.Tensor, attention_mask: torch.Tensor, special: SpecialTokens, vocab: int,
                prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `prob` of the real tokens; 80% -> [MASK], 10% -> random, 10% kept.
    Returns (input ids, labels with -100 where no prediction is asked)."""
    real = attention_mask.bool() & (ids != special.cls) & (ids != special.sep) & (ids != special.pad)
    u = torch.rand(ids.shape, generator=generator, device=ids.device)
    chosen = real & (u < prob)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    v = torch.rand(ids.shape, generator=generator, device=ids.device)
    inputs = ids.clone()
    inputs[chosen & (v < 0.8)] = special.mask
    random_ids = torch.randint(vocab, ids.shape, generator=generator, device=ids.device)
    swap = chosen & (v >= 0.8) & (v < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, labels


def pretrain_losses(model: MultiwayTransformer | torch.nn.Module, batch: Batch, special: SpecialTokens, weights: dict[str, float],
                    generator: torch.Generator | None = None, itm_easy: float = 0.0) -> dict[str, torch.Tensor]:
    """All weighted objectives for one batch; "loss" is what to call backward on. `itm_easy`: share of
    uniform (easy) ITM negatives, see hard_negatives."""
    out: dict[str, torch.Tensor] = {}
    total = batch.images.new_zeros(())
    if weights.get("itc", 0) or weights.get("itm", 0):
        _, img_feat = model("encode_image", batch.images)
        _, txt_feat = model("encode_text", batch.ids, batch.mask)
        itc, sim, offset = itc_loss(img_feat, txt_feat, model("itc_scale"))
        out["itc"] = itc
        total = total + weights.get("itc", 0) * itc
    if weights.get("itm", 0):
        b = batch.images.shape[0]
        all_images, all_ids, all_mask = (gather(t, with_grad_local=False) for t in (batch.images, batch.ids, batch.mask))
        neg_text, neg_image = hard_negatives(sim, all_ids, offset, b, generator, itm_easy)
        images = torch.cat([batch.images, batch.images, all_images[neg_image]])
        ids = torch.cat([batch.ids, all_ids[neg_text], batch.ids])
        mask = torch.cat([batch.mask, all_mask[neg_text], batch.mask])
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
        logits = model("itm_logits", model("fuse", images, ids, mask))
        out["itm"] = F.cross_entropy(logits, labels)
        out["itm_acc"] = (logits.argmax(1) == labels).float().mean().detach()
        total = total + weights["itm"] * out["itm"]
    if weights.get("mlm", 0):
        inputs, labels = mask_tokens(batch.ids, batch.mask, special, vocab_size(model), generator=generator)
        logits = model("lm_logits", model("fuse", batch.images, inputs, batch.mask))
        out["mlm"] = _ce_or_zero(logits, labels)
        total = total + weights["mlm"] * out["mlm"]
    if weights.get("lm", 0):
        hidden = model("fuse", batch.images, batch.ids, batch.mask, causal=True)
        labels = batch.ids[:, 1:].masked_fill(batch.mask[:, 1:] == 0, -100)
        out["lm"] = _ce_or_zero(model("lm_logits", hidden[:, :-1]), labels)
        total = total + weights["lm"] * out["lm"]
    out["loss"] = total
    return out


def _ce_or_zero(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if (labels != -100).any():
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return logits.sum() * 0.0  # keeps the graph (every rank must reach backward with the same graph)


def vocab_size(model: torch.nn.Module) -> int:
    inner = getattr(model, "module", model)  # a DeepSpeed engine or DDP wraps the model
    return inner.cfg.vocab_size
