"""Opt-outs a host declares in files of its own: robots.txt and TDMRep's /.well-known/tdmrep.json.

`HostOptOuts.refusal(url)` answers, before an image URL is fetched, whether its host opted out:
  - robots.txt (RFC 9309), parsed by protego and matched for the crawler's product token (a group
    naming it, else `*`) -> "opt_out_robots";
  - tdmrep.json (W3C TDM Reservation Protocol, CG final report 2024): the first rule whose `location`
    matches the URL's path decides; `tdm-reservation: 1` -> "opt_out_tdmrep". (The image response's
    `tdm-reservation` header is checked by fetch.py.)
Each origin's (scheme, host, port) files are fetched once per instance, i.e. once per shard task: the
first thread that needs them fetches, threads asking for the same origin wait for it, other origins do
not wait. robots.txt is fetched first and tdmrep.json only once a URL of the origin passes it.

What each answer means (`counts` tallies them per origin, for the manifest):
  robots.txt
    200                     -> its rules; only the first 500 KiB are parsed (RFC 9309 2.5: a parser
                               may stop there), cut at the last whole line so that no rule is read
                               half-written.                                        robots_fetched
    4xx but 429, a 3xx without Location, too many redirects (RFC 9309 2.3.1.2-3: "unavailable")
                            -> no rules: every URL allowed.                         robots_missing
    5xx (RFC 9309 2.3.1.4: "unreachable": assume complete
    disallow)               -> FetchFailed("robots_unavailable") for every URL of the origin, a
                               transient failure the stage fetches again in a later run. The outcome
                               is kept for the task too: a host whose robots.txt fails is not asked
                               again for each of its URLs, and the RFC's disallow holds meanwhile.
                                                                                     robots_unavailable
    no answer at all (refused, reset, timeout, DNS, TLS) -> the URL fails with that network reason,
                               as fetching it would (a host that is down is named as down).
                                                                                     robots_unreachable
    429, 503                -> the URL goes back in its host's line for the Retry-After (politeness.py),
                               uncached; robots_unavailable after `rate_limit_retries`.
    a body over fetch_text's cap (we never see its first 500 KiB)
                            -> FetchFailed("robots_too_large"): rules we cannot read are a disallow
                               (as for an unreachable file), but not a transient one: fetching it
                               again gives the same answer.                         robots_too_large
    the URL's own host refused by the URL policy (private address, malformed ...)
                            -> that refusal, re-raised: it is what fetching the image would say.
                                                                                     robots_refused
    a redirect of robots.txt to a target the policy refuses
                            -> as "unavailable": the host's rules are the host's to give, and it
                               gave none we may read.                               robots_missing
  tdmrep.json
    200, a JSON array       -> its rules.                                           tdmrep_fetched
    4xx, a redirect loop, a refused redirect -> no reservation.                     tdmrep_missing
    5xx, 429, network errors -> no reservation. The report says "failure to provide access to such a
                               representation implies that the origin server does not implement
                               this protocol"; the image's own header is still checked. tdmrep_unavailable
    not JSON, not an array, over the cap -> no reservation, noted.                  tdmrep_invalid
    rules that are no object or have no string `location` are skipped; a `tdm-reservation` other
    than the integers 0 and 1 is a protocol error the report says to read as unset.  tdmrep_bad_rules

Matching a `location` (TDMRep, "TDM File on the Origin Server", which borrows robots.txt's notation): a
prefix of the URL's path (the query is not part of it, as the report speaks of paths; robots.txt rules
do see it), `*` for any run of characters, a final `$` for the path's end;
case-sensitive; percent-escapes of unreserved characters decoded on both sides, other escapes kept (so
"%2F" is not "/"), and a "$" or "*" that the path itself holds matched by "%24" / "%2A" in a pattern.
"""
from __future__ import annotations

import collections
import json
import re
import string
import threading
from typing import Callable
from urllib.parse import quote, urlsplit

from protego import Protego

from pipeline.data.fetch import FetchFailed

ROBOTS_PARSE_LIMIT = 500 * 1024   # RFC 9309 2.5: a crawler may stop parsing here, not before
# fetch.py's reasons that mean "the server has no such file for us" (RFC 9309's "unavailable"); a 429 is
# not one of them: it says "not now".
# ("http_other" is every other 4xx, and a 3xx without Location.)
MISSING = frozenset({"http_403", "http_404", "http_410", "http_other", "too_many_redirects"})
# The URL policy's refusals of the listed URL itself, and of a redirect's target.
URL_REFUSED = ("url_",)
REDIRECT_REFUSED = ("redirect_",)

_UNSET = object()
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_URI_CHARS = "!#$&'()*+,/:;=?@[]%"   # RFC 3986's reserved characters, and "%" (escapes stay as written)
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


class HostOptOuts:
    """The opt-outs of the hosts one shard task fetches from, each host's files fetched once.

    `fetch_text(url) -> bytes` is the download stage's guarded fetcher (redirects followed and checked,
    body capped, FetchFailed raised). `agent` is the crawler's robots.txt product token ("vlp"), not a
    whole User-Agent line. `robots_txt` / `tdmrep`: each check can be turned off; with both off nothing
    is fetched."""

    def __init__(self, fetch_text: Callable[[str], bytes], agent: str, robots_txt: bool = True,
                 tdmrep: bool = True):
        if not agent or not agent.strip():
            raise ValueError("agent: a robots.txt product token is needed")
        self.fetch_text, self.agent = fetch_text, agent.strip()
        self.robots_txt, self.tdmrep = robots_txt, tdmrep
        self.counts: collections.Counter = collections.Counter()
        self._hosts: dict[tuple, _Host] = {}
        self._lock = threading.Lock()   # guards _hosts and counts; never held while fetching

    def refusal(self, url: str) -> str | None:
        """The opt-out that drops `url` ("opt_out_robots", "opt_out_tdmrep"), or None; raises FetchFailed
        when its host's robots.txt cannot be read (robots_unavailable, robots_too_large) or its host is
        refused by the URL policy (that refusal's reason)."""
        if not (self.robots_txt or self.tdmrep):
            return None
        origin = _origin(url)
        if origin is None:
            return None   # not an http(s) URL with a host: fetch refuses it on its own terms
        host = self._host(origin)
        if self.robots_txt:
            robots = host.once("robots", lambda: self._load_robots(origin))
            if isinstance(robots, FetchFailed):
                # a new exception each time: threads raising one object at once would share its traceback
                raise FetchFailed(robots.reason, str(robots))
            if robots is not None and not robots.can_fetch(url, self.agent):
                return "opt_out_robots"
        if self.tdmrep and tdm_reservation(host.once("tdmrep", lambda: self._load_tdmrep(origin)),
                                           _path(url)) == 1:
            return "opt_out_tdmrep"
        return None

    def _host(self, origin: tuple) -> _Host:
        with self._lock:
            host = self._hosts.get(origin)
            if host is None:
                host = self._hosts[origin] = _Host()
                self.counts["hosts"] += 1
            return host

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _load_robots(self, origin: tuple):
        """The origin's parsed robots.txt, None (no rules), or the FetchFailed every URL of it raises."""
        base = _base(origin)
        try:
            body = self.fetch_text(base + "/robots.txt")
        except FetchFailed as err:
            if err.rate_limited:   # 429/503: not cached; the URL waits in its host's line (politeness.py)
                raise _slow_down(err, f"{base}/robots.txt") from None
            if err.reason in MISSING or err.reason.startswith(REDIRECT_REFUSED):
                self._count("robots_missing")
                return None
            if err.reason.startswith(URL_REFUSED):
                self._count("robots_refused")
                return err
            if err.reason == "body_too_large":
                self._count("robots_too_large")
                return FetchFailed("robots_too_large", f"{base}/robots.txt is over the body cap, so "
                                   f"unread; read as a complete disallow ({err})")
            if not err.reason.startswith("http_"):
                # The host did not answer (refused, reset, timed out, DNS, TLS): its images would fail the
                # same way, so the URL fails with that reason, which says what is wrong (a host down).
                self._count("robots_unreachable")
                return FetchFailed(err.reason, f"{base}/robots.txt (asked before the image): {err}")
            self._count("robots_unavailable")
            return FetchFailed("robots_unavailable", f"{base}/robots.txt unavailable ({err.reason}: {err}); "
                               "RFC 9309 2.3.1.4: assume complete disallow until it can be read")
        if len(body) > ROBOTS_PARSE_LIMIT:
            body = body[:body.rfind(b"\n", 0, ROBOTS_PARSE_LIMIT) + 1]   # whole lines only
        try:
            robots = Protego.parse(body.decode("utf-8-sig", errors="replace"))   # RFC 9309: UTF-8
            # A first query builds protego's lazy caches here, under the origin's lock, so that the
            # threads' queries afterwards only read them.
            robots.can_fetch(base + "/", self.agent)
        except Exception as err:  # noqa: BLE001 (a parser bug must not fail open, nor kill a thread)
            self._count("robots_unavailable")
            return FetchFailed("robots_unavailable", f"{base}/robots.txt unparsable: {type(err).__name__}: {err}")
        self._count("robots_fetched")
        return robots

    def _load_tdmrep(self, origin: tuple) -> list[TdmRule]:
        """The origin's tdmrep.json rules; none when it has no usable file (see the module's table)."""
        try:
            body = self.fetch_text(_base(origin) + "/.well-known/tdmrep.json")
        except FetchFailed as err:
            if err.rate_limited:
                raise _slow_down(err, f"{_base(origin)}/.well-known/tdmrep.json") from None
            if err.reason in MISSING or err.reason.startswith(REDIRECT_REFUSED):
                self._count("tdmrep_missing")
            elif err.reason == "body_too_large":
                self._count("tdmrep_invalid")
            else:
                self._count("tdmrep_unavailable")
            return []
        try:
            rules, bad = parse_tdmrep(body)
        except ValueError:
            self._count("tdmrep_invalid")
            return []
        self._count("tdmrep_fetched")
        if bad:
            self._count("tdmrep_bad_rules", bad)
        return rules


def _slow_down(err: FetchFailed, what: str) -> FetchFailed:
    """A host that asks us to slow down (429, 503) while we read its opt-out files: the URL goes back in
    its host's line for the Retry-After, as an image answer would send it, and the file is asked again
    then (a load that raises is not cached). After `rate_limit_retries` it fails as robots_unavailable."""
    return FetchFailed("robots_unavailable", f"{what}: {err}", rate_limited=True, retry_after=err.retry_after)


class _Host:
    """One origin's files, each loaded at most once: the first caller loads, callers meanwhile wait."""
    __slots__ = ("lock", "robots", "tdmrep")

    def __init__(self):
        self.lock = threading.Lock()
        self.robots = self.tdmrep = _UNSET

    def once(self, name: str, load: Callable):
        value = getattr(self, name)
        if value is _UNSET:
            with self.lock:
                value = getattr(self, name)
                if value is _UNSET:
                    value = load()
                    setattr(self, name, value)
        return value


class TdmRule:
    """One rule of a tdmrep.json: a `location` pattern and its `tdm-reservation` (1, 0, or None where
    the file gave a value the report calls a protocol error: unset)."""
    __slots__ = ("location", "reservation", "policy", "_parts", "_anchored")

    def __init__(self, location: str, reservation: int | None, policy: str | None = None):
        self.location, self.reservation, self.policy = location, reservation, policy
        pattern = location
        if pattern.startswith(("http://", "https://")):   # a full URL where a path belongs: its path
            pattern = urlsplit(pattern).path or "/"
        elif not pattern.startswith(("/", "*")):
            pattern = "/" + pattern
        self._anchored = pattern.endswith("$")   # only a final "$" anchors; another one is a character
        if self._anchored:
            pattern = pattern[:-1]
        self._parts = re.sub(r"\*+", "*", _canonical(pattern, literal="$")).split("*")

    def matches(self, path: str) -> bool:
        """Whether the rule covers `path` (a URL's path as it is written, percent-escapes and all)."""
        path = _canonical(path or "/", literal="$*")
        first, *rest = self._parts
        if not path.startswith(first):
            return False
        if not rest:
            return not self._anchored or len(path) == len(first)
        pos = len(first)
        # The leftmost place of each piece leaves the most room for the next: no backtracking needed.
        for part in rest[:-1]:
            found = path.find(part, pos)
            if found < 0:
                return False
            pos = found + len(part)
        last = rest[-1]
        if self._anchored:
            return len(path) - len(last) >= pos and path.endswith(last)
        return path.find(last, pos) >= 0

    def __repr__(self) -> str:
        return f"TdmRule({self.location!r}, {self.reservation!r})"


def parse_tdmrep(data: bytes) -> tuple[list[TdmRule], int]:
    """(the rules of a tdmrep.json in order, how many entries were malformed: skipped, or kept with an
    unset reservation); raises ValueError for what is no JSON array."""
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"tdmrep.json is not JSON: {err}") from None
    if not isinstance(doc, list):
        raise ValueError(f"tdmrep.json is a JSON {type(doc).__name__}, not an array")
    rules, bad = [], 0
    for entry in doc:
        location = entry.get("location") if isinstance(entry, dict) else None
        if not isinstance(location, str) or not location.strip():
            bad += 1
            continue
        value = entry.get("tdm-reservation")
        reservation = value if type(value) is int and value in (0, 1) else None   # not True/False, "1", 1.0
        if reservation is None:
            bad += 1   # counted, though the rule stays: it still ends the search, as unset
        policy = entry.get("tdm-policy")
        rules.append(TdmRule(location.strip(), reservation, policy if isinstance(policy, str) else None))
    return rules, bad


def tdm_reservation(rules: list[TdmRule], path: str) -> int | None:
    """The `tdm-reservation` for `path`: the first matching rule's ("the most specific match is the
    first in sequence"), None if no rule matches or that rule's value is unset."""
    for rule in rules:
        if rule.matches(path):
            return rule.reservation
    return None


def _canonical(text: str, literal: str = "") -> str:
    """`text` spelled for an octet comparison: what a URI cannot hold (non-ASCII as UTF-8, spaces,
    controls) and the characters in `literal` percent-encoded; escapes of unreserved characters
    decoded, other escapes kept, in upper case."""
    text = quote(text, safe="".join(c for c in _URI_CHARS if c not in literal))

    def unescape(m: re.Match) -> str:
        char = chr(int(m[1], 16))
        return char if char in _UNRESERVED else "%" + m[1].upper()

    return _ESCAPE.sub(unescape, text)


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, the host lower case and IDNA-encoded; None otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return parts.scheme, host.lower(), port or (443 if parts.scheme == "https" else 80)


def _base(origin: tuple[str, str, int]) -> str:
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port == (443 if scheme == "https" else 80) else f":{port}")


def _path(url: str) -> str:
    return urlsplit(url.strip()).path or "/"
