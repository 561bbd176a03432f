"""DeepSpeed: the config we hand it (importing it and its first start: pipeline/deepspeed_setup.py)."""
from __future__ import annotations

from stages.pretrain.config import PretrainConfig


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
