"""capfilt: BLIP's captioning and filtering, with the model of the previous round.

1. Two copies of the model are fine-tuned on the clean seed set (stages/capfilt/finetune.py), as two Ray
   tasks in parallel: a captioner (LM) and a filter (ITC + ITM). Separate copies, because a filter that
   shares its weights with the captioner waves the captioner's mistakes through (BLIP, Table 4).
2. A pool of Ray actors, each holding both models, takes the web shards one by one. Per image, the
   captioner samples one synthetic caption (nucleus sampling, KV cache) and the filter scores the web
   caption and the synthetic one (`rule`: BLIP's ITM probability, or ITM + ITC calibrated on seed pairs
   held out of the filter's fine-tuning); each text at or above the threshold becomes one output
   sample. An image with no kept text is dropped ("filter_rejected"). Each model captions or scores in
   the precision of the fine-tune that produced it (bf16 autocast where that one ran in bf16), the one
   the filter's calibration scored in.

Each shard's sampling is seeded by (run seed, round, shard name), so a shard redone after a kill, or by
another actor, is the same bytes. Besides the tar and its stats, each shard commits
`decisions/<shard>.parquet`: both texts and both scores of every image, kept or not (for the report and
for measuring the filter); in a folder of their own, so that the stage folder's `*.parquet` are ledgers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from stages.capfilt.config import SECTION, CapfiltConfig
from pipeline.configtree import build, to_plain
from pipeline.data.loader import decode_image
from pipeline.data.shards import encode_json, read_shard
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_json, read_json, sha256_file
from pipeline.ledger import DECISIONS_SCHEMA, decisions_path, write_records
from pipeline.manifest import Manifest
from pipeline.parallel import Progress, run_on_actor_pool
from pipeline.threads import prefetched
from pipeline.runs import StageDir, fingerprint, verify_shard
from pipeline.shardcommit import ShardOutput, settle
from pipeline.sources import Sources
from pipeline.stage import Extra, Inputs, Request, Stage, StageContext, Upstream, web_data, web_shards
from pipeline.model.scoring import Calibration, match_scores
from stages.capfilt import report
from stages.capfilt.finetune import finetune, model_fingerprint, model_precision
from pipeline.storage import as_path

log = logging.getLogger("vlp")
ROLES = ("captioner", "filter")


def run(cfg: CapfiltConfig, inputs: Inputs, ctx: StageContext) -> Manifest:
    """Fine-tune the captioner and filter from `base_model` on the seed set, then caption and filter every
    shard of prefilter's output on an actor pool."""
    started = time.time()
    upstream_dir, shards = inputs.first().path, inputs.first().manifest.shards
    base_model, seed_shards = inputs.extra["base_model"], inputs.extra["seed_shards"]
    samples_in = sum(s["samples"] for s in shards)
    ctx.out.begin(ctx.fingerprint, {"shards_total": len(shards), "samples_in": samples_in,
                                    "base_model": ctx.run.relative(base_model)})
    executor, gpus = ctx.executor, cfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if executor.resources().get("GPU", 0) > 0 else 0.0
    models = _finetune_both(cfg, base_model, seed_shards, ctx, gpus)

    fps = {role: models[role]["fingerprint"] for role in ROLES}
    # max_concurrency: an actor takes its next shard while the current one infers (CapfiltWorker.process)
    worker = executor.actor(CapfiltWorker, cpus=cfg.cpus_per_actor, gpus=gpus, concurrency=cfg.shards_per_actor)

    calibration = models["filter"].get("calibration")

    def make_actor():
        return worker.remote(str(ctx.out.path / "captioner"), str(ctx.out.path / "filter"), to_plain(cfg),
                             str(ctx.out.path), ctx.out.round, ctx.seed, fps, calibration, ctx.out.writer)

    jobs = {s["shard"]: (str(upstream_dir / s["shard"]), s["shard"], s) for s in shards}
    results, restarts = run_on_actor_pool(executor, ctx.out, make_actor, jobs, cfg.actors, cfg.shard_retries,
                                          Progress("capfilt", len(shards), samples_in), cfg.shards_per_actor)
    summaries = settle(ctx.out, [results[name] for name in jobs], cfg.max_drop_share, cfg.drop_share_limits)
    summaries = [s | {"pairs": results[s["shard"]]["pairs"]} for s in summaries]
    pairs = {k: sum(s["pairs"][k] for s in summaries) for k in ("web", "synthetic")}
    total_pairs = pairs["web"] + pairs["synthetic"]
    extra = {"base_model": ctx.run.relative(base_model), "base_model_fingerprint": model_fingerprint(base_model),
             "rule": cfg.rule, "threshold": calibration["threshold"] if calibration else cfg.threshold,
             "models": models, "pairs": pairs, "pairs_out": total_pairs,
             "synthetic_share": round(pairs["synthetic"] / total_pairs, 4) if total_pairs else 0.0,
             "actor_restarts": restarts, "gpus_per_actor": gpus}
    return ctx.manifest(to_plain(cfg), summaries, started, extra)


def _upstreams(cfg, round_: int) -> list[tuple[str, int]]:
    """Round 0's web data, cleaned with the previous round's model (or `capfilt.model` in round 1)."""
    return [web_data(cfg)] + ([] if round_ == 1 and cfg.capfilt.model else [("pretrain", round_ - 1)])


def _extra_inputs(cfg, round_: int, sources: Sources, upstream: tuple[Upstream, ...]) -> dict[str, Extra]:
    seed = sources.seed_shards()
    given = round_ == 1 and cfg.capfilt.model
    base_model = as_path(cfg.capfilt.model) if given else upstream[1].exported_model()
    if not (base_model / "model.safetensors").is_file():
        raise InputError(f"capfilt.model: {base_model} is not an exported vlp model (no model.safetensors)")
    # a model from outside the run enters by its content; the previous round's by its stage's fingerprint
    model_fps = (fingerprint("model", base_model.name, [sha256_file(base_model / "model.safetensors")]),) if given else ()
    return {"seed_shards": Extra(seed, sources.shard_fingerprints("seed-shard", seed)), "base_model": Extra(base_model, model_fps)}


def _request(cfg, urls: int | None) -> Request:
    c, shards = cfg.capfilt, web_shards(cfg, urls)
    bundle = {"CPU": c.cpus_per_actor, **({"GPU": c.gpus_per_actor} if c.gpus_per_actor else {})}
    return Request(bundle, c.actors, False, shards,
                   f"at most {urls if urls is not None else 'all listed'} images in; up to 2 texts (web, synthetic) "
                   "out per image" + ("; GPU per actor: 1 where the cluster has GPUs" if c.gpus_per_actor is None else ""))


STAGE = Stage("capfilt", SECTION, upstreams=_upstreams, run=run, request=_request,
              extra_inputs=_extra_inputs, seeded=True, conserves=True, models=("captioner", "filter"),
              report=report.section, fates=report.fates, fate_labels=report.FATE_LABELS, figures=report.figures)


def _finetune_both(cfg: CapfiltConfig, base_model: Path, seed_shards: list[str], ctx: StageContext,
                   gpus: float) -> dict[str, dict]:
    """Fine-tune the captioner and the filter (in parallel), unless this stage already exported them."""
    task = ctx.executor.task(finetune, cpus=cfg.cpus_per_actor, gpus=gpus, retries=cfg.shard_retries)
    summaries, refs = {}, {}
    for i, role in enumerate(ROLES):
        folder = ctx.out.path / role
        summary_path = ctx.out.path / f"{role}.json"
        if summary_path.is_file() and (folder / "model.safetensors").is_file():
            summaries[role] = read_json(summary_path)
            continue
        calibrated = role == "filter" and cfg.rule == "calibrated"
        refs[role] = task.remote(str(base_model), seed_shards, str(folder), role, to_plain(getattr(cfg, role)),
                                 cfg.prompt, ctx.seed * 1000 + ctx.out.round * 10 + i,
                                 cfg.calibration_share if calibrated else 0.0,
                                 cfg.clean_reject_rate if calibrated else None)
    for role, ref in refs.items():
        summaries[role] = ctx.executor.get(ref)
        atomic_write_json(ctx.out.path / f"{role}.json", summaries[role])
        log.info("capfilt: fine-tuned the %s on the seed set in %.1fs (final %s)", role,
                 summaries[role]["duration_s"], summaries[role]["final"])
    return summaries


class CapfiltWorker:
    """A Ray actor: loads the captioner and the filter once, then processes shard after shard."""

    def __init__(self, captioner_dir: str, filter_dir: str, cfg: dict, out_dir: str, round_: int, seed: int,
                 fps: dict, calibration: dict | None = None, writer: tuple | None = None):
        from pipeline.modelio import load_pretrained

        self.cfg = build(CapfiltConfig, cfg, source="capfilt")
        self.calibration = Calibration(**calibration) if self.cfg.rule == "calibrated" else None
        self.threshold = self.calibration.threshold if self.calibration else self.cfg.threshold
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.captioner, self.tok, captioner_info = load_pretrained(captioner_dir, self.device)
        self.filter, _, filter_info = load_pretrained(filter_dir, self.device)
        # each model in its fine-tune's precision: the filter's calibration scored in it
        self.precision = {"captioner": model_precision(captioner_info), "filter": model_precision(filter_info)}
        self.out = StageDir(as_path(out_dir), "capfilt", round_, writer)   # writer: commit only for a live run
        self.round, self.seed, self.fps = round_, seed, fps
        prompt = self.tok(self.cfg.prompt, add_special_tokens=True)["input_ids"][:-1]  # [CLS] prompt, no [SEP]
        self.prompt = torch.tensor(prompt, device=self.device)[None]
        self.models = threading.Lock()   # shards_per_actor calls share the models: one infers at a time

    def process(self, shard_path: str, name: str, expected: dict) -> dict:
        verify_shard(as_path(shard_path), expected)   # the bytes prefilter committed, or a clear error
        started = time.time()
        output = ShardOutput()
        digest = hashlib.sha256(f"{self.seed}:{self.round}:{name}".encode()).digest()
        generator = torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little"))
        decisions = []
        batches = self._batches(as_path(shard_path), output)
        if not self.cfg.prefetch_batches:
            batches = iter(list(batches))   # the whole shard decoded before any inference
        else:
            batches = prefetched(batches, self.cfg.prefetch_batches)
        for chunk in batches:
            with self.models:
                images = torch.stack([c[1] for c in chunk]).to(self.device)
                synthetic = self.caption(images, generator)
                web_p = self.match(images, [c[2] for c in chunk])
                syn_p = self.match(images, synthetic)
            for (sample, _, web), syn, pw, ps in zip(chunk, synthetic, web_p, syn_p):
                decision, texts = self._decide(sample, web, syn, pw, ps)
                decisions.append(decision)
                row = {"key": decision["key"], "url": decision["url"]}
                if decision["verdict"] == "dropped":
                    output.dropped(row, "filter_rejected")
                else:
                    output.kept(row, *texts)
        write_records(decisions_path(self.out.path, name), decisions, DECISIONS_SCHEMA)
        pairs = {"web": sum(d["web_kept"] for d in decisions), "synthetic": sum(d["synthetic_kept"] for d in decisions)}
        return output.commit(self.out, name, started, {"pairs": pairs})

    def _batches(self, shard: Any, output: ShardOutput) -> Iterator[list[tuple]]:
        """The shard's decodable samples as (sample, image tensor, caption) in batches of batch_size, in
        shard order (the batches, hence the captions sampled, are those of a whole-shard decode); a sample
        that does not decode is counted as failed in `output` (which orders its ledger by key)."""
        size, batch = self.filter.cfg.image_size, []
        for sample in read_shard(shard):
            try:
                batch.append((sample, decode_image(sample["jpg"], size, None), sample["txt"].decode("utf-8")))
            except Exception as err:  # noqa: BLE001 (counted and reported, never silently lost)
                output.failed({"key": sample["__key__"]}, "decode_error", str(err)[:200])
            if len(batch) == self.cfg.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _decide(self, sample: dict, web: str, syn: str, pw: float, ps: float) -> tuple[dict, list[dict]]:
        """The image's decision (its row of decisions/) and the samples it becomes: one per kept text."""
        threshold = self.threshold
        pw, ps = round(pw, 6), round(ps, 6)  # decide on the score the decisions file records
        web_kept, syn_kept = pw >= threshold, ps >= threshold and bool(syn.strip())
        origin = json.loads(sample["json"]) if "json" in sample else {}
        key = sample["__key__"]
        # every key in every sample, one type, never null (pipeline/data/samplejson.py)
        provenance = {"round": self.round, "captioner": self.fps["captioner"], "filter": self.fps["filter"],
                      "threshold": float(threshold), "original_caption": web, "web_score": round(pw, 6),
                      "synthetic_caption": syn, "synthetic_score": round(ps, 6), "url": origin.get("url") or "",
                      "origin": origin}
        out = []
        for kept, source, text, score in ((web_kept, "web", web, pw), (syn_kept, "synthetic", syn, ps)):
            if kept:
                out.append({"__key__": f"{key}_{source[:3]}", "jpg": sample["jpg"], "txt": text.encode(),
                            "json": encode_json({"source": source, "score": round(score, 6), **provenance})})
        verdict = {(True, True): "both", (True, False): "web", (False, True): "synthetic"}.get((web_kept, syn_kept),
                                                                                                "dropped")
        return {"key": key, "url": origin.get("url"), "web_caption": web, "web_score": round(pw, 6),
                "web_kept": web_kept, "synthetic_caption": syn, "synthetic_score": round(ps, 6),
                "synthetic_kept": syn_kept, "verdict": verdict}, out

    @torch.no_grad()
    def caption(self, images: torch.Tensor, generator: torch.Generator) -> list[str]:
        from pipeline.model.generate import generate

        prompt = self.prompt.expand(images.shape[0], -1)
        with self.precision["captioner"].autocast(managed_by_deepspeed=False):
            ids = generate(self.captioner, images, prompt, sep_id=self.tok.sep_token_id,
                           pad_id=self.tok.pad_token_id, max_len=self.cfg.max_len, min_len=self.cfg.min_len,
                           top_p=self.cfg.top_p, repetition_penalty=self.cfg.repetition_penalty, generator=generator)
        return [t.strip() for t in self.tok.batch_decode(ids[:, prompt.shape[1]:], skip_special_tokens=True)]

    @torch.no_grad()
    def match(self, images: torch.Tensor, texts: list[str]) -> list[float]:
        """Per text, the score the rule compares with the threshold: the ITM match probability ("itm") or
        the calibrated sum of both standardised scores ("calibrated"); in the filter's fine-tune's precision."""
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=self.filter.cfg.max_text_len,
                       return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        with self.precision["filter"].autocast(managed_by_deepspeed=False):
            itm, itc = match_scores(self.filter, images, ids, mask)
        scores = self.calibration.combine(itm, itc) if self.calibration else torch.sigmoid(itm)
        return scores.tolist()
