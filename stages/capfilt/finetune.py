"""Fine-tuning one copy of a pretrained model on the clean seed set, for CapFilt.

The captioner learns with the LM loss on `prompt + caption`; the filter with ITC + ITM, whose ITM
negatives are the hardest ones in the batch (sampled by ITC similarity), so it learns to tell a
caption from one that differs in a detail. Seed sets are small (BLIP: COCO), so this is a single
process with plain AdamW rather than a Ray Train job; it runs as one Ray task per copy.

Precision: the pretraining's (`pretrain.precision` as recorded in the base model; `auto` for a model
without it), resolved on this machine as pretraining resolves it (pipeline/precision.py): bf16
autocast over fp32 weights where the CPU has bf16 instructions. The export records it ("precision"), and
the CapFilt actors caption and score in it (`model_precision`); the filter's calibration scores the
held-out pairs in it too, so that its threshold fits the actors' scores.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import torch

from pipeline.configtree import build
from pipeline.data.loader import StreamSpec, make_loader
from pipeline.fsutil import sha256_file
from pipeline.model.objectives import Batch, SpecialTokens, TextQueue, pretrain_losses
from pipeline.model.scoring import Calibration, match_scores
from pipeline.storage import as_path
from pipeline.precision import Precision, resolve
from stages.capfilt.config import FinetuneConfig

ROLE_WEIGHTS = {"captioner": {"lm": 1.0}, "filter": {"itc": 1.0, "itm": 1.0}}   # objectives: pipeline/model/objectives.py LOSSES


def model_precision(info: dict) -> Precision:
    """The precision a fine-tuned model captions and scores in: that of the fine-tune that produced it (its
    export's "precision"), resolved here; `auto` for a model without one. Run it as
    `model_precision(info).autocast(managed_by_deepspeed=False)` (fp32 weights: autocast on a GPU too)."""
    return resolve(info.get("precision") or "auto")


def model_fingerprint(folder: Path) -> str:
    """Identifies an exported model by its weights."""
    return sha256_file(folder / "model.safetensors")[:16]


@contextlib.contextmanager
def _deterministic_on_cpu(device: str) -> Iterator[None]:
    """torch's deterministic kernels while inside, on a CPU. With more than one thread some CPU kernels of
    the backward pass sum in the order threads finish: two fine-tunes of the demo's model with the same
    seed on 2 threads gave different weights (and filter P 0.936 vs 0.926), the same with this on. On one
    thread (a Ray task with one CPU, as in the demo) the bits are the same either way; no cost measured
    (80 steps on 2 threads: 36.4-36.9 s against 35.9-39.7 s)."""
    if device != "cpu":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def finetune(base_dir: str, seed_shards: list[str], out_dir: str, role: str, cfg: dict, prompt: str,
             seed: int, holdout: float = 0.0, reject_rate: float | None = None) -> dict:
    """Fine-tune the model in `base_dir` as `role` and export it to `out_dir`; returns a summary. The
    filter with `holdout` > 0 trains without that share of the seed pairs and calibrates its keep rule
    on them (pipeline/model/scoring.py), rejecting `reject_rate` of such clean pairs. The same weights
    for the same seed and thread count (_deterministic_on_cpu; the executor gives a task as many threads
    as CPUs, pipeline/threads.py); another thread count sums in another order."""
    with _deterministic_on_cpu("cuda" if torch.cuda.is_available() else "cpu"):
        return _finetune(base_dir, seed_shards, out_dir, role, cfg, prompt, seed, holdout, reject_rate)


def _finetune(base_dir: str, seed_shards: list[str], out_dir: str, role: str, cfg: dict, prompt: str,
              seed: int, holdout: float, reject_rate: float | None) -> dict:
    from pipeline.optim import lr_lambda, param_groups
    from pipeline.modelio import load_pretrained, save_pretrained

    ft = build(FinetuneConfig, cfg, source=f"capfilt.{role}")
    started = time.time()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, info = load_pretrained(base_dir, device)
    precision = resolve((info.get("pretrain") or {}).get("precision", "auto"))
    model.train()
    special = SpecialTokens(pad=tok.pad_token_id, cls=tok.cls_token_id, sep=tok.sep_token_id, mask=tok.mask_token_id)
    spec = StreamSpec(shards=tuple(seed_shards), rank=0, world=1, seed=seed, batch_size=ft.batch_size,
                      image_size=model.cfg.image_size, max_text_len=model.cfg.max_text_len,
                      tokenizer_dir=str(as_path(base_dir) / "tokenizer"), augment=True,
                      caption_prefix=prompt if role == "captioner" else "", holdout=holdout)
    optimizer = torch.optim.AdamW(param_groups(model, ft.weight_decay), lr=ft.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(ft))
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = ROLE_WEIGHTS[role]
    history = []
    queue = TextQueue(ft.text_queue) if ft.text_queue and "itm" in weights else None
    batches = iter(make_loader(spec))
    for step in range(1, ft.steps + 1):
        raw = next(batches)
        batch = Batch(raw["images"].to(device), raw["ids"].to(device), raw["mask"].to(device))
        with precision.autocast(managed_by_deepspeed=False):
            losses = pretrain_losses(model, batch, special, weights, generator, ft.itm_easy_negatives, queue,
                                     ft.queue_in_itc)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == ft.steps:
            history.append({"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}})
    calibration = None
    if holdout > 0 and reject_rate is not None:
        model.eval()
        calibration = calibrate(model, tok, seed_shards, holdout, reject_rate, device, precision).to_json()
    out = as_path(out_dir)
    save_pretrained(out, model.cfg, model.state_dict(), as_path(base_dir) / "tokenizer",
                    {"role": role, "base_model": model_fingerprint(as_path(base_dir)), "finetune": cfg,
                     "prompt": prompt, "history": history, "calibration": calibration, **precision.to_json()})
    return {"role": role, "fingerprint": model_fingerprint(out), "final": history[-1],
            "duration_s": round(time.time() - started, 2), "calibration": calibration, **precision.to_json()}


def calibrate(model, tok, seed_shards: list[str], holdout: float, reject_rate: float, device: str,
              precision: Precision, batch_size: int = 64) -> Calibration:
    """Both match scores of the held-out (never trained on) clean seed pairs, and the rule fitted to them.
    `precision`: the fine-tune's, which its export records and the actors score in (`model_precision`)."""
    from pipeline.data.loader import decode_image, in_holdout
    from pipeline.data.shards import ShardCheck, read_input_shard

    # read as the fine-tune's own stream reads them: a sample with no image or caption is skipped, as is
    # one that does not decode, and counted; a cut shard is an InputError naming it
    images, captions, read = [], [], ShardCheck()
    for shard in seed_shards:
        for sample in read_input_shard(as_path(shard), read):
            if not in_holdout(sample["__key__"], holdout):
                continue
            try:
                image, caption = decode_image(sample["jpg"], model.cfg.image_size, None), sample["txt"].decode("utf-8")
            except Exception:  # noqa: BLE001 (an unusable pair is counted and skipped, not the stage's end)
                read.reject("decode_error")
                continue
            images.append(image)
            captions.append(caption)
    read.warn("capfilt: the filter's calibration pairs")
    itm, itc = [], []
    for i in range(0, len(images), batch_size):
        enc = tok(captions[i:i + batch_size], padding="max_length", truncation=True,
                  max_length=model.cfg.max_text_len, return_tensors="pt")
        with precision.autocast(managed_by_deepspeed=False):
            a, b = match_scores(model, torch.stack(images[i:i + batch_size]).to(device),
                                enc["input_ids"].to(device), enc["attention_mask"].to(device))
        itm.append(a)
        itc.append(b)
    if not itm:
        raise ValueError(f"capfilt.calibration_share {holdout}: no seed pair falls in the held-out share")
    return Calibration.fit(torch.cat(itm), torch.cat(itc), reject_rate)
