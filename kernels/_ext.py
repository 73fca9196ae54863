"""Access to the compiled extension ``vqim.kernels._C`` and the raw-pointer calling convention.

``_C`` links no libtorch: each op takes one params struct (``C.CodebookLookupParams`` ...), filled
by field name with ``tensor.data_ptr()``, extents, shapes, strides, a dtype code and the current
CUDA stream as plain numbers; the C++ side checks them before any CUDA call.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
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


@contextlib.contextmanager
def launch(t: torch.Tensor) -> Iterator[tuple[ModuleType, int]]:
    """``with launch(t) as (C, stream):`` -- ``_C``, under t's device guard (the C++ side checks
    every pointer against the current device), with t's device's current stream."""
    C = load()
    with torch.cuda.device(t.device):
        yield C, torch.cuda.current_stream(t.device).cuda_stream


def operand(name: str, t: torch.Tensor) -> dict[str, int]:
    """``{name: data pointer, name + "_extent": elements addressable from it}``: the extent (the
    storage past the tensor's offset) lets the C++ side reject strides that would read outside it."""
    extent = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return {name: t.data_ptr(), f"{name}_extent": extent}


def params(cls: type, **fields):
    """An instance of a ``_C`` params struct with the given fields set by name (an unknown name
    raises AttributeError; an unset field keeps a default the C++ checks reject)."""
    p = cls()
    for k, v in fields.items():
        setattr(p, k, v)
    return p
