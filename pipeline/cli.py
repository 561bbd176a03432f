"""`vlp`: run, resume and inspect pipeline runs."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.errors import VlpError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlp", description="Vision-language pretraining pipeline on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stage graph of a config")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>)")
    run.add_argument("--only", help="comma-separated stages to run, e.g. download,prefilter")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set download.timeout=5 (repeatable)")

    resume = sub.add_parser("resume", help="finish a run: redo only what is missing")
    resume.add_argument("run_dir")
    resume.add_argument("--stage", help="resume only this stage")

    status = sub.add_parser("status", help="per-stage state and sample accounting of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    report = sub.add_parser("report", help="write the run's HTML report (<run>/report/index.html)")
    report.add_argument("run_dir")
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
        cfg = load_config(run.config_path)
        run = runner.execute(cfg, run.root, [args.stage] if args.stage else None)
        _print_status(run.root)
        return 0
    if args.command == "status":
        if args.json:
            print(runner.status_json(args.run_dir))
        else:
            _print_status(args.run_dir)
        return 0
    if args.command == "report":
        from pipeline.report import write_report

        print(f"report: {write_report(args.run_dir)}")
        return 0
    raise AssertionError(args.command)


def _print_status(run_dir) -> None:
    from pipeline import runner
    from pipeline.measure import format_rounds, rounds

    print(runner.format_status(runner.status(run_dir)))
    per_round = rounds(run_dir)
    if per_round:
        print("\nper round (retrieval: ITC on the held-out pairs; filter P/R at removing noisy web pairs, "
              "measured against the toy web's truth):")
        print(format_rounds(per_round))


if __name__ == "__main__":
    sys.exit(main())
