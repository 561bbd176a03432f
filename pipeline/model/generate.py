"""Caption generation with the captioner mode: nucleus sampling, repetition penalty, KV cache."""
from __future__ import annotations

import torch

from pipeline.model.multiway import MultiwayTransformer


@torch.no_grad()
def generate(model: MultiwayTransformer, images: torch.Tensor, prompt: torch.Tensor, *, sep_id: int, pad_id: int,
             max_len: int, min_len: int = 0, top_p: float | None = 0.9, repetition_penalty: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue `prompt` ([B, P] ids starting with [CLS]) for each image until [SEP] or `max_len` text
    tokens in all. `top_p=None` decodes greedily. With `use_cache` the image and the text so far are
    encoded once and each step runs one token through the blocks; without, every step re-encodes all."""
    b, p = prompt.shape
    max_len = min(max_len, model.cfg.max_text_len)
    ids = prompt
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    cache = model.new_cache() if use_cache else None
    ones = torch.ones_like(prompt)
    hidden = model("fuse", images, prompt, ones, causal=True, cache=cache)[:, -1]
    for step in range(p, max_len):
        logits = model("lm_logits", hidden).float()
        logits = _penalise_repeats(logits, ids, repetition_penalty)
        if step - 1 < min_len:  # text so far excludes [CLS]: forbid ending too early
            logits[:, sep_id] = float("-inf")
        token = _pick(logits, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == sep_id
        if done.all() or step + 1 == max_len:
            break
        if use_cache:
            hidden = model("decode_step", token[:, None], step, cache)[:, -1]
        else:
            hidden = model("fuse", images, ids, torch.ones_like(ids), causal=True)[:, -1]
    return ids


def _penalise_repeats(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: make tokens already in the sequence less likely."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, ids, seen)


def _pick(logits: torch.Tensor, top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    if top_p is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(1, choice).squeeze(1)
