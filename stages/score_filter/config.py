"""score_filter's settings: the scoring model, and the rule (a top fraction, or a threshold)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configbase import Section, ShardMapSettings, keeps_output, require


@dataclass(frozen=True, kw_only=True)
class ScoreFilterConfig(ShardMapSettings):
    clip_model: str | None = keeps_output(None)
    """A local folder holding a Hugging Face CLIP-style checkpoint (`save_pretrained`: config, weights, a
    tokenizer and an image processor; anything whose model has get_image_features and get_text_features).
    Required when the stage runs; nothing is downloaded. Its files' content enters the fingerprint (not
    its path: the same model moved elsewhere is the same result)."""
    keep_top: float | None = 0.3
    """Keep this fraction of the input with the highest scores (DataComp's "CLIP score top 30%"), measured
    over the whole input before any shard is decided. None: keep by `threshold`."""
    threshold: float | None = None
    """Keep a pair whose score (the cosine of the model's image and text features) is at least this."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require((self.keep_top is None) != (self.threshold is None),
                "keep_top, threshold: give exactly one (keep_top: null to keep by threshold)")
        require(self.keep_top is None or 0 < self.keep_top <= 1, "keep_top: must be in (0, 1]")
        require(self.threshold is None or -1 <= self.threshold <= 1, "threshold: a cosine, in [-1, 1]")


SECTION = Section(ScoreFilterConfig, optional=True)   # the run config's `score_filter:` section
