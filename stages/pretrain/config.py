"""pretrain's settings: the model, its objectives and the training recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pipeline.configbase import Section, keeps_output, rate, require


# The pretraining objectives by name -> whether they run the fusion encoder (fusion steps only, see
# fusion_every), in the order a step computes them. The losses are pipeline/model/objectives.py's LOSSES
# (the model package imports only torch, so it cannot read this table; tests/test_recipe.py holds the two
# together). Loss weights, the training log, its plots and the model card read the names from here.
OBJECTIVES: dict[str, bool] = {"bow": False, "itc": False, "itm": True, "mlm": True, "lm": True}
UNIMODAL_OBJECTIVES = tuple(name for name, fused in OBJECTIVES.items() if not fused)


@dataclass(frozen=True, kw_only=True)
class InitFrom:
    """Hugging Face checkpoints (local transformers folders) a fresh model starts from, as VLMo does:
    attention and every FFN expert from `vision` (ViT, DeiT, or BEiT with absolute positions), word
    embeddings and tokenizer from `text` (a BERT-family model). Sizes must match the chosen model."""
    vision: str | None = None
    text: str | None = None


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Pretraining on Ray Train + DeepSpeed. Batch sizes are per rank; the global batch is
    micro_batch x grad_accum x num_workers."""
    model: Literal["tiny", "demo", "base", "large"] = "demo"
    tokenizer: str | None = None
    """A local tokenizer folder (transformers format); None trains a WordPiece on the run's captions."""
    vocab_size: int = 1000
    """Target size of a trained tokenizer (the model takes the tokenizer's real size)."""
    tokenizer_min_count: int = 2
    """A trained tokenizer keeps a word whole only if it occurs this often in the sampled captions; rarer
    words are spelled in pieces (pipeline/data/tokenizer.py: a one-caption word's own row only memorises
    its pair)."""
    tokenizer_captions: int = 1_000_000
    """Captions a trained tokenizer is built from, read from the shards in a seeded order until there are
    this many (a vocabulary of word counts needs a sample, not 400M captions read in the driver). The
    vocabulary does not depend on the order, so a run with fewer captions uses them all, as before."""
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = keeps_output(1.0)
    loader_workers: int = 0
    """DataLoader processes per rank (0: load in the training process)."""
    loader_prefetch: int = keeps_output(2)
    """With loader_workers 0: batches a thread of the training process prepares ahead, while the model
    trains on the current one (0: load in series with training). Changes no batch and no result."""
    zero_stage: int = 2
    micro_batch: int = 32
    grad_accum: int = 1
    steps: int = 300
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on a GPU; on a CPU bf16 autocast where it has bf16 instructions (AMX-BF16, AVX512-BF16),
    else fp32 (pipeline/precision.py). bf16 on a CPU without them works, slower than fp32."""
    peak_tflops: float | None = keeps_output(None)
    """One device's peak TFLOP/s for the MFU in the training metrics; None: known GPUs' bf16 peak (H100,
    H200, A100, ...), else no MFU (TFLOP/s achieved is logged either way)."""
    activation_checkpointing: bool = keeps_output(False)
    """Recompute each block in backward (fairscale's checkpoint_wrapper): less memory, more time."""
    augment: bool = True
    loss_weights: dict[str, float] = field(default_factory=lambda: {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "lm": 1.0})
    """Objectives and their weights: itc, itm, mlm, lm (VLMo/BLIP), and bow (the words of the caption
    predicted from the image [CLS]; cheap, and it teaches the image encoder what captions name fastest)."""
    fusion_every: int = 1
    """Run the objectives that need the fusion encoder (itm, mlm, lm: ~3/4 of a full step's compute) on
    every n-th step only; itc and bow run on every step. The encoders then get several times more steps
    per second, and the fusion heads still learn all along (a late start left ITM at its prior)."""
    itm_easy_negatives: float = 0.0
    """Share of ITM negatives drawn uniformly from the batch instead of by ITC similarity (hard). BLIP
    uses hard ones only; a small model trained from scratch needs some easy ones to learn ITM at all."""
    text_queue: int = 0
    """Texts of earlier global batches kept as a pool of ITM hard negatives (0: the batch only). A batch
    rarely holds a caption that differs from a pair's own in one detail; a pool of ~1,000 usually does."""
    queue_in_itc: bool = False
    """Also use the queued texts' (stale) features as ITC negatives."""
    itc_hard_negatives: int = 0
    """Per image, this many queued captions closest to it encoded afresh, without gradient, and added to
    the ITC softmax as negatives: ITC then has to tell apart captions that differ in one detail, which a
    batch rarely holds. Never its own caption nor one it rates at least as high (a paraphrase, or the
    truth behind a noisy pair). 0: off; needs text_queue; one text forward pass each."""
    with_seed: bool = True
    """Also train on the clean seed set (data.seed_shards), in every round, as BLIP adds COCO."""
    init: Literal["fresh", "previous"] = "fresh"
    """Rounds after 0: train a new model (BLIP) or continue from the model that cleaned the round's data."""
    init_from: InitFrom = field(default_factory=InitFrom)
    """Where a fresh model's weights start (round 0, and later rounds with init: fresh); unset: random."""
    checkpoint_every: int = keeps_output(100)
    keep_checkpoints: int = keeps_output(2)
    log_every: int = keeps_output(10)
    max_failures: int = keeps_output(2)
    """Times Ray Train restarts the workers (from the last complete checkpoint) before giving up."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers: must be >= 1")
        require(self.zero_stage in (0, 1, 2, 3), f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("micro_batch", "grad_accum", "steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            require(getattr(self, name) >= 1, f"{name}: must be >= 1")
        require(math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr_ratio <= 1,
                 "lr: must be finite and > 0 (min_lr_ratio in 0..1)")
        require(0 <= self.warmup_steps < self.steps, "warmup_steps: must be in 0..steps-1")
        require(self.vocab_size >= 64, "vocab_size: must be >= 64")
        require(self.tokenizer_min_count >= 1, "tokenizer_min_count: must be >= 1")
        require(self.tokenizer_captions >= 1, "tokenizer_captions: must be >= 1")
        require(self.loader_prefetch >= 0, f"loader_prefetch: must be >= 0, got {self.loader_prefetch}")
        require(self.cpus_per_worker > 0, f"cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops: must be > 0 (or unset)")
        require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip: must be >= 0 (0: no clipping)")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay: must be >= 0")
        require(self.text_queue >= 0, "text_queue: must be >= 0")
        require(self.itc_hard_negatives >= 0, "itc_hard_negatives: must be >= 0")
        require(not self.itc_hard_negatives or (self.text_queue and not self.queue_in_itc),
                "itc_hard_negatives: needs text_queue > 0, and replaces queue_in_itc (set one of them)")
        rate("itm_easy_negatives", self.itm_easy_negatives)
        unknown = set(self.loss_weights) - set(OBJECTIVES)
        require(not unknown, f"loss_weights: unknown objective(s) {sorted(unknown)}; use {', '.join(OBJECTIVES)}")
        require(all(w >= 0 for w in self.loss_weights.values()) and any(self.loss_weights.values()),
                 "loss_weights: must be >= 0 and not all 0")
        require(self.fusion_every >= 1, "fusion_every: must be >= 1")
        require(not (self.tokenizer and self.init_from.text),
                 "tokenizer: init_from.text brings its own tokenizer; give one of tokenizer, init_from.text")
        require(self.fusion_every == 1 or any(self.loss_weights.get(k) for k in UNIMODAL_OBJECTIVES),
                 "fusion_every: steps between fusion steps need itc or bow in loss_weights")


SECTION = Section(PretrainConfig, rounds="every")   # the run config's `pretrain:` section
