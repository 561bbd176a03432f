"""Per-sample outcomes, beside each shard: `<shard>.parquet` (img2dataset's convention).

One row per sample that went into the shard's task: its key, its outcome (kept, dropped, failed), the
reason and error for the ones not kept, and where it came from (url, source list, row; download and
prefilter fill them, CapFilt the url). A copy prefilter dropped says what it copies: `keeper`, the key of
the sample kept (duplicate_exact: the first sample with the same original bytes, which a later rule may
have dropped in turn: its own row says; duplicate_near: the kept sample it copies, the closest if
several), or for `eval_contaminated` the eval image's `benchmark` (a benchmark's name, or
`evaluate.shards`) and `item` (its path in the benchmark, or `<tar>/<key>`); and `distance`, the
near-copy distance (0: the same bytes or pixels). A scoring stage fills `score` (score_filter: the
image-text score it kept or dropped the sample by) and a balancing one `entries` (balance: the entries
the caption matched). Other rows leave those six null; ledgers written before they existed read with
them null. The shard's stats file holds only the counts per reason, so the driver, `vlp status` and the
resume scan read a few hundred bytes per shard; whoever wants the samples (the report, a user asking
"why was this URL dropped?") aggregates the ledgers with pyarrow.dataset, never the tars.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.fsutil import atomic_write_parquet, read_parquet
from pipeline.storage import arrow, as_path

SCHEMA = pa.schema([("key", pa.string()), ("outcome", pa.string()), ("reason", pa.string()),
                    ("error", pa.string()), ("url", pa.string()), ("source", pa.string()),
                    ("source_row", pa.int64()), ("keeper", pa.string()), ("distance", pa.float64()),
                    ("benchmark", pa.string()), ("item", pa.string()), ("score", pa.float64()),
                    ("entries", pa.list_(pa.string()))])
SUFFIX = ".parquet"
# CapFilt's `decisions/<shard>.parquet`: both texts and both scores of every image it judged. In a
# folder of their own, so that a stage folder's `*.parquet` are its ledgers only (`duckdb.sql("select *
# from 'STAGE/*.parquet'")`, `pd.read_parquet` of the files a glob gives).
DECISIONS_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("web_caption", pa.string()),
                              ("web_score", pa.float64()), ("web_kept", pa.bool_()),
                              ("synthetic_caption", pa.string()), ("synthetic_score", pa.float64()),
                              ("synthetic_kept", pa.bool_()), ("verdict", pa.string())])
DECISIONS = "decisions"
OLD_DECISIONS_SUFFIX = ".decisions.parquet"   # beside the ledgers, as vlp wrote them before `decisions/`
# prefilter's `signatures/<shard>.parquet`: the near-duplicate signature (pipeline/data/neardup.py, raw
# bytes) of every sample the shard kept, by key; not in the sample json, where base64 made it ~3/4 of it.
SIGNATURES = "signatures"
SIGNATURES_SCHEMA = pa.schema([("key", pa.string()), ("signature", pa.binary())])
SIDE_FOLDERS = (DECISIONS, SIGNATURES)   # per-shard side files, each kind in its folder of the stage folder


def decisions_path(folder: Path, shard_name: str) -> Path:
    """Where a stage folder holds the decisions of shard `shard_name` (`00003.tar`)."""
    return folder / DECISIONS / (shard_name.split(".")[0] + SUFFIX)


def signatures_path(folder: Path, shard_name: str) -> Path:
    """Where prefilter's folder holds the signatures of the samples shard `shard_name` kept."""
    return folder / SIGNATURES / (shard_name.split(".")[0] + SUFFIX)


def stage_signatures(folder: Path) -> pa.Table:
    """(key, signature) of every sample a prefilter folder kept, in shard order: what deduplicating other
    data against this one reads (pipeline.data.neardup.decode, near_copy_distance)."""
    return _dataset(folder, SIGNATURES_SCHEMA, _files(folder / SIGNATURES, lambda name: True))


def write_records(path: Path, records: list[dict], schema: pa.Schema = SCHEMA) -> None:
    """Write `records` (dicts; absent fields are null) as a parquet file of `schema`, atomically."""
    atomic_write_parquet(path, pa.table({name: [r.get(name) for r in records] for name in schema.names}, schema=schema))


def write_ledger(path: Path, records: list[dict]) -> None:
    """A shard's ledger: `records` are {key, outcome, ...} of every sample that went in."""
    write_records(path, records, SCHEMA)


def read_ledger(path: Path) -> list[dict]:
    return read_parquet(path, schema=SCHEMA).to_pylist()


def stage_ledger(folder: Path, columns: list[str] | None = None, expression: ds.Expression | None = None) -> pa.Table:
    """Every committed shard's ledger in a stage folder, as one table (or the rows matching
    `expression`, e.g. `ds.field("outcome") != "kept"`)."""
    # (`NNNNN.parquet` only: a folder CapFilt began before `decisions/` has its older shards' decisions here)
    return _dataset(folder, SCHEMA, _files(folder, lambda name: name.count(".") == 1), columns, expression)


def decisions_table(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """CapFilt's decisions over every shard of a stage folder, in shard order: `decisions/`, and the
    `<shard>.decisions.parquet` beside the ledgers of shards an older vlp committed (a resumed stage
    may hold both)."""
    folder = as_path(folder)
    files = _files(folder / DECISIONS, lambda name: True) + _files(folder, lambda name: name.endswith(OLD_DECISIONS_SUFFIX))
    return _dataset(folder, DECISIONS_SCHEMA, sorted(files, key=lambda f: f.rsplit("/", 1)[-1]), columns)


def stage_decisions(folder: Path) -> list[dict]:
    """decisions_table's rows as dicts."""
    return decisions_table(folder).to_pylist()


def _files(folder: Path, wanted) -> list[str]:
    folder = as_path(folder)   # (a folder that does not exist globs nothing)
    return sorted(arrow(p)[0] for p in folder.glob("*.parquet") if not p.name.startswith(".") and wanted(p.name))


def _dataset(folder: Path, schema: pa.Schema, files: list[str], columns=None, expression=None) -> pa.Table:
    if not files:
        return schema.empty_table().select(columns or schema.names)
    return ds.dataset(files, schema=schema, format="parquet", filesystem=arrow(as_path(folder))[1]).to_table(
        columns=columns, filter=expression)


def not_kept(folder: Path) -> list[dict]:
    """The ledger rows of every sample a stage dropped or that failed (small stages, tests, reports)."""
    return stage_ledger(folder, expression=ds.field("outcome") != "kept").to_pylist()
