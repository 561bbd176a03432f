"""The stage graph on Ray: fingerprints each stage, skips committed work, runs the rest.

download -> prefilter (round 0). A stage whose manifest carries the fingerprint we compute now is
done and skipped; inside a stage, committed shards are skipped. So `vlp resume` is just running the
graph again with the run's saved config.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from pipeline.config import STAGE_ORDER, RunConfig, ToyWebConfig, UrlListConfig, dump_config
from pipeline.configtree import to_plain
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from pipeline.runs import RunDir, fingerprint
from pipeline.stage import StageContext

log = logging.getLogger("vlp")
TOYWEB_FORMAT = 2  # bump when the files prepare_toy_web writes change
UPSTREAM = {"download": None, "prefilter": "download", "pretrain": "prefilter", "evaluate": "pretrain"}


def default_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir or Path("runs") / cfg.name)


def execute(cfg: RunConfig, run_dir: str | Path, only: list[str] | None = None) -> RunDir:
    """Run the stages of `cfg` (or just `only`) into `run_dir`; returns the run directory."""
    run = RunDir(run_dir)
    selected = _select(cfg, only)
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run.config_path, dump_config(cfg).encode())
    log.info("run directory %s; stages %s", run.root, ", ".join(selected))
    lists, toyweb = list(cfg.data.inputs), None
    if cfg.data.toyweb is not None:
        toyweb = prepare_toy_web(cfg.data.toyweb, run)
        lists = [UrlListConfig(**s) for s in toyweb["inputs"]] + lists
    with contextlib.ExitStack() as stack:
        ray_started = False
        for stage in selected:
            job = _prepare_stage(cfg, run, stage, lists, toyweb)
            if job is None:
                continue
            # Start the toy web and Ray only when there is work: a committed run needs neither.
            if stage == "download" and toyweb is not None:
                stack.enter_context(serve_toy_web(cfg.data.toyweb, toyweb["port"]))
            if not ray_started:
                stack.enter_context(ray_session(cfg))
                ray_started = True
            _commit(job())
    return run


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


def _prepare_stage(cfg: RunConfig, run: RunDir, stage: str, lists: list[UrlListConfig], toyweb: dict | None):
    """Check a stage's inputs (before Ray starts) and return a thunk that runs it, or None if done."""
    from stages import download, evaluate, prefilter, pretrain

    out = run.stage(stage, 0)
    stage_cfg = getattr(cfg, stage)
    upstream_name = UPSTREAM[stage]
    if upstream_name is None:
        shards = download.plan(stage_cfg, tuple(lists))  # reads and checks every list: fails early
        inputs = [_list_fingerprint(spec) for spec in lists]
    else:
        upstream_dir = run.stage(upstream_name, 0)
        upstream = upstream_dir.manifest()
        if upstream is None:
            raise InputError(f"{stage} needs the output of {upstream_name}, which is not committed in "
                             f"{run.root}: run it first (vlp run CONFIG --only {upstream_name},{stage})")
        inputs = [upstream["fingerprint"]]
    if stage == "evaluate":
        eval_shards = _eval_shards(cfg, toyweb)
        inputs += [fingerprint("eval-shard", Path(p).name, [sha256_file(p)]) for p in eval_shards]
    fp = fingerprint(stage, to_plain(stage_cfg), inputs)
    done = out.manifest()
    if done is not None and done.get("fingerprint") == fp:
        log.info("%s: already committed (fingerprint %s), skipped", stage, fp)
        return None
    ctx = StageContext(run=run, out=out, fingerprint=fp, input_fingerprints=tuple(inputs), seed=cfg.seed)

    def job() -> tuple[StageContext, dict]:
        log.info("%s: running (fingerprint %s)", stage, fp)
        if stage == "download":
            return ctx, download.run(stage_cfg, tuple(lists), shards, ctx)
        if stage == "prefilter":
            return ctx, prefilter.run(stage_cfg, upstream, upstream_dir.path, ctx)
        if stage == "pretrain":
            return ctx, pretrain.run(stage_cfg, upstream, upstream_dir.path, ctx)
        return ctx, evaluate.run(stage_cfg, upstream_dir.path / upstream["export"], eval_shards, ctx)
    return job


def _eval_shards(cfg: RunConfig, toyweb: dict | None) -> list[str]:
    if cfg.evaluate.shards:
        import braceexpand

        shards = list(braceexpand.braceexpand(cfg.evaluate.shards))
        missing = [p for p in shards if not Path(p).is_file()]
        if missing:
            raise InputError(f"evaluate.shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        return shards
    if toyweb is None:
        raise InputError("evaluate: set evaluate.shards (a held-out webdataset) or use the toy web")
    return toyweb["eval_shards"]


def _commit(done: tuple[StageContext, dict]) -> None:
    ctx, manifest = done
    ctx.out.commit(manifest)
    totals = manifest["totals"]
    log.info("%s: committed %d shards in %.1fs: %d in, %d kept, %d dropped, %d failed", ctx.out.stage,
             len(manifest["shards"]), manifest["duration_s"], totals["samples_in"], totals["samples_kept"],
             totals["samples_dropped"], totals["samples_failed"])


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
        state = {"format": TOYWEB_FORMAT, "config": to_plain(cfg), "port": port, "inputs": [asdict(s) for s in files.inputs],
                 "truth": str(files.truth), "eval": str(files.eval), "seed": str(files.seed),
                 "eval_shards": [str(p) for p in files.eval_shards]}
        atomic_write_json(state_path, state)
    return state


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
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host="127.0.0.1", **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def status(run_dir: str | Path) -> list[dict]:
    """Per stage and round: state, shards done/total, the accounting, duration."""
    from pipeline.runs import Accounting

    run = RunDir(run_dir).require()
    rows = []
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    for sd in sorted(run.stage_dirs(), key=lambda d: (d.round, order.get(d.stage, len(order)), d.stage)):
        manifest, plan = sd.manifest(), sd.plan() or {}
        acc = Accounting()
        if manifest is not None:
            acc.add(manifest["totals"])
            state, done, duration = "done", len(manifest["shards"]), manifest["duration_s"]
            upstream = UPSTREAM.get(sd.stage)
            if upstream:
                up = run.stage(upstream, sd.round).manifest()
                if up is None or manifest["inputs"][:1] != [up["fingerprint"]]:
                    state = "stale"
        else:
            stats = sorted(sd.path.glob("*.stats.json"))
            for path in stats:
                acc.add(read_json(path)["accounting"])
            state, done, duration = ("incomplete" if plan else "pending"), len(stats), None
        row = {"stage": sd.stage, "round": sd.round, "state": state, "shards_done": done,
               "shards_total": plan.get("shards_total", done), "duration_s": duration, **acc.to_json()}
        if manifest is not None and "metrics" in manifest:
            row["metrics"] = manifest["metrics"]
        rows.append(row)
    return rows


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
    return "\n".join(lines)


def status_json(run_dir: str | Path) -> str:
    return json.dumps({"run_dir": str(RunDir(run_dir).root), "stages": status(run_dir)}, indent=2)
