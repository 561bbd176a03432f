"""prefilter's settings: the cheap rules, decontamination and deduplication."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.configbase import Section, LIST_FIELDS, drop_shares, keeps_output, rate, require


DEFAULT_BOILERPLATE = (
    r"^(img|image|dsc|photo|pic)[_\- ]?\d+(\.(jpe?g|png|gif))?$",
    r"click (here )?to enlarge",
    r"^(stock )?(photo|image|picture|thumbnail)$",
    r"\.(jpe?g|png|gif|webp)$",
    r"^untitled",
)


@dataclass(frozen=True, kw_only=True)
class PrefilterConfig:
    min_image_side: int = 32
    """Minimum of width and height of the original image, in pixels."""
    max_aspect_ratio: float = 3.0
    min_caption_words: int = 2
    min_caption_chars: int = 5
    max_caption_chars: int = 1000
    boilerplate_patterns: tuple[str, ...] = DEFAULT_BOILERPLATE
    """Case-insensitive regexes; a caption matching any is dropped as boilerplate."""
    dedup_exact: bool = True
    """Drop images whose original bytes (img2dataset's sha256) equal an earlier kept image's."""
    dedup_near: bool = True
    """Drop images that are near copies of an earlier kept image (resized, re-encoded, cropped up to 3% per
    side, brightness nudged): colour signatures within `near_max_distance` (pipeline/data/neardup.py).
    Near-uniform images carry no signature and are deduplicated only exactly."""
    near_max_distance: float = 0.08
    """Largest distance between two near copies' band-limited colour thumbnails, relative to their
    contrast, after the best small crop (0: the same picture; unrelated pictures are near 1). Measured in
    bench/dedup.py: 0.08 keeps distinct but similar flat pictures apart and finds ~90% of near copies."""
    decontaminate: bool = True
    """Drop training images that are exact or near copies of an evaluation image (`eval_contaminated`):
    the images of `evaluate.shards` (or of the toy web's eval split) and of every `evaluate.benchmarks`
    split (COCO / Flickr test images, an ImageNet folder). Nothing to do without either."""
    decontaminate_max_distance: float = 0.1
    """`near_max_distance` for matches against eval images: looser, since a leaked eval image costs more
    than a training image lost (bench/dedup.py: 140 of 144 leaked eval pictures found, 1 of ~8,000 clean
    images dropped)."""
    dedup_partitions: int | None = keeps_output(None)
    """Partitions the dedup shuffle hashes its keys into, a Ray task each (stages/prefilter/dedup/). None: about
    one per 500k samples, at least 2. The decisions do not depend on it."""
    languages: tuple[str, ...] | None = None
    """Keep only captions in these languages (ISO 639-1 codes as py3langid names them, e.g. [en]);
    others are dropped as `caption_language`. None: no language rule."""
    language_min_confidence: float = 0.7
    """A caption is dropped only when the identifier gives a language outside `languages` at least this
    probability: on 2-3 words it rarely does (it cannot tell), and such captions are kept."""
    cpus_per_task: float = keeps_output(1.0)
    max_drop_share: float = keeps_output(0.5)
    """The breaker: when one drop reason removes more than this share of the stage's input, the stage stops
    before committing its manifest, naming the reason (committed shards are kept: raise it and `vlp resume`
    to accept the drops). 1.0 turns the breaker off."""
    drop_share_limits: dict[str, float] = keeps_output(default_factory=dict)
    """Per drop reason (as `vlp status` lists them), a share that replaces `max_drop_share` for that
    reason: looser for a rule known to be heavy on this data (a language rule on a multilingual crawl),
    or tighter, e.g. {caption_empty: 0.2}."""
    list_min: dict[str, float] = field(default_factory=dict)
    """Rules on the numbers a URL list gives per row (UrlListConfig.columns; LAION's by default): a sample
    whose value is below its minimum drops as `list_<field>`, e.g. {similarity: 0.28} (LAION-400M's CLIP
    threshold)."""
    list_max: dict[str, float] = field(default_factory=dict)
    """Maximums likewise, e.g. {punsafe: 0.5, pwatermark: 0.8}."""
    list_missing: Literal["drop", "keep"] = "drop"
    """A sample whose list gave no value for a ruled field: dropped as `list_<field>_missing`, or kept."""

    def __post_init__(self) -> None:
        import re

        for name, rules in (("list_min", self.list_min), ("list_max", self.list_max)):
            unknown = sorted(set(rules) - set(LIST_FIELDS))
            require(not unknown, f"{name}: unknown field(s) {unknown}; known: {', '.join(LIST_FIELDS)}")
        require(self.min_image_side >= 0, "min_image_side: must be >= 0")
        require(self.max_aspect_ratio >= 1, "max_aspect_ratio: must be >= 1")
        require(self.min_caption_words >= 0 and self.min_caption_chars >= 0, "min_caption_*: must be >= 0")
        require(self.max_caption_chars > self.min_caption_chars, "max_caption_chars: must exceed min_caption_chars")
        require(self.dedup_partitions is None or 1 <= self.dedup_partitions <= 4096,
                 f"dedup_partitions: 1..4096 or null (automatic), got {self.dedup_partitions}")
        require(0 <= self.near_max_distance <= 0.5,
                 f"near_max_distance: must be a relative distance in 0..0.5 (default 0.08), "
                 f"got {self.near_max_distance}")
        require(0 <= self.decontaminate_max_distance <= 0.5,
                 f"decontaminate_max_distance: must be in 0..0.5, got {self.decontaminate_max_distance}")
        require(self.languages is None or (len(self.languages) > 0 and all(re.fullmatch(r"[a-z]{2,3}", code)
                                                                          for code in self.languages)),
                 f"languages: give language codes such as [en, de] (ISO 639-1), or leave it unset for no "
                 f"language rule; got {self.languages}")
        rate("language_min_confidence", self.language_min_confidence)
        require(self.cpus_per_task > 0, "cpus_per_task: must be > 0")
        drop_shares(self.max_drop_share, self.drop_share_limits)
        for i, pattern in enumerate(self.boilerplate_patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"boilerplate_patterns[{i}]: not a valid regex ({err})") from None


SECTION = Section(PrefilterConfig)   # the run config's `prefilter:` section
