"""`vlp plan`: the stage graph of a config, each stage's Ray resource request, shard and sample counts,
and a check that a cluster can satisfy every request (Ray would otherwise wait forever on an
infeasible one, e.g. GPU workers on a CPU-only cluster).

A request is a list of bundles that must be granted at once (`gang`: Ray Train's workers) or one by
one (shard tasks, actors). It fits if every bundle fits on some node and, for a gang, the sum fits the
cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.executor import RAY, Executor
from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.storage import as_path
from pipeline.graph import schedule, spec


@dataclass(frozen=True)
class Step:
    stage: str
    round: int
    bundle: dict[str, float]      # resources of one task / actor / worker
    count: int                    # how many such bundles the stage uses (at most at once, for a gang)
    gang: bool                    # all `count` bundles needed together
    shards: int | None
    samples: str                  # expected sample counts, in words


def plan(cfg: RunConfig, count_urls: bool = True) -> list[Step]:
    """The steps of `cfg`, each stage's request as its module declares it. Without `count_urls`, URL
    lists are not read (the resource check before a run needs only the requests; the runner has read the
    lists already), so counts stay unknown."""
    urls = cfg.data.toyweb.num_urls if cfg.data.toyweb else (_count_urls(cfg) if count_urls else None)
    steps = []
    for stage, round_ in schedule(cfg, list(cfg.stages)):
        r = spec(stage).request(cfg, urls)
        steps.append(Step(stage, round_, r.bundle, r.count, r.gang, r.shards, r.samples))
    return steps


def _count_urls(cfg: RunConfig) -> int | None:
    """URLs in the lists (a parquet file's metadata, else one streamed pass), or None if some list is not
    on this machine (a cluster's config checked from a laptop): the counts are then unknown."""
    from pipeline.data.urllists import count_rows

    if missing_lists(cfg):
        return None
    return sum(count_rows(spec) for spec in cfg.data.inputs)


def missing_lists(cfg: RunConfig) -> list[str]:
    return [spec.path for spec in cfg.data.inputs if not as_path(spec.path).is_file()]


def format_plan(cfg: RunConfig, steps: list[Step]) -> str:
    lines = [f"run {cfg.name}: {len(steps)} stage runs, {cfg.rounds} bootstrapping round(s)",
             f"{'round':>5}  {'stage':<10} {'request':<34} {'shards':>6}  expected"]
    for s in steps:
        res = ", ".join(f"{k} {v:g}" for k, v in s.bundle.items())
        what = f"{s.count} x {{{res}}}" + (" together" if s.gang else "")
        lines.append(f"{s.round:>5}  {s.stage:<10} {what:<34} {s.shards if s.shards else '-':>6}  {s.samples}")
    return "\n".join(lines)


def unsatisfiable(steps: list[Step], nodes: list[dict[str, float]]) -> list[str]:
    """Why each request that cannot be granted on these nodes (resources per node) cannot."""
    total: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            total[k] = total.get(k, 0.0) + v
    problems = []
    for s in steps:
        if not any(all(node.get(k, 0.0) >= v for k, v in s.bundle.items()) for node in nodes):
            problems.append(f"{s.stage} (round {s.round}): no node has {s.bundle} "
                            f"(largest: {max(nodes, key=lambda n: n.get('CPU', 0)) if nodes else 'no nodes'})")
        elif s.gang:
            short = {k: v * s.count for k, v in s.bundle.items() if v * s.count > total.get(k, 0.0)}
            if short:
                problems.append(f"{s.stage} (round {s.round}): needs {s.count} x {s.bundle} at once, the cluster has "
                                + ", ".join(f"{k} {total.get(k, 0.0):g}" for k in short))
    return problems


def check_connected(steps: list[Step], executor: Executor = RAY) -> None:
    """Fail early if the cluster this process is connected to cannot satisfy a request."""
    problems = unsatisfiable(steps, executor.nodes())
    if problems:
        raise InputError("the Ray cluster cannot satisfy these resource requests (Ray would wait forever):\n  "
                         + "\n  ".join(problems))


def check_cluster(steps: list[Step], address: str) -> None:
    with RAY.connected(address):
        check_connected(steps, RAY)
