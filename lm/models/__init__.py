from lm.models.config import DecoderConfig, LayerSpec
from lm.models.decoder import DecoderLM

__all__ = ["DecoderConfig", "DecoderLM", "LayerSpec"]
