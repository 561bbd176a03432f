"""Pretraining objectives: ITC over the global batch, ITM with hard negatives, MLM, LM, and a
bag-of-words prediction from the image (BoW).

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
from typing import Callable

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


def gather(x: torch.Tensor, with_grad_local: bool = True, scale_local: bool = True) -> torch.Tensor:
    """Concatenate `x` from all ranks (rank order). The local slice keeps its gradient, multiplied by the
    world size when `scale_local` (for losses every rank computes over the whole global batch: ITC)."""
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.detach().contiguous())
    if with_grad_local:
        parts[rank] = _ScaleGrad.apply(x, float(size)) if scale_local else x
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


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, scale: torch.Tensor,
             queued_text: torch.Tensor | None = None):
    """Symmetric InfoNCE over the global batch, `scale` = 1 / temperature; `queued_text` (features of
    earlier batches' texts, no gradient) are extra negatives for the image-to-text direction. Returns
    (loss, global i2t logits over the batch's texts, offset of the local rows, the gathered text features)."""
    rank, _ = world()
    all_img, all_txt = gather(image_feat), gather(text_feat)
    # in fp32 under bf16 autocast too: with 1 / temperature up to 100, bf16 logits are 0.25 apart near 50,
    # a coarse grid for a softmax over the batch; the matmul is B x B x embed_dim, nothing to save
    with torch.autocast(image_feat.device.type, enabled=False):
        all_img, all_txt, scale = all_img.float(), all_txt.float(), scale.float()
        logits = scale * all_img @ all_txt.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        i2t = logits if queued_text is None else torch.cat([logits, scale * all_img @ queued_text.float().t()], dim=1)
        loss = (F.cross_entropy(i2t, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return loss, logits.detach(), rank * image_feat.shape[0], all_txt.detach()


class TextQueue:
    """The texts of the last global batches (token ids, mask, and their ITC features when they were
    encoded), a pool of negatives far larger than one batch (BLIP and ALBEF keep such a queue).

    Why: the most useful negative for an image is a caption that differs from its own in one detail,
    and a batch of 64 rarely holds one; a pool of ~1,000 recent captions usually does. Hard ITM
    negatives are sampled from it (the fusion encoder recomputes them, so stale features only steer the
    sampling); optionally the queued features are ITC negatives too. Every rank pushes the same gathered
    batch, so the queue is identical on all ranks; it is part of a checkpoint's rank state."""

    def __init__(self, size: int):
        self.size = size
        self.feats = self.ids = self.mask = None

    def __len__(self) -> int:
        return 0 if self.ids is None else self.ids.shape[0]

    def push(self, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        new = (feats.detach().float(), ids, mask)
        if self.ids is None:
            self.feats, self.ids, self.mask = (t[:self.size] for t in new)
        else:
            self.feats, self.ids, self.mask = (torch.cat([t, old])[:self.size]
                                               for t, old in zip(new, (self.feats, self.ids, self.mask)))

    def state_dict(self) -> dict:
        return {"size": self.size, "feats": self.feats, "ids": self.ids, "mask": self.mask}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.feats, self.ids, self.mask = state["size"], state["feats"], state["ids"], state["mask"]


def hard_negatives(sim_i2t: torch.Tensor, all_ids: torch.Tensor, offset: int, local: int,
                   generator: torch.Generator | None = None, easy: float = 0.0,
                   queued_sim: torch.Tensor | None = None, queued_ids: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local pair, one negative text index and one negative image index into the global batch,
    sampled with probability softmax(similarity) — never the positive, nor a pair whose text is
    identical to the positive's (a false negative). `easy` mixes in that share of uniform probability:
    a small model trained from scratch sees ITM stay at its prior on hard negatives alone. With a queue
    (`queued_sim`: local images x queued texts), text indices past the global batch point into it."""
    rows = slice(offset, offset + local)
    texts, sim_texts = all_ids, sim_i2t[rows]
    if queued_ids is not None:
        texts, sim_texts = torch.cat([all_ids, queued_ids]), torch.cat([sim_texts, queued_sim], dim=1)
    same_text = identical(all_ids[rows], texts)  # [local, candidates]
    same_image_text = identical(all_ids[rows], all_ids)

    def weights(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        p = F.softmax(sim.float(), dim=1)
        return ((1 - easy) * p + easy / p.shape[1]).masked_fill(same, 0)

    neg_text = _sample(weights(sim_texts, same_text), generator)
    neg_image = _sample(weights(sim_i2t.t()[rows], same_image_text), generator)
    return neg_text, neg_image


def identical(ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[len(ids), len(candidates)]: whether candidate text j has exactly the token ids of text i. Such a
    caption is the pair's own, never a negative."""
    return (ids[:, None, :] == candidates[None, :, :]).all(-1)


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


class _Shared:
    """What one batch's objectives share, each piece computed once, when the first objective asks for it:
    the image tokens (a conv stem is not free), the unimodal image encoding, the contrastive step."""

    def __init__(self, model, batch: Batch, special: SpecialTokens, generator: torch.Generator | None,
                 itm_easy: float, queue: TextQueue | None, queue_in_itc: bool, itc_hard: int = 0):
        self.model, self.batch, self.special, self.generator = model, batch, special, generator
        self.itm_easy, self.queue, self.queue_in_itc, self.itc_hard = itm_easy, queue, queue_in_itc, itc_hard
        self.image_tokens = model("embed_image", batch.images)
        self._image: tuple[torch.Tensor, torch.Tensor] | None = None
        self._contrast: dict | None = None
        self._texts: tuple[torch.Tensor, torch.Tensor] | None = None

    def texts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's token ids and mask (gathered from every rank once: ITM's negatives and the
        queue both read them)."""
        if self._texts is None:
            self._texts = tuple(gather(t, with_grad_local=False) for t in (self.batch.ids, self.batch.mask))
        return self._texts

    def image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image hidden states, image ITC feature) from the image encoder alone."""
        if self._image is None:
            self._image = self.model("encode_image", self.image_tokens, embedded=True)
        return self._image

    def contrast(self) -> dict:
        """The ITC step: its loss, the global i2t similarities and this rank's offset in them, the gathered
        text features (for the queue), the scale, and the queued features it used."""
        if self._contrast is None:
            _, img_feat = self.image()
            _, txt_feat = self.model("encode_text", self.batch.ids, self.batch.mask)
            q = self.queue
            queued = q.feats if q is not None and self.queue_in_itc and len(q) else None
            if q is not None and self.itc_hard and len(q):
                queued = self.hard_texts(img_feat, txt_feat)
            scale = self.model("itc_scale")
            loss, sim, offset, all_txt = itc_loss(img_feat, txt_feat, scale, queued)
            self._contrast = {"loss": loss, "sim": sim, "offset": offset, "all_txt": all_txt, "scale": scale,
                              "img_feat": img_feat}
        return self._contrast

    def hard_texts(self, img_feat: torch.Tensor, txt_feat: torch.Tensor) -> torch.Tensor:
        """Fresh ITC features of the queued captions most like this rank's images, from all ranks
        ([W x local x itc_hard, D], no gradient): per image the `itc_hard` queued captions its feature is
        closest to by the queue's stored (stale) features, encoded again by the current text encoder. They
        join every image's text softmax as negatives (itc_loss's `queued_text`). Why: ITC's negatives are
        the batch's captions, and 64 of them rarely hold one that differs from a pair's own in a single
        detail, so ITC never has to tell such captions apart (the demo's round 0 ranked 93 of its 123
        wrong first captions wrong by the shape alone); the queue holds such captions, but its stale
        features as negatives made ITC diverge (queue_in_itc). Costs one text forward pass per negative.

        Never a caption identical to the image's own, nor one the image already rates at least as high as
        its own caption (`txt_feat`, positive-aware mining as in NV-Retriever): that is a paraphrase, or
        the true description of an image whose web caption is noise, and a negative of either pushes the
        image away from what describes it. (The garbage captions a filter fine-tuned from such a model
        kept were the tokenizer's one-caption tokens, not the mining: BENCHMARKS.md, "Demo model
        quality" (e).) An image with no such caption left gets a zero feature: a neutral negative, so
        every rank sends the same count."""
        q, ids, k = self.queue, self.batch.ids, min(self.itc_hard, len(self.queue))
        with torch.no_grad():
            img = img_feat.detach().float()
            sim = img @ q.feats.t()                                              # [local, queue]
            own = (img * txt_feat.detach().float()).sum(-1, keepdim=True)
            excluded = identical(ids, q.ids) | (sim >= own)
            top = sim.masked_fill(excluded, float("-inf")).topk(k, dim=1)
            picked, usable = top.indices.reshape(-1), torch.isfinite(top.values).reshape(-1, 1)
            _, feats = self.model("encode_text", q.ids[picked], q.mask[picked])
        return gather(feats.float() * usable, with_grad_local=False)


def _bow(s: _Shared) -> dict[str, torch.Tensor]:
    return {"bow": bag_of_words_loss(s.model, s.image()[0][:, 0], s.batch, s.special)}


def _itc(s: _Shared) -> dict[str, torch.Tensor]:
    return {"itc": s.contrast()["loss"]}


def _itm(s: _Shared) -> dict[str, torch.Tensor]:
    """Each pair against one hard negative text and one hard negative image (hard_negatives)."""
    c, batch, b = s.contrast(), s.batch, s.batch.images.shape[0]
    all_ids, all_mask = s.texts()
    # negative images may live on another rank: their tokens travel, with gradient for the local ones
    all_tokens = gather(s.image_tokens, scale_local=False)
    text_ids, text_mask, queued_sim, queued_ids = all_ids, all_mask, None, None
    if s.queue is not None and len(s.queue):
        queued_sim = (c["scale"].float() * c["img_feat"].float() @ s.queue.feats.t()).detach()   # the queue keeps fp32
        queued_ids = s.queue.ids
        text_ids, text_mask = torch.cat([all_ids, s.queue.ids]), torch.cat([all_mask, s.queue.mask])
    neg_text, neg_image = hard_negatives(c["sim"], all_ids, c["offset"], b, s.generator, s.itm_easy, queued_sim,
                                         queued_ids)
    tokens = torch.cat([s.image_tokens, s.image_tokens, all_tokens[neg_image]])
    ids = torch.cat([batch.ids, text_ids[neg_text], batch.ids])
    mask = torch.cat([batch.mask, text_mask[neg_text], batch.mask])
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
    logits = s.model("itm_logits", s.model("fuse", tokens, ids, mask, embedded=True))
    return {"itm": F.cross_entropy(logits, labels), "itm_acc": (logits.argmax(1) == labels).float().mean().detach()}


def _mlm(s: _Shared) -> dict[str, torch.Tensor]:
    inputs, labels = mask_tokens(s.batch.ids, s.batch.mask, s.special, vocab_size(s.model), generator=s.generator)
    logits = s.model("lm_logits", s.model("fuse", s.image_tokens, inputs, s.batch.mask, embedded=True))
    return {"mlm": _ce_or_zero(logits, labels)}


def _lm(s: _Shared) -> dict[str, torch.Tensor]:
    hidden = s.model("fuse", s.image_tokens, s.batch.ids, s.batch.mask, causal=True, embedded=True)
    labels = s.batch.ids[:, 1:].masked_fill(s.batch.mask[:, 1:] == 0, -100)
    return {"lm": _ce_or_zero(s.model("lm_logits", hidden[:, :-1]), labels)}


@dataclass(frozen=True)
class Objective:
    loss: Callable[[_Shared], dict[str, torch.Tensor]]
    """The objective's loss under its name (and any metric beside it, e.g. itm_acc)."""
    needs: tuple[str, ...] = ()
    """Objectives computed with it even at weight 0 (ITM samples its negatives from ITC's similarities)."""


# The objectives by name, in the order a step computes them (that order fixes the random draws: ITM's
# negatives before MLM's masks). stages/pretrain/config.py's OBJECTIVES names the same ones, in this order, and
# says which need the fusion encoder; tests/test_recipe.py holds the two together.
LOSSES: dict[str, Objective] = {"bow": Objective(_bow), "itc": Objective(_itc), "itm": Objective(_itm, ("itc",)),
                                "mlm": Objective(_mlm), "lm": Objective(_lm)}


def pretrain_losses(model: MultiwayTransformer | torch.nn.Module, batch: Batch, special: SpecialTokens, weights: dict[str, float],
                    generator: torch.Generator | None = None, itm_easy: float = 0.0, queue: TextQueue | None = None,
                    queue_in_itc: bool = False, itc_hard: int = 0) -> dict[str, torch.Tensor]:
    """All weighted objectives for one batch (LOSSES); "loss" is what to call backward on. `itm_easy`:
    share of uniform (easy) ITM negatives, see hard_negatives. `queue`: earlier texts as extra ITM
    negatives (and ITC negatives with `queue_in_itc`, or its `itc_hard` hardest captions per image, freshly
    encoded: _Shared.hard_texts); this batch's texts are pushed to it at the end."""
    unknown = set(weights) - set(LOSSES)
    if unknown:
        raise ValueError(f"unknown objective(s) {sorted(unknown)}; known: {', '.join(LOSSES)}")
    active = {name for name, w in weights.items() if w}
    active |= {need for name in active for need in LOSSES[name].needs}
    shared = _Shared(model, batch, special, generator, itm_easy, queue, queue_in_itc, itc_hard)
    out: dict[str, torch.Tensor] = {}
    total = batch.images.new_zeros(())
    for name, objective in LOSSES.items():
        if name in active:
            out.update(objective.loss(shared))
            total = total + weights.get(name, 0) * out[name]
    if queue is not None and "itc" in out:
        queue.push(shared.contrast()["all_txt"], *shared.texts())
    out["loss"] = total
    return out


def bag_of_words_loss(model, image_cls: torch.Tensor, batch: Batch, special: SpecialTokens) -> torch.Tensor:
    """Which words does the caption contain? Multi-label logistic loss of the image [CLS] against the
    caption's bag of tokens, through the tied vocabulary decoder (summed over the vocabulary, averaged
    over the batch). Each word the caption names is a direct target for the image encoder, read from the
    very feature ITC uses: learned far faster per step than through a caption decoder (CLIP, Fig. 2, found
    bag-of-words prediction 3x more efficient than captioning), and ~free (one linear layer)."""
    logits = model("lm_logits", image_cls[:, None])[:, 0].float()  # [B, vocab]
    real = batch.mask.bool() & (batch.ids != special.cls) & (batch.ids != special.sep) & (batch.ids != special.pad)
    targets = torch.zeros_like(logits)
    targets.scatter_(1, batch.ids.masked_fill(~real, special.pad), 1.0)
    targets[:, special.pad] = 0.0
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


def _ce_or_zero(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if (labels != -100).any():
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return logits.sum() * 0.0  # keeps the graph (every rank must reach backward with the same graph)


def vocab_size(model: torch.nn.Module) -> int:
    inner = getattr(model, "module", model)  # a DeepSpeed engine or DDP wraps the model
    return inner.cfg.vocab_size
