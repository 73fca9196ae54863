"""vqim runtime: configs, weight loading, models, KV-cached generation and the Engine API."""

from .api import Engine
from .config import PRESETS, DecoderConfig, ModelConfig, TextEncoderConfig, VQGANConfig
from .models import ARDecoder, TextEncoder, VQIMModel, ViTVQGAN

__all__ = [
    "PRESETS",
    "ARDecoder",
    "DecoderConfig",
    "Engine",
    "ModelConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "VQGANConfig",
    "VQIMModel",
    "ViTVQGAN",
]
