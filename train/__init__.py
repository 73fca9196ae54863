"""vqim reference training stack (losses, optimizers, the run loop and its two stages, export to the
engine format)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .optim import Adafactor

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import TrainConfig
    from .run import Run

__all__ = ["Adafactor", "TrainConfig", "train"]

# The stages import vqim.kernels, which imports vqim.train.optim: loaded on first use, not here.
_LAZY = {"TrainConfig": ".config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(cfg: TrainConfig, stage: str, *, resume: bool = False, stop_after: int | None = None,
          on_step: Callable[[int, Run], None] | None = None) -> Run:
    """Build the run of ``stage`` (``"stage1"`` or ``"stage2"``), train it, return it (``.history``)."""
    from .stage1 import Stage1
    from .stage2 import Stage2

    runs = {"stage1": Stage1, "stage2": Stage2}
    if stage not in runs:
        raise ValueError(f"stage must be one of {sorted(runs)}, got {stage!r}")
    r = runs[stage](cfg)
    r.run(resume=resume, stop_after=stop_after, on_step=on_step)
    return r
