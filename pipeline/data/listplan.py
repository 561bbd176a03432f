"""Cutting URL lists into shard inputs without passing them through the driver.

One Ray task per list streams it in record batches (pipeline/data/urllists.py) and writes its rows to
`inputs/<list>.parquet`, one row group per shard: `samples_per_shard` rows, but the list's last
(img2dataset cuts each input file into shards the same way). A shard's task reads its row group. One
file per list, not per shard: 40k shards as 40k small parquet files cost ~1.5 ms each to write (more
than reading the list) and an object store charges a PUT each. The planning task returns the row
count of each row group; the driver numbers the shards in list order and keeps (shard, file, row
group, rows): O(shards), never O(rows). The plan is committed as `inputs/plan.json` after every part is written, so a resumed
download reads it instead of planning again (the stage folder belongs to one fingerprint, which covers
the lists' content and the shard size).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import UrlListConfig
from pipeline.fsutil import atomic_path, atomic_write_json, is_temporary, read_json
from pipeline.parallel import Progress, run_shard_tasks

log = logging.getLogger("vlp")
INPUTS = "inputs"
PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class ShardInput:
    shard_id: int
    path: str        # relative to the stage folder
    row_group: int
    rows: int


def read_shard_input(stage_path: Path, shard: ShardInput) -> list[dict]:
    return pq.ParquetFile(stage_path / shard.path).read_row_group(shard.row_group).to_pylist()


def plan_shards(stage_path: Path, lists: tuple[UrlListConfig, ...], samples_per_shard: int,
                cpus_per_task: float = 1.0) -> list[ShardInput]:
    """The shard inputs of `lists` under `stage_path/inputs/`: the committed plan, or a new one."""
    folder = stage_path / INPUTS
    if (folder / PLAN).is_file():
        return [ShardInput(*row) for row in read_json(folder / PLAN)["shards"]]
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.iterdir():   # a killed planning run's temporary files
        if is_temporary(leftover):
            leftover.unlink()
    task = ray.remote(plan_list).options(num_cpus=cpus_per_task, max_retries=2, retry_exceptions=False)
    jobs = {f"list {i}": (dataclasses.asdict(spec), i, str(folder), samples_per_shard) for i, spec in enumerate(lists)}
    parts = run_shard_tasks(task, jobs, Progress("download/plan", len(jobs), 0), lambda counts: sum(counts))
    shards, shard_id = [], 0
    for i in range(len(lists)):
        for group, rows in enumerate(parts[f"list {i}"]):
            shards.append(ShardInput(shard_id, f"{INPUTS}/{input_name(i)}", group, rows))
            shard_id += 1
    atomic_write_json(folder / PLAN, {"samples_per_shard": samples_per_shard,
                                      "shards": [dataclasses.astuple(s) for s in shards]})
    log.info("download: %d URLs of %d list(s) cut into %d shards", sum(s.rows for s in shards), len(lists), len(shards))
    return shards


def input_name(list_index: int) -> str:
    return f"{list_index:04d}.parquet"


def plan_list(spec: dict, list_index: int, folder: str, samples_per_shard: int) -> list[int]:
    """(Ray task) Stream one list into `folder/<list>.parquet`, a row group per shard; returns the row
    counts of the row groups. Holds at most one shard's rows and one record batch in memory."""
    from pipeline.data.urllists import SCHEMA, iter_url_batches

    counts: list[int] = []
    pending: list[pa.Table] = []
    held = 0
    with atomic_path(Path(folder) / input_name(list_index)) as tmp, \
            pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:

        def flush(rows: int) -> None:
            nonlocal pending, held
            table = pa.concat_tables(pending)
            writer.write_table(table.slice(0, rows), row_group_size=rows)
            counts.append(rows)
            rest = table.slice(rows)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows

        for batch in iter_url_batches(UrlListConfig(**spec), batch_rows=min(samples_per_shard, 65_536)):
            pending.append(batch)
            held += batch.num_rows
            while held >= samples_per_shard:
                flush(samples_per_shard)
        if held:
            flush(held)
    return counts
