"""download: URL lists -> webdataset shards: our guarded fetcher, img2dataset's resizer.

We split the lists into shards ourselves and download each shard inside a Ray task, because
img2dataset's Ray distributor neither retries a failed shard nor commits atomically. Inside a task a
pool of `thread_count` threads fetches the URLs with pipeline/data/fetch.py (every address resolved,
checked and pinned; redirects checked hop by hop; bodies capped; one deadline per URL; image size read
from the header before any decode) and resizes them with img2dataset's `Resizer`, one at a time.
img2dataset's own fetcher cannot be made safe from outside (see fetch.py). The task writes the tar
(sorted by key, so bytes are reproducible), renames it into place, writes the shard's ledger (every
URL's outcome, with the reason of each refusal or failure: pipeline/ledger.py), and its stats last.
The lists reach the tasks as a row group per shard, written by planning tasks (pipeline/data/listplan.py).

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

import ray

from pipeline.config import DownloadConfig, UrlListConfig
from pipeline.configtree import build
from pipeline.data.shards import SHARD_DIGITS, encode_json, shard_name
from pipeline.data.listplan import ShardInput, plan_shards, read_shard_input
from pipeline.data.urllists import check_url_list
from pipeline.data.fetch import TRANSIENT, FetchFailed, Limits, fetch, image_size
from pipeline.data.urlpolicy import HostPolicy
from pipeline.parallel import Progress, run_shard_tasks
from pipeline.manifest import Accounting, Manifest, shard_summary
from pipeline.sources import Sources
from pipeline.stage import Extra, Request, Stage, StageContext, Upstream, web_shards

log = logging.getLogger("vlp")
DECODE_BYTES_PER_PIXEL = 64      # cv2's decode + img2dataset's float64 alpha matting, at worst (RGBA)
BASE_TASK_MEMORY = 512 * 2**20   # the task's Python, pyarrow, cv2 and its shard's samples


def task_memory(cfg: DownloadConfig) -> int:
    """Bytes one shard task may use at most: its bodies in flight, one decode, its base."""
    return int(BASE_TASK_MEMORY + cfg.thread_count * cfg.max_body_bytes + DECODE_BYTES_PER_PIXEL * cfg.max_image_area)


def run(cfg: DownloadConfig, lists: tuple[UrlListConfig, ...], ctx: StageContext) -> Manifest:
    """Download every URL of `lists` into ctx.out; returns the stage manifest."""
    started = time.time()
    stage_cfg = dataclasses.asdict(cfg)
    ctx.out.begin(ctx.fingerprint, {})
    shards = plan_shards(ctx.out.path, lists, cfg.samples_per_shard, cfg.cpus_per_task)
    samples_in = sum(s.rows for s in shards)
    ctx.out.update_plan(shards_total=len(shards), samples_in=samples_in)
    progress = Progress("download", len(shards), samples_in)
    # One pass over the committed stats. Shards a killed run committed with transient failures (its toy
    # web or DNS gone with its driver, a network blip) are not final: their stats are withdrawn and the
    # task re-fetches just those URLs, keeping every other outcome.
    done, jobs, again = {}, {}, 0
    for s in shards:
        name = shard_name(s.shard_id)
        stats = ctx.out.shard_stats(name)
        retry = stats is not None and transient_failures(stats) > 0
        if stats is not None and not retry:
            done[name] = stats
            continue
        if retry:
            again += transient_failures(stats)
            ctx.out.stats_path(name).unlink()
        jobs[name] = (str(ctx.out.path), dataclasses.astuple(s), stage_cfg, retry)
    if again:
        log.info("download: committed shards have %d URLs with transient failures: fetching those again", again)
    progress.update(len(done), sum(st["accounting"]["samples_in"] for st in done.values()), force=True)
    task = ray.remote(download_shard).options(
        num_cpus=cfg.cpus_per_task, memory=task_memory(cfg), max_retries=cfg.shard_retries, retry_exceptions=True)
    results = done | run_shard_tasks(task, jobs, progress, lambda st: st["accounting"]["samples_in"])
    summaries = [shard_summary(results[shard_name(s.shard_id)]) for s in shards]
    ctx.out.write_sizes(summaries)
    return ctx.manifest(stage_cfg, summaries, started,
                        {"lists": [dataclasses.asdict(s) | {"path": ctx.run.relative(s.path)} for s in lists]})


def _extra_inputs(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    for spec in sources.lists:   # a list that cannot be used fails now, before Ray starts
        check_url_list(spec)
    return {"lists": Extra(sources.lists, sources.list_fingerprints())}


def _request(cfg, urls: int | None) -> Request:
    shards = web_shards(cfg, urls)
    return Request({"CPU": cfg.download.cpus_per_task}, shards or 1, False, shards,
                   f"{urls if urls is not None else 'all listed'} URLs in; "
                   f"{cfg.download.thread_count} download threads per task")


STAGE = Stage("download", DownloadConfig, "first", upstreams=lambda cfg, round_: [],
              run=lambda cfg, inputs, ctx: run(cfg, inputs.extra["lists"], ctx),
              request=_request, extra_inputs=_extra_inputs, fetches=True)


# --- inside the Ray task --------------------------------------------------------------------------

def download_shard(stage_path: str, shard: tuple, stage_cfg: dict, retry: bool = False) -> dict:
    """Download one shard (`shard`: its ShardInput from the plan, as a tuple) and commit it.
    Safe to run again: a committed shard is returned as it is. `retry`: the shard's earlier commit was
    withdrawn for its transient failures; only those are fetched again, every other outcome (and image)
    is kept from the earlier tar and ledger."""
    from pipeline.runs import StageDir

    cfg = build(DownloadConfig, stage_cfg, source="download task")
    out = StageDir(Path(stage_path), "download", 0)
    shard_input = ShardInput(*shard)
    shard_id, name = shard_input.shard_id, shard_name(shard_input.shard_id)
    if (done := out.shard_stats(name)) is not None:
        return done
    started = time.time()
    rows = read_shard_input(out.path, shard_input)
    policy = HostPolicy(cfg.allow_private_hosts)
    digits = max(1, math.ceil(math.log10(cfg.samples_per_shard)))
    for i, row in enumerate(rows):
        row["key"] = f"{shard_id:0{SHARD_DIGITS}d}{i:0{digits}d}"
        row["refusal"] = policy.refusal(row["url"])
    todo = [r for r in rows if r["refusal"] is None]
    fetched = {}
    if retry and out.ledger_path(name).is_file():
        fetched, again = _earlier_outcomes(out, name)
        todo = [r for r in todo if r["key"] in again]
    fetched.update(fetch_rows(cfg, todo))
    samples, records, acc = [], [], Accounting(samples_in=len(rows))
    for row in rows:
        base = {"key": row["key"], "url": row["url"], "source": row["source"], "source_row": row["source_row"]}
        if row["refusal"] is not None:
            acc.dropped[row["refusal"]] += 1
            records.append({**base, "outcome": "dropped", "reason": row["refusal"]})
            continue
        got = fetched[row["key"]]
        if got["status"] != "success":
            acc.failed[got["reason"]] += 1
            records.append({**base, "outcome": "failed", "reason": got["reason"], "error": got["error_message"]})
            continue
        acc.samples_kept += 1
        records.append({**base, "outcome": "kept"})
        meta = {**base, "caption": row["caption"], "caption_error": row["caption_error"],
                **{k: got[k] for k in ("width", "height", "original_width", "original_height", "sha256")},
                "round": 0, "stage": "download"}
        samples.append({"__key__": row["key"], "jpg": got["jpg"], "txt": (row["caption"] or "").encode(),
                        "json": encode_json(meta)})
    return out.commit_shard(name, samples, acc, records, started)


def transient_failures(stats: dict) -> int:
    """How many of a shard's URLs failed for reasons that may pass (timeouts, resets, refused connections,
    5xx, DNS)."""
    return sum(n for reason, n in stats["accounting"]["failed_by_reason"].items() if reason in TRANSIENT)


def _earlier_outcomes(out, name: str) -> tuple[dict[str, dict], set[str]]:
    """({key: result} of an earlier commit of this shard, as fetch_rows gives them, except its transient
    failures; the keys of those)."""
    from pipeline.data.shards import read_shard
    from pipeline.ledger import read_ledger

    outcomes, again = {}, set()
    for r in read_ledger(out.ledger_path(name)):
        if r["outcome"] == "failed":
            if r["reason"] in TRANSIENT:
                again.add(r["key"])
            else:
                outcomes[r["key"]] = {"status": "failed", "reason": r["reason"], "error_message": r["error"]}
    tar = out.shard_path(name)
    for sample in read_shard(tar) if tar.is_file() else []:
        meta = json.loads(sample["json"])
        outcomes[sample["__key__"]] = {"status": "success", "jpg": sample["jpg"],
                                       **{k: meta[k] for k in ("width", "height", "original_width",
                                                               "original_height", "sha256")}}
    return outcomes, again


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
