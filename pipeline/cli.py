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
        print(runner.format_status(runner.status(run.root)))
        print(f"run directory: {run.root}")
        return 0
    if args.command == "resume":
        from pipeline.runs import RunDir

        run = RunDir(args.run_dir).require()
        cfg = load_config(run.config_path)
        run = runner.execute(cfg, run.root, [args.stage] if args.stage else None)
        print(runner.format_status(runner.status(run.root)))
        return 0
    if args.command == "status":
        print(runner.status_json(args.run_dir) if args.json else runner.format_status(runner.status(args.run_dir)))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
