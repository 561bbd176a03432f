"""download: URL lists -> webdataset shards, with img2dataset doing the fetching and resizing.

We split the lists into shards ourselves and run img2dataset's own `Downloader` on each shard inside a
Ray task, because img2dataset's Ray distributor neither retries a failed shard nor commits atomically.
Each task downloads into a temporary folder, then writes the tar (sorted by key, so bytes are
reproducible), renames it into place and writes the shard's stats last. Refused URLs and per-sample
download errors are recorded in the stats with their reasons.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
import ray

from pipeline.config import DownloadConfig, UrlListConfig
from pipeline.configtree import build
from pipeline.data.shards import encode_json
from pipeline.data.urllists import read_url_list
from pipeline.data.urlpolicy import refusal
from pipeline.parallel import Progress, run_missing_shards
from pipeline.runs import Accounting, build_manifest, shard_summary
from pipeline.stage import StageContext

SHARD_DIGITS = 5


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}.tar"


def plan(cfg: DownloadConfig, lists: tuple[UrlListConfig, ...]) -> list[pa.Table]:
    """Read and check every list (before anything is fetched) and cut the rows into shards.

    Each row gets its key (shard id + position) and, for URLs we will not fetch, the refusal reason."""
    tables = [read_url_list(spec) for spec in lists]
    rows = pa.concat_tables(tables)
    allowed = frozenset(h.lower() for h in cfg.allow_private_hosts)
    refusals = [refusal(u, allowed) for u in rows.column("url").to_pylist()]
    rows = rows.append_column("refusal", pa.array(refusals, pa.string()))
    per = cfg.samples_per_shard
    digits = max(1, math.ceil(math.log10(per)))
    shards = []
    for shard_id in range(math.ceil(rows.num_rows / per)):
        part = rows.slice(shard_id * per, per)
        keys = [f"{shard_id:0{SHARD_DIGITS}d}{i:0{digits}d}" for i in range(part.num_rows)]
        shards.append(part.append_column("key", pa.array(keys, pa.string())))
    return shards


def run(cfg: DownloadConfig, lists: tuple[UrlListConfig, ...], shards: list[pa.Table], ctx: StageContext) -> dict:
    """Download `shards` (from `plan(cfg, lists)`) into ctx.out; returns the stage manifest."""
    started = time.time()
    samples_in = sum(t.num_rows for t in shards)
    ctx.out.begin(ctx.fingerprint, {"shards_total": len(shards), "samples_in": samples_in})
    stage_cfg = dataclasses.asdict(cfg)
    task = ray.remote(download_shard).options(
        num_cpus=cfg.cpus_per_task, max_retries=cfg.shard_retries, retry_exceptions=True)
    jobs = {shard_name(i): (str(ctx.out.path), i, table, stage_cfg) for i, table in enumerate(shards)}
    results = run_missing_shards(ctx.out, task, jobs, Progress("download", len(shards), samples_in))
    summaries = [shard_summary(results[name]) for name in jobs]
    ctx.out.write_sizes(summaries)
    return build_manifest(ctx.out, ctx.fingerprint, stage_cfg, list(ctx.input_fingerprints),
                          summaries, started, {"lists": [dataclasses.asdict(s) for s in lists]})


# --- inside the Ray task --------------------------------------------------------------------------

def download_shard(stage_path: str, shard_id: int, rows: pa.Table, stage_cfg: dict) -> dict:
    """Download one shard and commit it. Safe to run again: a committed shard is returned as it is."""
    from pipeline.runs import StageDir

    cfg = build(DownloadConfig, stage_cfg, source="download task")
    out = StageDir(Path(stage_path), "download", 0)
    name = shard_name(shard_id)
    if (done := out.shard_stats(name)) is not None:
        return done
    started = time.time()
    tmp = Path(stage_path) / f".{shard_id:0{SHARD_DIGITS}d}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        fetched = _fetch_with_img2dataset(cfg, shard_id, rows, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    samples, rejects, acc = [], [], Accounting(samples_in=rows.num_rows)
    for row in rows.to_pylist():
        base = {"key": row["key"], "url": row["url"], "source": row["source"], "source_row": row["source_row"]}
        if row["refusal"] is not None:
            acc.dropped[row["refusal"]] += 1
            rejects.append({**base, "outcome": "dropped", "reason": row["refusal"]})
            continue
        got = fetched[row["key"]]
        if got["status"] != "success":
            reason = failure_reason(got["error_message"])
            acc.failed[reason] += 1
            rejects.append({**base, "outcome": "failed", "reason": reason, "error": got["error_message"]})
            continue
        acc.samples_kept += 1
        meta = {**base, "caption": row["caption"], "caption_error": row["caption_error"],
                **{k: got[k] for k in ("width", "height", "original_width", "original_height", "sha256")},
                "round": 0, "stage": "download"}
        samples.append({"__key__": row["key"], "jpg": got["jpg"], "txt": (row["caption"] or "").encode(),
                        "json": encode_json(meta)})
    return out.commit_shard(name, samples, acc, rejects, started)


def _fetch_with_img2dataset(cfg: DownloadConfig, shard_id: int, rows: pa.Table, tmp: Path) -> dict[str, dict]:
    """Run img2dataset's Downloader over the fetchable rows; returns {key: its result row}."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    todo = rows.filter(pc.is_null(rows.column("refusal")))
    if todo.num_rows == 0:
        return {}
    todo = todo.select(["url", "caption", "key"]).rename_columns(["url", "caption", "vlp_key"])
    feather.write_feather(todo, tmp / "input.feather")
    resizer = Resizer(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=cfg.encode_quality,
        encode_format="jpg", skip_reencode=False, disable_all_reencoding=False,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area if cfg.max_image_area is not None else float("inf"),
        max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else float("inf"),
    )
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=resizer, thread_count=cfg.thread_count,
        save_caption=True, extract_exif=False, output_folder=str(tmp), column_list=["url", "caption", "vlp_key"],
        timeout=cfg.timeout, number_sample_per_shard=cfg.samples_per_shard, oom_shard_count=SHARD_DIGITS,
        compute_hash="sha256", verify_hash_type=None, encode_format="jpg", retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=list(cfg.disallowed_header_directives) or None,
    )
    # download_shard (not __call__, which swallows errors): an exception here fails the task, and Ray retries it.
    downloader.download_shard((shard_id, str(tmp / "input.feather")))
    table = pq.read_table(tmp / f"{shard_id:0{SHARD_DIGITS}d}.parquet")
    fetched = {r["vlp_key"]: r for r in table.to_pylist()}
    missing = set(todo.column("vlp_key").to_pylist()) - set(fetched)
    if missing:  # img2dataset logs and skips a sample whose handling raised: we count it as failed
        fetched.update({k: {"status": "failed", "error_message": "img2dataset lost the sample"} for k in missing})
    return fetched


# img2dataset reports free-text errors; we group them into reasons a user can count and act on.
_REASONS = (
    ("http error 404", "http_404"), ("http error 403", "http_403"), ("http error 410", "http_410"),
    ("http error 5", "http_5xx"), ("http error", "http_other"),
    ("timed out", "timeout"), ("incompleteread", "truncated"), ("connection refused", "connection_refused"),
    ("connection reset", "connection_reset"), ("remote end closed", "connection_reset"),
    ("x-robots-tag", "opt_out"), ("image decoding error", "decode_error"),
    ("image too small", "image_too_small"), ("image area too large", "image_too_large"),
    ("aspect ratio too large", "aspect_ratio_too_large"), ("name or service not known", "dns_error"),
    ("lost the sample", "lost_by_downloader"),
)


def failure_reason(message: str | None) -> str:
    text = (message or "").lower()
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return "other_error"
