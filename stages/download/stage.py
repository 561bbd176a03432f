"""download: URL lists -> webdataset shards: our guarded fetcher, img2dataset's resizer.

We split the lists into shards ourselves and download each shard inside a Ray task, because
img2dataset's Ray distributor neither retries a failed shard nor commits atomically. Inside a task a
pool of `thread_count` threads fetches the URLs with pipeline/data/fetch.py (every address resolved,
checked and pinned; redirects checked hop by hop; bodies capped; one deadline per URL; image size read
from the header before any decode) and resizes them with img2dataset's `Resizer`, one at a time.
img2dataset's own fetcher cannot be made safe from outside (see fetch.py). The task writes the tar
(sorted by key, so bytes are reproducible), renames it into place, writes the shard's ledger (every
URL's outcome, with the reason of each refusal or failure: pipeline/ledger.py), and its stats last.
The lists reach the tasks as a row group per shard, written by planning tasks (stages/download/listplan.py).

Memory: a task holds at most `thread_count` bodies of up to `max_body_bytes` and decodes one image of
at most `max_image_area` pixels at a time (~36 bytes a pixel at worst, its Decoder); it
asks Ray for that much (`task_memory`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import json
import logging
import threading
import time


from pipeline.config import UrlListConfig

from stages.download.config import SECTION, DownloadConfig
from pipeline.configtree import build
from pipeline.data import samplejson
from pipeline.data.shards import encode_json, sample_key, shard_name
from stages.download.listplan import INPUTS, ShardInput, plan_shards, read_shard_input
from stages.download import report
from stages.download.urldedup import duplicates_in
from pipeline.data.urllists import check_url_list
from pipeline.data.fetch import OPT_OUTS, TRANSIENT, FetchFailed, Limits, fetch, fetch_response, tls_context
from pipeline.data.images import check_header, prepare_image
from pipeline.data.optouts import HostOptOuts
from pipeline.data.politeness import HostQueue, Politeness
from pipeline.data.urlpolicy import HostPolicy
from pipeline.parallel import Progress, run_shard_tasks
from pipeline.manifest import Manifest
from pipeline.shardcommit import ShardOutput, settle
from pipeline.sources import Sources
from pipeline.stage import Extra, Request, Stage, StageContext, Upstream, web_shards
from pipeline.breaker import FailureBreaker
from pipeline.errors import ConfigError
from pipeline.storage import as_path

log = logging.getLogger("vlp")
# One decode (prepare_image, then the Resizer), peak bytes a stored pixel above the worker's baseline:
# 29.1 at worst, measured by tests/decode_memory.py (4999 x 4999 lossy WebP with alpha, decoded for 16
# threads; RGBA PNG 17.1, AVIF 21.6, HEIC 17.8, CMYK JPEG 12.0: BENCHMARKS.md), plus 24% for
# what was not measured (other allocator and library versions, formats). It holds because the stage
# decodes on one thread (Decoder): when each fetch thread decoded in turn, each kept its largest decode in
# its own malloc arena, 122 bytes a pixel over 16 threads. The Resizer alone on an RGBA PNG (its float64
# matting: 76) no longer runs: it gets RGB or grey. Checked by tests/test_decode_memory.py.
DECODE_BYTES_PER_PIXEL = 36
BASE_TASK_MEMORY = 512 * 2**20   # the task's Python, pyarrow, cv2 and its shard's samples
ROBOTS_BYTES = 500 * 1024        # RFC 9309: a crawler parses at least the first 500 KiB of a robots.txt


def task_memory(cfg: DownloadConfig) -> int:
    """Bytes one shard task may use at most: its bodies in flight, one decode, its base."""
    return int(BASE_TASK_MEMORY + cfg.thread_count * cfg.max_body_bytes + DECODE_BYTES_PER_PIXEL * cfg.max_image_area)


def run(cfg: DownloadConfig, lists: tuple[UrlListConfig, ...], ctx: StageContext) -> Manifest:
    """Download every URL of `lists` into ctx.out; returns the stage manifest."""
    started = time.time()
    stage_cfg = dataclasses.asdict(cfg)
    if cfg.ca_bundle is not None and not as_path(cfg.ca_bundle).is_file():
        raise ConfigError(f"download.ca_bundle: {cfg.ca_bundle} is not a file (a PEM file of CA certificates)")
    opt_outs_off = [name for name, on in (("robots_txt", cfg.robots_txt), ("tdmrep", cfg.tdmrep),
                                          ("x_robots_tag", bool(cfg.disallowed_header_directives))) if not on]
    if opt_outs_off:
        log.warning("download: opt-outs NOT honoured: %s (sites that reserved their images are downloaded; "
                    "the manifest records this)", ", ".join(opt_outs_off))
    ctx.out.begin(ctx.fingerprint, {})
    shards = plan_shards(ctx.out.path, lists, cfg.samples_per_shard, cfg.cpus_per_task, cfg.dedup_urls, ctx.executor)
    samples_in = sum(s.rows for s in shards)
    ctx.out.update_plan(shards_total=len(shards), samples_in=samples_in)
    progress = Progress("download", len(shards), samples_in)
    # One pass over the committed stats. A committed shard is final, but in a retry pass (`vlp resume
    # --retry-failed`: StageDir.start_retry_pass) a shard committed by an earlier pass with transient
    # failures goes back to its task, which fetches just those URLs again and keeps every other outcome.
    retry_pass = ctx.out.retry_pass()
    done, jobs, again = {}, {}, 0
    committed = ctx.out.committed_stats([shard_name(s.shard_id) for s in shards])
    for s in shards:
        name = shard_name(s.shard_id)
        stats = committed.get(name)
        retry = stats is not None and needs_retry(stats, retry_pass)
        if stats is not None and not retry:
            done[name] = stats
            continue
        again += transient_failures(stats) if retry else 0
        jobs[name] = (str(ctx.out.path), dataclasses.astuple(s), stage_cfg, retry_pass, ctx.out.writer)
    if again:
        log.info("download: retry pass %d: fetching again %d URLs that failed with transient errors", retry_pass, again)
    progress.update(len(done), sum(st["accounting"]["samples_in"] for st in done.values()), force=True)
    # Mass failures (a server down, a list of dead links) stop the stage early: see FailureBreaker.
    breaker = FailureBreaker(ctx.out, cfg.max_failed_share, cfg.failed_share_min_urls)
    for name, stats in done.items():
        breaker.add(name, stats, judge=False)
    breaker.check()
    task = ctx.executor.task(download_shard, cpus=cfg.cpus_per_task, memory=task_memory(cfg), retries=cfg.shard_retries,
                             retry_exceptions=True)
    results = done | run_shard_tasks(ctx.executor, task, jobs, progress, lambda st: st["accounting"]["samples_in"],
                                     on_result=breaker.add)
    breaker.check(final=True)
    # a mass drop (a list of repeats, of refused addresses) stops the stage here
    summaries = settle(ctx.out, [results[shard_name(s.shard_id)] for s in shards], cfg.max_drop_share,
                       cfg.drop_share_limits)
    politeness_counts, opt_out_counts = collections.Counter(), collections.Counter()
    for st in results.values():
        politeness_counts.update(st.get("politeness", {}))
        opt_out_counts.update(st.get("opt_outs", {}))
    manifest = ctx.manifest(stage_cfg, summaries, started,
                            {"lists": [dataclasses.asdict(s) | {"path": ctx.run.relative(s.path)} for s in lists],
                             "politeness": dict(politeness_counts), "opt_outs": dict(opt_out_counts),
                             **({"opt_outs_not_honoured": opt_outs_off} if opt_outs_off else {}),
                             **({"retry_pass": retry_pass} if retry_pass else {})})
    if (transient := transient_counts(manifest.totals.failed)):
        log.warning("download: %d URLs failed with transient errors (%s); `vlp resume --retry-failed %s` fetches "
                    "them again", sum(transient.values()), ", ".join(f"{r} {n}" for r, n in sorted(transient.items())),
                    ctx.run.root)
    return manifest


def _extra_inputs(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    for spec in sources.lists:   # a list that cannot be used fails now, before Ray starts
        check_url_list(spec)
    return {"lists": Extra(sources.lists, sources.list_fingerprints())}


def _request(cfg, urls: int | None) -> Request:
    shards = web_shards(cfg, urls)
    return Request({"CPU": cfg.download.cpus_per_task}, shards or 1, False, shards,
                   f"{urls if urls is not None else 'all listed'} URLs in; "
                   f"{cfg.download.thread_count} download threads per task")


STAGE = Stage("download", SECTION, curates_web=True, upstreams=lambda cfg, round_: [],
              run=lambda cfg, inputs, ctx: run(cfg, inputs.extra["lists"], ctx),
              request=_request, extra_inputs=_extra_inputs, fetches=True,
              retryable=lambda m: sum(transient_counts(m.totals.failed).values()), report=report.failures_by_host)


# --- inside the Ray task --------------------------------------------------------------------------

def download_shard(stage_path: str, shard: tuple, stage_cfg: dict, retry_pass: int = 0,
                   writer: tuple | None = None) -> dict:
    """Download one shard (`shard`: its ShardInput from the plan, as a tuple) and commit it.
    Safe to run again: a shard committed in this retry pass (`retry_pass`, 0 without `--retry-failed`) is
    returned as it is. One committed by an earlier pass has its transient failures fetched again; every
    other outcome (and image) is kept from its tar and ledger, and the shard is committed again (tar,
    ledger, stats: a kill between them leaves a state the next try reads the same way)."""
    from pipeline.runs import StageDir

    cfg = build(DownloadConfig, stage_cfg, source="download task")
    out = StageDir(as_path(stage_path), "download", 0, writer)   # writer: commit only for a live run
    shard_input = ShardInput(*shard)
    shard_id, name = shard_input.shard_id, shard_name(shard_input.shard_id)
    earlier = out.shard_stats(name)
    if earlier is not None and not needs_retry(earlier, retry_pass):
        return earlier
    started = time.time()
    rows = read_shard_input(out.path, shard_input)
    policy = HostPolicy(cfg.allow_private_hosts)
    repeats = duplicates_in(out.path / INPUTS, shard_input.list_index, rows[0]["source_row"],
                            rows[-1]["source_row"]) if rows else {}
    for i, row in enumerate(rows):
        row["key"] = sample_key(shard_id, i, cfg.samples_per_shard)
        row["refusal"], row["first"] = policy.refusal(row["url"]), repeats.get(row["source_row"])
        if row["first"] is not None and row["refusal"] is None:
            row["refusal"] = "duplicate_url"
    todo = [r for r in rows if r["refusal"] is None]
    fetched, counts, opt_outs = {}, collections.Counter(), collections.Counter()
    if earlier is not None:
        fetched, again = _earlier_outcomes(out, name)
        todo = [r for r in todo if r["key"] in again]
    fetched.update(fetch_rows(cfg, todo, counts, opt_outs))
    output = ShardOutput()
    for row in rows:
        base = {"key": row["key"], "url": row["url"], "source": row["source"], "source_row": row["source_row"]}
        if row["refusal"] is not None:
            output.dropped(base, row["refusal"], f"the URL of {row['first']}" if row["refusal"] == "duplicate_url" else None)
            continue
        got = fetched[row["key"]]
        if got["status"] != "success":   # an opt-out is the site's decision: a drop; the rest failed
            (output.dropped if got["reason"] in OPT_OUTS else output.failed)(base, got["reason"], got["error_message"])
            continue
        # every key in every sample, one type, never null (pipeline/data/samplejson.py); `list`: what the
        # URL list says of the row (LAION's similarity, punsafe, ...)
        meta = samplejson.fetched_json(base, row["caption"], row["caption_error"], got, row, "download")
        output.kept(base, {"__key__": row["key"], "jpg": got["jpg"], "txt": (row["caption"] or "").encode(),
                           "json": encode_json(meta)})
    politeness = {k: round(v, 3) for k, v in counts.items()}
    return output.commit(out, name, started, {"retry_pass": retry_pass, "politeness": politeness,
                                              "opt_outs": dict(opt_outs)})


def transient_counts(failed_by_reason: dict) -> dict[str, int]:
    """The failures of reasons that may pass (timeouts, resets, refused connections, 5xx, 429, DNS)."""
    return {reason: n for reason, n in failed_by_reason.items() if reason in TRANSIENT and n}


def transient_failures(stats: dict) -> int:
    """How many of a shard's URLs failed for reasons that may pass."""
    return sum(transient_counts(stats["accounting"]["failed_by_reason"]).values())


def needs_retry(stats: dict, retry_pass: int) -> bool:
    """Whether a committed shard goes back to its task in retry pass `retry_pass`: committed by an
    earlier pass, with transient failures."""
    return stats.get("retry_pass", 0) < retry_pass and transient_failures(stats) > 0


def _earlier_outcomes(out, name: str) -> tuple[dict[str, dict], set[str]]:
    """({key: result} of an earlier commit of this shard, as fetch_rows gives them, except its transient
    failures; the keys of those)."""
    from pipeline.data.shards import read_shard
    from pipeline.ledger import read_ledger

    outcomes, again = {}, set()
    for r in read_ledger(out.ledger_path(name)):
        if r["outcome"] == "failed" and r["reason"] in TRANSIENT:
            again.add(r["key"])
        elif r["outcome"] == "failed" or (r["outcome"] == "dropped" and r["reason"] in OPT_OUTS):
            outcomes[r["key"]] = {"status": "failed", "reason": r["reason"], "error_message": r["error"]}
    tar = out.shard_path(name)
    for sample in read_shard(tar) if tar.is_file() else []:   # after the ledger: a kill may have left a newer tar
        again.discard(sample["__key__"])
        meta = json.loads(sample["json"])
        outcomes[sample["__key__"]] = {"status": "success", "jpg": sample["jpg"],
                                       **{k: meta[k] for k in ("width", "height", "original_width",
                                                               "original_height", "sha256")}}
    return outcomes, again


def fetch_rows(cfg: DownloadConfig, rows: list[dict], counts: collections.Counter | None = None,
               opt_out_counts: collections.Counter | None = None) -> dict[str, dict]:
    """Fetch and resize every row ({key, url}) on `thread_count` threads, host by host within the
    politeness limits; returns {key: result}: status "success" with jpg, sizes and the original bytes'
    sha256, or "failed" with reason (an opt-out reason is the site's refusal: OPT_OUTS) and error_message.
    `counts` gains the 429/503 answers and the seconds of backoff they asked for; `opt_out_counts` what
    the hosts' robots.txt and tdmrep.json files said."""
    counts = collections.Counter() if counts is None else counts
    resizer = make_resizer(cfg)
    policy = HostPolicy(cfg.allow_private_hosts)
    limits = Limits(timeout=cfg.timeout, deadline=cfg.deadline, max_bytes=cfg.max_body_bytes,
                    max_redirects=cfg.max_redirects, max_image_area=cfg.max_image_area, retries=cfg.retries,
                    user_agent_token=cfg.user_agent_token,
                    disallowed_header_directives=frozenset(d.strip().lower() for d in cfg.disallowed_header_directives),
                    tdm_header=cfg.tdmrep,   # an image that claims too many pixels stops at its first chunk
                    header_check=functools.partial(check_header, max_image_area=cfg.max_image_area))
    tls = tls_context(cfg.ca_bundle)
    # robots.txt and tdmrep.json: small text files, fetched under the same guards, once per host.
    text_limits = dataclasses.replace(limits, max_bytes=ROBOTS_BYTES, keep_prefix=True, tdm_header=False,
                                      disallowed_header_directives=frozenset(), retries=0, header_check=None)
    host_files = HostOptOuts(lambda url: fetch(url, policy, text_limits, tls=tls), cfg.user_agent_token or "vlp",
                             robots_txt=cfg.robots_txt, tdmrep=cfg.tdmrep)

    def check_hop(url: str) -> None:
        """Every hop of a URL is asked of its host's opt-out files, not only the first (a CDN's redirect)."""
        reason = host_files.refusal(url)
        if reason is not None:
            raise FetchFailed(reason, f"{url}: {'robots.txt' if reason == 'opt_out_robots' else 'tdmrep.json'} "
                                      "reserves it")
    decode = Decoder(cfg, resizer)
    def one(row: dict) -> dict | None:
        """The row's result, or None when its host asked to slow down and the row went back in line."""
        try:
            check_hop(row["url"])   # the host's files first: their fetch is not charged to the URL's deadline
            data = fetch_response(row["url"], policy, limits, tls=tls, check_hop=check_hop).body
            jpg, w, h, original_w, original_h, err = decode(data)
        except FetchFailed as err:
            if err.rate_limited and queue.rate_limited(row, err.retry_after) is not None:
                return None
            return {"status": "failed", "reason": err.reason, "error_message": str(err)}
        except Exception as err:  # noqa: BLE001 (one URL's surprise is its own failure, counted with its message)
            return {"status": "failed", "reason": "other_error", "error_message": f"{type(err).__name__}: {err}"}
        if err is not None:
            return {"status": "failed", "reason": failure_reason(err), "error_message": err}
        return {"status": "success", "jpg": jpg, "width": w, "height": h, "original_width": original_w,
                "original_height": original_h, "sha256": hashlib.sha256(data).hexdigest()}

    results: dict[str, dict] = {}
    queue = HostQueue(rows, politeness(cfg))

    def worker() -> None:
        while (row := queue.take()) is not None:
            got = one(row)
            if got is not None:
                results[row["key"]] = got
                queue.finish(row)

    threads = [threading.Thread(target=worker, name=f"fetch-{i}", daemon=True)
               for i in range(min(cfg.thread_count, len(rows)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    decode.close()
    if len(results) != len(rows):   # a worker died of something `one` does not catch (it catches Exception)
        raise RuntimeError(f"download: {len(rows) - len(results)} URLs of the shard got no result")
    counts.update(queue.counts)
    if opt_out_counts is not None:
        opt_out_counts.update(host_files.counts)
    return results


class Decoder:
    """Decodes and resizes one image at a time, always on the same thread of its own.

    One at a time, as in img2dataset (which resizes in its main loop): its resizer swaps the process's
    stdout/stderr file descriptors for /dev/null while it runs, and two threads doing that at once leave
    them pointing at /dev/null for good; and a task's memory is budgeted for one decode
    (DECODE_BYTES_PER_PIXEL). On one thread, because glibc gives each thread its own malloc arena and keeps
    what a decode frees there for later: when every fetch thread decoded in turn under a lock, each kept
    its largest decode, and 16 threads that each decoded a 25-megapixel RGBA PNG held 122 bytes a pixel
    (tests/test_decode_memory.py). The image's header is read before any decode (prepare_image)."""

    def __init__(self, cfg: DownloadConfig, resizer):
        from concurrent.futures import ThreadPoolExecutor

        self.max_image_area, self.resizer = cfg.max_image_area, resizer
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vlp-decode")

    def _decode(self, data: bytes) -> tuple:
        image, _, _ = prepare_image(data, self.max_image_area)
        return self.resizer(io.BytesIO(image))

    def __call__(self, data: bytes) -> tuple:
        """(jpg, width, height, original width, original height, error) as img2dataset's Resizer; raises
        what prepare_image raises (FetchFailed)."""
        return self.pool.submit(self._decode, data).result()

    def close(self) -> None:
        self.pool.shutdown()


def make_resizer(cfg: DownloadConfig):
    """img2dataset's Resizer as the stage configures it (it takes what prepare_image hands on)."""
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=cfg.encode_quality,
        encode_format="jpg", skip_reencode=False, disable_all_reencoding=False,
        min_image_size=cfg.min_image_size, max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio if cfg.max_aspect_ratio is not None else float("inf"),
    )


def politeness(cfg: DownloadConfig) -> Politeness:
    return Politeness(connections=cfg.per_host_connections, rate=cfg.per_host_rate,
                      host_rates={h.lower(): r for h, r in cfg.host_rates.items()},
                      rate_limit_retries=cfg.rate_limit_retries, max_retry_after=cfg.max_retry_after)


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
