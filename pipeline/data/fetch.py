"""Fetching one image URL with bounded work and no way into the cluster's own network.

img2dataset's fetcher (urllib's urlopen) follows redirects anywhere, connects wherever a second DNS
lookup points, reads bodies whole with no size cap, has only a per-read timeout, and decodes an image
before checking its size. This fetcher keeps img2dataset's X-Robots-Tag rules (read by our own
robots_tag_rules) and speaks HTTP through urllib3 (HTTP/1.0 and 1.1, keep-alive or not, chunked
bodies, gzip/deflate decoded in bounded steps, TLS with SNI and certificate checks), driving one connection per hop itself so that:
  - every hop's host is resolved and every address checked (urlpolicy.HostPolicy.pin), and the
    connection goes to the checked address (TLS still verifies the certificate against the name);
  - redirects (301/302/303/307/308) are followed here, at most `max_redirects` hops, each checked the
    same way (and by the caller's `check_hop`, e.g. robots.txt); a non-http(s) target is refused;
  - a body is capped at `max_bytes` (Content-Length, then while streaming, after decoding: a gzip
    body that inflates past the cap is stopped there), and the whole URL (redirects, retries, a body
    dripping in) has one wall-clock `deadline`;
  - a 429 or 503 answer is not retried here: it raises at once with the Retry-After it gave, and the
    shard task pauses that host (politeness.py);
  - an image's size is checked from its header as soon as the header has come (`header_check`), and
    again before anything decodes it (images.open_image).
Failures raise FetchFailed with the reason the download stage counts. Why urllib3 and not httpx or
pycurl: docs/architecture.md, "The fetcher".
"""
from __future__ import annotations

import functools
import heapq
import http.client
import itertools
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import quote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import DecodeError

from pipeline.data.politeness import RATE_LIMITED, parse_retry_after
from pipeline.data.urlpolicy import HostPolicy, Refused, Resolver, system_resolver

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
HEADER_BYTES = 256 * 1024   # where a header_check gives up (a JPEG's size can follow ~64 KB of EXIF)
TRANSIENT = ("timeout", "deadline_exceeded", "connection_refused", "connection_reset", "truncated", "http_5xx",
             "http_429", "dns_error", "connection_error", "robots_unavailable")
# Decisions a site made about its images (X-Robots-Tag, robots.txt, TDM-Rep): counted as drops, not failures.
OPT_OUTS = ("opt_out", "opt_out_robots", "opt_out_tdmrep")
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
DECODED = ("", "identity", "gzip", "x-gzip", "deflate")   # what we ask for (Accept-Encoding) and decode


class FetchFailed(Exception):
    """A URL that gave no usable image; `reason` is the counted reason, the message says more."""

    def __init__(self, reason: str, message: str, rate_limited: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.rate_limited = rate_limited   # a 429 or 503: the host asks us to slow down
        self.retry_after = retry_after     # seconds its Retry-After asked for, if it said


@dataclass(frozen=True)
class Limits:
    timeout: float            # seconds per connect or read
    deadline: float           # seconds for the whole URL
    max_bytes: int            # body size cap (after decoding a Content-Encoding)
    max_redirects: int
    max_image_area: float     # width x height, read from the header
    retries: int = 0          # extra tries after a transient failure, within the deadline
    user_agent_token: str | None = None
    disallowed_header_directives: frozenset[str] = frozenset()
    tdm_header: bool = False  # a `tdm-reservation: 1` answer is an opt-out (opt_out_tdmrep)
    keep_prefix: bool = False  # a body over max_bytes gives its first max_bytes instead of body_too_large
    header_check: Callable[[bytes], bool] | None = None
    """Called with the body so far, chunk by chunk, until it returns True (or HEADER_BYTES have come): it
    raises FetchFailed to stop a body early (images.check_header: an image whose header claims more than
    max_image_area pixels is refused after its first chunk, not after its last)."""


@dataclass(frozen=True)
class Fetched:
    url: str                    # the URL that answered, after redirects
    status: int
    headers: Mapping[str, str]  # urllib3's HTTPHeaderDict: case-insensitive
    body: bytes


@functools.lru_cache(maxsize=8)
def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """The context that verifies servers: the system's CAs, or those of `ca_bundle` (a PEM file: a
    company's or a test's CA) instead. One per bundle, shared by the threads (an SSLContext may be)."""
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()


def fetch(url: str, policy: HostPolicy, limits: Limits, resolver: Resolver = system_resolver,
          tls: ssl.SSLContext | None = None) -> bytes:
    """The body of `url` (redirects followed), within `limits`; raises FetchFailed. `tls`: the context
    that verifies servers (default: the system's CAs)."""
    return fetch_response(url, policy, limits, resolver, tls).body


def fetch_response(url: str, policy: HostPolicy, limits: Limits, resolver: Resolver = system_resolver,
                   tls: ssl.SSLContext | None = None, check_hop: Callable[[str], None] | None = None) -> Fetched:
    """`fetch`, with the answer's headers and final URL. `check_hop(url)` runs before each hop is
    requested (the first included) and may raise FetchFailed, e.g. for a robots.txt opt-out."""
    deadline = time.monotonic() + limits.deadline
    for attempt in range(limits.retries + 1):
        try:
            return _fetch_once(url, policy, limits, resolver, deadline, tls or tls_context(), check_hop)
        except FetchFailed as err:
            # A host asking to slow down is not asked again at once: the caller backs off (politeness.py).
            if err.rate_limited or err.reason not in TRANSIENT or attempt == limits.retries \
                    or time.monotonic() >= deadline:
                raise
    raise AssertionError("unreachable")


def _fetch_once(url: str, policy: HostPolicy, limits: Limits, resolver: Resolver, deadline: float,
                tls: ssl.SSLContext, check_hop: Callable[[str], None] | None) -> Fetched:
    for hop in range(limits.max_redirects + 1):
        try:
            host, port, address = policy.pin(url, resolver, redirect=hop > 0)
        except Refused as err:
            raise FetchFailed(err.reason, f"{url}: {err}") from None
        if check_hop is not None:
            check_hop(url)
        parts = urlsplit(url.strip())
        timeout = _remaining(deadline, limits.timeout)
        # urllib3 connects to `address`; the Host header, SNI and the certificate check use the name.
        conn = (HTTPSConnection(address, port, timeout=timeout, ssl_context=tls, server_hostname=host)
                if parts.scheme == "https" else HTTPConnection(address, port, timeout=timeout))
        watchdog, response = _Watchdog(deadline), None
        try:
            conn.connect()
            watchdog.watch(conn.sock)
            conn.request("GET", _request_target(parts), headers=_headers(host, port, parts.scheme, limits),
                         preload_content=False, decode_content=True, enforce_content_length=True)
            response = conn.getresponse()
            if response.status in REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise FetchFailed("http_other", f"HTTP {response.status} without a Location")
                url = urljoin(url, location.strip())
                continue
            if response.status in RATE_LIMITED:
                raise FetchFailed(_http_reason(response.status), f"HTTP Error {response.status}: {response.reason}",
                                  rate_limited=True, retry_after=parse_retry_after(response.headers.get("Retry-After")))
            if response.status != 200:
                raise FetchFailed(_http_reason(response.status), f"HTTP Error {response.status}: {response.reason}")
            _check_opt_outs(response.headers, limits)
            body = _read_body(response, limits)
            watchdog.check()
            return Fetched(url, response.status, response.headers, body)
        except FetchFailed:
            watchdog.check()
            raise
        except Exception as err:  # noqa: BLE001 (sockets, TLS, http.client and urllib3 raise many kinds)
            watchdog.check()
            cause = _cause(err)
            raise FetchFailed(_network_reason(cause, deadline), f"{type(cause).__name__}: {cause}") from None
        finally:
            watchdog.cancel()
            if response is not None:   # it holds the socket when the server closes the connection
                response.close()
            conn.close()
    raise FetchFailed("too_many_redirects", f"more than {limits.max_redirects} redirects")


def _headers(host: str, port: int, scheme: str, limits: Limits) -> dict[str, str]:
    name = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return {"Host": name if port == default else f"{name}:{port}", "User-Agent": _user_agent(limits),
            "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "gzip, deflate"}


class _Watchdog:
    """Shuts the connection's socket down at the URL's deadline. Socket timeouts bound each read, not a
    server that sends one byte every few seconds (headers or body): this bounds the whole exchange. It
    holds the socket itself: http.client drops the connection's reference to it as soon as a response
    will close the connection (HTTP/1.0, `Connection: close`), while the response still reads from it."""

    def __init__(self, deadline: float):
        self.sock: socket.socket | None = None
        self.fired = self.cancelled = False
        self.lock = threading.Lock()
        _CLOCK.add(deadline, self)

    def watch(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            if self.fired:
                self._shutdown()

    def fire(self) -> None:
        with self.lock:
            if not self.cancelled:
                self.fired = True
                self._shutdown()

    def _shutdown(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self) -> None:
        if self.fired:
            raise FetchFailed("deadline_exceeded", "the URL's deadline passed")

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True


class _Clock:
    """One thread per process fires the watchdogs at their deadlines. A `threading.Timer` per URL started
    a thread per URL, half of a small image's fetch (bench/fetchers.py). Cancelled watchdogs leave the
    heap when they come to its top or their deadline passes: at most (URLs/s x deadline) entries."""

    def __init__(self):
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int, _Watchdog]] = []
        self.order = itertools.count()
        self.thread: threading.Thread | None = None

    def add(self, deadline: float, dog: _Watchdog) -> None:
        with self.cond:
            heapq.heappush(self.heap, (deadline, next(self.order), dog))
            if self.thread is None or not self.thread.is_alive():   # not started yet, or a forked child
                self.thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self.thread.start()
            elif self.heap[0][2] is dog:
                self.cond.notify()   # a nearer deadline than the one the thread sleeps towards

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                while self.heap and (self.heap[0][0] <= now or self.heap[0][2].cancelled):
                    _, _, dog = heapq.heappop(self.heap)
                    if not dog.cancelled:
                        dog.fire()
                self.cond.wait(self.heap[0][0] - now if self.heap else None)


_CLOCK = _Clock()


def _cause(err: BaseException) -> BaseException:
    """The error beneath urllib3's wrappers (ProtocolError('Connection broken: ...', the error),
    NewConnectionError from the socket's, ReadTimeoutError from a socket timeout)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = next((a for a in getattr(err, "args", ())[1:] if isinstance(a, BaseException)), None)
        if isinstance(err, urllib3.exceptions.HTTPError) and not isinstance(err, http.client.IncompleteRead):
            inner = inner or err.__cause__ or err.__context__
        # NewConnectionError subclasses ConnectTimeoutError (urllib3 2.x): its cause says what happened
        timed_out = isinstance(err, (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ConnectTimeoutError)) \
            and not isinstance(err, urllib3.exceptions.NewConnectionError)
        if timed_out:
            return TimeoutError(str(err))
        if inner is None:
            return err
        err = inner
    return err


def _network_reason(err: BaseException, deadline: float) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        # near the deadline a read's timeout is the time left: then the deadline is what ran out
        return "deadline_exceeded" if time.monotonic() >= deadline - 0.05 else "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(err, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return "connection_reset"
    if isinstance(err, http.client.IncompleteRead):
        return "truncated"
    if isinstance(err, (ssl.SSLError, ssl.CertificateError, urllib3.exceptions.SSLError)):
        return "tls_error"
    if isinstance(err, DecodeError):
        return "content_encoding"
    return "connection_error"


def _read_body(response: urllib3.BaseHTTPResponse, limits: Limits) -> bytes:
    encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
    if encoding not in DECODED:   # we asked for gzip or deflate only: brotli, zstd ... are not decoded here
        raise FetchFailed("content_encoding", f"Content-Encoding {encoding!r} is not decoded (asked for gzip, deflate)")
    declared = response.headers.get("Content-Length")
    length = int(declared) if declared and declared.strip().isdigit() else None
    if length is not None and length > limits.max_bytes and not limits.keep_prefix:
        raise FetchFailed("body_too_large", f"Content-Length {length} > max_bytes {limits.max_bytes}")
    body, check = bytearray(), limits.header_check
    # urllib3 >= 2.6 inflates at most CHUNK bytes a call, so a gzip bomb stops at the cap, not in memory.
    while chunk := response.read1(CHUNK):
        body += chunk
        if check is not None and (len(body) > HEADER_BYTES or check(bytes(body))):
            check = None   # the header was read and passed (or never will be: the whole body decides)
        if len(body) > limits.max_bytes:
            if limits.keep_prefix:   # robots.txt: RFC 9309 parses the first 500 KiB of a longer file
                return bytes(body[:limits.max_bytes])
            raise FetchFailed("body_too_large", f"body over max_bytes {limits.max_bytes}"
                                                + (f" after {encoding} decoding" if encoding not in ("", "identity") else ""))
    return bytes(body)


def _check_opt_outs(headers, limits: Limits) -> None:
    if limits.tdm_header and (headers.get("tdm-reservation") or "").strip() == "1":
        raise FetchFailed("opt_out_tdmrep", "text and data mining reserved by a tdm-reservation: 1 header")
    if limits.disallowed_header_directives and _disallowed(headers, limits):
        raise FetchFailed("opt_out", "use of the image disallowed by an X-Robots-Tag directive")


def _request_target(parts) -> str:
    """Path and query as sent: characters a request line cannot carry (spaces, non-ASCII, as web lists
    hold them) percent-encoded, existing escapes kept."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return quote(target, safe="/?&=%:@+$,;~!*'()[]-._")


def _remaining(deadline: float, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchFailed("deadline_exceeded", "the URL's deadline passed")
    return min(timeout, left)


def _http_reason(status: int) -> str:
    if status in (403, 404, 410, 429):
        return f"http_{status}"
    return "http_5xx" if 500 <= status < 600 else "http_other"


def _user_agent(limits: Limits) -> str:
    if limits.user_agent_token:
        return f"{USER_AGENT} (compatible; {limits.user_agent_token}; +https://github.com/rom1504/img2dataset)"
    return USER_AGENT


# X-Robots-Tag directives that stand for others: `none` is `noindex, nofollow` (Google's and Bing's
# documented meaning), so a site that sends it opts out wherever either of those two would.
SHORTHANDS = {"none": frozenset({"noindex", "nofollow"})}
# Directives written `name: value`. Any other `word:` opens the rules for the crawler it names
# ("googlebot: noindex"). img2dataset's reader took the text before the first colon of a header for a
# crawler's name, so `max-image-preview:large, noindex` or `unavailable_after: ..., noindex` read as
# rules for another crawler and the site's noindex was missed.
VALUED_DIRECTIVES = frozenset({"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"})
_CRAWLER = re.compile(r"[a-z0-9_.-]+")   # a product token; a date's "15:00" piece is not one


def header_directives(disallowed: frozenset[str]) -> frozenset[str]:
    """The directives that opt an image out, with each shorthand that means one of `disallowed`."""
    return disallowed | {short for short, meaning in SHORTHANDS.items() if meaning & disallowed}


def robots_tag_rules(values: list[str]) -> list[tuple[str | None, str]]:
    """(crawler or None for all, directive) of every X-Robots-Tag header: each is a comma-separated
    list; `crawler: directive` starts that crawler's rules, which go on to the end of the header."""
    rules = []
    for value in values:
        crawler = None
        for part in value.split(","):
            part = part.strip()
            name, colon, rest = part.partition(":")
            name = name.strip().lower()
            if colon and name not in VALUED_DIRECTIVES and _CRAWLER.fullmatch(name):
                crawler, part = name, rest.strip()
                name = part.partition(":")[0].strip().lower()
            if name:
                rules.append((crawler, name))
    return rules


def _disallowed(headers, limits: Limits) -> bool:
    token = limits.user_agent_token.strip().lower() if limits.user_agent_token else None
    refused = header_directives(limits.disallowed_header_directives)
    return any((crawler is None or crawler == token) and directive in refused
               for crawler, directive in robots_tag_rules(headers.getlist("X-Robots-Tag")))
