"""The stage graph on Ray: fingerprints each stage, skips committed work, runs the rest.

Round 0: download -> prefilter -> pretrain -> evaluate. Round r >= 1: capfilt (round 0's web data,
cleaned with round r-1's model) -> pretrain -> evaluate. Then the report. A stage whose manifest
carries the fingerprint we compute now is done and skipped; inside a stage, committed shards are skipped. So `vlp resume` is just running the
graph again with the run's saved config.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from pipeline.config import (LATER_ROUNDS, ROUND_ZERO, STAGE_ORDER, RunConfig, ToyWebConfig, UrlListConfig,
                             dump_config)
from pipeline.breaker import describe
from pipeline.configtree import to_plain
from pipeline.errors import InputError, StageFailed
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from pipeline.faults import crash_point
from pipeline.runlock import RunLock
from pipeline.runs import RunDir, fingerprint
from pipeline.stage import StageContext

log = logging.getLogger("vlp")
SEEDED_STAGES = ("pretrain", "capfilt")  # the stages that draw random numbers from the run's seed
TOYWEB_FORMAT = 6  # bump when the files prepare_toy_web writes change (5: eval leaks, 6: relative paths)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir or Path("runs") / cfg.name)


def execute(cfg: RunConfig, run_dir: str | Path, only: list[str] | None = None) -> RunDir:
    """Run the stages of `cfg` (or just `only`) into `run_dir`, round by round; returns the run directory."""
    run = RunDir(run_dir)
    selected = _select(cfg, only)
    # One writer per run directory (pipeline/runlock.py), taken before anything in it changes: a second
    # run refused here leaves config.yaml as the first one wrote it.
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run.root).acquire()
    except OSError as err:
        raise InputError(f"run directory {run.root}: cannot write to it ({err.strerror or err})") from None
    try:
        return _execute(cfg, run, selected)
    finally:
        lock.release()


def _execute(cfg: RunConfig, run: RunDir, selected: list[str]) -> RunDir:
    for finished in run.recover():   # a kill between a new result's commit and its move into place
        log.info("%s: finished putting its new result in place (the old one is in superseded/)", finished)
    order = _rounds_that_can_run(cfg, run, selected, schedule(cfg, selected))
    for line in explain_reruns(cfg, run, order):
        log.warning("%s", line)
    atomic_write_bytes(run.config_path, dump_config(cfg).encode())
    log.info("run directory %s; stages %s; %d bootstrapping round(s)", run.root, ", ".join(selected), cfg.rounds)
    lists, toyweb = list(cfg.data.inputs), None
    if cfg.data.toyweb is not None:
        toyweb = prepare_toy_web(cfg.data.toyweb, run)
        lists = [UrlListConfig(**s) for s in toyweb["inputs"]] + lists
    with contextlib.ExitStack() as stack:
        ray_started = False
        for stage, round_ in order:
            job = _prepare_stage(cfg, run, stage, round_, lists, toyweb)
            if job is None:
                continue
            # Start the toy web and Ray only when there is work: a committed run needs neither.
            if stage == "download" and toyweb is not None:
                stack.enter_context(serve_toy_web(cfg.data.toyweb, toyweb["port"]))
            if not ray_started:
                stack.enter_context(ray_session(cfg))
                ray_started = True
                from pipeline.plan import check_connected, plan

                check_connected([s for s in plan(cfg, count_urls=False) if s.stage in selected])
            _commit(job())
    if "report" in selected:
        from pipeline.report import write_report

        page = write_report(run.root)
        log.info("report: %s", page)
    return run


def schedule(cfg: RunConfig, selected: list[str]) -> list[tuple[str, int]]:
    """(stage, round) in the order they run: round 0, then each bootstrapping round."""
    order = [(s, 0) for s in ROUND_ZERO if s in selected]
    if "capfilt" not in cfg.stages:  # no bootstrapping in this config
        return order
    for round_ in range(1, cfg.rounds + 1):
        order += [(s, round_) for s in LATER_ROUNDS if s in selected]
    return order


def _rounds_that_can_run(cfg: RunConfig, run: RunDir, selected: list[str],
                         order: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """`--only download,prefilter,pretrain,evaluate` asks for round 0: a bootstrapping round whose capfilt
    is neither selected nor committed cannot run, so it and the rounds after it are left out (and said)."""
    if "capfilt" in selected:
        return order
    for round_ in range(1, cfg.rounds + 1):
        if run.stage("capfilt", round_).manifest() is None:
            if any(r >= round_ for _, r in order):
                log.info("rounds %d..%d left out: capfilt (round %d) is neither selected nor committed",
                         round_, cfg.rounds, round_)
            return [(s, r) for s, r in order if r < round_]
    return order


def upstreams(cfg: RunConfig, stage: str, round_: int) -> list[tuple[str, int]]:
    """The committed stages whose output (stage, round) reads. CapFilt always cleans round 0's web data,
    with the model of the previous round (or `capfilt.model` in round 1)."""
    if stage == "download":
        return []
    if stage == "prefilter":
        return [("download", 0)]
    if stage == "pretrain":
        return [("prefilter", 0)] if round_ == 0 else [("capfilt", round_)]
    if stage == "evaluate":
        return [("pretrain", round_)]
    if stage == "capfilt":
        return [("prefilter", 0)] + ([] if round_ == 1 and cfg.capfilt.model else [("pretrain", round_ - 1)])
    raise ValueError(stage)


def _select(cfg: RunConfig, only: list[str] | None) -> list[str]:
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


def _prepare_stage(cfg: RunConfig, run: RunDir, stage: str, round_: int, lists: list[UrlListConfig],
                   toyweb: dict | None):
    """Check a stage's inputs (before Ray starts) and return a thunk that runs it, or None if done."""
    from stages import capfilt, download, evaluate, prefilter, pretrain

    out = run.stage(stage, round_)
    stage_cfg = getattr(cfg, stage)
    ups = []
    for up_stage, up_round in upstreams(cfg, stage, round_):
        up_dir = run.stage(up_stage, up_round)
        manifest = up_dir.manifest()
        if manifest is None:
            raise InputError(f"{stage} (round {round_}) needs the output of {up_stage} (round {up_round}), which "
                             f"is not committed in {run.root}: run it first")
        ups.append((up_dir, manifest))
    inputs = [m["fingerprint"] for _, m in ups]
    if stage == "download":
        shards = download.plan(stage_cfg, tuple(lists))  # reads and checks every list: fails early
        inputs = [_list_fingerprint(spec) for spec in lists]
    seed_shards = []
    if stage == "capfilt" or (stage == "pretrain" and cfg.pretrain.with_seed):
        seed_shards = _seed_shards(cfg, toyweb)
        inputs += [fingerprint("seed-shard", Path(p).name, [sha256_file(p)]) for p in seed_shards]
    base_model = None
    if stage == "capfilt":
        base_model = Path(cfg.capfilt.model) if round_ == 1 and cfg.capfilt.model else \
            ups[1][0].path / ups[1][1]["export"]
        if not (base_model / "model.safetensors").is_file():
            raise InputError(f"capfilt.model: {base_model} is not an exported vlp model (no model.safetensors)")
        if round_ == 1 and cfg.capfilt.model:
            inputs.append(fingerprint("model", str(base_model.name), [sha256_file(base_model / "model.safetensors")]))
    eval_shards: list[str] = []
    if stage == "evaluate" or (stage == "prefilter" and cfg.prefilter.decontaminate):
        # prefilter drops training images that copy an eval image; with no eval set it has none to compare
        eval_shards = _eval_shards(cfg, toyweb, required=stage == "evaluate")
        inputs += [fingerprint("eval-shard", Path(p).name, [sha256_file(p)]) for p in eval_shards]
    if stage in SEEDED_STAGES:  # their output depends on the run's seed: a new seed is a new result
        inputs.append(f"seed:{cfg.seed}")
    # Settings marked `keeps_output` (e.g. max_drop_share) stay out: changing them keeps committed work.
    fp = fingerprint(stage, to_plain(stage_cfg, output_only=True), inputs)
    done = out.manifest()
    if done is not None and done.get("fingerprint") == fp:
        log.info("%s (round %d): already committed (fingerprint %s), skipped", stage, round_, fp)
        return None
    for up_dir, manifest in ups:   # it will run: are its inputs what their stages committed?
        _check_shard_files(up_dir, manifest)
    # A changed result is built beside the old one, which stays complete until the new one commits.
    ctx = StageContext(run=run, out=run.build_dir(stage, round_, fp), fingerprint=fp,
                       input_fingerprints=tuple(inputs), seed=cfg.seed)

    def job() -> tuple[StageContext, dict]:
        ctx_manifest = _run_stage()
        if stage in ("prefilter", "capfilt"):  # filtering stages: every upstream sample comes in
            _check_conservation(stage, round_, ups[0][1], ctx_manifest[1])
        return ctx_manifest

    def _run_stage() -> tuple[StageContext, dict]:
        log.info("%s (round %d): running (fingerprint %s)", stage, round_, fp)
        if stage == "download":
            return ctx, download.run(stage_cfg, tuple(lists), shards, ctx)
        up_dir, upstream = ups[0]
        if stage == "prefilter":
            return ctx, prefilter.run(stage_cfg, upstream, up_dir.path, eval_shards, ctx)
        if stage == "capfilt":
            return ctx, capfilt.run(stage_cfg, base_model, upstream, up_dir.path, seed_shards, ctx)
        if stage == "pretrain":
            previous = None if round_ == 0 else run.resolve(upstream["base_model"])
            return ctx, pretrain.run(stage_cfg, upstream, up_dir.path, seed_shards, ctx, previous)
        return ctx, evaluate.run(stage_cfg, up_dir.path / upstream["export"], eval_shards, ctx)
    return job


def _check_shard_files(up_dir, manifest: dict) -> None:
    """Every shard an upstream manifest lists is there with its committed size (a stat each: the tasks
    that read them check their sha256)."""
    for shard in manifest["shards"]:
        path = up_dir.path / shard["shard"]
        size = path.stat().st_size if path.is_file() else None
        if size != shard["bytes"]:
            raise InputError(f"{path}: {'missing' if size is None else f'{size} bytes'}, but {up_dir.stage} "
                             f"(round {up_dir.round}) committed it with {shard['bytes']} bytes: the shard changed "
                             "after its commit; rebuild that stage")


def _check_conservation(stage: str, round_: int, upstream: dict, manifest: dict) -> None:
    came, kept = manifest["totals"]["samples_in"], upstream["totals"]["samples_kept"]
    if came != kept:
        raise StageFailed(f"{stage} (round {round_}): read {came} samples, but its input kept {kept}: shards "
                          "changed under the run; nothing was committed as this stage's result")


def _seed_shards(cfg: RunConfig, toyweb: dict | None) -> list[str]:
    if cfg.data.seed_shards:
        return _expand_shards("data.seed_shards", cfg.data.seed_shards)
    if toyweb is None:
        raise InputError("data.seed_shards: CapFilt and pretrain.with_seed need a clean seed set (a webdataset, "
                         "e.g. COCO); set data.seed_shards, or pretrain.with_seed: false without CapFilt")
    return toyweb["seed_shards"]


def _expand_shards(name: str, pattern: str) -> list[str]:
    import braceexpand

    shards = list(braceexpand.braceexpand(pattern))
    missing = [p for p in shards if not Path(p).is_file()]
    if missing:
        raise InputError(f"{name}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return shards


def _eval_shards(cfg: RunConfig, toyweb: dict | None, required: bool = True) -> list[str]:
    if cfg.evaluate.shards:
        return _expand_shards("evaluate.shards", cfg.evaluate.shards)
    if toyweb is None:
        if not required:
            return []
        raise InputError("evaluate: set evaluate.shards (a held-out webdataset) or use the toy web")
    return toyweb["eval_shards"]


def _commit(done: tuple[StageContext, dict]) -> None:
    ctx, manifest = done
    ctx.out.commit(manifest)
    crash_point("committed")   # the new result is complete; the old one still in place
    replaced = ctx.run.stage(ctx.out.stage, ctx.out.round).path.exists() and ctx.out.path != \
        ctx.run.stage(ctx.out.stage, ctx.out.round).path
    ctx.run.publish(ctx.out)
    if replaced:
        log.info("%s (round %d): the result it replaces is kept in %s (vlp gc removes it)", ctx.out.stage,
                 ctx.out.round, ctx.run.root / "superseded")
    totals = manifest["totals"]
    log.info("%s: committed %d shards in %.1fs: %d in, %d kept, %d dropped, %d failed", ctx.out.stage,
             len(manifest["shards"]), manifest["duration_s"], totals["samples_in"], totals["samples_kept"],
             totals["samples_dropped"], totals["samples_failed"])


def explain_reruns(cfg: RunConfig, run: RunDir, order: list[tuple[str, int]]) -> list[str]:
    """Before anything runs: which committed stages this config will rebuild, and why (the settings that
    differ from the committed result, or an upstream that is rebuilt). Inputs whose content changed
    (a URL list, the seed set) are found, and said, when the stage is prepared."""
    lines, rebuilt = [], set()
    for stage, round_ in order:
        manifest = run.stage(stage, round_).manifest()
        if manifest is None:
            continue
        old, new = _flat(manifest.get("config", {})), _flat(to_plain(getattr(cfg, stage), output_only=True))
        changed = [f"{stage}.{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
        if stage in SEEDED_STAGES and f"seed:{cfg.seed}" not in manifest.get("inputs", [f"seed:{cfg.seed}"]):
            changed.append(f"seed -> {cfg.seed}")
        ups = [f"{s} (round {r})" for s, r in upstreams(cfg, stage, round_) if (s, r) in rebuilt]
        if changed or ups:
            rebuilt.add((stage, round_))
            why = "; ".join(changed + [f"its input {u} is rebuilt" for u in ups])
            lines.append(f"{stage} (round {round_}) will be rebuilt: {why}. Its committed result stays in place "
                         "until the new one commits, then moves to superseded/ (vlp gc removes it)")
    return lines


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _list_fingerprint(spec: UrlListConfig) -> str:
    return fingerprint("url-list", asdict(spec) | {"path": Path(spec.path).name}, [sha256_file(spec.path)])


def prepare_toy_web(cfg: ToyWebConfig, run: RunDir) -> dict:
    """Write the toy web's lists into the run, once per toy-web config; returns them and their port.

    The port is chosen at the first run and kept in toyweb/state.json: the URLs contain it, so a resumed
    run must serve the same port for its lists (and so its download fingerprint) to stay the same."""
    from pipeline.data.toyweb import write_toyweb

    folder = run.root / "toyweb"
    state_path = folder / "state.json"
    state = read_json(state_path) if state_path.is_file() else None
    if state is None or state["config"] != to_plain(cfg) or state.get("format") != TOYWEB_FORMAT:
        port = cfg.port or _free_port()
        files = write_toyweb(cfg, folder, port)

        def rel(path) -> str:  # paths inside the run directory are kept relative: the run can be moved
            return str(Path(path).relative_to(folder))
        state = {"format": TOYWEB_FORMAT, "config": to_plain(cfg), "port": port,
                 "inputs": [asdict(s) | {"path": rel(s.path)} for s in files.inputs],
                 "truth": rel(files.truth), "eval": rel(files.eval), "seed": rel(files.seed),
                 "eval_shards": [rel(p) for p in files.eval_shards], "seed_shards": [rel(p) for p in files.seed_shards]}
        atomic_write_json(state_path, state)
    resolved = {k: str(folder / v) for k, v in state.items() if k in ("truth", "eval", "seed")}
    return {**state, **resolved, "inputs": [s | {"path": str(folder / s["path"])} for s in state["inputs"]],
            "eval_shards": [str(folder / p) for p in state["eval_shards"]],
            "seed_shards": [str(folder / p) for p in state["seed_shards"]]}


@contextlib.contextmanager
def serve_toy_web(cfg: ToyWebConfig, port: int) -> Iterator[None]:
    from pipeline.data.toyweb_server import ToyWebServer

    server = ToyWebServer(cfg, port)
    try:
        server.start()
    except RuntimeError as err:
        raise InputError(f"toy web: cannot serve on 127.0.0.1:{port} (the port this run's URL lists "
                         f"use; is another run using it?): {err}") from None
    log.info("toy web: serving %d URLs on 127.0.0.1:%d (pid %d)", cfg.num_urls, server.port, server.proc.pid)
    try:
        yield
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_session(cfg: RunConfig) -> Iterator[None]:
    """Use the Ray this process is already connected to, else connect or start one for the run."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Ray workers inherit these; albumentations (imported by img2dataset) would otherwise phone home.
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore::UserWarning"}
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True, "runtime_env": {"env_vars": env}}
    if os.environ.get("VLP_RAY_JOB"):  # set by `vlp submit` in the job's runtime_env
        # Inside a Ray Job (vlp submit): join its cluster with the job's own runtime_env (code, env vars).
        kwargs.pop("runtime_env")
        ray.init(address=cfg.ray.address or "auto", **kwargs)
    elif cfg.ray.address:
        from cluster.auth import use_token_if_available

        use_token_if_available()
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        from cluster.auth import secure_local_token

        secure_local_token()  # token auth on, token file 0600 (cluster/auth.py)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host="127.0.0.1", **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def status(run_dir: str | Path) -> list[dict]:
    """Per stage and round: state, shards done/total, the accounting, duration."""
    from pipeline.config import load_config

    run = RunDir(run_dir).require()
    cfg = load_config(run.config_path)
    rows = []

    def order(sd) -> tuple:
        within = ROUND_ZERO if sd.round == 0 else LATER_ROUNDS
        return sd.round, within.index(sd.stage) if sd.stage in within else len(within), sd.stage

    states: dict[tuple[str, int], str] = {}
    for sd in sorted(run.stage_dirs(), key=order):
        row = _status_row(sd)
        if row["state"] == "done":
            up_keys = upstreams(cfg, sd.stage, sd.round)
            ups = [run.stage(s, r).manifest() for s, r in up_keys]
            # stale: built from an upstream result that has changed since, or from one that is stale itself
            if any(up is None for up in ups) or sd.manifest()["inputs"][:len(ups)] != [up["fingerprint"] for up in ups] \
                    or any(states.get(k) == "stale" for k in up_keys):
                row["state"] = "stale"
            states[(sd.stage, sd.round)] = row["state"]
        rows.append(row)
        staged = run.staged(sd.stage, sd.round)
        if staged is not None:   # a rebuild in progress (or stopped) beside the result it will replace
            rows.append(_status_row(staged) | {"state": "rebuilding", "rebuild": True})
    return rows


def _status_row(sd) -> dict:
    from pipeline.runs import Accounting

    manifest, plan = sd.manifest(), sd.plan() or {}
    acc = Accounting()
    if manifest is not None:
        acc.add(manifest["totals"])
        state, done, duration = "done", len(manifest["shards"]), manifest["duration_s"]
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
            if key in manifest:
                row[key] = manifest[key]
    return row


def format_status(rows: list[dict]) -> str:
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
                         f"IR@5 {m['itc_ir_r5']:.3f}; ITM re-rank TR@1 {m['itm_tr_r1']:.3f} IR@1 {m['itm_ir_r1']:.3f}")
        for kind in ("dropped", "failed"):
            reasons = r[f"{kind}_by_reason"]
            if reasons:
                lines.append(f"{'':>17}{kind}: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
        if "stopped" in r:
            lines.append(f"{'':>17}stopped: " + "; ".join(describe(item) for item in r["stopped"]["over"])
                         + f"; to accept: {r['stopped']['resume']}")
    return "\n".join(lines)


def status_json(run_dir: str | Path) -> str:
    from pipeline.measure import rounds

    run = RunDir(run_dir)
    return json.dumps({"run_dir": str(run.root), "stages": status(run_dir), "rounds": rounds(run_dir),
                       "superseded": run.superseded()}, indent=2)
