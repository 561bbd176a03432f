"""The one config tree: frozen dataclasses loaded strictly from YAML, with `--set a.b=c` overrides.

Each stage receives only its own sub-config (plus the run-level seed), never the root.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.configtree import apply_override, build, keeps_output, to_plain
from pipeline.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _rate(name: str, value: float) -> None:
    _require(0.0 <= value <= 1.0, f"{name}: must be a rate between 0 and 1, got {value}")


def _drop_shares(max_share: float, limits: dict[str, float]) -> None:
    """Checks of a filtering stage's breaker settings (max_drop_share, drop_share_limits)."""
    _require(0.0 < max_share <= 1.0, f"max_drop_share: must be in (0, 1] (1 turns the breaker off), got {max_share}")
    for reason, share in limits.items():
        _require(0.0 < share <= 1.0, f"drop_share_limits.{reason}: must be in (0, 1] (1: no limit), got {share}")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    address: str | None = None
    """Ray cluster address ("auto", "ray://host:10001"); None starts a local Ray for this run."""
    num_cpus: int | None = None
    """CPUs for a local Ray (None: all of this machine's). Ignored when `address` is set."""
    include_dashboard: bool = False
    """Start the dashboard with a local Ray (bound to 127.0.0.1)."""

    def __post_init__(self) -> None:
        _require(self.num_cpus is None or self.num_cpus >= 1, f"num_cpus: must be >= 1 (or null: all), got {self.num_cpus}")


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


# Numbers a URL list may carry per row (pipeline/data/urllists.py), kept in each sample's json (`list`)
# for prefilter's `list_rules`: LAION's CLIP similarity, NSFW and watermark probabilities, and the image
# size the list claims.
LIST_FIELDS = ("similarity", "punsafe", "pwatermark", "width", "height")


@dataclass(frozen=True, kw_only=True)
class UrlListConfig:
    """One URL list. `laion`, `cc3m` and `sbu` know their real column names; others need them."""
    path: str
    format: Literal["laion", "cc3m", "sbu", "parquet", "csv", "tsv", "json", "jsonl"]
    url_col: str | None = None
    caption_col: str | None = None
    name: str | None = None
    """Source name recorded in each sample's provenance (default: the file name)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Numeric columns to carry into each sample's json (`list`) for prefilter's `list_rules`: {field:
    column} with fields similarity, punsafe, pwatermark, width, height. Default: for `laion`, LAION's
    similarity, punsafe, pwatermark, WIDTH, HEIGHT where the file has them; none otherwise.
    Parquet, csv, tsv, jsonl and json (records) lists can carry them."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - set(LIST_FIELDS))
        _require(not unknown, f"columns: unknown field(s) {unknown}; known: {', '.join(LIST_FIELDS)}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    inputs: tuple[UrlListConfig, ...] = ()
    """URL lists to download. Relative paths are relative to the config file."""
    toyweb: ToyWebConfig | None = None
    """Generate the inputs from the toy web and serve it on 127.0.0.1 for the run."""
    seed_shards: str | None = None
    """A small clean, human-captioned webdataset (brace pattern; BLIP's COCO): CapFilt fine-tunes the
    captioner and the filter on it, and pretraining adds it to the web data. None: the toy web's seed split."""

    def __post_init__(self) -> None:
        _require(bool(self.inputs) or self.toyweb is not None,
                 "inputs: give at least one URL list, or a toyweb section")


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """What the downloader fetches, within which limits, and how the work is spread on Ray."""
    samples_per_shard: int = 1000
    thread_count: int = keeps_output(32)
    """Download threads inside each shard task."""
    cpus_per_task: float = keeps_output(1.0)
    """Ray CPUs one shard task reserves (how many shards run at once per node)."""
    shard_retries: int = keeps_output(2)
    """Times a failed shard task is run again before the stage fails."""
    image_size: int = 256
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    timeout: float = 10.0
    """Seconds per connect or read of one HTTP request."""
    deadline: float = 60.0
    """Seconds one URL may take in all: redirects, retries and a body that drips in slowly."""
    retries: int = 0
    """Extra tries of one URL after a transient failure (timeout, reset, 5xx, DNS), within its deadline."""
    max_redirects: int = 5
    """Redirect hops followed per URL, each checked like the URL itself."""
    max_body_bytes: int = 16 * 2**20
    """Response bodies larger than this are refused (Content-Length, then while reading): body_too_large."""
    min_image_size: int = 0
    max_image_area: float = 25_000_000
    """Reject images whose width x height exceeds this, read from the header before any decode
    (image_too_large): a 140 KB PNG can claim 12000 x 12000 pixels. Also the pixels a task decodes at once."""
    max_aspect_ratio: float | None = None
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    """X-Robots-Tag directives that opt an image out; empty list: ignore the header."""
    allow_private_hosts: tuple[str, ...] = ()
    """Exceptions to the refusal of non-public addresses: host names (whatever they resolve to), or
    addresses and networks ("127.0.0.2", "10.0.0.0/8"), whatever name resolves to them."""
    user_agent_token: str | None = None
    """Names the crawler in the User-Agent header and is the agent robots.txt groups and X-Robots-Tag
    directives are matched for (None: robots.txt's "vlp" group, else its "*" group)."""
    robots_txt: bool = True
    """Honour each host's robots.txt (fetched once per host per shard task): a disallowed URL is dropped as
    `opt_out_robots`; a robots.txt that answers 5xx or not at all fails its URLs as `robots_unavailable`
    (transient). Off: a warning in the log and the manifest."""
    tdmrep: bool = True
    """Honour TDM-Rep: a `tdm-reservation: 1` answer header or a matching /.well-known/tdmrep.json rule
    drops the image as `opt_out_tdmrep`. Off: a warning in the log and the manifest."""
    ca_bundle: str | None = None
    """A PEM file of certificate authorities that replace the system's for HTTPS (a company's or a test's
    CA). A certificate none of them vouches for fails as `tls_error`."""
    per_host_connections: int | None = keeps_output(16)
    """Requests in flight to one host at once, per shard task (pipeline/data/politeness.py). None: no cap."""
    per_host_rate: float | None = keeps_output(None)
    """Requests started per second to one host, per shard task. None: no limit."""
    host_rates: dict[str, float] = keeps_output(default_factory=dict)
    """Per-host exceptions to `per_host_rate` ({"i.example.com": 2.0}), by host name as URLs write it."""
    rate_limit_retries: int = 3
    """Tries of a URL after its host answered 429 or 503, each after the host's Retry-After (or 1, 2, 4 ...
    seconds without one); then it fails as http_429 / http_5xx, which `vlp resume --retry-failed` fetches again."""
    max_retry_after: float = 120.0
    """Longest Retry-After waited for; a host asking longer fails the URL at once (transient, as above)."""
    dedup_urls: bool = True
    """Fetch each URL once: a row repeating an earlier row's URL (in list order, across lists) is dropped as
    `duplicate_url` before any download (pipeline/data/urldedup.py)."""
    max_drop_share: float = keeps_output(0.5)
    """The breaker (as prefilter's): when one drop reason (`duplicate_url`, `url_private_address`, ...)
    removes more than this share of the listed rows, the stage stops before its manifest, naming it. A
    list that is mostly repeats or refused addresses is a wrong list more often than a right one.
    Failed fetches are not drops: they are counted and retried (`vlp resume --retry-failed`)."""
    drop_share_limits: dict[str, float] = keeps_output(default_factory=dict)
    """Per drop reason, a share that replaces `max_drop_share` for it, e.g. {duplicate_url: 0.9}."""
    max_failed_share: float = keeps_output(0.5)
    """The breaker for failures: when one failure reason (`connection_refused`, `http_404`, ...) exceeds this
    share of the URLs tried, the stage stops, naming it with example URLs and errors. Judged as shards
    finish once `failed_share_min_urls` URLs were tried (a 400M-row list stops early), and at the end."""
    failed_share_min_urls: int = keeps_output(1000)
    """URLs tried before the failure breaker judges while shards still run."""

    def __post_init__(self) -> None:
        _require(self.samples_per_shard > 0, "samples_per_shard: must be > 0")
        _require(0 < self.max_failed_share <= 1, f"max_failed_share: must be in (0, 1], got {self.max_failed_share}")
        _require(self.failed_share_min_urls >= 1, "failed_share_min_urls: must be >= 1")
        _require(self.ca_bundle is None or self.ca_bundle.strip() != "", "ca_bundle: a file path, or null")
        _drop_shares(self.max_drop_share, self.drop_share_limits)
        _require(self.per_host_connections is None or self.per_host_connections > 0, "per_host_connections: must be > 0")
        for host, rate in {"per_host_rate": self.per_host_rate, **self.host_rates}.items():
            _require(rate is None or rate > 0, f"{'host_rates.' if host != 'per_host_rate' else ''}{host}: a rate must be > 0")
        _require(self.rate_limit_retries >= 0 and self.max_retry_after >= 0, "rate_limit_retries, max_retry_after: must be >= 0")
        _require(self.thread_count > 0, "thread_count: must be > 0")
        _require(self.cpus_per_task > 0, "cpus_per_task: must be > 0")
        _require(self.shard_retries >= 0 and self.retries >= 0, "retries: must be >= 0")
        _require(self.image_size >= 8, f"image_size: must be >= 8, got {self.image_size}")
        _require(1 <= self.encode_quality <= 100, "encode_quality: must be in 1..100")
        _require(self.timeout > 0, f"timeout: must be > 0, got {self.timeout}")
        _require(self.deadline >= self.timeout, f"deadline: must be >= timeout ({self.timeout}), got {self.deadline}")
        _require(self.max_redirects >= 0, "max_redirects: must be >= 0")
        _require(self.max_body_bytes > 0, "max_body_bytes: must be > 0")
        _require(self.max_image_area > 0, "max_image_area: must be > 0")
        for host in self.allow_private_hosts:
            _require(isinstance(host, str) and host.strip() != "", "allow_private_hosts: entries must be non-empty strings")
        _require(self.max_aspect_ratio is None or self.max_aspect_ratio >= 1, "max_aspect_ratio: must be >= 1")


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
    """Partitions the dedup shuffle hashes its keys into, a Ray task each (pipeline/dedup.py). None: about
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
            _require(not unknown, f"{name}: unknown field(s) {unknown}; known: {', '.join(LIST_FIELDS)}")
        _require(self.min_image_side >= 0, "min_image_side: must be >= 0")
        _require(self.max_aspect_ratio >= 1, "max_aspect_ratio: must be >= 1")
        _require(self.min_caption_words >= 0 and self.min_caption_chars >= 0, "min_caption_*: must be >= 0")
        _require(self.max_caption_chars > self.min_caption_chars, "max_caption_chars: must exceed min_caption_chars")
        _require(self.dedup_partitions is None or 1 <= self.dedup_partitions <= 4096,
                 f"dedup_partitions: 1..4096 or null (automatic), got {self.dedup_partitions}")
        _require(0 <= self.near_max_distance <= 0.5,
                 f"near_max_distance: must be a relative distance in 0..0.5 (default 0.08), "
                 f"got {self.near_max_distance}")
        _require(0 <= self.decontaminate_max_distance <= 0.5,
                 f"decontaminate_max_distance: must be in 0..0.5, got {self.decontaminate_max_distance}")
        _require(self.languages is None or (len(self.languages) > 0 and all(re.fullmatch(r"[a-z]{2,3}", code)
                                                                          for code in self.languages)),
                 f"languages: give language codes such as [en, de] (ISO 639-1), or leave it unset for no "
                 f"language rule; got {self.languages}")
        _rate("language_min_confidence", self.language_min_confidence)
        _require(self.cpus_per_task > 0, "cpus_per_task: must be > 0")
        _drop_shares(self.max_drop_share, self.drop_share_limits)
        for i, pattern in enumerate(self.boilerplate_patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"boilerplate_patterns[{i}]: not a valid regex ({err})") from None


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
    else fp32 (pipeline/train/precision.py). bf16 on a CPU without them works, slower than fp32."""
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
        _require(self.num_workers >= 1, "num_workers: must be >= 1")
        _require(self.zero_stage in (0, 1, 2, 3), f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("micro_batch", "grad_accum", "steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            _require(getattr(self, name) >= 1, f"{name}: must be >= 1")
        _require(math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr_ratio <= 1,
                 "lr: must be finite and > 0 (min_lr_ratio in 0..1)")
        _require(0 <= self.warmup_steps < self.steps, "warmup_steps: must be in 0..steps-1")
        _require(self.vocab_size >= 64, "vocab_size: must be >= 64")
        _require(self.tokenizer_captions >= 1, "tokenizer_captions: must be >= 1")
        _require(self.loader_prefetch >= 0, f"loader_prefetch: must be >= 0, got {self.loader_prefetch}")
        _require(self.cpus_per_worker > 0, f"cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops: must be > 0 (or unset)")
        _require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "grad_clip: must be >= 0 (0: no clipping)")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay: must be >= 0")
        _require(self.text_queue >= 0, "text_queue: must be >= 0")
        _rate("itm_easy_negatives", self.itm_easy_negatives)
        unknown = set(self.loss_weights) - set(OBJECTIVES)
        _require(not unknown, f"loss_weights: unknown objective(s) {sorted(unknown)}; use {', '.join(OBJECTIVES)}")
        _require(all(w >= 0 for w in self.loss_weights.values()) and any(self.loss_weights.values()),
                 "loss_weights: must be >= 0 and not all 0")
        _require(self.fusion_every >= 1, "fusion_every: must be >= 1")
        _require(not (self.tokenizer and self.init_from.text),
                 "tokenizer: init_from.text brings its own tokenizer; give one of tokenizer, init_from.text")
        _require(self.fusion_every == 1 or any(self.loss_weights.get(k) for k in UNIMODAL_OBJECTIVES),
                 "fusion_every: steps between fusion steps need itc or bow in loss_weights")


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
        _require(bool(self.name.strip()) and "/" not in self.name, "name: must be non-empty, without '/'")
        _require(self.rerank_k >= 0, "rerank_k: must be >= 0")
        _require(all("{}" in t for t in self.templates), "templates: each needs a {} for the class name")


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
        _require(self.rerank_k >= 1 and self.batch_size >= 1, "rerank_k, batch_size: must be >= 1")
        names = [b.name for b in self.benchmarks]
        _require(len(set(names)) == len(names), f"benchmarks: names must be distinct, got {names}")


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
        _rate("itm_easy_negatives", self.itm_easy_negatives)
        _require(self.text_queue >= 0, "text_queue: must be >= 0")
        _require(self.steps >= 1 and self.batch_size >= 1, "steps, batch_size: must be >= 1")
        _require(math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr_ratio <= 1,
                 "lr: must be finite and > 0 (min_lr_ratio in 0..1)")
        _require(0 <= self.warmup_steps < self.steps, "warmup_steps: must be in 0..steps-1")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay: must be >= 0")


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
        _rate("threshold", self.threshold)
        _require(0 < self.clean_reject_rate < 0.5, "clean_reject_rate: must be in (0, 0.5)")
        _require(0 < self.calibration_share < 1, "calibration_share: must be in (0, 1)")
        _require(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")
        _require(0 <= self.min_len < self.max_len, "min_len, max_len: need 0 <= min_len < max_len")
        _require(self.repetition_penalty >= 1.0, "repetition_penalty: must be >= 1")
        _require(self.prefetch_batches >= 0 and self.shards_per_actor >= 1,
                 "prefetch_batches: must be >= 0; shards_per_actor: must be >= 1")
        _require(self.batch_size >= 1 and self.actors >= 1, "batch_size, actors: must be >= 1")
        _require(self.cpus_per_actor > 0, "cpus_per_actor: must be > 0")
        _require(self.gpus_per_actor is None or self.gpus_per_actor >= 0, "gpus_per_actor: must be >= 0")
        _require(self.shard_retries >= 0, "shard_retries: must be >= 0")
        _drop_shares(self.max_drop_share, self.drop_share_limits)


STAGE_ORDER = ("download", "prefilter", "pretrain", "evaluate", "capfilt", "report")


@dataclass(frozen=True, kw_only=True)
class MlflowTracking:
    tracking_uri: str | None = None
    """Where runs go: a server (http://...) or a local store path; None: <run>/mlruns (a file store)."""
    experiment: str | None = None
    """Experiment name; None: the run's name."""


@dataclass(frozen=True, kw_only=True)
class WandbTracking:
    project: str | None = None
    """W&B project; None: the run's name."""
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    """offline: write under `dir` only (upload later with `wandb sync`)."""
    dir: str | None = None
    """Where W&B writes its files; None: <run>/wandb."""


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Experiment tracking, off unless a backend is given (pipeline/tracking.py): the resolved config as
    parameters, per-step training metrics, per-round curation and evaluation figures, the report."""
    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str
    """Run name; the default run directory is runs/<name>."""
    seed: int = 0
    run_dir: str | None = None
    stages: tuple[Literal["download", "prefilter", "pretrain", "evaluate", "capfilt", "report"], ...] = STAGE_ORDER
    """Stages of the graph to run, in graph order. Round 0 runs download, prefilter, pretrain, evaluate;
    each later round capfilt, pretrain, evaluate; report (the HTML page) comes last."""
    rounds: int = 1
    """Bootstrapping rounds after round 0: round r's CapFilt cleans the web data with round r-1's model
    and round r pretrains on the result. 0: no CapFilt."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig
    download: DownloadConfig = field(default_factory=DownloadConfig)
    prefilter: PrefilterConfig = field(default_factory=PrefilterConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    capfilt: CapfiltConfig = field(default_factory=CapfiltConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name: must not be empty")
        _require(list(self.stages) == [s for s in STAGE_ORDER if s in self.stages],
                 f"stages: must be in graph order {list(STAGE_ORDER)}, got {list(self.stages)}")
        _require(self.rounds >= 0, f"rounds: must be >= 0, got {self.rounds}")
        _require("capfilt" not in self.stages or self.rounds >= 1,
                 "rounds: capfilt runs in rounds 1.., so it needs rounds >= 1")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load `path` strictly and apply `--set` overrides. Relative input paths resolve against the file."""
    from pipeline.storage import as_path

    path = as_path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not UTF-8 text (byte {err.start}): is it a config file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"
        for assignment in overrides:
            apply_override(data, assignment, source)
    _resolve_input_paths(data, path.parent)
    return build(RunConfig, data, source=source)


def _resolve_input_paths(data: dict, base) -> None:
    from pipeline.storage import is_remote, is_url

    inputs = (data.get("data") or {}).get("inputs") if isinstance(data.get("data"), dict) else None
    for entry in inputs or ():
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not is_url(entry["path"]):
            p = Path(entry["path"]).expanduser()
            entry["path"] = str(p if p.is_absolute() else (base / p) if is_remote(base) else (base / p).resolve())


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)
