"""How well a text matches an image, as the CapFilt filter judges it.

Two views of one model: the ITM head's log-odds (fusion encoder: reads the text against the image's
tokens; good at details it was trained to check, blind to text that is not a caption at all) and the
ITC cosine (the two encoders' features; sees garbage and mismatched text at once, and what the image
[CLS] knows). The calibrated rule adds both after standardising each on clean held-out pairs, and keeps
a text whose sum is above what the lowest `reject_rate` of those clean pairs score. That quantile is
read from the lower side of their sums only: the median minus the normal quantile times the RMS distance
of the sums below the median. Clean sums are skewed to the left (a clean pair the model misreads scores
low, none scores unusually high), so a normal fit of all of them placed the threshold too high: on the
demo's web it rejected 4.1% of clean pairs when asked for 3%, the lower-side fit 3.2%. It is steadier
than an empirical tail of a few hundred pairs (at 1% that is the 2nd lowest of 195) and equals the
normal fit on normal data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

import torch


@torch.no_grad()
def match_scores(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITM log-odds of "match", ITC cosine similarity) per (image, text) row, float32 on the CPU."""
    tokens = model("embed_image", images)
    logits = model("itm_logits", model("fuse", tokens, ids, mask, embedded=True)).float()
    _, image_feat = model("encode_image", tokens, embedded=True)
    _, text_feat = model("encode_text", ids, mask)
    cosine = (image_feat.float() * text_feat.float()).sum(-1)
    return (logits[:, 1] - logits[:, 0]).cpu(), cosine.cpu()


@dataclass(frozen=True)
class Calibration:
    """Standardisation of both scores and the keep threshold, measured on clean held-out pairs."""
    itm_mean: float
    itm_std: float
    itc_mean: float
    itc_std: float
    threshold: float
    reject_rate: float
    pairs: int

    @classmethod
    def fit(cls, itm: torch.Tensor, itc: torch.Tensor, reject_rate: float) -> "Calibration":
        if len(itm) < 10:
            raise ValueError(f"calibration needs at least 10 clean held-out pairs, got {len(itm)}")
        im, isd = itm.mean().item(), itm.std().item() + 1e-6
        cm, csd = itc.mean().item(), itc.std().item() + 1e-6
        combined = ((itm - im) / isd + (itc - cm) / csd).double()
        median = combined.median().item()
        below = combined[combined < median] - median
        lower_spread = below.square().mean().sqrt().item() if len(below) else 0.0
        threshold = median + NormalDist().inv_cdf(reject_rate) * lower_spread
        return cls(im, isd, cm, csd, threshold, reject_rate, len(itm))

    def combine(self, itm: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
        return (itm - self.itm_mean) / self.itm_std + (itc - self.itc_mean) / self.itc_std

    def to_json(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def rerank_score(itm_logits: torch.Tensor, itc_logit: torch.Tensor) -> torch.Tensor:
    """The re-rank score of (image, text) candidates: log P(match) from the ITM head plus the ITC logit
    (1 / temperature x cosine), the two experts' log-likelihoods multiplied. BLIP re-ranks by ITM score
    plus ITC similarity; both terms here are in the same unit (a log-odds), so neither is a tie-breaker
    for the other. ITM alone (ALBEF) throws away what ITC already knows: on the demo's round-0 model the
    ITM head told the right caption from a wrong one among the ITC top 16 with AUC 0.82 where ITC itself
    had 0.95, and re-ranking by it alone cost 28 points of TR@1 (docs/architecture.md, "Retrieval")."""
    return torch.log_softmax(itm_logits.float(), dim=-1)[..., 1] + itc_logit.float()

