"""MoME Multiway Transformer (VLMo): one shared self-attention per block, FFN experts by modality.

Routing of a block's FFN:
  * image-only input: V-FFN in every block; text-only input: L-FFN in every block;
  * image + text (fusion and captioner modes): V-FFN for image tokens and L-FFN for text tokens in the
    bottom blocks, and VL-FFN for all tokens in the top `vl_layers` blocks.
Each expert owns its pre-FFN LayerNorm, as in VLMo, so the statistics of each modality stay apart.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

# relative, so that this file and config.py also work as the modelling code of a Hugging Face export
from .config import ModelConfig

IMAGE, TEXT = 0, 1


class Attention(nn.Module):
    fp32_under_cpu_autocast = True
    """Under bf16 autocast on a CPU, compute the attention itself (softmax(QK^T)V, forward and backward)
    in fp32; the projections stay in bf16. torch's bf16 attention backward on CPU was 48% of the demo's
    step on a Xeon with AMX, and the step ran 1.8x as fast with it in fp32 (issue #30); 1.35-1.55x on a
    2-core AVX512-BF16 EPYC (BENCHMARKS.md, "Training precision"). On a GPU the bf16 kernels (flash,
    memory-efficient) are the fast ones, so this applies to the CPU only."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: bool, broadcastable to [B, heads, Tq, Tk], True where a query may attend.
        `cache`: a dict that keeps this layer's keys/values across generation steps.
        `bias`: [heads, n, n] added to the logits among the first n tokens (the image's)."""
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        fp32 = self.fp32_under_cpu_autocast and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        if bias is not None:
            n = bias.shape[-1]
            bias = F.pad(bias, (0, k.shape[2] - n, 0, t - n)).to(q.dtype)[None]
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class Expert(nn.Module):
    """One FFN expert with its own pre-norm (and, with layer scale, its own per-channel output scale)."""

    def __init__(self, cfg: ModelConfig, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc1, self.fc2 = nn.Linear(cfg.width, hidden), nn.Linear(hidden, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = _layer_scale(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))
        return out if self.scale is None else out * self.scale


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias: a learned value per head for each (row, column) offset between two
    patches of the grid, and one each for [CLS] to patch, patch to [CLS] and [CLS] to itself (the
    indices BEiT's checkpoints are laid out in)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.grid = cfg.image_size // cfg.patch_size
        self.table = nn.Parameter(torch.zeros((2 * self.grid - 1) ** 2 + 3, cfg.heads))
        # Derived, so neither a parameter nor a buffer: a loader that builds the model on the meta device
        # (transformers' from_pretrained) restores only what the checkpoint holds and left a buffer garbage.
        self._index: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        if self._index is None or self._index.device != self.table.device:
            self._index = relative_position_index(self.grid).to(self.table.device)
        n = self._index.shape[0]
        return self.table[self._index.view(-1)].view(n, n, -1).permute(2, 0, 1)   # [heads, 1 + N, 1 + N]


def relative_position_index(grid: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)   # offsets from 0
    distances = (2 * grid - 1) ** 2
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :], index[:, 0], index[0, 0] = distances, distances + 1, distances + 2
    return index


class MultiwayBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, with_vl: bool):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.heads, cfg.dropout)
        self.attn_scale = _layer_scale(cfg)
        self.v_ffn = Expert(cfg, hidden)
        self.l_ffn = Expert(cfg, hidden)
        self.vl_ffn = Expert(cfg, hidden) if with_vl else None
        self.rel_pos = RelativePositionBias(cfg) if cfg.rel_pos_bias == "layer" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, route: str, n_image: int = 0,
                cache: dict | None = None, shared_bias: RelativePositionBias | None = None) -> torch.Tensor:
        """route: "v", "l", "vl" (one expert for all tokens) or "split" (first n_image tokens to V-FFN,
        the rest to L-FFN). With relative positions, the first n_image tokens are the image's (route
        "v": all of them)."""
        table = self.rel_pos if self.rel_pos is not None else shared_bias
        image_tokens = x.shape[1] if route == "v" else n_image
        bias = table() if table is not None and image_tokens else None
        attended = self.attn(self.norm(x), mask, cache, bias)
        x = x + (attended if self.attn_scale is None else attended * self.attn_scale)
        if route == "split":
            return x + torch.cat([self.v_ffn(x[:, :n_image]), self.l_ffn(x[:, n_image:])], dim=1)
        expert = {"v": self.v_ffn, "l": self.l_ffn, "vl": self.vl_ffn}[route]
        if expert is None:
            raise ValueError("this block has no VL-FFN")
        return x + expert(x)


class MultiwayTransformer(nn.Module):
    """Image encoder, text encoder, fusion encoder and captioner in one set of weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = ConvStem(w, cfg.patch_size) if cfg.stem == "conv" else \
            nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, w))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, w))
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, w))
        self.type_embed = nn.Embedding(2, w)
        first_vl = cfg.depth - cfg.vl_layers
        self.blocks = nn.ModuleList(MultiwayBlock(cfg, with_vl=i >= first_vl) for i in range(cfg.depth))
        self.rel_pos = RelativePositionBias(cfg) if cfg.rel_pos_bias == "shared" else None
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.image_proj = nn.Linear(w, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(w, cfg.embed_dim, bias=False)
        # shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes and cannot view a 0-dim tensor
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
        self.itm_head = nn.Linear(w, 2)
        self.lm_norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # decoder weight is tied to token_embed
        self.apply(_init)
        for p in (self.image_cls, self.image_pos, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)
        if cfg.pos_init == "sincos":
            with torch.no_grad():
                self.image_pos[0, 1:] = sincos_2d(cfg.image_size // cfg.patch_size, w)

    MODES = ("embed_image", "encode_image", "encode_text", "fuse", "decode_step", "itm_logits", "lm_logits",
             "itc_scale")

    def forward(self, mode: str, *args, **kwargs):
        """Every entry point goes through forward, e.g. `model("encode_image", images)`: DeepSpeed
        ZeRO-3 gathers a module's partitioned parameters in hooks around its forward, and this
        module's own parameters (CLS, positions, temperature, tied decoder) would otherwise be missed."""
        if mode not in self.MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(self.MODES)}")
        return getattr(self, mode)(*args, **kwargs)

    @property
    def first_vl(self) -> int:
        return self.cfg.depth - self.cfg.vl_layers

    # --- embeddings ---------------------------------------------------------------------------

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.pixel_mean != (0.5, 0.5, 0.5) or self.cfg.pixel_std != (0.5, 0.5, 0.5):
            # from the loaders' (x - 0.5) / 0.5 to the tower's own statistics; computed here, not kept in
            # a buffer (see RelativePositionBias: a meta-device loader would leave it garbage)
            mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
                         for v in (self.cfg.pixel_mean, self.cfg.pixel_std))
            images = (images * 0.5 + 0.5 - mean) / std
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        cls = self.image_cls.expand(x.shape[0], -1, -1)
        if self.cfg.cls_from_patches:
            cls = cls + x.mean(1, keepdim=True)
        x = torch.cat([cls, x], dim=1)
        return x + self.image_pos + self.type_embed.weight[IMAGE]

    def embed_text(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        pos = self.text_pos[:, start:start + ids.shape[1]]
        return self.token_embed(ids) + pos + self.type_embed.weight[TEXT]

    # --- modes --------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor, embedded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Image encoder: (hidden states, L2-normalised ITC feature). `embedded`: `images` are already
        tokens from `embed_image` (one embedding of a batch serves every objective of a step)."""
        x = images if embedded else self.embed_image(images)
        for block in self.blocks:
            x = block(x, None, "v", shared_bias=self.rel_pos)
        x = self.norm(x)
        return x, F.normalize(self.image_proj(x[:, 0]), dim=-1)

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text encoder: (hidden states, L2-normalised ITC feature of the [CLS] token)."""
        x = self.embed_text(ids)
        mask = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask, "l")
        x = self.norm(x)
        return x, F.normalize(self.text_proj(x[:, 0]), dim=-1)

    def fuse(self, images: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor,
             causal: bool = False, cache: list[dict] | None = None, embedded: bool = False) -> torch.Tensor:
        """Fusion encoder (bidirectional) or, with `causal`, the captioner: image tokens attend to image
        tokens only, text tokens to all image tokens and to earlier text. Returns the text positions'
        hidden states (the image positions' are never needed by a head). `embedded`: as in encode_image."""
        img = images if embedded else self.embed_image(images)
        n_img = img.shape[1]
        x = torch.cat([img, self.embed_text(ids)], dim=1)
        mask = joint_mask(attention_mask.bool(), n_img, causal)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, "vl" if i >= self.first_vl else "split", n_img,
                      cache[i] if cache is not None else None, self.rel_pos)
        return self.norm(x[:, n_img:])

    def decode_step(self, ids: torch.Tensor, position: int, cache: list[dict]) -> torch.Tensor:
        """Captioner, one new text token per sequence at text `position`, attending to everything in
        the cache (the image and earlier text). Returns the token's hidden state [B, 1, W]."""
        x = self.embed_text(ids, start=position)
        for i, block in enumerate(self.blocks):
            x = block(x, None, "vl" if i >= self.first_vl else "l", 0, cache[i])
        return self.norm(x)

    # --- heads --------------------------------------------------------------------------------

    def itc_scale(self) -> torch.Tensor:
        """The learnable inverse temperature, capped at 100 (temperature >= 0.01) as in CLIP."""
        return self.logit_scale.clamp(max=math.log(100)).exp().reshape(())

    def itm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        return self.itm_head(text_hidden[:, 0])

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for MLM and LM (decoder tied to the token embedding)."""
        return F.linear(self.lm_norm(hidden), self.token_embed.weight, self.lm_bias)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]


class ConvStem(nn.Module):
    """A small convolutional network in place of the patch projection (Xiao et al. 2021, "Early
    convolutions help transformers see better"): per stage a stride-2 and a stride-1 3x3 convolution,
    each with BatchNorm and ReLU, channels doubling up to the width, until one position per patch.
    A transformer from a patch projection learns shapes of small objects slowly; this learns them fast."""

    channels_last_under_cpu_autocast = True
    """Under bf16 autocast on a CPU, run the convolutions channels_last: oneDNN's bf16 convolutions use AMX
    only in that layout (+8% a demo step on a Xeon with AMX, issue #30; neutral on an AVX512-BF16 EPYC).
    Not in fp32, where it measured 0.97-0.99x and would change the bits of an fp32 run."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        stages = patch_size.bit_length() - 1
        channels = [3] + [max(32, width >> (stages - i)) for i in range(1, stages + 1)]
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            for stride, c in ((2, c_in), (1, c_out)):
                layers += [nn.Conv2d(c, c_out, 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU()]
        layers.append(nn.Conv2d(channels[-1], width, 1))
        self.convs = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, width, H / patch, W / patch], like the patch convolution."""
        cpu_autocast = images.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if self.channels_last_under_cpu_autocast and cpu_autocast:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.convs(images)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """[grid * grid, width] 2-D sine-cosine position code (row-major), half the channels per axis."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (ys.reshape(-1), xs.reshape(-1)):
        angles = axis[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    code = torch.cat(parts, dim=1)
    return F.pad(code, (0, width - code.shape[1]))


def joint_mask(text_mask: torch.Tensor, n_image: int, causal: bool) -> torch.Tensor:
    """Attention mask over [image tokens; text tokens], True where a query may attend a key."""
    b, t = text_mask.shape
    keys = torch.cat([text_mask.new_ones(b, n_image), text_mask], dim=1)  # padding never attended
    if not causal:
        return keys[:, None, None, :]
    n = n_image + t
    allowed = torch.zeros(n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :n_image] = True                                  # everyone sees the image
    allowed[n_image:, n_image:] = torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    # every row keeps the image columns, so even a padded query has something to attend
    return allowed[None, None] & keys[:, None, None, :]


def _layer_scale(cfg: ModelConfig) -> nn.Parameter | None:
    """LayerScale (CaiT, BEiT): a learned per-channel factor on a residual branch, or None without it."""
    return nn.Parameter(torch.full((cfg.width,), cfg.layer_scale)) if cfg.layer_scale else None


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
