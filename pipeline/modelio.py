"""A trained model on disk: `model.safetensors`, `config.yaml` (model + training config) and the
tokenizer folder. Loading needs torch, safetensors and transformers only: no DeepSpeed, no Ray."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from pipeline.errors import InputError
from pipeline.fsutil import atomic_path
from pipeline.model import ModelConfig, MultiwayTransformer
from pipeline.storage import as_path, local_copy, remove_tree


def save_pretrained(folder: Path, model_cfg: ModelConfig, state_dict: dict, tokenizer_dir: Path, info: dict) -> None:
    from dataclasses import asdict

    from safetensors.torch import save_file

    if folder.exists():
        remove_tree(folder)
    with atomic_path(folder) as tmp, local_copy(as_path(tokenizer_dir)) as tokenizer:
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        shutil.copytree(tokenizer, tmp / "tokenizer")
        (tmp / "config.yaml").write_text(yaml.safe_dump({"model": asdict(model_cfg), **info}, sort_keys=False))


def read_info(folder: str | Path) -> dict:
    """An export's config.yaml: {"model": ModelConfig fields, ...training info}."""
    return yaml.safe_load((as_path(folder) / "config.yaml").read_text())


def load_pretrained(folder: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, config dict) from a folder written by save_pretrained."""
    from safetensors.torch import load_file

    from pipeline.data.tokenizer import load_tokenizer

    folder = as_path(folder)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.yaml").is_file():
        raise InputError(f"{folder}: not an exported vlp model (model.safetensors + config.yaml expected)")
    info = read_info(folder)
    model = MultiwayTransformer(ModelConfig(**info["model"]))
    with local_copy(folder / "model.safetensors") as weights:
        missing, unexpected = model.load_state_dict(load_file(str(weights), device=device), strict=False)
    if missing or unexpected:
        raise InputError(f"{folder}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), load_tokenizer(folder / "tokenizer"), info
