"""The breaker for mass drops (DESIGN.md, "No silent mass drops").

A filtering stage calls `check_drop_shares` after its last shard is committed and before it builds its
manifest. When one drop reason removed more than its limit of the stage's input, the stage stops with
`StageFailed`: the shards stay committed, no manifest means the stage is not done, and the reason is
noted in plan.json for `vlp status`. The limits are not in the fingerprint (`keeps_output`), so a
`vlp resume --set <stage>.max_drop_share=...` finds every shard committed and only writes the manifest.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
from typing import Mapping

from pipeline.errors import StageFailed
from pipeline.fsutil import atomic_write_json
from pipeline.manifest import Accounting
from pipeline.runs import PLAN, StageDir

log = logging.getLogger("vlp")


def check_drop_shares(out: StageDir, shards: list[dict], max_share: float, limits: Mapping[str, float]) -> None:
    """Raise StageFailed if a drop reason removed more than its share of the input of `shards` (their
    summaries or stats, with "accounting"). The stage's config section is named like the stage."""
    totals = Accounting()
    for shard in shards:
        totals.add(shard["accounting"])
    section = out.stage
    unused = sorted(set(limits) - set(totals.dropped))
    if unused:  # a misspelt reason would silently not apply
        log.warning("%s.drop_share_limits names %s, which dropped nothing here (reasons that dropped samples: %s)",
                    section, ", ".join(unused), ", ".join(sorted(totals.dropped)) or "none")
    if totals.samples_in == 0:
        return
    over = []
    for reason, dropped in sorted(totals.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        share, own = dropped / totals.samples_in, reason in limits
        limit = limits[reason] if own else max_share
        if share > limit:
            setting = f"{section}.drop_share_limits.{reason}" if own else f"{section}.max_drop_share"
            over.append({"reason": reason, "dropped": dropped, "samples_in": totals.samples_in,
                         "share": round(share, 4), "limit": limit, "setting": setting})
    if not over:
        return
    command, narrower = _resume_commands(out, over)
    plan = out.plan() or {}
    atomic_write_json(out.path / PLAN, {**plan, "stopped": {"over": over, "resume": command}})
    raise StageFailed(f"{out.stage} (round {out.round}) stopped before committing its manifest: "
                      f"{'; '.join(describe(i) for i in over)}. Its {len(shards)} shards are committed and kept. "
                      f"If the rule is right for this data, continue with `{command}`{narrower}; if not, change "
                      "the rule and resume.")


def describe(item: dict) -> str:
    """'duplicate_near dropped 93.3% (2,648 of 2,838) > prefilter.max_drop_share 0.5'"""
    return (f"{item['reason']} dropped {item['share']:.1%} ({item['dropped']:,} of {item['samples_in']:,}) "
            f"> {item['setting']} {item['limit']:g}")


def _resume_commands(out: StageDir, over: list[dict]) -> tuple[str, str]:
    """The command that accepts the drops (each setting raised just past what it has to allow, to the next
    0.05), and the narrower alternative of per-reason limits where the stage-wide one tripped."""
    raised: dict[str, float] = {}
    for item in over:
        raised[item["setting"]] = max(raised.get(item["setting"], 0.0), _above(item))
    run_dir = shlex.quote(str(out.path.parents[1]))
    resume = _resume_verb()
    command = " ".join([f"{resume} {run_dir}"] + [f"--set {k}={v!r}" for k, v in raised.items()])
    global_ones = [item for item in over if not item["setting"].startswith(f"{out.stage}.drop_share_limits.")]
    narrower = ""
    if global_ones:
        narrower = " (or " + " ".join(f"--set {out.stage}.drop_share_limits.{i['reason']}={_above(i)!r}"
                                      for i in global_ones) + \
            f" to allow only {'this reason' if len(global_ones) == 1 else 'these reasons'})"
    return command, narrower


def _resume_verb() -> str:
    """How the user goes on: inside a Ray job (vlp submit) the resume is submitted too."""
    return "vlp submit --resume" if os.environ.get("VLP_RAY_JOB") else "vlp resume"


def _above(item: dict) -> float:
    """The next multiple of 0.05 strictly above the share (from the exact counts, not the rounded share)."""
    share = item["dropped"] / item["samples_in"]
    limit = (math.floor(share * 20) + 1) / 20
    if limit <= share:  # float rounding at a multiple of 0.05
        limit += 0.05
    return min(1.0, round(limit, 2))


class FailureBreaker:
    """The breaker for mass failures (download): failures are not drops, so without it a download whose
    every URL fails commits and the next stages run on nothing. Fed each shard's stats as it commits;
    `check()` raises StageFailed when one failure reason exceeds `max_share` of the URLs tried (kept +
    failed), once `min_tried` were tried, or at the end (`final`) on whatever was tried."""

    def __init__(self, out: StageDir, max_share: float, min_tried: int):
        self.out, self.max_share, self.min_tried = out, max_share, min_tried
        self.totals, self.shards = Accounting(), []

    def add(self, name: str, stats: dict, judge: bool = True) -> None:
        """Count a committed shard's stats; with `judge`, stop if the failures are now past the share."""
        self.totals.add(stats["accounting"])
        self.shards.append(name)
        if judge:
            self.check()

    def over(self, final: bool = False) -> tuple[str, int, int] | None:
        """(reason, failures, URLs tried) of the worst reason past its share, or None."""
        failed = self.totals.failed
        tried = self.totals.samples_kept + sum(failed.values())
        if not failed or tried == 0 or (tried < self.min_tried and not final):
            return None
        reason, count = max(failed.items(), key=lambda kv: (kv[1], kv[0]))
        return (reason, count, tried) if count / tried > self.max_share else None

    def check(self, final: bool = False) -> None:
        found = self.over(final)
        if found is None:
            return
        reason, count, tried = found
        examples = "; ".join(f"{r['url']} ({r['error']})" for r in self._examples(reason))
        run_dir = shlex.quote(str(self.out.path.parents[1]))
        resume = _resume_verb()
        plan = self.out.plan() or {}
        over = [{"reason": reason, "failed": count, "tried": tried, "share": round(count / tried, 4),
                 "limit": self.max_share, "setting": f"{self.out.stage}.max_failed_share"}]
        atomic_write_json(self.out.path / PLAN, {**plan, "stopped": {"over": over, "resume": f"{resume} {run_dir}"}})
        from pipeline.data.fetch import TRANSIENT

        accept = f"`{resume} {run_dir} --set {self.out.stage}.max_failed_share=" \
                 f"{_above({'dropped': count, 'samples_in': tried}):g}`"
        advice = (f"Once the cause has passed (a server down, a network out), `{resume} {run_dir} --retry-failed` "
                  f"fetches these URLs again; if the failures are expected, {accept}" if reason in TRANSIENT else
                  f"{reason} is not a passing failure: check the list and the settings; if it is expected, {accept}")
        raise StageFailed(
            f"{self.out.stage} stopped: {reason} failed {count / tried:.1%} of the URLs tried ({count:,} of "
            f"{tried:,}) > {self.out.stage}.max_failed_share {self.max_share:g}. Examples: {examples}. "
            f"Its {len(self.shards)} finished shards are committed and kept. {advice}.")

    def _examples(self, reason: str, n: int = 3) -> list[dict]:
        from pipeline.ledger import read_ledger

        found: list[dict] = []
        for name in self.shards:   # a few ledgers at most: the first shards holding the reason
            for record in read_ledger(self.out.ledger_path(name)):
                if record["outcome"] == "failed" and record["reason"] == reason:
                    found.append(record)
                    if len(found) == n:
                        return found
        return found
