"""Linear probes: which labelled attributes of an image can be read off the frozen image features?

Used by the evaluate stage when the held-out split labels its images (the toy web's eval split carries
`attributes` in each sample's json: shape, colour, size, position, background). For each attribute a
multinomial logistic regression (L2, full-batch L-BFGS) is trained on the [CLS] features of k-1 folds
and scored on the held-out fold; the accuracy is the mean over folds. A retrieval score says whether
the whole caption matches; the probe says which attribute the encoder has not learned yet, which is
what bounds the CapFilt filter (it can only reject a caption that gets an attribute wrong if the image
features tell that attribute apart).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def probe_accuracy(features: torch.Tensor, labels: list[dict[str, str]], folds: int = 5,
                   l2: float = 1e-3) -> dict[str, float]:
    """{attribute: held-out accuracy} for every attribute that all `labels` name (deterministic)."""
    n = features.shape[0]
    names = sorted(set.intersection(*(set(lab) for lab in labels))) if labels else []
    if n < 2 * folds or not names:
        return {}
    x = features.float()
    fold_of = torch.arange(n) % folds  # rows are in shard order, not grouped by label
    out = {}
    for name in names:
        classes = sorted({lab[name] for lab in labels})
        y = torch.tensor([classes.index(lab[name]) for lab in labels])
        correct = 0
        for k in range(folds):
            train, test = fold_of != k, fold_of == k
            mean, std = x[train].mean(0), x[train].std(0) + 1e-6
            head = _fit((x[train] - mean) / std, y[train], len(classes), l2)
            correct += int((head((x[test] - mean) / std).argmax(1) == y[test]).sum())
        out[name] = round(correct / n, 4)
    return out


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.nn.Linear:
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head
