"""evaluate's settings: the held-out split's retrieval and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configbase import Section, keeps_output, require


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig:
    """One standard evaluation (pipeline/benchmarks.py), run on every round's model."""
    name: str
    format: Literal["karpathy", "imagefolder", "wds"]
    path: str
    """karpathy: the annotation JSON; imagefolder: the folder of class folders; wds: the dataset root."""
    images: str | None = None
    """karpathy: the folder the JSON's image paths are relative to (default: the JSON's folder)."""
    split: str | None = None
    """karpathy / wds: the split to read (default: test)."""
    templates: tuple[str, ...] = ("a photo of a {}.",)
    """Zero-shot prompts; {} is the class name (a wds dataset's own templates file wins)."""
    classnames: str | None = None
    """imagefolder: a file with one class name per line, in the sorted order of the class folders
    (ImageNet's folders are WordNet ids); None: the folder names, "_" read as a space."""
    rerank_k: int = 0
    """Retrieval: re-rank each query's ITC top k by ITM (BLIP: 128 / 256); 0: ITC only."""
    max_items: int | None = None
    """Read only the first N images (a quick check)."""

    def __post_init__(self) -> None:
        require(bool(self.name.strip()) and "/" not in self.name, "name: must be non-empty, without '/'")
        require(self.rerank_k >= 0, "rerank_k: must be >= 0")
        require(all("{}" in t for t in self.templates), "templates: each needs a {} for the class name")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    shards: str | None = None
    """Eval webdataset (brace pattern). None: the toy web's clean held-out split."""
    rerank_k: int = 16
    """ITC top-k candidates re-ranked by ITM."""
    batch_size: int = keeps_output(64)
    benchmarks: tuple[BenchmarkConfig, ...] = ()
    """Standard evaluations (COCO/Flickr Karpathy retrieval, ImageNet-style folders, CLIP_benchmark
    webdatasets); with the toy web, its toy COCO and toy ImageNet come first."""

    def __post_init__(self) -> None:
        require(self.rerank_k >= 1 and self.batch_size >= 1, "rerank_k, batch_size: must be >= 1")
        names = [b.name for b in self.benchmarks]
        require(len(set(names)) == len(names), f"benchmarks: names must be distinct, got {names}")


SECTION = Section(EvaluateConfig, rounds="every")   # the run config's `evaluate:` section
