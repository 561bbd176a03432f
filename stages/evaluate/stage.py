"""evaluate: zero-shot image-text retrieval on a held-out split the model never trained on.

TR@k: for each image, is a correct caption among the k best-ranked captions; IR@k: for each caption,
is a correct image among the k best-ranked images. *Correct* means the retrieved item has the same
attributes as the query (toy web: shape, colour, size, position, background), since many held-out
pairs share a scene; where the split carries no attributes, only the item's own partner is correct.
Ranked by ITC similarity alone ("itc"), and the ITC top-k re-ranked two ways: by the ITM match
probability alone ("itm", as ALBEF) and by ITM and ITC together ("rerank", as BLIP; pipeline/model/retrieval.py).
Where the split labels its images' attributes, a linear probe per attribute on the frozen image
features ([CLS], 5-fold) says which ones the encoder tells apart (pipeline/probe.py).
Then the standard evaluations (`evaluate.benchmarks`, and the toy web's toy COCO and toy ImageNet):
Karpathy-split retrieval, zero-shot classification, CLIP_benchmark webdatasets (pipeline/benchmarks.py).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import time

import torch

from stages.evaluate.config import SECTION, EvaluateConfig
from pipeline.errors import InputError
from pipeline.data.loader import decode_image
from pipeline.data.shards import ShardCheck, read_input_shard
from pipeline.manifest import Accounting, Manifest
from pipeline.model.retrieval import itm_scorer, retrieval_recalls
from pipeline.stage import Inputs, Request, Stage, StageContext
from stages.evaluate.heldout import held_out
from pipeline.storage import as_path


def run(cfg: EvaluateConfig, inputs: Inputs, ctx: StageContext) -> Manifest:
    """Retrieval (ITC, ITM re-rank) and the attribute probe of the round's model on the held-out set."""
    started = time.time()
    model_dir, eval_shards = inputs.first().exported_model(), inputs.extra["eval_shards"]
    ctx.out.begin(ctx.fingerprint, {"eval_shards": eval_shards})
    executor = ctx.executor
    task = executor.task(evaluate_retrieval, cpus=1)
    try:
        metrics = executor.get(task.remote(str(model_dir), eval_shards, dataclasses.asdict(cfg), inputs.extra["benchmarks"]))
    except Exception as err:   # a cut eval shard: its own message, naming it
        cause = executor.cause(err)
        raise (cause if isinstance(cause, InputError) else err) from None
    read = metrics.pop("eval_shards")   # what reading the eval set left out, beside the metrics
    n, skipped = metrics["pairs"], collections.Counter(read["skipped_by_reason"])
    if skipped or read["members_dropped"]:
        dropped = collections.Counter(read["members_dropped"])
        ShardCheck(read["shards"], n, skipped, dropped).warn("evaluate: eval shards")
    return ctx.manifest(dataclasses.asdict(cfg), [], started, {"metrics": metrics, "eval_shards": read},
                        totals=Accounting(samples_in=n + sum(skipped.values()), samples_kept=n, failed=skipped))


def _figures(folder, manifest, truth) -> dict:
    """Its columns of the round-over-round table: retrieval by embedding similarity, the probe, the benchmarks."""
    m = manifest.details["metrics"]
    return {"tr_r1": m["itc_tr_r1"], "ir_r1": m["itc_ir_r1"], "tr_r5": m["itc_tr_r5"], "ir_r5": m["itc_ir_r5"],
            "probe": m.get("attribute_probe") or None, "benchmarks": m.get("benchmarks") or {}}


STAGE = Stage("evaluate", SECTION, upstreams=lambda cfg, round_: [("pretrain", round_)], run=run,
              request=lambda cfg, urls: Request({"CPU": 1.0}, 1, False, None, "the held-out split"),
              extra_inputs=lambda cfg, round_, sources, upstream: held_out(cfg, sources), evaluates=True,
              figures=_figures, provides={"held_out": held_out})


@torch.no_grad()
def evaluate_retrieval(model_dir: str, eval_shards: list[str], cfg: dict, benchmarks: list[dict] = ()) -> dict:
    from pipeline.benchmarks import run_benchmark
    from pipeline.modelio import load_pretrained
    from pipeline.probe import probe_accuracy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, _ = load_pretrained(model_dir, device)
    size, max_len = model.cfg.image_size, model.cfg.max_text_len
    images, captions, labels, attributes, read = read_eval_set(eval_shards, size)
    n, bs = len(images), cfg["batch_size"]
    enc = tok(captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    images_t = torch.stack(images).to(device)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    encoded = [model("encode_image", images_t[i:i + bs]) for i in range(0, n, bs)]
    img_feat = torch.cat([feat for _, feat in encoded])
    cls_hidden = torch.cat([hidden[:, 0] for hidden, _ in encoded]).cpu()
    txt_feat = torch.cat([model("encode_text", ids[i:i + bs], mask[i:i + bs])[1] for i in range(0, n, bs)])
    sim = img_feat @ txt_feat.t()  # [images, texts]
    same = torch.tensor([[a == b for b in labels] for a in labels])

    result = {"pairs": n, "eval_shards": read.to_json(), "chance_r1": round(same.float().mean().item(), 4),
              "attribute_probe": probe_accuracy(cls_hidden, attributes)}
    result.update(retrieval_recalls(sim, same, min(cfg["rerank_k"], n), itm_scorer(model, images_t, ids, mask, bs),
                                    model.itc_scale()))
    result["benchmarks"] = {b["name"]: {"format": b["format"], **run_benchmark(b, model, tok, device, bs)}
                            for b in benchmarks}
    return result


def read_eval_set(eval_shards: list[str], image_size: int) -> tuple[list, list, list, list, ShardCheck]:
    """(image tensors, captions, labels, attribute dicts, what reading left out) of the held-out set. It is
    the user's: a cut shard is an InputError naming it; a sample with no image or caption, or one that
    does not decode, is skipped and counted; members we do not own are dropped and counted."""
    images, captions, labels, attributes = [], [], [], []
    read = ShardCheck()
    for shard in eval_shards:
        for sample in read_input_shard(as_path(shard), read):
            try:
                image = decode_image(sample["jpg"], image_size, None)
                caption = sample["txt"].decode("utf-8")
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except Exception:  # noqa: BLE001 (an undecodable pair is counted and skipped, not the evaluation's end)
                read.reject("decode_error")
                continue
            images.append(image)
            captions.append(caption)
            attrs = meta.get("attributes") if isinstance(meta, dict) else None
            labels.append(json.dumps(attrs, sort_keys=True) if attrs else sample["__key__"])
            attributes.append(attrs if isinstance(attrs, dict) else {})
    if not images:
        raise InputError(f"evaluate: no usable pair in the {len(eval_shards)} eval shard(s) {eval_shards[:1]} ... "
                         f"({read.to_json()})")
    return images, captions, labels, attributes, read
