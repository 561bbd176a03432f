"""The toy web's settings (the run config's `data.toyweb:`): the world it draws, its caption noise, the
download faults it serves and its eval split, seed set and benchmarks. The toy web's own; the run config
(pipeline/config.py) holds it as one section of `data`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pipeline.configbase import rate as _rate, require as _require


@dataclass(frozen=True, kw_only=True)
class CaptionNoise:
    """Rates of web-like caption noise in the toy web (each noisy pair gets exactly one kind)."""
    mismatched: float = 0.10
    """Caption of another image."""
    boilerplate: float = 0.05
    """Alt text that says nothing ("IMG_2931.JPG", "click to enlarge")."""
    wrong_attribute: float = 0.10
    """Right caption with one attribute (shape, colour, size, position, background) changed."""
    empty_or_garbage: float = 0.05
    """Empty text, random characters, or bytes that are not UTF-8 (CC3M tsv only)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _rate(f.name, getattr(self, f.name))
        _require(self.total() <= 1.0, f"caption noise rates add up to {self.total()} > 1")

    def total(self) -> float:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True, kw_only=True)
class DownloadFaults:
    """Rates of download faults served by the toy web (each URL gets at most one)."""
    not_found: float = 0.02
    slow: float = 0.01
    """Answers after `ToyWebConfig.slow_seconds`, beyond any sane timeout."""
    truncated: float = 0.02
    """Promises more bytes than it sends, then closes the connection."""
    corrupt: float = 0.02
    """A JPEG header followed by garbage."""
    html: float = 0.01
    """An HTML page instead of an image."""
    huge: float = 0.005
    """A very large image (4096 x 4096)."""
    noai: float = 0.01
    """A valid image served with `X-Robots-Tag: noai`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _rate(f.name, getattr(self, f.name))
        _require(self.total() <= 1.0, f"fault rates add up to {self.total()} > 1")

    def total(self) -> float:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True, kw_only=True)
class ToyWebConfig:
    """A procedural web of images, rendered from the URL by a local HTTP server."""
    num_urls: int = 2000
    """Size of the noisy web list (split across `formats`)."""
    eval_size: int = 300
    """Clean held-out pairs for evaluation, disjoint from the web list."""
    seed_size: int = 200
    """Small clean 'seed' split (the stand-in for COCO), disjoint from both."""
    world_seed: int = 0
    """Seed of the world; the same seed gives the same URLs, captions and pixels."""
    formats: tuple[Literal["laion", "cc3m", "sbu"], ...] = ("laion", "cc3m", "sbu")
    """Real list formats to write the web list in (URLs are split evenly across them)."""
    port: int = 0
    """Port of the server on 127.0.0.1; 0 picks a free one at the first run and keeps it."""
    min_side: int = 40
    """Shorter side of a picture, drawn uniformly in [min_side, max_side]; the longer side follows from
    an aspect ratio drawn from `aspect_ratios` (either orientation)."""
    max_side: int = 160
    aspect_ratios: tuple[float, ...] = (1.0, 4 / 3, 3 / 2, 16 / 9)
    """Common photo shapes (square, 4:3, 3:2, 16:9), in landscape or portrait with equal odds."""
    banner_share: float = 0.03
    """Share of 4:1 banners (landscape or portrait), which a prefilter aspect rule should drop."""
    flat_share: float = 0.4
    """Share of pictures on a flat background with no texture (product shots, icons, diagrams: the hard
    case for perceptual-hash dedup); the rest carry soft blob texture, as photos do."""
    slow_seconds: float = 30.0
    exact_duplicates: float = 0.03
    """Rate of URLs that serve the very image of an earlier URL."""
    near_duplicates: float = 0.03
    """Rate of URLs that serve an earlier picture resized (75-95%), re-encoded and, half of the time,
    cropped by up to 3% on each side."""
    eval_leaks: float = 0.01
    """Rate of web URLs that serve a picture of the eval split (the very image, or a near copy half of
    the time): the contamination prefilter's `decontaminate` rule must find."""
    rate_limited_share: float = 0.0
    """Share of web URLs on the toy web's rate-limited host, 127.0.0.2 (same port; a download needs it in
    `allow_private_hosts`): it serves at most `rate_limit` requests in any second and answers the rest
    429 with a Retry-After, as image CDNs do."""
    rate_limit: float = 20.0
    noise: CaptionNoise = field(default_factory=CaptionNoise)
    faults: DownloadFaults = field(default_factory=DownloadFaults)

    def __post_init__(self) -> None:
        _require(self.num_urls > 0, f"num_urls: must be > 0, got {self.num_urls}")
        _require(self.eval_size >= 0 and self.seed_size >= 0, "eval_size, seed_size: must be >= 0")
        _require(len(self.formats) > 0, "formats: name at least one of laion, cc3m, sbu")
        _require(len(set(self.formats)) == len(self.formats), "formats: each format at most once")
        _require(0 <= self.port < 65536, f"port: must be in 0..65535, got {self.port}")
        _require(8 <= self.min_side <= self.max_side, "min_side, max_side: need 8 <= min_side <= max_side")
        _require(self.slow_seconds > 0, "slow_seconds: must be > 0")
        _require(len(self.aspect_ratios) > 0 and all(a >= 1 for a in self.aspect_ratios),
                 "aspect_ratios: give at least one ratio, each >= 1 (long side / short side)")
        _rate("banner_share", self.banner_share)
        _rate("flat_share", self.flat_share)
        _rate("exact_duplicates", self.exact_duplicates)
        _rate("near_duplicates", self.near_duplicates)
        _rate("eval_leaks", self.eval_leaks)
        _require(self.eval_leaks == 0 or self.eval_size > 0, "eval_leaks: needs an eval split (eval_size > 0)")
        _rate("rate_limited_share", self.rate_limited_share)
        _require(self.rate_limit > 0, f"rate_limit: must be > 0, got {self.rate_limit}")
