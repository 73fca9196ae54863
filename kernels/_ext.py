"""Access to the compiled extension ``vqim.kernels._C`` and the raw-pointer calling convention.

``_C`` links no libtorch: launchers pass ``tensor.data_ptr()``, shapes, strides, a dtype code
and the current CUDA stream as plain integers.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

# Must match csrc/common.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def load() -> ModuleType:
    """Import ``_C`` once, with an error that says how to build it."""
    try:
        from vqim.kernels import _C
    except ImportError as exc:
        raise RuntimeError(
            "vqim.kernels._C is not built: reinstall with nvcc on PATH "
            "(pip install --no-build-isolation -e .) and without VQIM_SKIP_CUDA_BUILD, "
            "or use backend='triton' / 'torch'"
        ) from exc
    return _C


def available() -> bool:
    try:
        load()
    except RuntimeError:
        return False
    return True


def dtype_code(t: torch.Tensor, arg: str) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise ValueError(f"{arg} must be float32, float16 or bfloat16 for backend='cuda', got {t.dtype}") from None


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
