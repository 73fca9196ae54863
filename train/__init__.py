"""vqim reference training stack (losses, optimizers, the run loop and its stages: the tokenizer,
the generator, the reranker; export to the engine format)."""

from __future__ import annotations

from collections.abc import Callable

from .config import TrainConfig
from .optim import Adafactor
from .run import Run
from .stage1 import Stage1
from .scorer import ScorerRun
from .superres import SuperResRun
from .stage2 import Stage2

__all__ = ["Adafactor", "TrainConfig", "train"]


def train(cfg: TrainConfig, stage: str, *, resume: bool = False, stop_after: int | None = None,
          on_step: Callable[[int, Run], None] | None = None) -> Run:
    """Build the run of ``stage`` (``"stage1"``, ``"stage2"``, ``"scorer"`` or ``"superres"``), train it, return it
    (``.history``)."""
    runs = {"stage1": Stage1, "stage2": Stage2, "scorer": ScorerRun, "superres": SuperResRun}
    if stage not in runs:
        raise ValueError(f"stage must be one of {sorted(runs)}, got {stage!r}")
    r = runs[stage](cfg)
    r.run(resume=resume, stop_after=stop_after, on_step=on_step)
    return r
