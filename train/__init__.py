"""vqim reference training stack (losses, optimizers, loops, export to the engine format)."""

from .optim import Adafactor

__all__ = ["Adafactor"]
