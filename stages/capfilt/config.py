"""capfilt's settings: the captioner's and the filter's fine-tunes, the rule and its threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pipeline.configbase import Section, drop_shares, keeps_output, rate, require


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Fine-tuning one copy of a pretrained model on the seed set (one process, plain AdamW)."""
    steps: int = 200
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    itm_easy_negatives: float = 0.5
    """The filter's share of uniformly drawn ITM negatives (see PretrainConfig)."""
    text_queue: int = 0
    """The filter's pool of earlier texts for hard ITM negatives (see PretrainConfig)."""
    queue_in_itc: bool = False

    def __post_init__(self) -> None:
        rate("itm_easy_negatives", self.itm_easy_negatives)
        require(self.text_queue >= 0, "text_queue: must be >= 0")
        require(self.steps >= 1 and self.batch_size >= 1, "steps, batch_size: must be >= 1")
        require(math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr_ratio <= 1,
                 "lr: must be finite and > 0 (min_lr_ratio in 0..1)")
        require(0 <= self.warmup_steps < self.steps, "warmup_steps: must be in 0..steps-1")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class CapfiltConfig:
    """BLIP's CapFilt: a captioner writes a synthetic caption per image, a filter keeps the texts
    (web and synthetic) that match the image well enough (`rule`)."""
    model: str | None = None
    """An exported model folder (model.safetensors + config.yaml + tokenizer/) for round 1's CapFilt,
    e.g. for a curation job. None: the model pretrained in the previous round of this run."""
    captioner: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(steps=200))
    """Fine-tuned with the LM loss."""
    filter: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(steps=200))
    """Fine-tuned with ITC + ITM (hard negatives)."""
    rule: Literal["calibrated", "itm"] = "calibrated"
    """How the filter decides. "itm" (BLIP): keep a text whose ITM match probability reaches `threshold`.
    "calibrated": add the ITM log-odds and the ITC similarity, each standardised on clean seed pairs held
    out of the filter's fine-tuning, and keep a text scoring above the lowest `clean_reject_rate` of those
    clean pairs (pipeline/model/scoring.py). ITM alone misses text that is not a caption at all and
    attributes its hard negatives rarely showed; ITC catches those; and the threshold is set by the
    loss of clean pairs one accepts, not guessed."""
    threshold: float = 0.5
    """rule "itm": the ITM match probability a text needs to be kept."""
    clean_reject_rate: float = 0.03
    """rule "calibrated": the share of clean held-out pairs the rule may reject."""
    calibration_share: float = 0.2
    """rule "calibrated": the share of seed pairs (chosen by key) held out of the filter's fine-tuning."""
    prompt: str = "a picture of "
    """Text the captioner starts from (trained on `prompt + caption`); removed from the synthetic caption."""
    top_p: float = 0.9
    min_len: int = 5
    """Fewest generated tokens before [SEP] is allowed."""
    max_len: int = 30
    """Most text tokens in all ([CLS] and prompt included; capped by the model's max_text_len)."""
    repetition_penalty: float = 1.0
    batch_size: int = 64
    actors: int = keeps_output(2)
    """Ray actors, each holding the captioner and the filter, that process shards in parallel."""
    cpus_per_actor: float = keeps_output(1.0)
    gpus_per_actor: float | None = None
    """None: one GPU per actor where the cluster has GPUs, none otherwise. Fractions share a GPU."""
    shard_retries: int = keeps_output(2)
    """Times a shard is redone after its actor died before the stage fails."""
    prefetch_batches: int = keeps_output(2)
    """Batches an actor's reader thread reads and decodes ahead of inference (the models wait for no
    decode); 0: decode the whole shard first, then infer (the way before streaming)."""
    shards_per_actor: int = keeps_output(2)
    """Shards an actor holds at once: the next one is read and decoded while the current one infers and
    commits (inference itself runs one shard at a time)."""
    max_drop_share: float = keeps_output(0.5)
    """The breaker: when the filter rejects every text of more than this share of the input images
    (`filter_rejected`), the stage stops before committing its manifest (committed shards are kept: raise
    it and `vlp resume` to accept the drops). 1.0 turns the breaker off."""
    drop_share_limits: dict[str, float] = keeps_output(default_factory=dict)
    """Per drop reason, a share that replaces `max_drop_share` for that reason, e.g. {filter_rejected: 0.8}."""

    def __post_init__(self) -> None:
        rate("threshold", self.threshold)
        require(0 < self.clean_reject_rate < 0.5, "clean_reject_rate: must be in (0, 0.5)")
        require(0 < self.calibration_share < 1, "calibration_share: must be in (0, 1)")
        require(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")
        require(0 <= self.min_len < self.max_len, "min_len, max_len: need 0 <= min_len < max_len")
        require(self.repetition_penalty >= 1.0, "repetition_penalty: must be >= 1")
        require(self.prefetch_batches >= 0 and self.shards_per_actor >= 1,
                 "prefetch_batches: must be >= 0; shards_per_actor: must be >= 1")
        require(self.batch_size >= 1 and self.actors >= 1, "batch_size, actors: must be >= 1")
        require(self.cpus_per_actor > 0, "cpus_per_actor: must be > 0")
        require(self.gpus_per_actor is None or self.gpus_per_actor >= 0, "gpus_per_actor: must be >= 0")
        require(self.shard_retries >= 0, "shard_retries: must be >= 0")
        drop_shares(self.max_drop_share, self.drop_share_limits)


SECTION = Section(CapfiltConfig, rounds="later")   # the run config's `capfilt:` section
