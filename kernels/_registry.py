"""One small backend registry for every public op.

Each op registers one implementation per backend:

* ``"triton"``: the Triton kernel. Default for CUDA tensors where the triton package is
  installed (Linux); without it the torch reference is the default everywhere. On CPU
  tensors it runs through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
  before ``triton`` is imported.
* ``"cuda"``: the csrc twin in ``vqim.kernels._C`` (CUDA tensors only).
* ``"torch"``: the plain-PyTorch reference, the definition of the op. Default for CPU tensors.

``backend=None`` picks by device, unless a :func:`use_backend` block overrides the default
(tests and benchmarks). Nothing here touches the GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import torch

from . import _triton

BACKENDS = ("triton", "cuda", "torch")

_IMPLS: dict[str, dict[str, Callable]] = {}
_DEFAULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("vqim_backend", default=None)


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``@register("codebook_lookup", "triton")`` on the implementation."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Make ``backend`` the default for ops called inside the block (``None`` restores auto)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    token = _DEFAULT.set(backend)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def _default_backend() -> str | None:
    return _DEFAULT.get()


# Dynamo cannot read a ContextVar: it calls this at trace time and bakes the answer into the
# graph (with no guard on it), so a compiled function keeps the backend it was traced under.
# That is what torch.compiler.assume_constant_result marks, but applying it imports
# torch._dynamo (half of `import vqim`'s time) in every program, compiling or not; the mark is
# this attribute, and tests/test_registry.py checks it is the one the decorator sets.
_default_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend an op call runs on, with a clear error where it cannot run."""
    if backend is None:
        backend = _default_backend()
    if backend is None:
        # Without Triton (macOS, Windows) the references serve CUDA tensors too.
        return "triton" if device.type == "cuda" and _triton.AVAILABLE else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not _triton.AVAILABLE:
        raise RuntimeError(_triton.MISSING)
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda":
        if device.type != "cpu":
            raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU via the interpreter), got {device}")
        if not triton_interpreter_enabled():
            raise RuntimeError(
                "backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='torch'"
            )
    return backend


def dispatch(op: str, backend: str | None, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` (or the device's default)."""
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementations registered for op {op!r}")
    name = resolve_backend(backend, device)
    if name not in impls:
        raise NotImplementedError(f"op {op!r} has no {name!r} backend (has: {sorted(impls)})")
    return impls[name]


def custom_op(name: str, *, mutates_args: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """``torch.library.custom_op(name, mutates_args=...)`` that also keeps the op's Python body
    for :func:`call`."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        _BODIES[op] = fn
        return op

    return wrap


_BODIES: dict[Callable, Callable] = {}


def call(op: Callable, *args, **kwargs):
    """Run the custom op ``op`` (made by :func:`custom_op`) on its arguments; in plain eager inference
    run its body directly, which is what the dispatcher would run, without the round trip through
    torch.library (~9 us a call on a CPU, where a small model's decode step makes ~15 such calls
    and does ~2 ms of work). The op itself runs whenever something must see it as one op:
    compiling or exporting (Dynamo folds ``is_compiling`` to True), a dispatch mode (fake tensors,
    ``make_fx``, the launch counter of ``vqim.engine.profiling``), autograd recording (the op
    has no formula for most ops, and conv_attention's is the op's own), or meta tensors (the op's
    fake implementation gives their shapes). The first argument is a tensor in every op."""
    if eager_inference(args[0]):
        return _BODIES[op](*args, **kwargs)
    return op(*args, **kwargs)


def eager_inference(t: torch.Tensor) -> bool:
    """True where nothing needs to see an op as one op (:func:`call`'s rule), for a call whose
    first tensor argument is ``t``: not compiling, no grad, no dispatch mode, not meta."""
    return (not torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and torch._C._len_torch_dispatch_stack() == 0 and not t.is_meta)


def registered(op: str) -> tuple[str, ...]:
    """The backends ``op`` has, for tests and benchmarks."""
    return tuple(sorted(_IMPLS.get(op, {})))


def interpreter_dot_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """True where a Triton kernel must upcast bf16 ``tl.dot`` operands to fp32.

    Triton 3.6's interpreter returns garbage for ``tl.dot`` on bf16 operands (fp16 and fp32
    are right). bf16 -> fp32 is exact and the GPU accumulates bf16 products in fp32, so the
    upcast computes the same thing; kernels take this as a constexpr so GPU code is unchanged.
    """
    return dtype == torch.bfloat16 and device.type != "cuda"
