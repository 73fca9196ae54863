"""Triton, where it is installed; stand-ins that fail on use where it is not.

Triton is published for Linux only, so on macOS and Windows ``import triton`` fails. Every op
module imports ``triton`` and ``tl`` from here instead: with Triton installed they are the real
modules; without it, ``triton.jit`` and ``triton.Config`` return placeholders so the op modules
still import (kernel bodies are never evaluated), the registry's default falls back to the torch
references, and asking for ``backend="triton"`` raises :data:`MISSING` (see ``_registry``).
"""

from __future__ import annotations

from typing import Any

MISSING = ("backend='triton' needs the triton package, which is not installed (it is published for "
           "Linux only: pip install triton); use backend='torch' (or 'cuda' where vqim.kernels._C is built)")

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    class _Kernel:
        """What ``@triton.jit`` leaves behind without Triton: launching it says why it cannot run."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid: Any):
            raise RuntimeError(MISSING)

        def __call__(self, *args, **kwargs):
            raise RuntimeError(MISSING)

    class _Triton:
        """The names the op modules use outside kernels: ``jit`` and ``Config`` at import, and
        the integer helpers that size the torch paths' buffers too."""

        @staticmethod
        def jit(fn=None, **kwargs):
            return _Kernel(fn) if fn is not None else _Kernel

        @staticmethod
        def Config(*args, **kwargs):  # noqa: N802 (triton's name)
            return None

        @staticmethod
        def cdiv(x: int, y: int) -> int:
            return (x + y - 1) // y

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << (n - 1).bit_length() if n > 0 else 0

        def __getattr__(self, name: str):
            raise RuntimeError(MISSING)

    triton = _Triton()
    # Only kernel bodies and (string) annotations name ``tl``, and neither is evaluated.
    tl = None

__all__ = ["AVAILABLE", "MISSING", "tl", "triton"]
