"""Model sizes. Plain dataclasses: the model package imports only torch (and the standard library)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    vl_layers: int = 1
    """F: the top F blocks also have a VL-FFN, used for all tokens in fusion and captioner modes."""
    image_size: int = 32
    patch_size: int = 8
    max_text_len: int = 24
    vocab_size: int = 1000
    embed_dim: int = 128
    """Width of the ITC projection."""
    dropout: float = 0.0
    stem: str = "patch"
    """How pixels become tokens: "patch" (ViT's one strided convolution, patch_size x patch_size) or
    "conv" (stride-2 3x3 convolutions down to the same grid, then a norm: sees edges and corners inside
    a patch, which small objects need)."""
    cls_from_patches: bool = False
    """Start the image [CLS] token from the mean of the patch tokens (plus the learned [CLS]), as global
    average pooling does: it carries the image's content from the first step instead of having to learn
    where to look first."""
    pos_init: str = "trunc_normal"
    """Initial image position embeddings: "trunc_normal" (std 0.02, ViT/BEiT) or "sincos" (2-D sine-cosine,
    unit amplitude, MAE): position is then visible from the first step instead of 6% of each token."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon (ViT and BEiT checkpoints use 1e-12; a model initialised from one takes theirs)."""
    layer_scale: float = 0.0
    """LayerScale (CaiT, BEiT): learned per-channel factors on every residual branch, starting at this
    value; 0 for none. A model initialised from a BEiT checkpoint takes BEiT's factors."""

    rel_pos_bias: str = "none"
    """BEiT's relative position bias on image-to-image attention (a learned bias per head for each offset
    between two patches, and for [CLS]): "none", "shared" (one table for every block) or "layer" (one
    per block). The BEiT checkpoints VLMo starts from use it; a model initialised from one takes theirs."""
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """The per-channel normalisation (of [0, 1] RGB) the image tower was trained with. vlp's loaders give
    (x - 0.5) / 0.5; when these differ (a DeiT checkpoint: ImageNet's statistics), embed_image turns
    one into the other, so every caller, the Hugging Face export included, feeds the same pixels."""

    def __post_init__(self) -> None:
        for name in ("pixel_mean", "pixel_std"):   # a list from YAML / JSON
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name}: three values (R, G, B), got {getattr(self, name)}")
        if min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_std: must be > 0, got {self.pixel_std}")
        if self.width % self.heads:
            raise ValueError(f"width: {self.width} is not divisible by heads {self.heads}")
        if not 0 <= self.vl_layers <= self.depth:
            raise ValueError(f"vl_layers: must be in 0..depth ({self.depth}), got {self.vl_layers}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.max_text_len < 4:
            raise ValueError("max_text_len: must be >= 4")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem: one of patch, conv; got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ValueError(f"patch_size: the conv stem halves the image per layer, so it needs a power of 2, "
                             f"got {self.patch_size}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps: must be in (0, 1), got {self.norm_eps}")
        if self.layer_scale < 0:
            raise ValueError(f"layer_scale: must be >= 0 (0: none), got {self.layer_scale}")
        if self.rel_pos_bias not in ("none", "shared", "layer"):
            raise ValueError(f"rel_pos_bias: one of none, shared, layer; got {self.rel_pos_bias!r}")
        if self.pos_init not in ("trunc_normal", "sincos"):
            raise ValueError(f"pos_init: one of trunc_normal, sincos; got {self.pos_init!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Named sizes. base/large follow VLMo (BEiT-style ViT-B/16 and ViT-L/16 at 224 px, 40 text tokens,
# BERT's 30522-token vocabulary); tiny is for tests, demo learns the toy web in minutes on 2 CPU cores:
# 64 px through a conv stem to 4 x 4 tokens (small objects need the pixels and the convolutions; the
# transformer's cost is that of 32 px with 8 px patches).
SIZES = {
    "tiny": ModelConfig(width=32, depth=2, heads=2, mlp_ratio=2.0, vl_layers=1, image_size=32, patch_size=8,
                        max_text_len=16, vocab_size=512, embed_dim=32, stem="conv", cls_from_patches=True),
    "demo": ModelConfig(width=128, depth=4, heads=4, mlp_ratio=4.0, vl_layers=1, image_size=64, patch_size=16,
                        max_text_len=16, vocab_size=1000, embed_dim=128, stem="conv", cls_from_patches=True),
    "base": ModelConfig(width=768, depth=12, heads=12, mlp_ratio=4.0, vl_layers=2, image_size=224, patch_size=16,
                        max_text_len=40, vocab_size=30522, embed_dim=768),
    "large": ModelConfig(width=1024, depth=24, heads=16, mlp_ratio=4.0, vl_layers=3, image_size=224, patch_size=16,
                         max_text_len=40, vocab_size=30522, embed_dim=1024),
}
