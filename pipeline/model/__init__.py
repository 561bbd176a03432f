"""The MoME Multiway Transformer: torch only (no Ray, no DeepSpeed), loadable anywhere."""
from pipeline.model.config import SIZES, ModelConfig
from pipeline.model.multiway import MultiwayTransformer, count_parameters

__all__ = ["SIZES", "ModelConfig", "MultiwayTransformer", "count_parameters"]
