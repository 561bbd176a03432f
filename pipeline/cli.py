"""`vlp`: run, resume and inspect pipeline runs."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.errors import VlpError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlp", description="Vision-language pretraining pipeline on Ray")
    # the deepspeed launcher puts --local_rank=N before the command (unless --no_local_rank); the
    # LOCAL_RANK variable it also sets is what `vlp train` reads
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stage graph of a config")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>)")
    run.add_argument("--only", help="comma-separated stages to run, e.g. download,prefilter")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set download.timeout=5 (repeatable)")
    run.add_argument("--submitted-marker", help=argparse.SUPPRESS)  # set by `vlp submit` (cluster/jobs.py)

    resume = sub.add_parser("resume", help="finish a run: redo only what is missing of what it was asked to do")
    resume.add_argument("run_dir")
    resume.add_argument("--stage", help="resume only this stage")
    resume.add_argument("--all", action="store_true",
                        help="run every stage of the config, also those the run was not asked for (`vlp run --only`)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the run's saved config.yaml, e.g. --set prefilter.max_drop_share=0.9 "
                             "(repeatable); a setting that changes a stage's output re-runs that stage")
    resume.add_argument("--retry-failed", action="store_true",
                        help="fetch again the URLs that failed with transient errors (timeouts, 5xx, 429, DNS, "
                             "resets), keeping every kept sample; the stages after download then rebuild")
    resume.add_argument("--submitted-marker", help=argparse.SUPPRESS)

    address_help = "Ray dashboard address (default: $RAY_ADDRESS, else http://127.0.0.1:8265)"
    submit = sub.add_parser("submit", help="submit a run (or --resume one) to a Ray cluster as a Ray Job")
    submit.add_argument("config", nargs="?", help="YAML config")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--run-dir", help="run directory, on storage the cluster mounts")
    submit.add_argument("--resume", metavar="RUN_DIR", help="resume this run directory instead")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (with --resume: change the run's saved config)")
    submit.add_argument("--retry-failed", action="store_true", help="with --resume: as `vlp resume --retry-failed`")
    jobs = sub.add_parser("jobs", help="list the cluster's jobs")
    jobs.add_argument("--address", help=address_help)
    logs = sub.add_parser("logs", help="print a job's output")
    logs.add_argument("job")
    logs.add_argument("--address", help=address_help)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    stop = sub.add_parser("stop", help="stop a job (its committed shards are kept: resume it later)")
    stop.add_argument("job")
    stop.add_argument("--address", help=address_help)

    plan = sub.add_parser("plan", help="print the stage graph, resource requests and expected counts")
    plan.add_argument("config")
    plan.add_argument("--address", help="check the requests against this Ray cluster (ray://, auto, or host:port)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    status = sub.add_parser("status", help="per-stage state and sample accounting of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    report = sub.add_parser("report", help="write the run's HTML report (<run>/report/index.html)")
    report.add_argument("run_dir")

    train = sub.add_parser("train", help="the pretrain stage under torchrun or the deepspeed launcher, without Ray "
                                         "(every process runs it; see pipeline/torchrun.py)")
    train.add_argument("config", help="YAML config; its data stages must be committed in the run directory")
    train.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    export = sub.add_parser("export", help="write a trained model in another format (hf: a Hugging Face folder)")
    export.add_argument("model_dir", help="a model folder, e.g. runs/demo/round-0/pretrain/model")
    export.add_argument("--format", required=True, choices=["hf"],
                        help="hf: AutoModel/AutoTokenizer/AutoImageProcessor load it (trust_remote_code=True)")
    export.add_argument("out", help="the folder to write (must not exist)")

    gc = sub.add_parser("gc", help="list the results newer ones replaced (<run>/superseded/); --yes deletes them")
    gc.add_argument("run_dir")
    gc.add_argument("--yes", action="store_true", help="delete them (without it, only list what would go)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("VLP_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except VlpError as err:
        print(f"vlp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlp: interrupted; committed shards are kept, continue with `vlp resume`", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.status import status_json

    if getattr(args, "submitted_marker", None):
        from cluster.jobs import claim_marker

        claim_marker(args.submitted_marker)
    if args.command == "run":
        cfg = load_config(args.config, args.overrides)
        logging.getLogger().setLevel(cfg.log_level)
        only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
        run = runner.execute(cfg, args.run_dir or runner.default_run_dir(cfg), only)
        _print_status(run.root)
        print(f"run directory: {run.root}")
        if (run.root / "report" / "index.html").is_file():
            print(f"report: {run.root / 'report' / 'index.html'}")
        return 0
    if args.command == "resume":
        from pipeline.runs import RunDir

        run = RunDir(args.run_dir).require()
        cfg = load_config(run.config_path, args.overrides)  # execute() saves it as the run's config.yaml
        # What the run was last asked to do (`vlp run --only download` resumes download alone).
        only = [args.stage] if args.stage else None if args.all else run.selected()
        run = runner.execute(cfg, run.root, only, retry_failed=args.retry_failed)
        _print_status(run.root)
        return 0
    if args.command == "status":
        if args.json:
            print(status_json(args.run_dir))
        else:
            _print_status(args.run_dir)
        return 0
    if args.command in ("submit", "jobs", "logs", "stop"):
        return _jobs(args)
    if args.command == "plan":
        from pipeline.plan import check_cluster, format_plan, missing_lists, plan

        cfg = load_config(args.config, args.overrides)
        steps = plan(cfg)
        print(format_plan(cfg, steps))
        if missing := missing_lists(cfg):
            print(f"counts unknown: {len(missing)} of {len(cfg.data.inputs)} URL lists are not on this machine "
                  f"(e.g. {missing[0]}); `vlp run` checks them before it starts")
        if args.address:
            check_cluster(steps, args.address)
            print(f"cluster at {args.address}: every request fits")
        return 0
    if args.command == "gc":
        return _gc(args.run_dir, args.yes)
    if args.command == "train":
        from pipeline.torchrun import train_command

        return train_command(args.config, args.run_dir, args.overrides)
    if args.command == "export":
        from pipeline.hfexport import export_hf

        print(f"exported: {export_hf(args.model_dir, args.out)}")
        return 0
    if args.command == "report":
        from pipeline.report import write_report

        print(f"report: {write_report(args.run_dir)}")
        return 0
    raise AssertionError(args.command)


def _jobs(args) -> int:
    from cluster import jobs

    if args.command == "submit":
        if bool(args.config) == bool(args.resume):
            raise VlpError("vlp submit: give a CONFIG, or --resume RUN_DIR (not both)")
        job_id, run_dir = jobs.submit(args.address, config=args.config, overrides=tuple(args.overrides),
                                      run_dir=args.run_dir, resume=args.resume, retry_failed=args.retry_failed)
        print(f"job: {job_id}\nrun directory: {run_dir}\nfollow it: vlp logs {job_id} --follow")
    elif args.command == "jobs":
        print(jobs.format_jobs(jobs.list_jobs(args.address)))
    elif args.command == "logs":
        jobs.logs(args.address, args.job, args.follow)
    else:
        print(f"job {args.job}: {jobs.stop(args.address, args.job)}")
    return 0


def _gc(run_dir: str, delete: bool) -> int:
    """Superseded results are committed work: they go only when the user says so, under the run's lock."""
    from pipeline.runlock import RunLock
    from pipeline.runs import RunDir

    run = RunDir(run_dir).require()
    with RunLock(run.root):
        old = run.superseded()
        if not old:
            print(f"{run.root}: nothing superseded")
            return 0
        for row in old:
            print(f"{'deleting' if delete else 'would delete'} {row['path']} ({_describe_superseded(row)})")
            if delete:
                run.remove_superseded(row)
        if not delete:
            print("run `vlp gc RUN_DIR --yes` to delete them")
    return 0


def _describe_superseded(row: dict) -> str:
    if row["kind"] == "link":
        return f"a symlink to {row['target']}: the link only, never what it points to"
    if row["kind"] == "file":
        return f"{row['bytes']} bytes, a stray file: no result vlp moved there"
    return f"{row['bytes'] / 1e6:.1f} MB, {'complete' if row['complete'] else 'partial'}"


def _print_status(run_dir) -> None:
    from pipeline.runs import RunDir
    from pipeline.status import format_status, status
    from pipeline.toyweb.measures import (
        format_attributes,
        format_noise_kinds,
        format_rounds,
        rounds,
    )

    print(format_status(status(run_dir)))
    superseded = RunDir(run_dir).superseded()
    if superseded:
        print("\nsuperseded results (replaced by a rebuild; kept until `vlp gc RUN_DIR --yes`):")
        for row in superseded:
            print(f"  {row['name']}  {row['bytes'] / 1e6:.1f} MB")
    per_round = rounds(run_dir)
    if per_round:
        print("\nper round (retrieval: ITC on the held-out pairs; filter P/R at removing noisy web pairs and "
              "caption 5/5, the synthetic captions naming all five attributes right, against the toy web's "
              "truth; probe: a linear probe per attribute on the frozen image features of the held-out images):")
        print(format_rounds(per_round))
        by_kind = format_noise_kinds(per_round)
        if by_kind:
            print("\nnoisy web pairs the filter removed, by kind of noise (recall per kind):")
            print(by_kind)
        from pipeline.benchmarks import format_benchmarks

        if benchmarks := format_benchmarks(per_round):
            print("\nstandard evaluations per round (Karpathy-split retrieval, zero-shot classification):")
            print(benchmarks)
        by_attribute = format_attributes(per_round)
        if by_attribute:
            print("\nwrong-attribute web captions the filter removed, and synthetic captions that name the "
                  "attribute right:")
            print(by_attribute)


if __name__ == "__main__":
    sys.exit(main())
