"""The stage graph of a config, from the registry (stages/__init__.py): which (stage, round) run, in
which order, what each reads, and which committed results a config will rebuild."""
from __future__ import annotations

import logging

from pipeline.config import STAGE_ORDER, RunConfig
from pipeline.configtree import to_plain
from pipeline.errors import InputError
from pipeline.runs import RunDir
from pipeline.stage import Stage
import stages

log = logging.getLogger("vlp")


def registry() -> tuple[Stage, ...]:
    return stages.registry()   # the stage modules import Ray and torch: only when a graph is walked


def spec(name: str) -> Stage:
    return stages.stage(name)


def bootstraps(cfg: RunConfig) -> bool:
    """Bootstrapping rounds exist when a stage that runs only in them is among the config's stages."""
    return any(s.rounds == "later" and s.name in cfg.stages for s in registry())


def schedule(cfg: RunConfig, selected: list[str]) -> list[tuple[str, int]]:
    """(stage, round) in the order they run: round 0, then each bootstrapping round."""
    rounds = range(cfg.rounds + 1) if bootstraps(cfg) else range(1)
    return [(s.name, r) for r in rounds for s in registry() if s.name in selected and s.runs_in(r)]


def upstreams(cfg: RunConfig, stage: str, round_: int) -> list[tuple[str, int]]:
    """The committed stages whose output (stage, round) reads."""
    return spec(stage).upstreams(cfg, round_)


def select(cfg: RunConfig, only: list[str] | None) -> list[str]:
    if not only:
        return list(cfg.stages)
    unknown = [s for s in only if s not in STAGE_ORDER]
    if unknown:
        raise InputError(f"--only: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_ORDER)}")
    missing = [s for s in only if s not in cfg.stages]
    if missing:
        raise InputError(f"--only: stage(s) {', '.join(missing)} are not in this config's stages "
                         f"({', '.join(cfg.stages)})")
    return [s for s in cfg.stages if s in only]


def rounds_that_can_run(cfg: RunConfig, run: RunDir, order: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """`--only download,prefilter,pretrain,evaluate` asks for round 0: a bootstrapping round with an
    input that is neither scheduled before it nor committed cannot run, so it and the rounds after it
    are left out (and said). In round 0 a missing input is an error, when the stage is prepared."""
    scheduled: set[tuple[str, int]] = set()
    for stage, round_ in order:
        missing = [u for u in upstreams(cfg, stage, round_) if u not in scheduled and run.stage(*u).manifest() is None]
        if missing and round_ >= 1:
            up, up_round = missing[0]
            log.info("rounds %d..%d left out: %s (round %d) is neither selected nor committed",
                     round_, cfg.rounds, up, up_round)
            return [(s, r) for s, r in order if r < round_]
        scheduled.add((stage, round_))
    return order


def explain_reruns(cfg: RunConfig, run: RunDir, order: list[tuple[str, int]]) -> list[str]:
    """Before anything runs: which committed stages this config will rebuild, and why (the settings that
    differ from the committed result, or an upstream that is rebuilt). Inputs whose content changed
    (a URL list, the seed set) are found, and said, when the stage is prepared."""
    lines, rebuilt = [], set()
    for stage, round_ in order:
        manifest = run.stage(stage, round_).manifest()
        if manifest is None:
            continue
        old, new = _flat(manifest.config), _flat(to_plain(getattr(cfg, stage), output_only=True))
        changed = [f"{stage}.{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
        if spec(stage).seeded and seed_input(cfg) not in manifest.inputs:
            changed.append(f"seed -> {cfg.seed}")
        ups = [f"{s} (round {r})" for s, r in upstreams(cfg, stage, round_) if (s, r) in rebuilt]
        if changed or ups:
            rebuilt.add((stage, round_))
            why = "; ".join(changed + [f"its input {u} is rebuilt" for u in ups])
            lines.append(f"{stage} (round {round_}) will be rebuilt: {why}. Its committed result stays in place "
                         "until the new one commits, then moves to superseded/ (vlp gc removes it)")
    return lines


def seed_input(cfg: RunConfig) -> str:
    """The input fingerprint a seeded stage gets from the run's seed."""
    return f"seed:{cfg.seed}"


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}
