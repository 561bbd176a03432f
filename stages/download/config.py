"""download's settings: what the downloader fetches, within which limits, and how the work is spread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configbase import Section, drop_shares, keeps_output, require


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
    `duplicate_url` before any download (stages/download/urldedup.py)."""
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
        require(self.samples_per_shard > 0, "samples_per_shard: must be > 0")
        require(0 < self.max_failed_share <= 1, f"max_failed_share: must be in (0, 1], got {self.max_failed_share}")
        require(self.failed_share_min_urls >= 1, "failed_share_min_urls: must be >= 1")
        require(self.ca_bundle is None or self.ca_bundle.strip() != "", "ca_bundle: a file path, or null")
        drop_shares(self.max_drop_share, self.drop_share_limits)
        require(self.per_host_connections is None or self.per_host_connections > 0, "per_host_connections: must be > 0")
        for host, rate in {"per_host_rate": self.per_host_rate, **self.host_rates}.items():
            require(rate is None or rate > 0, f"{'host_rates.' if host != 'per_host_rate' else ''}{host}: a rate must be > 0")
        require(self.rate_limit_retries >= 0 and self.max_retry_after >= 0, "rate_limit_retries, max_retry_after: must be >= 0")
        require(self.thread_count > 0, "thread_count: must be > 0")
        require(self.cpus_per_task > 0, "cpus_per_task: must be > 0")
        require(self.shard_retries >= 0 and self.retries >= 0, "retries: must be >= 0")
        require(self.image_size >= 8, f"image_size: must be >= 8, got {self.image_size}")
        require(1 <= self.encode_quality <= 100, "encode_quality: must be in 1..100")
        require(self.timeout > 0, f"timeout: must be > 0, got {self.timeout}")
        require(self.deadline >= self.timeout, f"deadline: must be >= timeout ({self.timeout}), got {self.deadline}")
        require(self.max_redirects >= 0, "max_redirects: must be >= 0")
        require(self.max_body_bytes > 0, "max_body_bytes: must be > 0")
        require(self.max_image_area > 0, "max_image_area: must be > 0")
        for host in self.allow_private_hosts:
            require(isinstance(host, str) and host.strip() != "", "allow_private_hosts: entries must be non-empty strings")
        require(self.max_aspect_ratio is None or self.max_aspect_ratio >= 1, "max_aspect_ratio: must be >= 1")


SECTION = Section(DownloadConfig)   # the run config's `download:` section
