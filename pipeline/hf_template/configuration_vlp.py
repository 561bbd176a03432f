"""Configuration of a vlp MoME Multiway Transformer exported for Hugging Face transformers
(written by `vlp export --format hf`; loaded with trust_remote_code=True)."""
from transformers import PretrainedConfig


class VlpMultiwayConfig(PretrainedConfig):
    model_type = "vlp_multiway"

    def __init__(self, multiway: dict | None = None, **kwargs):
        self.multiway = dict(multiway or {})
        """The fields of vlp's ModelConfig (config.py beside this file)."""
        super().__init__(**kwargs)
