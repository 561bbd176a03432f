"""The shard map of a filtering or scoring stage, written once (datatrove's BaseFilter, NeMo Curator's
ProcessingStage): each input shard is verified against its manifest and read, the stage's `Operator`
judges its samples a batch at a time, every sample is accounted for (kept, dropped with a reason, failed
with an error) in the shard's ledger, and the shard is committed atomically by the task that wrote it;
then sizes.json, the breaker and the manifest. A stage built on it writes only its Operator and its
declaration (stages/score_filter/, stages/balance/).

An operator that must see the whole input before it decides (keep the top 30% by score; cap each concept
at t samples) measures first: pass 1 writes each shard's per-sample values to `work/` with a small summary
that the driver merges into the plan (`selection.json`, kept beside the shards); pass 2 decides with it,
reading the values back instead of measuring twice. The driver holds per-shard summaries only. A resumed
stage measures only the shards without a summary and writes only the missing shards; `work/` is removed
once every shard is committed and the breaker has passed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from pipeline.configtree import build, to_plain
from pipeline.data import samplejson
from pipeline.data.shards import encode_json, read_shard
from pipeline.fsutil import atomic_write_json, atomic_write_parquet, read_json, read_parquet
from pipeline.manifest import Manifest
from pipeline.parallel import Progress, run_missing_shards, run_shard_tasks
from pipeline.runs import StageDir, verify_shard
from pipeline.shardcommit import ShardOutput, settle
from pipeline.stage import Inputs, StageContext
from pipeline.storage import as_path, remove_tree

WORK = "work"                # pass 1's per-shard values and summaries, removed at the end
SELECTION = "selection.json"  # the plan pass 2 decided with (a threshold, per-entry counts)
PLAN_SLACK = 0.02            # a reason the plan sets the share of may exceed it by this much


@dataclass(frozen=True)
class Verdict:
    """One sample's outcome. `score` and `entries` go into its ledger row (pipeline/ledger.py); `fields`
    into its json if it is kept (every sample a stage keeps gets the same keys)."""
    keep: bool
    reason: str | None = None
    score: float | None = None
    entries: list[str] | None = None
    fields: dict = field(default_factory=dict)


class Operator:
    """What a filtering or scoring stage writes: per sample, a value (`measure`) and a verdict (`decide`).
    One instance per task, built from the stage's settings; `open` loads what it needs (a model) once."""
    needs_plan = False
    """True: every shard is measured first and `plan` sees all the summaries before any shard is decided."""

    def __init__(self, cfg: Any, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    def open(self) -> None:
        """Load models or tables, in the task (not on the driver)."""

    def measure(self, samples: list[dict]) -> list[dict]:
        """A json-able value per sample (a score, the entries a caption matches); {"failed": reason,
        "error": text} for a sample that cannot be judged (an unreadable image)."""
        raise NotImplementedError

    def summarize(self, values: list[dict]) -> dict:
        """A shard's share of what the plan needs (a histogram, counts per entry): small and json-able."""
        return {}

    def plan(self, summaries: list[dict]) -> dict:
        """On the driver: the rule for every shard, from every shard's summary (none unless needs_plan)."""
        return {}

    def decide(self, sample: dict, value: dict, plan: dict) -> Verdict:
        raise NotImplementedError

    def planned_drops(self, plan: dict) -> dict[str, float]:
        """Drop reasons whose share of the input the plan sets by design: {reason: expected share}."""
        return {}

    def shard_extra(self, verdicts: list[Verdict]) -> dict:
        """What a shard's stats add for `describe` (e.g. kept samples per entry)."""
        return {}

    def describe(self, plan: dict, shard_stats: list[dict], out: Path) -> dict:
        """The manifest's details: what was decided, and with which plan (a table too large for the
        manifest goes into a file of the stage folder `out`)."""
        return {}


def run_shard_map(operator: type[Operator], cfg: Any, inputs: Inputs, ctx: StageContext) -> Manifest:
    """The driver of a shard-map stage over its main input's shards (the web's data as curated so far)."""
    started = time.time()
    upstream = inputs.first()
    shards = list(upstream.manifest.shards)
    samples_in = sum(s["samples"] for s in shards)
    ctx.out.begin(ctx.fingerprint, {"shards_total": len(shards), "samples_in": samples_in})
    settings = to_plain(cfg)
    job = Job(operator, type(cfg), settings, ctx.seed, ctx.out.stage)
    op = operator(cfg, ctx.seed)
    executor, options = ctx.executor, {"cpus": cfg.cpus_per_task, "retries": 2, "retry_exceptions": True}
    work, name = ctx.out.path / WORK, ctx.out.stage
    todo = {s["shard"] for s in shards} - set(ctx.out.committed_stats([s["shard"] for s in shards]))
    plan: dict = {}
    if op.needs_plan:
        selection = ctx.out.path / SELECTION
        if todo or not selection.is_file():
            measured = {s["shard"]: (job, str(upstream.path / s["shard"]), s, i, str(work))
                        for i, s in enumerate(shards) if not _summary_path(work, i).is_file()}
            run_shard_tasks(executor, executor.task(measure_shard, **options), measured,
                            Progress(f"{name}/measure", len(shards), samples_in), lambda summary: 0)
            plan = op.plan([read_json(_summary_path(work, i)) for i in range(len(shards))])
            atomic_write_json(selection, plan)
        plan = read_json(selection)
    plan_ref = executor.put(plan)   # once, not with each task
    jobs = {s["shard"]: (job, str(upstream.path / s["shard"]), s, i, str(work), plan_ref, str(ctx.out.path),
                         ctx.out.round, ctx.out.writer) for i, s in enumerate(shards)}
    results = run_missing_shards(executor, ctx.out, executor.task(write_shard, **options), jobs,
                                 Progress(f"{name}/write", len(shards), samples_in))
    limits = dict(cfg.drop_share_limits)
    for reason, share in op.planned_drops(plan).items():
        limits[reason] = max(limits.get(reason, cfg.max_drop_share), min(1.0, share + PLAN_SLACK))
    summaries = settle(ctx.out, [results[s["shard"]] for s in shards], cfg.max_drop_share, limits)
    if work.exists():
        remove_tree(work)   # the values: every decision is in the shards and their ledgers now
    return ctx.manifest(settings, summaries, started, op.describe(plan, [results[s["shard"]] for s in shards],
                                                                   ctx.out.path))


def _summary_path(work, index: int):
    return as_path(work) / f"{index:05d}.json"


def _values_path(work, index: int):
    return as_path(work) / f"{index:05d}.parquet"


# --- inside the Ray tasks -------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """What a task needs to build the stage's operator: its class, its settings (plain, rebuilt and checked
    in the task), the run's seed and the stage's name."""
    operator: type[Operator]
    settings_type: type
    settings: dict
    seed: int
    stage: str

    def make(self) -> Operator:
        return self.operator(build(self.settings_type, self.settings, source=f"{self.stage} task"), self.seed)

    def open(self) -> Operator:
        op = self.make()
        op.open()
        return op


def _batches(shard_path: str, size: int) -> Iterator[list[dict]]:
    batch = []
    for sample in read_shard(as_path(shard_path)):
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def measure_shard(job: Job, shard_path: str, expected: dict, index: int, work: str) -> dict:
    """Pass 1: every sample's value into `work/<index>.parquet`, then the shard's summary (its marker)."""
    verify_shard(as_path(shard_path), expected)
    op = job.open()
    keys, values = [], []
    for batch in _batches(shard_path, op.cfg.batch_size):
        keys += [s["__key__"] for s in batch]
        values += op.measure(batch)
    atomic_write_parquet(_values_path(work, index), pa.table({"key": pa.array(keys, pa.string()),
                                                              "value": pa.array([json.dumps(v) for v in values])}))
    summary = op.summarize(values)
    atomic_write_json(_summary_path(work, index), summary)
    return summary


def write_shard(job: Job, shard_path: str, expected: dict, index: int, work: str, plan: dict, out_path: str,
                round_: int, writer: tuple | None) -> dict:
    """Pass 2: decide every sample (with the values of pass 1, or measured here), account, commit."""
    out = StageDir(as_path(out_path), job.stage, round_, writer)   # writer: commit only for a live run
    if (done := out.shard_stats(expected["shard"])) is not None:
        return done
    started = time.time()
    op = job.make()
    verify_shard(as_path(shard_path), expected)
    measured = None
    if op.needs_plan:   # pass 1 measured: its values are read back, the model is not loaded again
        measured = {r["key"]: json.loads(r["value"]) for r in read_parquet(_values_path(work, index)).to_pylist()}
    else:
        op.open()
    output, verdicts = ShardOutput(), []
    for batch in _batches(shard_path, op.cfg.batch_size):
        values = [measured[s["__key__"]] for s in batch] if measured is not None else op.measure(batch)
        for sample, value in zip(batch, values):
            meta = samplejson.parse(sample.get("json"))
            row = {"key": sample["__key__"], "url": meta.get("url"), "source": meta.get("source"),
                   "source_row": meta.get("source_row")}
            if "failed" in value:
                output.failed(row, value["failed"], value.get("error"))
                continue
            verdict = op.decide(sample, value, plan)
            verdicts.append(verdict)
            row |= {"score": verdict.score, "entries": verdict.entries}
            if not verdict.keep:
                output.dropped(row, verdict.reason)
                continue
            output.kept(row, {"__key__": sample["__key__"], "jpg": sample["jpg"], "txt": sample.get("txt", b""),
                              "json": encode_json({**samplejson.stable(meta), **verdict.fields})})
    return output.commit(out, expected["shard"], started, op.shard_extra(verdicts))
