"""Politeness towards the hosts a shard task fetches from: per-host concurrency, rate, and backoff.

A shard task's threads take their next URL from a `HostQueue` rather than in list order. The queue
hands out a URL only when its host has a free connection (`per_host_connections`) and its next start
time has come (`per_host_rate`, a request every 1/rate seconds); a host that answered 429 or 503 is
paused for its Retry-After (or 1, 2, 4 ... seconds without one), and the URL goes back to the front of
its host's queue. A host that said so also gets fewer connections at once: its cap halves on each such
answer and grows back by about one per round of answers without one (additive increase, multiplicative
decrease, as TCP does), so the burst that ends a pause does not run into the same limit again and spend
the URLs' tries. Threads meanwhile take URLs of other hosts, so one slow or rate-limited host does
not hold the whole task. A URL's deadline covers its own requests, not its wait in the queue.

The limits are per task: a host sees at most (limit x shard tasks running at once). A list shuffled
across shards (LAION's are) spreads each host's URLs over the tasks; set the limits with that in mind.
Hosts are URL host names as written (lower case); redirects are followed within the URL's slot.
"""
from __future__ import annotations

import collections
import email.utils
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

RATE_LIMITED = (429, 503)


def host_of(url: str | None) -> str:
    try:
        return (urlsplit((url or "").strip()).hostname or "").lower()
    except ValueError:
        return ""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), or None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Politeness:
    connections: int | None = None       # requests in flight per host; None: no cap
    rate: float | None = None            # request starts per second per host; None: no limit
    host_rates: dict = field(default_factory=dict)   # host -> rate, overriding `rate`
    rate_limit_retries: int = 3          # tries after a 429/503 answer
    max_retry_after: float = 120.0       # a longer Retry-After fails the URL at once
    backoff: float = 1.0                 # first wait after a 429/503 without Retry-After; doubles

    def rate_for(self, host: str) -> float | None:
        return self.host_rates.get(host, self.rate)


class _Host:
    __slots__ = ("queue", "active", "next_start", "cap", "slowed_until")

    def __init__(self):
        self.queue: collections.deque = collections.deque()
        self.active = 0
        self.next_start = 0.0
        self.cap: float | None = None   # connections allowed after a 429/503 (None: the configured limit)
        self.slowed_until = 0.0         # end of the pause the last 429/503 asked for

    def full(self, connections: int | None) -> bool:
        limit = connections if self.cap is None else int(self.cap)
        return bool(limit) and self.active >= limit


class HostQueue:
    """The URLs of one shard task, handed out host by host within the politeness limits."""

    def __init__(self, rows: list[dict], rules: Politeness, clock=time.monotonic):
        self.rules, self.clock = rules, clock
        self.hosts: dict[str, _Host] = {}
        for row in rows:
            self.hosts.setdefault(host_of(row["url"]), _Host()).queue.append(row)
        self.order = collections.deque(self.hosts)   # round robin over hosts with work
        self.pending = len(rows)                     # rows not finished (queued or in flight)
        self.cond = threading.Condition()
        self.counts = collections.Counter()          # rate_limited answers, backoff seconds

    def take(self) -> dict | None:
        """The next row a thread may fetch now (waiting while every host with work is busy or paused),
        or None when no row is left."""
        with self.cond:
            while True:
                if self.pending == 0:
                    self.cond.notify_all()
                    return None
                now, soonest = self.clock(), None
                for _ in range(len(self.order)):
                    name = self.order[0]
                    self.order.rotate(-1)
                    host = self.hosts[name]
                    if not host.queue or host.full(self.rules.connections):
                        continue
                    if host.next_start > now:
                        soonest = host.next_start if soonest is None else min(soonest, host.next_start)
                        continue
                    rate = self.rules.rate_for(name)
                    host.active += 1
                    host.next_start = max(now, host.next_start) + (1.0 / rate if rate else 0.0)
                    return host.queue.popleft()
                self.cond.wait(timeout=None if soonest is None else max(soonest - now, 0.001))

    def finish(self, row: dict) -> None:
        """The row is done (fetched, or failed for good)."""
        with self.cond:
            host = self.hosts[host_of(row["url"])]
            host.active -= 1
            if host.cap is not None:   # an answer that was not "slow down": one more connection per round
                host.cap += 1.0 / host.cap
                if self.rules.connections and host.cap >= self.rules.connections:
                    host.cap = None
            self.pending -= 1
            self.cond.notify_all()

    def rate_limited(self, row: dict, retry_after: float | None) -> float | None:
        """The host answered 429/503 for `row`: pause the host and queue the row again first in line.
        Returns the pause, or None when the row has no tries left or asks too long a wait (then the
        caller fails it and calls `finish`)."""
        tries = row.get("_rate_limited", 0)
        wait = retry_after if retry_after is not None else self.rules.backoff * 2 ** tries
        with self.cond:
            self.counts["rate_limited_answers"] += 1
            if tries >= self.rules.rate_limit_retries or wait > self.rules.max_retry_after:
                return None
            row["_rate_limited"] = tries + 1
            host = self.hosts[host_of(row["url"])]
            now = self.clock()
            if now >= host.slowed_until:   # once per pause: the other answers of the same burst say the same
                host.cap = max(1.0, min(host.active if host.cap is None else host.cap, host.active) / 2)
                host.slowed_until = now + wait
            host.active -= 1
            host.next_start = max(host.next_start, now + wait)
            host.queue.appendleft(row)
            self.counts["backoff_s"] += wait
            self.cond.notify_all()
            return wait
