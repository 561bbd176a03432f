"""download: URL lists -> webdataset shards: our guarded fetcher, img2dataset's resizer.

We split the lists into shards ourselves and download each shard inside a Ray task, because
img2dataset's Ray distributor neither retries a failed shard nor commits atomically. Inside a task a
pool of `thread_count` threads fetches the URLs with pipeline/data/fetch.py (every address resolved,
checked and pinned; redirects checked hop by hop; bodies capped; one deadline per URL; image size read
from the header before any decode) and resizes them with img2dataset's `Resizer`, one at a time.
img2dataset's own fetcher cannot be made safe from outside (see fetch.py). The task writes the tar
(sorted by key, so bytes are reproducible), renames it into place and writes the shard's stats last.
Refused URLs and per-sample download errors are recorded in the stats with their reasons.

Memory: a task holds at most `thread_count` bodies of up to `max_body_bytes` and decodes one image of
at most `max_image_area` pixels at a time (~64 bytes a pixel at worst); it asks Ray for that much
(`task_memory`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import ray

from pipeline.config import DownloadConfig, UrlListConfig
from pipeline.configtree import build
from pipeline.data.shards import encode_json
from pipeline.data.urllists import read_url_list
from pipeline.data.fetch import TRANSIENT, FetchFailed, Limits, fetch, image_size
from pipeline.data.urlpolicy import HostPolicy
from pipeline.parallel import Progress, run_missing_shards
from pipeline.manifest import Accounting, Manifest, shard_summary
from pipeline.sources import Sources, list_fingerprint
from pipeline.stage import Extra, Request, Stage, StageContext, Upstream, web_shards

SHARD_DIGITS = 5
log = logging.getLogger("vlp")
DECODE_BYTES_PER_PIXEL = 64      # cv2's decode + img2dataset's float64 alpha matting, at worst (RGBA)
BASE_TASK_MEMORY = 512 * 2**20   # the task's Python, pyarrow, cv2 and its shard's samples


def task_memory(cfg: DownloadConfig) -> int:
    """Bytes one shard task may use at most: its bodies in flight, one decode, its base."""
    return int(BASE_TASK_MEMORY + cfg.thread_count * cfg.max_body_bytes + DECODE_BYTES_PER_PIXEL * cfg.max_image_area)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}.tar"


def plan(cfg: DownloadConfig, lists: tuple[UrlListConfig, ...]) -> list[pa.Table]:
    """Read and check every list (before anything is fetched) and cut the rows into shards.

    Each row gets its key (shard id + position) and, for URLs we will not fetch, the refusal reason."""
    tables = [read_url_list(spec) for spec in lists]
    rows = pa.concat_tables(tables)
    policy = HostPolicy(cfg.allow_private_hosts)
    refusals = [policy.refusal(u) for u in rows.column("url").to_pylist()]
    rows = rows.append_column("refusal", pa.array(refusals, pa.string()))
    per = cfg.samples_per_shard
    digits = max(1, math.ceil(math.log10(per)))
    shards = []
    for shard_id in range(math.ceil(rows.num_rows / per)):
        part = rows.slice(shard_id * per, per)
        keys = [f"{shard_id:0{SHARD_DIGITS}d}{i:0{digits}d}" for i in range(part.num_rows)]
        shards.append(part.append_column("key", pa.array(keys, pa.string())))
    return shards


def run(cfg: DownloadConfig, lists: tuple[UrlListConfig, ...], shards: list[pa.Table], ctx: StageContext) -> Manifest:
    """Download `shards` (from `plan(cfg, lists)`) into ctx.out; returns the stage manifest."""
    started = time.time()
    samples_in = sum(t.num_rows for t in shards)
    ctx.out.begin(ctx.fingerprint, {"shards_total": len(shards), "samples_in": samples_in})
    stage_cfg = dataclasses.asdict(cfg)
    # Shards a killed run committed with transient failures (its toy web or DNS gone with its driver, a
    # network blip) are not final: their stats are withdrawn and the task re-fetches just those URLs.
    retry = {}
    for i in range(len(shards)):
        stats = ctx.out.shard_stats(shard_name(i))
        if stats is not None and transient_failures(stats):
            retry[shard_name(i)] = stats
            ctx.out.stats_path(shard_name(i)).unlink()
    if retry:
        log.info("download: %d committed shard(s) have transient failures (%d URLs): re-fetching those URLs",
                 len(retry), sum(len(transient_failures(s)) for s in retry.values()))
    task = ray.remote(download_shard).options(
        num_cpus=cfg.cpus_per_task, memory=task_memory(cfg), max_retries=cfg.shard_retries, retry_exceptions=True)
    jobs = {shard_name(i): (str(ctx.out.path), i, table, stage_cfg, retry.get(shard_name(i)))
            for i, table in enumerate(shards)}
    results = run_missing_shards(ctx.out, task, jobs, Progress("download", len(shards), samples_in))
    summaries = [shard_summary(results[name]) for name in jobs]
    ctx.out.write_sizes(summaries)
    return ctx.manifest(stage_cfg, summaries, started,
                        {"lists": [dataclasses.asdict(s) | {"path": ctx.run.relative(s.path)} for s in lists]})


def _extra_inputs(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    shards = plan(cfg.download, sources.lists)  # reads and checks every list: fails before Ray starts
    return {"lists": Extra(sources.lists, tuple(list_fingerprint(spec) for spec in sources.lists)),
            "shards": Extra(shards)}


def _request(cfg, urls: int | None) -> Request:
    shards = web_shards(cfg, urls)
    return Request({"CPU": cfg.download.cpus_per_task}, shards or 1, False, shards,
                   f"{urls if urls is not None else 'all listed'} URLs in; "
                   f"{cfg.download.thread_count} download threads per task")


STAGE = Stage("download", DownloadConfig, "first", upstreams=lambda cfg, round_: [],
              run=lambda cfg, inputs, ctx: run(cfg, inputs.extra["lists"], inputs.extra["shards"], ctx),
              request=_request, extra_inputs=_extra_inputs, fetches=True)


# --- inside the Ray task --------------------------------------------------------------------------

def download_shard(stage_path: str, shard_id: int, rows: pa.Table, stage_cfg: dict,
                   previous: dict | None = None) -> dict:
    """Download one shard and commit it. Safe to run again: a committed shard is returned as it is.
    `previous`: the withdrawn stats of this shard's earlier commit; only its transient failures are
    fetched again, every other outcome (and image) is kept from the earlier tar."""
    from pipeline.runs import StageDir

    cfg = build(DownloadConfig, stage_cfg, source="download task")
    out = StageDir(Path(stage_path), "download", 0)
    name = shard_name(shard_id)
    if (done := out.shard_stats(name)) is not None:
        return done
    started = time.time()
    todo = [r for r in rows.select(["key", "url", "refusal"]).to_pylist() if r["refusal"] is None]
    fetched = {}
    if previous is not None:
        again = set(transient_failures(previous))
        fetched = _earlier_outcomes(out.shard_path(name), previous, again)
        todo = [r for r in todo if r["key"] in again]
    fetched.update(fetch_rows(cfg, todo))
    samples, rejects, acc = [], [], Accounting(samples_in=rows.num_rows)
    for row in rows.to_pylist():
        base = {"key": row["key"], "url": row["url"], "source": row["source"], "source_row": row["source_row"]}
        if row["refusal"] is not None:
            acc.dropped[row["refusal"]] += 1
            rejects.append({**base, "outcome": "dropped", "reason": row["refusal"]})
            continue
        got = fetched[row["key"]]
        if got["status"] != "success":
            reason = got["reason"]
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


def transient_failures(stats: dict) -> list[str]:
    """Keys a shard failed for reasons that may pass (timeouts, resets, refused connections, 5xx, DNS)."""
    return [r["key"] for r in stats["rejects"] if r["outcome"] == "failed" and r["reason"] in TRANSIENT]


def _earlier_outcomes(tar: Path, stats: dict, again: set[str]) -> dict[str, dict]:
    """{key: result} of an earlier commit of this shard, as fetch_rows gives them, except `again`."""
    from pipeline.data.shards import read_shard

    outcomes = {r["key"]: {"status": "failed", "reason": r["reason"], "error_message": r.get("error")}
                for r in stats["rejects"] if r["outcome"] == "failed" and r["key"] not in again}
    for sample in read_shard(tar) if tar.is_file() else []:
        meta = json.loads(sample["json"])
        outcomes[sample["__key__"]] = {"status": "success", "jpg": sample["jpg"],
                                       **{k: meta[k] for k in ("width", "height", "original_width",
                                                               "original_height", "sha256")}}
    return outcomes


def fetch_rows(cfg: DownloadConfig, rows: list[dict]) -> dict[str, dict]:
    """Fetch and resize every row ({key, url}) on `thread_count` threads; returns {key: result}: status
    "success" with jpg, sizes and the original bytes' sha256, or "failed" with reason and error_message."""
    from img2dataset.resizer import Resizer

    resizer = Resizer(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=cfg.encode_quality,
        encode_format="jpg", skip_reencode=False, disable_all_reencoding=False,
        min_image_size=cfg.min_image_size, max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else float("inf"),
    )
    policy = HostPolicy(cfg.allow_private_hosts)
    limits = Limits(timeout=cfg.timeout, deadline=cfg.deadline, max_bytes=cfg.max_body_bytes,
                    max_redirects=cfg.max_redirects, max_image_area=cfg.max_image_area, retries=cfg.retries,
                    user_agent_token=cfg.user_agent_token,
                    disallowed_header_directives=frozenset(d.strip().lower() for d in cfg.disallowed_header_directives))
    # One decode at a time, as in img2dataset (which resizes in its main loop): its resizer swaps the
    # process's stdout/stderr file descriptors for /dev/null while it runs, and two threads doing that at
    # once leave them pointing at /dev/null for good. It also bounds decode memory to one image.
    resizing = threading.Lock()

    def one(row: dict) -> tuple[str, dict]:
        try:
            data = fetch(row["url"], policy, limits)
            width, height = image_size(data, cfg.max_image_area)
            with resizing:
                jpg, w, h, original_w, original_h, err = resizer(io.BytesIO(data))
        except FetchFailed as err:
            return row["key"], {"status": "failed", "reason": err.reason, "error_message": str(err)}
        except Exception as err:  # noqa: BLE001 (one URL's surprise is its own failure, counted with its message)
            return row["key"], {"status": "failed", "reason": "other_error", "error_message": f"{type(err).__name__}: {err}"}
        if err is not None:
            return row["key"], {"status": "failed", "reason": failure_reason(err), "error_message": err}
        return row["key"], {"status": "success", "jpg": jpg, "width": w, "height": h, "original_width": original_w,
                            "original_height": original_h, "sha256": hashlib.sha256(data).hexdigest()}

    if not rows:
        return {}
    with ThreadPoolExecutor(max_workers=min(cfg.thread_count, len(rows)), thread_name_prefix="fetch") as pool:
        return dict(pool.map(one, rows))


# img2dataset's resizer reports free-text errors; we group them into reasons a user can count and act on.
_REASONS = (
    ("image decoding error", "decode_error"), ("image too small", "image_too_small"),
    ("image area too large", "image_too_large"), ("aspect ratio too large", "aspect_ratio_too_large"),
)


def failure_reason(message: str | None) -> str:
    text = (message or "").lower()
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return "other_error"
