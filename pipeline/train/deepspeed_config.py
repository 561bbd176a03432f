"""DeepSpeed: the config we hand it, and importing it with the right accelerator."""
from __future__ import annotations

import os

from pipeline.config import PretrainConfig


def import_deepspeed():
    """Import deepspeed, telling it to use the CPU accelerator where there is no GPU (it must be told
    before its first import)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def deepspeed_config(cfg: PretrainConfig, world_size: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # torch_adam: DeepSpeed's fused CPU Adam would need a compiled op; torch's AdamW is enough here.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                  "torch_adam": True}},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
