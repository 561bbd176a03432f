"""Fetching one image URL with bounded work and no way into the cluster's own network.

img2dataset's fetcher (urllib's urlopen) follows redirects anywhere, connects wherever a second DNS
lookup points, reads bodies whole with no size cap, has only a per-read timeout, and decodes an image
before checking its size. This fetcher keeps img2dataset's resizer and its X-Robots-Tag rules and does
the network part itself:
  - every hop's host is resolved and every address checked (urlpolicy.HostPolicy.pin), and the
    connection goes to the checked address (TLS still verifies the certificate against the name);
  - redirects (301/302/303/307/308) are followed here, at most `max_redirects` hops, each checked the
    same way; a non-http(s) target is refused;
  - a body is capped at `max_bytes` (Content-Length, then while streaming), and the whole URL
    (redirects, retries, a body dripping in) has one wall-clock `deadline`;
  - a 429 or 503 answer is not retried here: it raises at once with the Retry-After it gave, and the
    shard task pauses that host (politeness.py);
  - the image's dimensions are read from its header (PIL opens lazily) before anything decodes it:
    an image over `max_image_area` is refused undecoded (a 140 KB PNG can claim 12000 x 12000 pixels).
Failures raise FetchFailed with the reason the download stage counts.
"""
from __future__ import annotations

import http.client
import io
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from PIL import Image

from pipeline.data.politeness import RATE_LIMITED, parse_retry_after
from pipeline.data.urlpolicy import HostPolicy, Refused, Resolver, system_resolver

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
TRANSIENT = ("timeout", "deadline_exceeded", "connection_refused", "connection_reset", "truncated", "http_5xx",
             "http_429", "dns_error", "connection_error")
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


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
    max_bytes: int            # body size cap
    max_redirects: int
    max_image_area: float     # width x height, read from the header
    retries: int = 0          # extra tries after a transient failure, within the deadline
    user_agent_token: str | None = None
    disallowed_header_directives: frozenset[str] = frozenset()


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a host name, connected to an address chosen (and checked) beforehand."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS likewise: TCP to the checked address, TLS (SNI and certificate check) for the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


_TLS = threading.local()


def _tls_context() -> ssl.SSLContext:
    if not hasattr(_TLS, "context"):
        _TLS.context = ssl.create_default_context()
    return _TLS.context


def fetch(url: str, policy: HostPolicy, limits: Limits, resolver: Resolver = system_resolver,
          tls: ssl.SSLContext | None = None) -> bytes:
    """The body of `url` (redirects followed), within `limits`; raises FetchFailed. `tls`: the context
    that verifies servers (default: the system's CAs)."""
    deadline = time.monotonic() + limits.deadline
    for attempt in range(limits.retries + 1):
        try:
            return _fetch_once(url, policy, limits, resolver, deadline, tls or _tls_context())
        except FetchFailed as err:
            # A host asking to slow down is not asked again at once: the caller backs off (politeness.py).
            if err.rate_limited or err.reason not in TRANSIENT or attempt == limits.retries \
                    or time.monotonic() >= deadline:
                raise
    raise AssertionError("unreachable")


def _fetch_once(url: str, policy: HostPolicy, limits: Limits, resolver: Resolver, deadline: float,
                tls: ssl.SSLContext) -> bytes:
    for hop in range(limits.max_redirects + 1):
        try:
            host, port, address = policy.pin(url, resolver, redirect=hop > 0)
        except Refused as err:
            raise FetchFailed(err.reason, f"{url}: {err}") from None
        parts = urlsplit(url.strip())
        timeout = _remaining(deadline, limits.timeout)
        conn = (_PinnedHTTPS(host, port, address, timeout, tls) if parts.scheme == "https"
                else _PinnedHTTP(host, port, address, timeout))
        watchdog = _Watchdog(conn, deadline)
        try:
            conn.request("GET", _request_target(parts), headers={"User-Agent": _user_agent(limits), "Accept": "image/*,*/*;q=0.5"})
            response = conn.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchFailed("http_other", f"HTTP {response.status} without a Location")
                url = urljoin(url, location.strip())
                continue
            if response.status in RATE_LIMITED:
                raise FetchFailed(_http_reason(response.status), f"HTTP Error {response.status}: {response.reason}",
                                  rate_limited=True, retry_after=parse_retry_after(response.getheader("Retry-After")))
            if response.status != 200:
                raise FetchFailed(_http_reason(response.status), f"HTTP Error {response.status}: {response.reason}")
            if limits.disallowed_header_directives and _disallowed(response, limits):
                raise FetchFailed("opt_out", "use of the image disallowed by an X-Robots-Tag directive")
            body = _read_body(conn, response, limits, deadline)
            watchdog.check()
            return body
        except FetchFailed:
            watchdog.check()
            raise
        except Exception as err:  # noqa: BLE001 (sockets, TLS and http.client raise many kinds)
            watchdog.check()
            raise FetchFailed(_network_reason(err, deadline), f"{type(err).__name__}: {err}") from None
        finally:
            watchdog.cancel()
            conn.close()
    raise FetchFailed("too_many_redirects", f"more than {limits.max_redirects} redirects")


class _Watchdog:
    """Shuts the connection's socket down at the URL's deadline. Socket timeouts bound each read, not a
    server that sends one byte every few seconds (headers or body): this bounds the whole exchange."""

    def __init__(self, conn: http.client.HTTPConnection, deadline: float):
        self.conn, self.fired = conn, False
        self.timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self) -> None:
        if self.fired:
            raise FetchFailed("deadline_exceeded", "the URL's deadline passed")

    def cancel(self) -> None:
        self.timer.cancel()


def _network_reason(err: Exception, deadline: float) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        # near the deadline a read's timeout is the time left: then the deadline is what ran out
        return "deadline_exceeded" if time.monotonic() >= deadline - 0.05 else "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(err, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return "connection_reset"
    if isinstance(err, http.client.IncompleteRead):
        return "truncated"
    if isinstance(err, ssl.SSLError):
        return "tls_error"
    return "connection_error"


def _read_body(conn, response, limits: Limits, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    length = int(declared) if declared and declared.strip().isdigit() else None
    if length is not None and length > limits.max_bytes:
        raise FetchFailed("body_too_large", f"Content-Length {length} > max_bytes {limits.max_bytes}")
    body = bytearray()
    while True:
        conn.sock.settimeout(_remaining(deadline, limits.timeout))
        chunk = response.read1(CHUNK)  # one recv: the deadline is checked between them
        if not chunk:
            break
        body += chunk
        if len(body) > limits.max_bytes:
            raise FetchFailed("body_too_large", f"body over max_bytes {limits.max_bytes}")
    if length is not None and len(body) < length:
        raise FetchFailed("truncated", f"IncompleteRead({len(body)} bytes read, {length - len(body)} more expected)")
    return bytes(body)


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


def _disallowed(response, limits: Limits) -> bool:
    from img2dataset.downloader import is_disallowed  # img2dataset's reading of X-Robots-Tag

    token = limits.user_agent_token.strip().lower() if limits.user_agent_token else None
    return is_disallowed(response.headers, token, limits.disallowed_header_directives)


def image_size(data: bytes, max_image_area: float) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels; raises FetchFailed for what
    is no image PIL can read, or one over `max_image_area` (the decoder would need that many pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError as err:
        raise FetchFailed("image_too_large", str(err)) from None
    except Exception as err:  # noqa: BLE001 (PIL raises many kinds for bytes that are not an image)
        raise FetchFailed("decode_error", f"Image decoding error: {type(err).__name__}: {err}") from None
    if width * height > max_image_area:
        raise FetchFailed("image_too_large", f"{width} x {height} pixels > max_image_area {max_image_area:.0f}")
    return width, height
