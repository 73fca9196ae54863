"""Training checkpoints on disk: written whole or not at all, read without running their contents.

A checkpoint is a dict of plain values only (str, int, float, bool, None, lists, tuples, dicts
and tensors: the configs as ``to_dict()``, state dicts, RNG states as byte tensors), so it is
read with ``torch.load(weights_only=True)`` and no allow-list: a file that names any other
Python object (a crafted pickle's payload) is refused before anything in it runs.
"""

from __future__ import annotations

import pickle
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from vqim.engine.weights import atomic_write

STAGES = ("stage1", "stage2", "scorer", "superres")
# Key -> type every checkpoint holds; the rest (optimizers, rng, ...) is the stage's own.
_REQUIRED = {"stage": str, "step": int, "model_config": dict, "train_config": dict, "model": dict}


def write_checkpoint(path: Path, ckpt: dict) -> None:
    atomic_write(path, lambda p: torch.save(ckpt, p))


def read_checkpoint(path: str | Path, what: str) -> dict:
    """The checkpoint at ``path``; ``what`` (the argument or field that named it) leads every
    error message. Anything but a vqim training checkpoint of plain values is a ValueError."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: no such file {p}")
    try:
        # The weights-only unpickler warns about the pickle protocol of files it then refuses.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any way a foreign file fails to load is the user's input error
        # torch's own message advises weights_only=False, the very thing to avoid: not relayed.
        named = re.search(r"GLOBAL (\S+)", str(e))
        if named:
            why = f"it names {named.group(1)}, which is never loaded"
        elif isinstance(e, pickle.UnpicklingError):
            why = "it holds more than tensors and plain values"
        else:
            why = f"it is truncated or not a torch.save file: {type(e).__name__}"
        raise ValueError(f"{what}: {p} is not a vqim training checkpoint ({why})") from e
    if not isinstance(ckpt, dict) or ckpt.get("stage") not in STAGES:
        raise ValueError(f"{what}: {p} is not a vqim training checkpoint (no 'stage' of {STAGES})")
    for key, typ in _REQUIRED.items():
        if not isinstance(ckpt.get(key), typ):
            raise ValueError(f"{what}: {p} is not a complete vqim training checkpoint ({key!r} must be a "
                             f"{typ.__name__}, got {type(ckpt.get(key)).__name__})")
    return ckpt


@contextmanager
def blame(what: str, path: Path):
    """Errors from using a checkpoint's contents (a config, state dict or RNG state that does not
    fit) become one-line ValueErrors naming the checkpoint."""
    try:
        yield
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise ValueError(f"{what}: {path}: {detail or type(e).__name__}") from e


def stale_temp_files(dst: Path) -> list[Path]:
    """The temporary files ``atomic_write(dst, ...)`` leaves when killed mid-write
    (``.NAME.<pid>.<thread id>.tmp`` beside ``dst``); nothing else matches."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.\d+\.\d+\.tmp")
    if not dst.parent.is_dir():
        return []
    return sorted(p for p in dst.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())
