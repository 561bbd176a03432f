"""What a stage commits: its accounting and its manifest, read and written here only."""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.runs import StageDir


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlp")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Accounting:
    """Where every sample that went in ended up. `samples_in` always equals kept + dropped + failed."""
    samples_in: int = 0
    samples_kept: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    failed: collections.Counter = field(default_factory=collections.Counter)

    def add(self, other: "Accounting | dict") -> None:
        if isinstance(other, dict):
            other = Accounting.from_json(other)
        self.samples_in += other.samples_in
        self.samples_kept += other.samples_kept
        self.dropped.update(other.dropped)
        self.failed.update(other.failed)

    @property
    def samples_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def samples_failed(self) -> int:
        return sum(self.failed.values())

    def check(self, where: str) -> None:
        total = self.samples_kept + sum(self.dropped.values()) + sum(self.failed.values())
        if total != self.samples_in:
            raise AssertionError(f"{where}: {self.samples_in} samples in, but kept + dropped + failed = {total}")

    def to_json(self) -> dict:
        return {"samples_in": self.samples_in, "samples_kept": self.samples_kept,
                "samples_dropped": sum(self.dropped.values()), "samples_failed": sum(self.failed.values()),
                "dropped_by_reason": dict(sorted(self.dropped.items())),
                "failed_by_reason": dict(sorted(self.failed.items()))}

    @classmethod
    def from_json(cls, d: dict) -> "Accounting":
        return cls(d["samples_in"], d["samples_kept"], collections.Counter(d.get("dropped_by_reason", {})),
                   collections.Counter(d.get("failed_by_reason", {})))


_MANIFEST_FIELDS = ("stage", "round", "fingerprint", "config", "inputs", "code_version", "shards", "totals",
                    "started", "finished", "duration_s")


@dataclass
class Manifest:
    """A stage's committed result (`manifest.json`, written last). `shards` are the summaries of
    `shard_summary`; `details` what the stage adds (its exported model, metrics, ...), kept at the
    top level of the JSON file."""
    stage: str
    round: int
    fingerprint: str
    config: Any
    inputs: list[str]
    shards: list[dict]
    totals: Accounting
    started: float
    finished: float
    duration_s: float
    code_version: str = field(default_factory=code_version)
    details: dict = field(default_factory=dict)

    @property
    def result_id(self) -> str:
        """What a downstream stage's fingerprint takes from this result: its fingerprint, and the pass of
        `vlp resume --retry-failed` that last changed it (the same config, fetched again, is new data)."""
        n = self.details.get("retry_pass", 0)
        return self.fingerprint if not n else f"{self.fingerprint}+retry-{n}"

    def to_json(self) -> dict:
        plain = {k: getattr(self, k) for k in _MANIFEST_FIELDS}
        return plain | {"totals": self.totals.to_json()} | self.details

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        known = {k: data[k] for k in _MANIFEST_FIELDS if k in data}
        known["totals"] = Accounting.from_json(data["totals"])
        return cls(**known, details={k: v for k, v in data.items() if k not in _MANIFEST_FIELDS})

    @classmethod
    def build(cls, out: StageDir, fp: str, config: Any, inputs: list[str], shards: list[dict], started: float,
              details: dict | None = None, totals: Accounting | None = None) -> "Manifest":
        """The manifest of `out`; totals are the sum over shards unless given (stages without shards).
        Fails if the totals do not add up."""
        if totals is None:
            totals = Accounting()
            for shard in shards:
                totals.add(shard["accounting"])
        totals.check(f"{out.stage} (round {out.round})")
        finished = time.time()
        return cls(out.stage, out.round, fp, config, list(inputs), shards, totals, started, finished,
                   round(finished - started, 3), details=dict(details or {}))


def shard_summary(stats: dict) -> dict:
    """What a manifest keeps of a shard's stats (the per-sample rejects stay in the stats file)."""
    return {k: stats[k] for k in ("shard", "samples", "sha256", "bytes", "accounting")}
