"""How every stage that writes the web's shards (download, prefilter, the shard map's operators, CapFilt)
commits them: a task builds one shard's `ShardOutput` (every sample in is kept, dropped with a reason or
failed with an error: one count and one ledger row each) and commits it atomically; once every shard is
committed the driver `settle`s the stage (sizes.json, then the breaker, before any manifest)."""
from __future__ import annotations

import threading

from pipeline.breaker import check_drop_shares
from pipeline.manifest import Accounting, shard_summary
from pipeline.runs import StageDir


class ShardOutput:
    """One shard's samples out, its accounting and its ledger rows, as its task builds them."""

    def __init__(self) -> None:
        self.acc, self.samples, self.records = Accounting(), [], []
        # a task may count from two threads (CapFilt: decode failures in its prefetch thread)
        self._lock = threading.Lock()

    def kept(self, row: dict, *samples: dict) -> None:
        """`row`: the ledger's fields (key, url, ...); `samples`: what the sample becomes in the shard (CapFilt
        writes one per kept text)."""
        with self._lock:
            self.acc.samples_in += 1
            self.acc.samples_kept += 1
            self.records.append({**row, "outcome": "kept"})
            self.samples.extend(samples)

    def dropped(self, row: dict, reason: str, error: str | None = None) -> None:
        with self._lock:
            self.acc.samples_in += 1
            self.acc.dropped[reason] += 1
            self.records.append({**row, "outcome": "dropped", "reason": reason, "error": error})

    def failed(self, row: dict, reason: str, error: str | None = None) -> None:
        with self._lock:
            self.acc.samples_in += 1
            self.acc.failed[reason] += 1
            self.records.append({**row, "outcome": "failed", "reason": reason, "error": error})

    def commit(self, out: StageDir, name: str, started: float, extra: dict | None = None) -> dict:
        """The shard, its ledger (in key order: the same bytes whatever order a task's threads judged the
        samples in) and its stats, atomically (StageDir.commit_shard); returns the stats."""
        records = sorted(self.records, key=lambda r: r["key"])
        return out.commit_shard(name, self.samples, self.acc, records, started, extra)


def settle(out: StageDir, stats: list[dict], max_drop_share: float, limits: dict[str, float]) -> list[dict]:
    """Every shard of the stage is committed (`stats` in shard order): sizes.json, then the breaker (a mass
    drop stops the stage here, before its manifest). Returns the manifest's shard summaries."""
    summaries = [shard_summary(s) for s in stats]
    out.write_sizes(summaries)
    check_drop_shares(out, summaries, max_drop_share, limits)
    return summaries
