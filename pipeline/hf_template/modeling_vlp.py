"""A vlp MoME Multiway Transformer (VLMo-style) as a transformers model: the same code (multiway.py,
config.py beside this file) and weights as vlp's own export, behind transformers' loading API.

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    image_embeds = model.get_image_features(pixel_values)                # L2-normalised ITC features
    text_embeds = model.get_text_features(input_ids, attention_mask)
    out = model(pixel_values=..., input_ids=..., attention_mask=...)     # both, and CLIP-style logits
    model.multiway("fuse", ...), model.multiway("itm_logits", ...)     # fusion, ITM, LM: vlp's modes

The same class answers AutoModelForZeroShotImageClassification (config.json's auto_map), so
transformers' zero-shot-image-classification pipeline takes the folder: it reads
`logits_per_image` (the ITC similarities times the learned scale) and softmaxes them over the labels.
"""
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .config import ModelConfig
from .configuration_vlp import VlpMultiwayConfig
from .multiway import MultiwayTransformer


@dataclass
class VlpMultiwayOutput(ModelOutput):
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_hidden_states: torch.Tensor | None = None
    text_hidden_states: torch.Tensor | None = None


class VlpMultiwayModel(PreTrainedModel):
    config_class = VlpMultiwayConfig
    base_model_prefix = "multiway"
    main_input_name = "pixel_values"

    def __init__(self, config: VlpMultiwayConfig):
        super().__init__(config)
        self.multiway = MultiwayTransformer(ModelConfig(**config.multiway))
        self.post_init()

    def _init_weights(self, module):
        """Nothing: MultiwayTransformer initialises itself, and a loaded model takes every weight from
        model.safetensors."""

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multiway("encode_image", pixel_values)[1]

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._encode_text(input_ids, attention_mask)[1]

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        limit = self.multiway.cfg.max_text_len
        if input_ids.shape[-1] > limit:
            raise ValueError(f"input_ids has {input_ids.shape[-1]} positions, the model has {limit}: tokenize "
                             "with truncation=True (the folder's processor does), or use shorter texts")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.multiway("encode_text", input_ids, attention_mask)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, **kwargs) -> VlpMultiwayOutput:
        """Either input or both; `kwargs` takes what a BERT tokenizer adds (token_type_ids), unused."""
        out = VlpMultiwayOutput()
        if pixel_values is not None:
            out.image_hidden_states, out.image_embeds = self.multiway("encode_image", pixel_values)
        if input_ids is not None:
            out.text_hidden_states, out.text_embeds = self._encode_text(input_ids, attention_mask)
        if out.image_embeds is not None and out.text_embeds is not None:
            out.logits_per_image = self.multiway("itc_scale") * out.image_embeds @ out.text_embeds.t()
            out.logits_per_text = out.logits_per_image.t()
        return out
