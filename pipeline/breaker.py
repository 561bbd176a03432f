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
    resume = "vlp submit --resume" if os.environ.get("VLP_RAY_JOB") else "vlp resume"
    command = " ".join([f"{resume} {run_dir}"] + [f"--set {k}={v!r}" for k, v in raised.items()])
    global_ones = [item for item in over if not item["setting"].startswith(f"{out.stage}.drop_share_limits.")]
    narrower = ""
    if global_ones:
        narrower = " (or " + " ".join(f"--set {out.stage}.drop_share_limits.{i['reason']}={_above(i)!r}"
                                      for i in global_ones) + \
            f" to allow only {'this reason' if len(global_ones) == 1 else 'these reasons'})"
    return command, narrower


def _above(item: dict) -> float:
    """The next multiple of 0.05 strictly above the share (from the exact counts, not the rounded share)."""
    share = item["dropped"] / item["samples_in"]
    limit = (math.floor(share * 20) + 1) / 20
    if limit <= share:  # float rounding at a multiple of 0.05
        limit += 0.05
    return min(1.0, round(limit, 2))
