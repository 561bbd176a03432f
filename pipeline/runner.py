"""Runs the stage graph on Ray: fingerprints each stage, skips committed work, runs the rest.

The stages, their rounds, inputs and order come from the registry (stages/__init__.py, walked by
pipeline/graph.py); nothing here knows a stage by name. A stage whose manifest carries the fingerprint
we compute now is done and skipped; inside a stage, committed shards are skipped. So `vlp resume` is
just running the graph again with the run's saved config.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

from pipeline import storage
from pipeline.config import RunConfig, UrlListConfig, dump_config
from pipeline.configtree import to_plain
from pipeline.errors import InputError, StageFailed
from pipeline.executor import RAY, Executor
from pipeline.faults import crash_point
from pipeline.fsutil import atomic_write_bytes
from pipeline.graph import explain_reruns, rounds_that_can_run, schedule, seed_input, select, spec
from pipeline.manifest import Manifest
from pipeline.runlock import RunLock
from pipeline.runs import RunDir, fingerprint
from pipeline.sources import Sources
from pipeline.stage import Inputs, StageContext, Upstream

log = logging.getLogger("vlp")


def default_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir or Path("runs") / cfg.name)


def execute(cfg: RunConfig, run_dir: str | Path, only: list[str] | None = None, retry_failed: bool = False,
            executor: Executor = RAY) -> RunDir:
    """Run the stages of `cfg` (or just `only`) into `run_dir`, round by round; returns the run directory.
    `retry_failed`: stages that can (Stage.retryable) try their transiently failed samples again, keeping
    every other outcome; the stages after them then rebuild. `executor`: where the stages' work runs
    (pipeline/executor.py): Ray, started or joined when a stage has work; or this process (`vlp train` under
    a launcher, whose processes train instead of Ray Train's)."""
    run = RunDir(run_dir)
    selected = select(cfg, only)
    # One writer per run directory (pipeline/runlock.py), taken before anything in it changes: a second
    # run refused here leaves config.yaml as the first one wrote it.
    try:
        storage.make_dir(run.root)
        lock = RunLock(run.root).acquire()
    except OSError as err:
        raise InputError(f"run directory {run.root}: cannot write to it ({err.strerror or err})") from None
    run.writer = (str(run.root), lock.token)   # its shard tasks commit only while this run holds the lock
    try:
        return _execute(cfg, run, selected, retry_failed, executor)
    finally:
        lock.release()


def _execute(cfg: RunConfig, run: RunDir, selected: list[str], retry_failed: bool = False,
             executor: Executor = RAY) -> RunDir:
    from pipeline.report import AFTER_ROUNDS   # imported when a run starts: the report reads the status

    for finished in run.recover():   # a kill between a new result's commit and its move into place
        log.info("%s: finished putting its new result in place (the old one is in superseded/)", finished)
    order = rounds_that_can_run(cfg, run, schedule(cfg, selected))
    for line in explain_reruns(cfg, run, order):
        log.warning("%s", line)
    atomic_write_bytes(run.config_path, dump_config(cfg).encode())
    run.select(selected)
    log.info("run directory %s; stages %s; %d bootstrapping round(s)", run.root, ", ".join(selected), cfg.rounds)
    sources = _sources(cfg, run)
    with contextlib.ExitStack() as stack:
        from pipeline.tracking import pipeline_tracker, settings, stage_figures

        tracker = pipeline_tracker(cfg, run.root)
        if tracker is not None:
            stack.callback(tracker.close)
        tracking = settings(cfg, run.root)   # after the tracker: it holds the pipeline run's ids
        started = False
        for stage, round_ in order:
            job = prepare_stage(cfg, sources, stage, round_, retry_failed, tracking, executor)
            if job is None:
                if tracker is not None:   # committed before: its figures still belong to this run's record
                    tracker.metrics(stage_figures(stage, run.stage(stage, round_).manifest()), step=round_)
                continue
            # Start the toy web and Ray only when there is work: a committed run needs neither.
            if spec(stage).fetches and cfg.data.toyweb is not None:
                from pipeline.toyweb.service import serve_toy_web

                # a local run's web outlives a killed driver until the run's lock is free (no false failures)
                stack.enter_context(serve_toy_web(cfg.data.toyweb, sources.toyweb["port"],
                                                  None if storage.is_remote(run.root) else run.root))
            if not started:
                stack.enter_context(executor.session(cfg.ray))
                started = True
                from pipeline.plan import check_connected, plan

                check_connected([s for s in plan(cfg, count_urls=False) if s.stage in selected], executor)
            done = job()
            _commit(done)
            if tracker is not None:
                tracker.metrics(stage_figures(stage, done[1]), step=round_)
        for name, step in AFTER_ROUNDS.items():
            if name in selected:
                log.info("%s: %s", name, step(run.root))
                if tracker is not None and (run.root / name).is_dir():
                    tracker.artifact(run.root / name)
    return run


def _sources(cfg: RunConfig, run: RunDir) -> Sources:
    lists, toyweb = list(cfg.data.inputs), None
    if cfg.data.toyweb is not None:
        from pipeline.toyweb.service import prepare_toy_web

        toyweb = prepare_toy_web(cfg.data.toyweb, run)
        lists = [UrlListConfig(**s) for s in toyweb["inputs"]] + lists
    return Sources(cfg, run, tuple(lists), toyweb)


def prepare_stage(cfg: RunConfig, sources: Sources, stage: str, round_: int, retry_failed: bool = False,
                  tracking: dict | None = None, executor: Executor = RAY) -> Callable[[], tuple] | None:
    """Check a stage's inputs (before Ray starts) and return a thunk that runs it, or None if done."""
    run, stage_spec = sources.run, spec(stage)
    ups = []
    for up_stage, up_round in stage_spec.upstreams(cfg, round_):
        up_dir = run.stage(up_stage, up_round)
        manifest = up_dir.manifest()
        if manifest is None:
            raise InputError(f"{stage} (round {round_}) needs the output of {up_stage} (round {up_round}), which "
                             f"is not committed in {run.root}: run it first")
        ups.append(Upstream(up_dir, manifest))
    extras = stage_spec.extra_inputs(cfg, round_, sources, tuple(ups))
    inputs = [up.manifest.result_id for up in ups] + [fp for extra in extras.values() for fp in extra.fingerprints]
    if stage_spec.seeded:   # its output depends on the run's seed: a new seed is a new result
        inputs.append(seed_input(cfg))
    stage_cfg = getattr(cfg, stage)
    # Settings marked `keeps_output` (e.g. max_drop_share) stay out: changing them keeps committed work.
    fp = fingerprint(stage, to_plain(stage_cfg, output_only=True), inputs)
    current = run.stage(stage, round_)
    if retry_failed and stage_spec.retryable is not None and current.fingerprint() == fp:
        _reopen_for_retry(current, stage_spec.retryable)
    done = current.manifest()
    if done is not None and done.fingerprint == fp:
        log.info("%s (round %d): already committed (fingerprint %s), skipped", stage, round_, fp)
        return None
    for up in ups:   # it will run: are its inputs what their stages committed?
        _check_shard_files(up)
    # A changed result is built beside the old one, which stays complete until the new one commits.
    ctx = StageContext(run=run, out=run.build_dir(stage, round_, fp), fingerprint=fp,
                       input_fingerprints=tuple(inputs), seed=cfg.seed, tracking=tracking, executor=executor)
    given = Inputs(tuple(ups), {name: extra.value for name, extra in extras.items()})

    def job() -> tuple[StageContext, Manifest]:
        log.info("%s (round %d): running (fingerprint %s)", stage, round_, fp)
        manifest = stage_spec.run(stage_cfg, given, ctx)
        if stage_spec.conserves:   # a filtering stage: every sample its input kept came in
            _check_conservation(stage, round_, ups[0].manifest, manifest)
        return ctx, manifest
    return job


def _reopen_for_retry(current, retryable: Callable[[Manifest], int]) -> None:
    done = current.manifest()
    failed = retryable(done) if done is not None else None
    if failed == 0:
        log.info("%s (round %d): no transiently failed samples to fetch again", current.stage, current.round)
        return
    n = current.start_retry_pass()
    what = f"{failed} transiently failed samples" if failed is not None else "the transient failures of its committed shards"
    log.info("%s (round %d): retry pass %d: trying %s again; kept samples stay", current.stage, current.round, n, what)


def _check_shard_files(up: Upstream) -> None:
    """Every shard an upstream manifest lists is there with its committed size (a stat each: the tasks
    that read them check their sha256)."""
    for shard in up.manifest.shards:
        path = up.path / shard["shard"]
        size = path.stat().st_size if path.is_file() else None
        if size != shard["bytes"]:
            raise InputError(f"{path}: {'missing' if size is None else f'{size} bytes'}, but {up.dir.stage} "
                             f"(round {up.dir.round}) committed it with {shard['bytes']} bytes: the shard changed "
                             "after its commit; rebuild that stage")


def _check_conservation(stage: str, round_: int, upstream: Manifest, manifest: Manifest) -> None:
    came, kept = manifest.totals.samples_in, upstream.totals.samples_kept
    if came != kept:
        raise StageFailed(f"{stage} (round {round_}): read {came} samples, but its input kept {kept}: shards "
                          "changed under the run; nothing was committed as this stage's result")


def _commit(done: tuple[StageContext, Manifest]) -> None:
    ctx, manifest = done
    ctx.out.commit(manifest)
    crash_point("committed")   # the new result is complete; the old one still in place
    replaced = ctx.run.publish(ctx.out)
    if replaced is not None:
        log.info("%s (round %d): the result it replaces is kept in %s (vlp gc removes it)", ctx.out.stage,
                 ctx.out.round, replaced)
    t = manifest.totals
    log.info("%s: committed %d shards in %.1fs: %d in, %d kept, %d dropped, %d failed", ctx.out.stage,
             len(manifest.shards), manifest.duration_s, t.samples_in, t.samples_kept, t.samples_dropped,
             t.samples_failed)
