"""Dedup's driver side: runs the phases (exact.py, band.py, verify.py, resolve.py, names.py; scan.py runs
in prefilter's scan tasks) as tasks of the stage's executor, each unit once (a unit with a done marker is not redone), and sums
their summaries. The order and what each phase does: the package's docstring (__init__.py)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from stages.prefilter.dedup.band import band_partition
from stages.prefilter.dedup.common import Settings, done_marker
from stages.prefilter.dedup.exact import exact_partition
from stages.prefilter.dedup.names import decisions_partition, drops_partition, names_partition
from stages.prefilter.dedup.resolve import decide_partition, near_resolve, prune_partition
from stages.prefilter.dedup.verify import join_partition, verify_partition
from pipeline.executor import Executor
from pipeline.fsutil import atomic_write_json, read_json
from pipeline.parallel import Progress, run_shard_tasks
from pipeline.storage import children

log = logging.getLogger("vlp")

# 3: drops carry their keeper and distance, the resolve in six phases (names); 2: exact drops and edges by unit
# partition, the resolve in four phases; 1: one resolve task
PHASES_LAYOUT = 3


def _forget_other_layout(root: Path) -> None:
    """A dedup folder a vlp before PHASES_LAYOUT left (a run resumed across an upgrade) keeps its scans,
    whose files have not changed; the markers of its later phases are dropped, so those phases run again
    and rewrite their outputs (derived files, not committed work)."""
    path = root / "phases-layout.json"
    if path.is_file() and read_json(path) == PHASES_LAYOUT:
        return
    if (root / "done").is_dir():
        for marker in children(root / "done"):
            if not marker.name.startswith("scan-"):
                marker.unlink()
    atomic_write_json(path, PHASES_LAYOUT)


def run_phases(executor: Executor, root: Path, shards: int, settings: Settings, options: dict) -> dict:
    """Run exact, band, join, verify, decide, prune, near, drops, names and decisions (the scans are done);
    returns their summaries. `options`: the tasks' resources (Executor.task's keywords)."""
    _forget_other_layout(root)
    P = settings.partitions
    summary: dict = {"partitions": P}

    seconds: dict[str, float] = {}

    def phase(name: str, fn, units: list[int], *args) -> list[dict]:
        started = time.perf_counter()
        done = {u: read_json(done_marker(root, name, str(u))) for u in units if done_marker(root, name, str(u)).is_file()}
        todo = {str(u): (str(root), u, *args) for u in units if u not in done}
        got = run_shard_tasks(executor, executor.task(fn, **options), todo, Progress(f"prefilter/{name}", len(units), None),
                              lambda s: 0) if todo else {}
        seconds[name] = round(time.perf_counter() - started, 2)
        return list(done.values()) + list(got.values())

    summary["exact_drops"] = sum(s["drops"] for s in phase("exact", exact_partition, list(range(P)), settings))
    if settings.searches_near:
        bands = phase("band", band_partition, list(range(P)), settings)
        summary["candidate_pairs"] = sum(s["pairs"] for s in bands)
        summary["copy_edges"] = sum(s["copy_edges"] for s in bands)
        summary["buckets_cut"] = sum(s["buckets_cut"] for s in bands)
        summary["pairs_left_out"] = sum(s["pairs_left_out"] for s in bands)
        phase("join", join_partition, list(range(P)), settings)
        summary["verified_edges"] = sum(s["edges"] for s in phase("verify", verify_partition, list(range(P)), settings))
    decided = phase("decide", decide_partition, list(range(P)), settings)
    summary["edges"] = sum(s["edges"] for s in decided)
    phase("prune", prune_partition, list(range(P)), settings)
    summary |= phase("near", near_resolve, [0], settings)[0]
    phase("drops", drops_partition, list(range(P)), settings)
    phase("names", names_partition, list(range(P)), settings)
    written = phase("decisions", decisions_partition, list(range(P)), settings, shards)
    summary["dropped"] = sum(s["dropped"] for s in written)
    summary["seconds"] = seconds
    log.info("prefilter: dedup over %d partitions: %s", P, json.dumps(summary))
    return summary
