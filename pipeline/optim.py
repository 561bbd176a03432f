"""The optimiser's parameter groups and the learning-rate schedule, shared by pretraining and the
CapFilt fine-tunes."""
from __future__ import annotations

import math

import torch



def lr_lambda(cfg):
    """Linear warmup to lr, then cosine down to lr x min_lr_ratio at the last step (`cfg`: a training
    stage's settings, with steps, warmup_steps and min_lr_ratio)."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings of positions/CLS and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(("_pos", "_cls")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
