"""vqim reference training stack (losses, optimizers, loops, export to the engine format)."""

from .optim import Adafactor

__all__ = ["Adafactor", "TrainConfig", "train"]

# The loops import vqim.kernels, which imports vqim.train.optim: loaded on first use, not here.
_LAZY = {"TrainConfig": ".config", "train": ".loop"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
