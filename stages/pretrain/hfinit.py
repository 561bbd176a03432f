"""Start the Multiway Transformer from Hugging Face checkpoints, as VLMo starts from BEiT and BLIP from
DeiT + BERT: the shared self-attention and *every* FFN expert (V, L and VL) from the vision checkpoint,
the word (and position) embeddings and the tokenizer from the text checkpoint; the rest (ITC
projections, heads, type embedding of text) keeps its seeded random init.

Checkpoints are read from their files (safetensors, sharded or not, or pytorch_model.bin) under the
names transformers writes to disk, which have stayed the same across its versions; no model class is
instantiated, so a `base` model costs its weights once in memory. Accepted: ViT (and the non-distilled
DeiT checkpoints, which are ViTs), DeiT with a distillation token (the token is dropped: the multiway
model has one [CLS]) and BEiT with absolute position embeddings or relative position bias, shared or
per layer (its LayerScale factors and bias tables become the model's).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.model import ModelConfig, MultiwayTransformer
from pipeline.model.multiway import IMAGE, TEXT
from pipeline.storage import as_path, local_copy

VISION_TYPES = ("vit", "deit", "beit")


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder}: no config.json (a Hugging Face model folder is expected)")
    return json.loads(path.read_text())


def vision_overrides(hf: dict, folder: Path) -> dict:
    """ModelConfig fields a vision checkpoint dictates (the architecture it was trained with); sizes are
    not overridden: they must match the chosen model size, and a mismatch names the tensors."""
    kind = hf.get("model_type")
    if kind not in VISION_TYPES:
        raise InputError(f"{folder}: model_type {kind!r} is not a vision checkpoint this model can start from "
                         f"(one of {', '.join(VISION_TYPES)})")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise InputError(f"{folder}: hidden_act {hf['hidden_act']!r}; the multiway FFN uses gelu")
    rel_pos = "none"
    if kind == "beit":
        if hf.get("use_shared_relative_position_bias") and hf.get("use_relative_position_bias"):
            raise InputError(f"{folder}: both use_shared_relative_position_bias and use_relative_position_bias "
                             f"are set; the multiway model has one kind of relative position bias")
        rel_pos = "shared" if hf.get("use_shared_relative_position_bias") else \
            "layer" if hf.get("use_relative_position_bias") else "none"
        if rel_pos == "none" and not hf.get("use_absolute_position_embeddings"):
            raise InputError(f"{folder}: neither absolute nor relative positions: this BEiT has no position "
                             f"information the multiway model could take")
    return {"stem": "patch", "cls_from_patches": False, "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
            "rel_pos_bias": rel_pos,
            "layer_scale": float(hf.get("layer_scale_init_value") or 0.0) if kind == "beit" else 0.0,
            **pixel_statistics(kind, folder)}


# transformers' image processors' defaults when a folder has no preprocessor_config.json: ViT and BEiT
# normalise with 0.5 / 0.5, DeiT with ImageNet's statistics.
DEFAULT_PIXEL_STATS = {"vit": ((0.5,) * 3, (0.5,) * 3), "beit": ((0.5,) * 3, (0.5,) * 3),
                       "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def pixel_statistics(kind: str, folder: Path) -> dict:
    """The mean / std the checkpoint's images were normalised with, from its preprocessor_config.json."""
    mean, std = DEFAULT_PIXEL_STATS[kind]
    path = folder / "preprocessor_config.json"
    if path.is_file():
        pre = json.loads(path.read_text())
        if pre.get("do_rescale") is False:
            raise InputError(f"{path}: do_rescale is false (pixels in 0..255); the model reads [0, 1] pixels")
        if pre.get("do_normalize") is False:
            mean, std = (0.0,) * 3, (1.0,) * 3
        else:
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    mean, std = ([v] * 3 if isinstance(v, (int, float)) else v for v in (mean, std))   # one value: every channel
    return {"pixel_mean": tuple(map(float, mean)), "pixel_std": tuple(map(float, std))}


def init_state(model_cfg: ModelConfig, vision: str | None, text: str | None, seed: int) -> tuple[ModelConfig, dict]:
    """(the model config to train, a complete state dict): the seeded random init of `model_cfg`, with
    the named parts replaced from the checkpoints. Every mismatch is reported at once."""
    if vision:
        with local_copy(as_path(vision)) as folder:
            hf_vision = read_hf_config(folder)
            model_cfg = model_cfg.replace(**vision_overrides(hf_vision, folder))
            _check_vision_sizes(hf_vision, model_cfg, folder)
            try:
                vision_tensors = _vision_tensors(_read_weights(folder, "embeddings.cls_token"), hf_vision, model_cfg)
            except KeyError as missing:
                raise InputError(f"{folder}: the checkpoint lacks the tensor {missing}") from None
    torch.manual_seed(seed)          # the training workers build their model from the same seed
    state = MultiwayTransformer(model_cfg).state_dict()
    wanted: dict[str, tuple[str, torch.Tensor]] = {}
    if vision:
        wanted.update({dst: (f"vision {src}", t) for dst, (src, t) in vision_tensors.items()})
        state["type_embed.weight"][IMAGE] = 0.0   # image tokens are then exactly the checkpoint's
    if text:
        with local_copy(as_path(text)) as folder:
            read_hf_config(folder)
            raw = _read_weights(folder, "embeddings.word_embeddings.weight")
        wanted["token_embed.weight"] = ("text embeddings.word_embeddings.weight", raw["embeddings.word_embeddings.weight"])
        pos = raw.get("embeddings.position_embeddings.weight")
        if pos is not None and pos.shape[0] >= model_cfg.max_text_len:
            wanted["text_pos"] = ("text embeddings.position_embeddings.weight", pos[None, :model_cfg.max_text_len])
        types = raw.get("embeddings.token_type_embeddings.weight")
        if types is not None and types.shape[-1] == model_cfg.width:
            state["type_embed.weight"][TEXT] = types[0]
    wrong = [f"{src} {tuple(t.shape)} -> {dst} {tuple(state[dst].shape)}"
             for dst, (src, t) in wanted.items() if tuple(t.shape) != tuple(state[dst].shape)]
    if wrong:
        raise InputError("pretrain.init_from: tensor shapes differ from the model's (pick a model size whose "
                         "width, depth, mlp_ratio, image_size, patch_size and vocabulary match): " + "; ".join(wrong))
    for dst, (_, tensor) in wanted.items():
        state[dst] = tensor.to(state[dst].dtype).clone()
    return model_cfg, state


def _check_vision_sizes(hf: dict, cfg: ModelConfig, folder: Path) -> None:
    """Sizes no tensor shape shows (heads) or that show only as an opaque shape (depth)."""
    for key, ours in (("num_attention_heads", cfg.heads), ("num_hidden_layers", cfg.depth)):
        if key in hf and hf[key] != ours:
            raise InputError(f"{folder}: {key} is {hf[key]}, the model has {ours} "
                             f"(pick a model size that matches the checkpoint)")


def _vision_tensors(raw: dict, hf: dict, cfg: ModelConfig) -> dict[str, tuple[str, torch.Tensor]]:
    """Multiway parameter name -> (checkpoint name, tensor)."""
    out = {"patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
           "image_cls": "embeddings.cls_token", "image_pos": "embeddings.position_embeddings"}
    if "layernorm.weight" in raw:    # a mean-pooling BEiT has none; the final norm then keeps its init
        out.update({"norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"})
    if "embeddings.position_embeddings" not in raw:   # relative positions only: no absolute ones
        del out["image_pos"]
    result = {dst: (src, raw[src]) for dst, src in out.items()}
    if "image_pos" not in result:
        result["image_pos"] = ("no position embeddings (relative positions only): zeros",
                               torch.zeros(1, 1 + cfg.num_patches, cfg.width))
    table = "relative_position_bias.relative_position_bias_table"
    if cfg.rel_pos_bias == "shared":
        result["rel_pos.table"] = (f"encoder.{table}", raw[f"encoder.{table}"])
    if hf["model_type"] == "deit":   # positions: [CLS], distillation, patches
        pos = raw["embeddings.position_embeddings"]
        result["image_pos"] = ("embeddings.position_embeddings without the distillation token",
                               torch.cat([pos[:, :1], pos[:, 2:]], dim=1))
    experts = ["v_ffn", "l_ffn"]
    for i in range(cfg.depth):
        layer = f"encoder.layer.{i}."
        att = layer + "attention.attention."
        q, k, v = (raw[f"{att}{n}.weight"] for n in ("query", "key", "value"))
        bias = [raw.get(f"{att}{n}.bias", torch.zeros(q.shape[0])) for n in ("query", "key", "value")]  # BEiT: no key bias
        block = f"blocks.{i}."
        result[block + "attn.qkv.weight"] = (f"{att}query/key/value.weight", torch.cat([q, k, v]))
        result[block + "attn.qkv.bias"] = (f"{att}query/key/value.bias", torch.cat(bias))
        pairs = {"norm.weight": "layernorm_before.weight", "norm.bias": "layernorm_before.bias",
                 "attn.proj.weight": "attention.output.dense.weight", "attn.proj.bias": "attention.output.dense.bias"}
        if cfg.layer_scale:
            pairs["attn_scale"] = "lambda_1"
        if cfg.rel_pos_bias == "layer":
            pairs["rel_pos.table"] = f"attention.attention.{table}"
        ffn = {"norm.weight": "layernorm_after.weight", "norm.bias": "layernorm_after.bias",
               "fc1.weight": "intermediate.dense.weight", "fc1.bias": "intermediate.dense.bias",
               "fc2.weight": "output.dense.weight", "fc2.bias": "output.dense.bias"}
        if cfg.layer_scale:
            ffn["scale"] = "lambda_2"
        for expert in experts + (["vl_ffn"] if i >= cfg.depth - cfg.vl_layers else []):
            pairs.update({f"{expert}.{ours}": theirs for ours, theirs in ffn.items()})
        for ours, theirs in pairs.items():
            result[block + ours] = (layer + theirs, raw[layer + theirs])
    return result


def _read_weights(folder: Path, anchor: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, their names stripped of a head model's prefix ("vit.",
    "bert.", ...), found as whatever comes before `anchor`."""
    tensors = _load_files(folder)
    prefixes = [name[: -len(anchor)] for name in tensors if name.endswith(anchor)]
    if not prefixes:
        raise InputError(f"{folder}: the checkpoint has no {anchor!r} (not a model of the expected kind)")
    prefix = min(prefixes, key=len)
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def _load_files(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise InputError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def checkpoint_files(folder: str) -> list[str]:
    """The files whose content makes an init (for the stage fingerprint), sorted."""
    root = as_path(folder)
    return sorted(str(p) for p in root.iterdir() if p.is_file() and re.search(r"\.(json|safetensors|bin|txt|model)$", p.name))
