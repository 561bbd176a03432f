"""prefilter: cheap rules, decontamination and deduplication before any model sees the data.

Three passes, so that deduplication is global across the stage and still deterministic:
  1. scan (a Ray task per shard): rule verdicts (image size, aspect ratio, caption rules, caption
     language) and fingerprints (sha256 of the original bytes, near-duplicate signature); the eval
     images are fingerprinted the same way (a task per eval shard);
  2. dedup (driver): in (shard, key) order, an image that is an exact or near copy of an eval image is
     dropped (`eval_contaminated`); otherwise the first copy is kept, and exact copies (same original
     bytes) and near copies (pipeline/data/neardup.py) of a kept image are dropped;
  3. write (a Ray task per shard): kept samples into a new shard, committed atomically.
A resumed run rescans (cheap), reaches the same decisions and writes only the missing shards.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import io
import json
import re
import time
from pathlib import Path

import ray
from PIL import Image

from pipeline.breaker import check_drop_shares
from pipeline.config import PrefilterConfig
from pipeline.configtree import build
from pipeline.data import language
from pipeline.data.neardup import NearDuplicateIndex, signature
from pipeline.data.shards import OWNED_MEMBERS, encode_json, read_shard
from pipeline.errors import ConfigError
from pipeline.parallel import Progress, run_missing_shards, run_shard_tasks
from pipeline.manifest import Accounting, Manifest, shard_summary
from pipeline.runs import StageDir, verify_shard
from pipeline.sources import Sources
from pipeline.stage import Extra, Inputs, Request, Stage, StageContext, Upstream, web_shards


def run(cfg: PrefilterConfig, inputs: Inputs, ctx: StageContext) -> Manifest:
    """Filter download's shards; `inputs.extra["eval_shards"]`: the evaluation images training must not
    contain (empty: nothing to decontaminate)."""
    started = time.time()
    _check_languages(cfg)
    upstream_dir, eval_shards = inputs.first().path, inputs.extra["eval_shards"]
    shards = list(inputs.first().manifest.shards)
    samples_in = sum(s["samples"] for s in shards)
    ctx.out.begin(ctx.fingerprint, {"shards_total": len(shards), "samples_in": samples_in})
    stage_cfg = dataclasses.asdict(cfg)
    options = {"num_cpus": cfg.cpus_per_task, "max_retries": 2, "retry_exceptions": True}

    scan = ray.remote(scan_shard).options(**options)
    scans = run_shard_tasks(scan, {s["shard"]: (str(upstream_dir / s["shard"]), stage_cfg, s) for s in shards},
                            Progress("prefilter/scan", len(shards), samples_in), len)
    eval_images = []
    if cfg.decontaminate and eval_shards:
        prints = run_shard_tasks(ray.remote(fingerprint_eval_shard).options(**options), {p: (p,) for p in eval_shards},
                                 Progress("prefilter/eval", len(eval_shards), 0), len)
        eval_images = [fp for p in eval_shards for fp in prints[p]]
    decisions = deduplicate(cfg, [(s["shard"], scans[s["shard"]]) for s in shards], eval_images)

    jobs = {s["shard"]: (str(upstream_dir / s["shard"]), str(ctx.out.path), s["shard"], decisions[s["shard"]])
            for s in shards}
    write = ray.remote(write_shard_task).options(**options)
    results = run_missing_shards(ctx.out, write, jobs, Progress("prefilter/write", len(shards), samples_in))
    summaries = [shard_summary(results[name]) for name in jobs]
    ctx.out.write_sizes(summaries)
    # Every shard is committed; a mass drop stops the stage here, before its manifest.
    check_drop_shares(ctx.out, summaries, cfg.max_drop_share, cfg.drop_share_limits)
    return ctx.manifest(stage_cfg, summaries, started)


def _eval_shards(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    # training images that copy an eval image are dropped; with no eval set there is nothing to compare
    shards = sources.eval_shards(required=False) if cfg.prefilter.decontaminate else []
    return {"eval_shards": Extra(shards, sources.shard_fingerprints("eval-shard", shards))}


def _request(cfg, urls: int | None) -> Request:
    shards = web_shards(cfg, urls)
    return Request({"CPU": cfg.prefilter.cpus_per_task}, shards or 1, False, shards,
                   f"at most {urls if urls is not None else 'all listed'} in (what download keeps)")


STAGE = Stage("prefilter", PrefilterConfig, "first", upstreams=lambda cfg, round_: [("download", 0)], run=run,
              request=_request, extra_inputs=_eval_shards, conserves=True)


def deduplicate(cfg: PrefilterConfig, scans: list[tuple[str, list[dict]]],
                eval_images: list[tuple[str, bytes]] = ()) -> dict[str, dict[str, dict]]:
    """Per shard, {key: {"outcome": kept|dropped|failed, "reason": ..., "signature": ...}} for every sample.
    `eval_images`: (sha256, signature) of each evaluation image."""
    eval_exact = {digest for digest, _ in eval_images}
    eval_near = NearDuplicateIndex(cfg.decontaminate_max_distance)
    for _, sig in eval_images:
        eval_near.add(sig)
    seen_exact: set[str] = set()
    near = NearDuplicateIndex(cfg.near_max_distance)
    out: dict[str, dict[str, dict]] = {}
    for shard, records in scans:
        decided = out[shard] = {}
        for rec in sorted(records, key=lambda r: r["key"]):
            sig = rec["signature"]
            verdict = {"outcome": rec["outcome"], "reason": rec["reason"], "signature": sig}
            if rec["outcome"] == "kept":
                if rec["exact"] in eval_exact or eval_near.find(sig) is not None:
                    verdict.update(outcome="dropped", reason="eval_contaminated")
                elif cfg.dedup_exact and rec["exact"] in seen_exact:
                    verdict.update(outcome="dropped", reason="duplicate_exact")
                elif cfg.dedup_near and near.find(sig) is not None:
                    verdict.update(outcome="dropped", reason="duplicate_near")
                else:
                    seen_exact.add(rec["exact"])
                    near.add(sig)
            decided[rec["key"]] = verdict
    return out


def _check_languages(cfg: PrefilterConfig) -> None:
    """A language code the identifier does not know would drop every caption: refuse it up front."""
    if cfg.languages:
        unknown = sorted(set(cfg.languages) - language.known_languages())
        if unknown:
            raise ConfigError(f"prefilter.languages: {', '.join(unknown)} not known to the language identifier "
                              f"(py3langid); it knows {', '.join(sorted(language.known_languages()))}")


# --- inside the Ray tasks -------------------------------------------------------------------------

def scan_shard(shard_path: str, stage_cfg: dict, expected: dict) -> list[dict]:
    """Rule verdicts and signatures of every sample of an upstream shard (verified against its manifest)."""
    verify_shard(Path(shard_path), expected)
    cfg = build(PrefilterConfig, stage_cfg, source="prefilter task")
    patterns = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate_patterns]
    records = []
    for sample in read_shard(Path(shard_path)):
        records.append(_scan_sample(sample, cfg, patterns))
    return records


def _scan_sample(sample: dict, cfg: PrefilterConfig, patterns) -> dict:
    rec = {"key": sample["__key__"], "outcome": "kept", "reason": None, "signature": None, "exact": None}
    try:
        meta = _json(sample.get("json"))
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            img.load()
            width, height = img.size
            rec["signature"] = signature(img)
    except Exception as err:  # noqa: BLE001 (a bad sample is counted, never crashes the shard)
        rec.update(outcome="failed", reason="image_unreadable" if "jpg" in sample else "image_missing",
                   error=f"{type(err).__name__}: {err}")
        return rec
    # The original bytes' hash (img2dataset's sha256) finds copies that differ only after re-encoding.
    rec["exact"] = meta.get("sha256") or hashlib.sha256(sample["jpg"]).hexdigest()
    width = meta.get("original_width") or width
    height = meta.get("original_height") or height
    reason = image_rule(width, height, cfg) or caption_rule(sample.get("txt"), meta, cfg, patterns)
    if reason:
        rec.update(outcome="dropped", reason=reason)
    return rec


def _json(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def image_rule(width: int, height: int, cfg: PrefilterConfig) -> str | None:
    if min(width, height) < cfg.min_image_side:
        return "image_too_small"
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "aspect_ratio_too_large"
    return None


def caption_rule(txt: bytes | None, meta: dict, cfg: PrefilterConfig, patterns) -> str | None:
    if meta.get("caption_error") == "not_utf8":
        return "caption_not_utf8"
    try:
        text = (txt or b"").decode("utf-8").strip()
    except UnicodeDecodeError:
        return "caption_not_utf8"
    if not text:
        return "caption_empty"
    if any(p.search(text) for p in patterns):  # before length: "IMG_2931.JPG" is boilerplate, not just short
        return "caption_boilerplate"
    if len(text) < cfg.min_caption_chars or _words(text) < cfg.min_caption_words:
        return "caption_too_short"
    if len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    if cfg.languages and language.in_other_language(text, cfg.languages, cfg.language_min_confidence):
        return "caption_language"
    return None


def _words(text: str) -> int:
    """Words separated by spaces, plus one per Chinese or Japanese character: those scripts write no spaces
    (a 14-character Chinese caption is one 'word' to str.split)."""
    return len(text.split()) + sum(1 for ch in text if "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff")


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # how webdatasets (ours, COCO's, open_clip's) name images


def fingerprint_eval_shard(shard_path: str) -> list[tuple[str, bytes]]:
    """(sha256 of the bytes, near-duplicate signature) of every readable image of an eval shard."""
    prints = []
    for sample in read_shard(Path(shard_path)):
        data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                prints.append((hashlib.sha256(data).hexdigest(), signature(img)))
        except Exception:  # noqa: BLE001 (an unreadable eval image cannot leak into training either)
            continue
    return prints


def write_shard_task(in_path: str, stage_path: str, name: str, decisions: dict[str, dict]) -> dict:
    out = StageDir(Path(stage_path), "prefilter", 0)
    if (done := out.shard_stats(name)) is not None:
        return done
    started = time.time()
    acc, kept, rejects, foreign = Accounting(), [], [], collections.Counter()
    for sample in read_shard(Path(in_path)):
        key = sample["__key__"]
        acc.samples_in += 1
        verdict = decisions[key]
        if verdict["outcome"] == "kept":
            acc.samples_kept += 1
            meta = _json(sample.get("json"))
            # the near-duplicate signature travels with the sample, for dedup across runs and datasets
            meta["prefilter"] = {"signature": base64.b64encode(verdict["signature"]).decode()}
            # Only the members this stage owns: a planted `.pyd` or `.pth` member would run code in
            # whoever reads the shards with webdataset's default decoders.
            foreign.update(ext for ext in sample if ext != "__key__" and ext not in OWNED_MEMBERS)
            kept.append({"__key__": key, "jpg": sample["jpg"], "txt": sample.get("txt", b""), "json": encode_json(meta)})
            continue
        (acc.dropped if verdict["outcome"] == "dropped" else acc.failed)[verdict["reason"]] += 1
        rejects.append({"key": key, "outcome": verdict["outcome"], "reason": verdict["reason"]})
    return out.commit_shard(name, kept, acc, rejects, started, {"members_dropped": dict(sorted(foreign.items()))})
