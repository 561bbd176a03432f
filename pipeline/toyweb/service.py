"""The toy web inside a run: its lists written once into `<run>/toyweb/` (state.json keeps the port the
URLs name, so a resumed run serves the same one), and its server while a stage fetches from it."""
from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from pipeline.toyweb.config import ToyWebConfig
from pipeline.configtree import to_plain
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_json, read_json
from pipeline.runs import RunDir
from pipeline.storage import is_remote, upload
from pipeline.toyweb.lists import write_toyweb
from pipeline.toyweb.server import ToyWebServer

log = logging.getLogger("vlp")
TOYWEB_FORMAT = 8  # bump when the files prepare_toy_web writes change (5: eval leaks, 6: relative paths, 7: LAION scores, rate-limited host, 8: toy COCO + ImageNet)


def prepare_toy_web(cfg: ToyWebConfig, run: RunDir) -> dict:
    """Write the toy web's lists into the run, once per toy-web config; returns them and their port.

    The port is chosen at the first run and kept in toyweb/state.json: the URLs contain it, so a resumed
    run must serve the same port for its lists (and so its download fingerprint) to stay the same."""
    folder = run.root / "toyweb"
    state_path = folder / "state.json"
    state = read_json(state_path) if state_path.is_file() else None
    if state is None or state["config"] != to_plain(cfg) or state.get("format") != TOYWEB_FORMAT:
        port = cfg.port or _free_port()
        with contextlib.ExitStack() as stack:
            # the lists are written by parquet and tar writers: locally, then put in an object store's run
            local = Path(stack.enter_context(tempfile.TemporaryDirectory())) if is_remote(folder) else folder
            files = write_toyweb(cfg, local, port)
            if local != folder:
                upload(local, folder)

        def rel(path) -> str:  # paths inside the run directory are kept relative: the run can be moved
            return str(Path(path).relative_to(local))
        state = {"format": TOYWEB_FORMAT, "config": to_plain(cfg), "port": port,
                 "inputs": [asdict(s) | {"path": rel(s.path)} for s in files.inputs],
                 "truth": rel(files.truth), "eval": rel(files.eval), "seed": rel(files.seed),
                 "eval_shards": [rel(p) for p in files.eval_shards], "seed_shards": [rel(p) for p in files.seed_shards],
                 "benchmarks": [b | {"path": rel(b["path"])} for b in files.benchmarks]}
        atomic_write_json(state_path, state)
    resolved = {k: str(folder / v) for k, v in state.items() if k in ("truth", "eval", "seed")}
    return {**state, **resolved, "inputs": [s | {"path": str(folder / s["path"])} for s in state["inputs"]],
            "eval_shards": [str(folder / p) for p in state["eval_shards"]],
            "seed_shards": [str(folder / p) for p in state["seed_shards"]],
            "benchmarks": [b | {"path": str(folder / b["path"])} for b in state["benchmarks"]]}


@contextlib.contextmanager
def serve_toy_web(cfg: ToyWebConfig, port: int, run_root=None) -> Iterator[None]:
    """The toy web for the block's length. `run_root`: a local run directory whose lock this process
    holds: if this process is killed, the web serves on until that lock is free (ToyWebServer)."""
    server = ToyWebServer(cfg, port, str(run_root) if run_root is not None else None)
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
