"""Image-text retrieval recall at k: one implementation for the held-out split (stages/evaluate/stage.py) and the
standard benchmarks (pipeline/benchmarks.py), which differ only in which texts are right for an image.

Ranked by ITC similarity ("itc"), and each query's ITC top k re-ranked by the ITM head alone ("itm", as
ALBEF) and by ITM and ITC together ("rerank", as BLIP; `rerank_score`), the rest of the candidates keeping
their ITC order below the k. A query's hit at r: a right candidate ranks among its first r, where a
candidate's rank is the number of candidates scoring strictly above the best right one (COCO's rule).
A re-rank is turned into positions first, so a tie of two saturated probabilities keeps the ITC order
instead of counting as a hit.
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.model.scoring import rerank_score

RANKS = (1, 5, 10)


@torch.no_grad()
def retrieval_recalls(sim: torch.Tensor, correct: torch.Tensor, k: int = 0,
                      itm_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      scale: float | torch.Tensor = 1.0, ranks: tuple[int, ...] = RANKS) -> dict:
    """sim [images, texts]: ITC similarities; correct [images, texts]: which texts are right for which
    image (and so which images for which text). With k > 0, `itm_logits(image_idx, text_idx)` gives the
    match head's [n, 2] logits of those pairs and `scale` is the ITC inverse temperature. Returns
    {itc,itm,rerank}_{tr,ir}_r{r} and itc_r_mean, and rerank_k where it re-ranked."""
    sim, correct = sim.float().cpu(), correct.bool().cpu()
    out: dict = {}
    for direction, scores, right in (("tr", sim, correct), ("ir", sim.t(), correct.t())):
        out.update(recalls("itc", direction, scores, right, ranks))
        kk = min(k, scores.shape[1])
        if not kk or itm_logits is None:
            continue
        top = scores.topk(kk, dim=1).indices                 # [queries, k], in ITC order
        queries, cand = torch.arange(scores.shape[0]).repeat_interleave(kk), top.reshape(-1)
        pair = (queries, cand) if direction == "tr" else (cand, queries)
        logits = itm_logits(*pair).float().cpu().reshape(-1, kk, 2)
        itc_logit = torch.as_tensor(scale).float().cpu() * scores.gather(1, top)
        for name, score in (("itm", logits.softmax(-1)[..., 1]), ("rerank", rerank_score(logits, itc_logit))):
            out.update(recalls(name, direction, reranked(scores, top, score), right, ranks))
        out["rerank_k"] = kk
    out["itc_r_mean"] = round(sum(out[f"itc_{d}_r{r}"] for d in ("tr", "ir") for r in ranks) / (2 * len(ranks)), 4)
    return out


def itm_scorer(model, pixels: torch.Tensor | Callable[[], torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
               batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `itm_logits(image_idx, text_idx)` that retrieval_recalls re-ranks with: the match head's [n, 2]
    logits of those (image, text) pairs, fused in batches. `pixels`: the images [n, 3, H, W], or a function
    that returns them, called once and only when a re-rank asks (a benchmark decodes its images only then)."""
    held: list[torch.Tensor] = []

    def itm_logits(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        if not held:
            held.append(pixels() if callable(pixels) else pixels)
        images = held[0]
        image_idx, text_idx = image_idx.to(images.device), text_idx.to(images.device)
        return torch.cat([model("itm_logits", model("fuse", images[image_idx[i:i + batch_size]],
                                                    ids[text_idx[i:i + batch_size]], mask[text_idx[i:i + batch_size]])
                                ).float().cpu() for i in range(0, len(image_idx), batch_size)])
    return itm_logits


def recalls(name: str, direction: str, scores: torch.Tensor, right: torch.Tensor,
            ranks: tuple[int, ...] = RANKS) -> dict:
    """scores, right: [queries, candidates]. {name}_{direction}_r{r}: the share of queries with a right
    candidate ranked among the first r (a query with none counts as a miss)."""
    best = scores.masked_fill(~right, float("-inf")).max(1, keepdim=True).values
    rank = (scores > best).sum(1).masked_fill(~right.any(1), scores.shape[1])
    return {f"{name}_{direction}_r{r}": round((rank < r).float().mean().item(), 4) for r in ranks}


def reranked(scores: torch.Tensor, top: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """scores [queries, candidates]; top [queries, k], each query's candidates in ITC order; score the
    re-ranker's score of each. A matrix that ranks them first, in the re-ranker's order, and every other
    candidate after them in ITC order. Positions, not scores: the sort is stable, so ties keep ITC's order."""
    k = top.shape[1]
    order = top.gather(1, score.argsort(dim=1, descending=True, stable=True))
    out = scores - scores.max() - 1.0
    return out.scatter_(1, order, float(k) - torch.arange(k, dtype=scores.dtype).expand(len(order), k))
