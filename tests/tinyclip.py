"""A tiny random CLIPModel saved as a Hub checkpoint is (config, safetensors, tokenizer, image processor):
what score_filter's tests and bench/shardmap.py load through transformers' Auto classes. Seeded: the
same arguments give the same weights."""
from __future__ import annotations

from pathlib import Path


def save_tiny_clip(folder: Path, words: list[str], width: int, layers: int, heads: int, intermediate: int,
                   image_size: int, projection_dim: int, max_positions: int, patch_size: int = 8) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pipeline.data.tokenizer import train_tokenizer

    tok = train_tokenizer([" ".join(words)] * 4, 120, folder)
    torch.manual_seed(0)
    tower = {"hidden_size": width, "intermediate_size": intermediate, "num_hidden_layers": layers,
             "num_attention_heads": heads}
    cfg = CLIPConfig(text_config={**tower, "vocab_size": len(tok), "max_position_embeddings": max_positions,
                                  "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id,
                                  "bos_token_id": tok.cls_token_id},
                     vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
                     projection_dim=projection_dim)
    CLIPModel(cfg).eval().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
