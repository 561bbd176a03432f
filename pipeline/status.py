"""`vlp status`: per stage and round, its state (done, stale, incomplete, pending, rebuilding), shards,
accounting and figures; read from the run directory's manifests and stats files only."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.breaker import describe
from pipeline.config import load_config
from pipeline.fsutil import read_json
from pipeline.graph import registry, upstreams
from pipeline.manifest import Accounting, Manifest
from pipeline.runs import RunDir


def status(run_dir: str | Path) -> list[dict]:
    """Per stage and round: state, shards done/total, the accounting, duration."""
    run = RunDir(run_dir).require()
    cfg = load_config(run.config_path)
    rows = []

    names = [s.name for s in registry()]

    def order(sd) -> tuple:
        return sd.round, names.index(sd.stage) if sd.stage in names else len(names), sd.stage

    dirs = sorted(run.stage_dirs(), key=order)
    manifests = {(sd.stage, sd.round): sd.manifest() for sd in dirs}   # each read once
    states: dict[tuple[str, int], str] = {}
    for sd in dirs:
        manifest = manifests[(sd.stage, sd.round)]
        row = _status_row(sd, manifest)
        if manifest is not None:
            up_keys = upstreams(cfg, sd.stage, sd.round)
            ups = [manifests.get(k) for k in up_keys]
            # stale: built from an upstream result that has changed since, or from one that is stale itself
            if any(up is None for up in ups) or manifest.inputs[:len(ups)] != [up.result_id for up in ups] \
                    or any(states.get(k) == "stale" for k in up_keys):
                row["state"] = "stale"
            states[(sd.stage, sd.round)] = row["state"]
        rows.append(row)
        staged = run.staged(sd.stage, sd.round)
        if staged is not None:   # a rebuild in progress (or stopped) beside the result it will replace
            rows.append(_status_row(staged, staged.manifest()) | {"state": "rebuilding", "rebuild": True})
    return rows


def _status_row(sd, manifest: Manifest | None) -> dict:
    plan = sd.plan() or {}
    acc = Accounting()
    if manifest is not None:
        acc.add(manifest.totals)
        state, done, duration = "done", len(manifest.shards), manifest.duration_s
    else:
        stats = sorted(sd.path.glob("*.stats.json"))
        for path in stats:
            acc.add(read_json(path)["accounting"])
        state, done, duration = ("incomplete" if plan else "pending"), len(stats), None
    row = {"stage": sd.stage, "round": sd.round, "state": state, "shards_done": done,
           "shards_total": plan.get("shards_total", done), "duration_s": duration, **acc.to_json()}
    if manifest is None and plan.get("stopped"):  # the mass-drop breaker (pipeline/breaker.py)
        row["stopped"] = plan["stopped"]
    if manifest is not None:
        for key in ("metrics", "pairs_out", "synthetic_share", "actor_restarts"):
            if key in manifest.details:
                row[key] = manifest.details[key]
    return row


def format_status(rows: list[dict]) -> str:
    from pipeline.benchmarks import describe as describe_benchmark

    header = f"{'round':>5}  {'stage':<10} {'state':<10} {'shards':>9} {'in':>8} {'kept':>8} {'dropped':>8} {'failed':>8} {'time':>8}"
    lines = [header]
    for r in rows:
        t = f"{r['duration_s']:.1f}s" if r["duration_s"] is not None else "-"
        shards = f"{r['shards_done']:>4}/{r['shards_total']:<4}" if r["shards_total"] else f"{'-':>6}   "
        lines.append(f"{r['round']:>5}  {r['stage']:<10} {r['state']:<10} {shards} "
                     f"{r['samples_in']:>8} {r['samples_kept']:>8} {r['samples_dropped']:>8} {r['samples_failed']:>8} {t:>8}")
        if "metrics" in r:
            m = r["metrics"]
            lines.append(f"{'':>17}retrieval on {m['pairs']} held-out pairs (chance R@1 {m['chance_r1']:.3f}): "
                         f"ITC TR@1 {m['itc_tr_r1']:.3f} IR@1 {m['itc_ir_r1']:.3f} TR@5 {m['itc_tr_r5']:.3f} "
                         f"IR@5 {m['itc_ir_r5']:.3f}; top {m['rerank_k']} re-ranked by ITM TR@1 {m['itm_tr_r1']:.3f} "
                         f"IR@1 {m['itm_ir_r1']:.3f}" + (f", by ITM+ITC TR@1 {m['rerank_tr_r1']:.3f} IR@1 "
                                                         f"{m['rerank_ir_r1']:.3f}" if "rerank_tr_r1" in m else ""))
            for name, bench in (m.get("benchmarks") or {}).items():
                lines.append(f"{'':>17}{describe_benchmark(name, bench)}")
        for kind in ("dropped", "failed"):
            reasons = r[f"{kind}_by_reason"]
            if reasons:
                lines.append(f"{'':>17}{kind}: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
        if "stopped" in r:
            lines.append(f"{'':>17}stopped: " + "; ".join(describe(item) for item in r["stopped"]["over"])
                         + f"; to accept: {r['stopped']['resume']}")
    return "\n".join(lines)


def status_json(run_dir: str | Path) -> str:
    from pipeline.toyweb.measures import rounds

    run = RunDir(run_dir)
    return json.dumps({"run_dir": str(run.root), "stages": status(run_dir), "rounds": rounds(run_dir),
                       "superseded": run.superseded()}, indent=2)
