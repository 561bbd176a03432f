"""Cutting URL lists into shard inputs without passing them through the driver.

One Ray task per list streams it in record batches (pipeline/data/urllists.py) and writes its rows to
`inputs/<list>.parquet`, one row group per shard: `samples_per_shard` rows, but the list's last
(img2dataset cuts each input file into shards the same way). A shard's task reads its row group. One
file per list, not per shard: 40k shards as 40k small parquet files cost ~1.5 ms each to write (more
than reading the list) and an object store charges a PUT each. The planning task returns the row
count of each row group; the driver numbers the shards in list order and keeps (shard, file, row
group, rows): O(shards), never O(rows). The plan is committed as `inputs/plan.json` after every part is written, so a resumed
download reads it instead of planning again (the stage folder belongs to one fingerprint, which covers
the lists' content and the shard size). With URL dedup, the planning tasks also hash each URL into
a shuffle that finds the rows repeating an earlier row's URL (urldedup.py) before the plan commits.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.executor import RAY, Executor
from pipeline.config import UrlListConfig
from stages.download import urldedup
from pipeline.fsutil import atomic_path, atomic_write_json, is_temporary, read_json
from pipeline.parallel import Progress, run_shard_tasks
from pipeline.storage import as_path, children, remove_tree

log = logging.getLogger("vlp")
INPUTS = "inputs"
PLAN = "plan.json"
HASH_ROWS = 4_000_000   # URLs a planning task hashes at once (~100 MB with the strings)
BATCH_ROWS = 65_536     # rows a planning task reads at once: the shards they fill are written in one call


@dataclasses.dataclass(frozen=True)
class ShardInput:
    shard_id: int
    path: str        # relative to the stage folder
    row_group: int
    rows: int

    @property
    def list_index(self) -> int:
        return int(Path(self.path).stem)


def read_shard_input(stage_path: Path, shard: ShardInput) -> list[dict]:
    with (as_path(stage_path) / shard.path).open("rb") as f:
        return pq.ParquetFile(f).read_row_group(shard.row_group).to_pylist()


def plan_shards(stage_path: Path, lists: tuple[UrlListConfig, ...], samples_per_shard: int,
                cpus_per_task: float = 1.0, dedup_urls: bool = False, executor: Executor = RAY) -> list[ShardInput]:
    """The shard inputs of `lists` under `stage_path/inputs/`: the committed plan, or a new one.
    `dedup_urls`: also find the rows repeating an earlier row's URL (urldedup.py)."""
    folder = stage_path / INPUTS
    if (folder / PLAN).is_file():
        return [ShardInput(*row) for row in read_json(folder / PLAN)["shards"]]
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in children(folder):   # a killed planning run's temporary files and shuffle
        if is_temporary(leftover):
            leftover.unlink()
        elif leftover.is_dir():
            remove_tree(leftover)
    partitions = urldedup.partitions_for(sum(_size(spec.path) for spec in lists)) if dedup_urls else 0
    task = executor.task(plan_list, cpus=cpus_per_task, retries=2)
    jobs = {f"list {i}": (dataclasses.asdict(spec), i, str(folder), samples_per_shard, partitions)
            for i, spec in enumerate(lists)}
    parts = run_shard_tasks(executor, task, jobs, Progress("download/plan", len(jobs), None), lambda counts: sum(counts))
    shards, shard_id, first_shard = [], 0, []
    for i in range(len(lists)):
        first_shard.append(shard_id)
        for group, rows in enumerate(parts[f"list {i}"]):
            shards.append(ShardInput(shard_id, f"{INPUTS}/{input_name(i)}", group, rows))
            shard_id += 1
    repeats = _find_repeated_urls(executor, folder, partitions, first_shard, samples_per_shard, cpus_per_task) \
        if partitions else 0
    atomic_write_json(folder / PLAN, {"samples_per_shard": samples_per_shard, "duplicate_urls": repeats,
                                      "shards": [dataclasses.astuple(s) for s in shards]})
    log.info("download: %d URLs of %d list(s) cut into %d shards%s", sum(s.rows for s in shards), len(lists),
             len(shards), f"; {repeats} repeat an earlier row's URL and will not be fetched" if partitions else "")
    return shards


def _size(path: str) -> int:
    return as_path(path).stat().st_size if as_path(path).is_file() else 0


def _find_repeated_urls(executor: Executor, folder: Path, partitions: int, first_shard: list[int],
                        samples_per_shard: int, cpus_per_task: float) -> int:
    find = executor.task(urldedup.find_duplicates, cpus=cpus_per_task, retries=2)
    jobs = {str(p): (str(folder), p) for p in range(partitions)}
    run_shard_tasks(executor, find, jobs, Progress("download/url-dedup", partitions, None), lambda n: 0)
    merge = executor.task(urldedup.merge_duplicates, cpus=cpus_per_task, retries=2)
    repeats = executor.get(merge.remote(str(folder), partitions, first_shard, samples_per_shard))
    for shuffle in (urldedup.HASHES, urldedup.FOUND):
        if (folder / shuffle).exists():
            remove_tree(folder / shuffle)
    return repeats


def input_name(list_index: int) -> str:
    return f"{list_index:04d}.parquet"


def plan_list(spec: dict, list_index: int, folder: str, samples_per_shard: int, partitions: int = 0) -> list[int]:
    """(Ray task) Stream one list into `folder/<list>.parquet`, a row group per shard; returns the row
    counts of the row groups. Holds at most a record batch (BATCH_ROWS) and a shard's rows in memory,
    and with `partitions` (URL dedup) the URLs of up to HASH_ROWS rows, hashed into partitions as they fill."""
    from pipeline.data.urllists import SCHEMA, iter_url_batches

    counts: list[int] = []
    pending: list[pa.Table] = []
    held = 0
    hashing: list[pa.Table] = []
    hashing_rows = parts = 0

    def flush_hashes() -> None:
        nonlocal hashing_rows, parts
        table = pa.concat_tables(hashing)
        urldedup.write_hash_partitions(as_path(folder), list_index, table["url"], table["source_row"].to_numpy(),
                                       partitions, parts)
        hashing.clear()
        hashing_rows, parts = 0, parts + 1

    # Dictionaries only for the column that repeats (a list's name): tried on URLs and captions they
    # fall back to plain after costing ~40% of the write and a larger file; statistics only for
    # source_row (a shard's input is read by row-group number, never filtered by its strings).
    with atomic_path(as_path(folder) / input_name(list_index)) as tmp, \
            pq.ParquetWriter(tmp, SCHEMA, compression="zstd", use_dictionary=["source"],
                             write_statistics=["source_row"]) as writer:

        def flush(rows: int) -> None:
            """Write the first `rows` held rows (whole shards, or the list's last) in one call."""
            nonlocal pending, held
            table = pa.concat_tables(pending)
            writer.write_table(table.slice(0, rows), row_group_size=samples_per_shard)
            whole, last = divmod(rows, samples_per_shard)
            counts.extend([samples_per_shard] * whole + ([last] if last else []))
            rest = table.slice(rows)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows

        for batch in iter_url_batches(UrlListConfig(**spec), batch_rows=BATCH_ROWS):
            pending.append(batch)
            held += batch.num_rows
            if held >= samples_per_shard:
                flush(held - held % samples_per_shard)
            if partitions:
                hashing.append(batch.select(["url", "source_row"]))
                hashing_rows += batch.num_rows
                if hashing_rows >= HASH_ROWS:
                    flush_hashes()
        if held:
            flush(held)
        if hashing:
            flush_hashes()
    return counts
