"""Fine-tuning one copy of a pretrained model on the clean seed set, for CapFilt.

The captioner learns with the LM loss on `prompt + caption`; the filter with ITC + ITM, whose ITM
negatives are the hardest ones in the batch (sampled by ITC similarity), so it learns to tell a
caption from one that differs in a detail. Seed sets are small (BLIP: COCO), so this is a single
process with plain AdamW rather than a Ray Train job; it runs as one Ray task per copy.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.config import FinetuneConfig
from pipeline.configtree import build
from pipeline.data.loader import StreamSpec, make_loader
from pipeline.fsutil import sha256_file
from pipeline.model.objectives import Batch, SpecialTokens, pretrain_losses

OBJECTIVES = {"captioner": {"lm": 1.0}, "filter": {"itc": 1.0, "itm": 1.0}}


def model_fingerprint(folder: Path) -> str:
    """Identifies an exported model by its weights."""
    return sha256_file(folder / "model.safetensors")[:16]


def finetune(base_dir: str, seed_shards: list[str], out_dir: str, role: str, cfg: dict, prompt: str,
             seed: int) -> dict:
    """Fine-tune the model in `base_dir` as `role` and export it to `out_dir`; returns a summary."""
    from stages.pretrain_loop import lr_lambda, param_groups
    from pipeline.modelio import load_pretrained, save_pretrained

    ft = build(FinetuneConfig, cfg, source=f"capfilt.{role}")
    started = time.time()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, info = load_pretrained(base_dir, device)
    model.train()
    special = SpecialTokens(pad=tok.pad_token_id, cls=tok.cls_token_id, sep=tok.sep_token_id, mask=tok.mask_token_id)
    spec = StreamSpec(shards=tuple(seed_shards), rank=0, world=1, seed=seed, batch_size=ft.batch_size,
                      image_size=model.cfg.image_size, max_text_len=model.cfg.max_text_len,
                      tokenizer_dir=str(Path(base_dir) / "tokenizer"), augment=True,
                      caption_prefix=prompt if role == "captioner" else "")
    optimizer = torch.optim.AdamW(param_groups(model, ft.weight_decay), lr=ft.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(ft))
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = OBJECTIVES[role]
    history = []
    batches = iter(make_loader(spec))
    for step in range(1, ft.steps + 1):
        raw = next(batches)
        batch = Batch(raw["images"].to(device), raw["ids"].to(device), raw["mask"].to(device))
        losses = pretrain_losses(model, batch, special, weights, generator, ft.itm_easy_negatives)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == ft.steps:
            history.append({"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}})
    out = Path(out_dir)
    save_pretrained(out, model.cfg, model.state_dict(), Path(base_dir) / "tokenizer",
                    {"role": role, "base_model": model_fingerprint(Path(base_dir)), "finetune": cfg,
                     "prompt": prompt, "history": history})
    return {"role": role, "fingerprint": model_fingerprint(out), "final": history[-1],
            "duration_s": round(time.time() - started, 2)}
