"""Fused residual add + RMSNorm: ``s = x + delta``, ``h = rms_norm(s) * weight``.

The pre-norm blocks of Llama-style decoders (Janus-Pro, LlamaGen) add each sublayer's output
to the residual stream and RMS-normalize the sum for the next sublayer; in the decode step both
are tiny, launch-bound ops, so one kernel does both (vLLM's ``fused_add_rms_norm``; the same
structure as :mod:`.add_layer_norm`, without the mean and the bias).

The definition (``add_rms_norm_ref``) is plain PyTorch, Hugging Face's ``LlamaRMSNorm`` and
LlamaGen's ``RMSNorm`` exactly:

* ``s = x + delta`` in x's dtype (for fp16/bf16 the sum is taken in fp32 and rounded once,
  which is what ``x + delta`` does in torch on CPU and CUDA).
* ``h = (s.float() * rsqrt(mean(s.float()^2) + eps)).to(x.dtype) * weight``: normalized in
  fp32, rounded to x's dtype, then multiplied by the weight in torch's promoted dtype of x and
  weight (x's dtype when both are the model dtype; fp32 for an fp32 weight with fp16/bf16 x).

The Triton kernel computes the same steps: it loads a row of x and delta, adds in fp32, rounds
s to x's dtype and stores it, takes the mean square of the rounded s in fp32, rounds
``s * rsqrt(ms + eps)`` to x's dtype and stores its product with the weight. s is bitwise
torch's; h differs from torch's only by fp32 rounding (the order of the sum, rsqrt's precision)
carried through the two roundings.

Inference only: the custom op has no autograd formula.
"""

from __future__ import annotations

import torch

from ._registry import call, custom_op, dispatch, register, resolve_backend, triton_interpreter_enabled
from ._triton import tl, triton
from .add_layer_norm import _MAX_W, _check_inputs, _launch_sizes, _to_bf16_rtne


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain RMSNorm over the last dim, Hugging Face's ``LlamaRMSNorm`` (no residual)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of the op: ``(x + delta, rms_norm_ref(x + delta, weight, eps))``."""
    s = x + delta
    return s, rms_norm_ref(s, weight, eps)


@triton.jit
def _rounded(v, dtype: tl.constexpr, BF16_RTNE: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype``; BF16_RTNE: to bf16 by integer ops (the interpreter
    truncates fp32 -> bf16 casts, see :mod:`.add_layer_norm`)."""
    if BF16_RTNE and dtype == tl.bfloat16:
        return _to_bf16_rtne(v)
    else:
        return v.to(dtype)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, d_ptr, w_ptr, s_ptr, h_ptr,
    M, W, eps,
    stride_xm, stride_xw, stride_dm, stride_dw,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row offsets: M * stride can pass 2^31 in a long prefill.
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    col_mask = cols < W
    mask = (rows < M)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xw, mask=mask, other=0.0)  # (ROWS, BLOCK_W)
    d = tl.load(d_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dw, mask=mask, other=0.0)  # (ROWS, BLOCK_W)
    # One fp32 add rounded once to x's dtype: torch's x + delta, bit for bit.
    s = _rounded(x.to(tl.float32) + d.to(tl.float32), s_ptr.dtype.element_ty, BF16_RTNE)
    out = rows[:, None] * W + cols[None, :]
    tl.store(s_ptr + out, s, mask=mask)
    # The statistic is over the rounded s, as the reference sees it; masked lanes hold 0.
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=1) / W + eps)  # (ROWS,)
    # Rounded to x's dtype before the weight, as LlamaRMSNorm does.
    n = _rounded(sf * rstd[:, None], s_ptr.dtype.element_ty, BF16_RTNE)  # (ROWS, BLOCK_W)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_W,)
    h = n.to(tl.float32) * w[None, :]
    tl.store(h_ptr + out, _rounded(h, h_ptr.dtype.element_ty, BF16_RTNE), mask=mask)


@register("add_rms_norm", "triton")
def _add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = x.shape[-1]
    if w > _MAX_W:
        raise ValueError(f"x's last dim W must be <= {_MAX_W} for backend='triton', got {w}")
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    # A view wherever the leading dims merge; the kernel takes both strides.
    x2, d2 = x.reshape(-1, w), delta.reshape(-1, w)  # (M, W)
    m = x2.shape[0]
    if m == 0:
        return s, h
    # Narrow rows are packed several to a program as in add_layer_norm; from W = 1024 up (every
    # model width) a program holds one row.
    rows, block_w, num_warps = _launch_sizes(m, w)
    _add_rms_norm_kernel[(triton.cdiv(m, rows),)](
        x2, d2, weight, s, h,
        m, w, eps,
        x2.stride(0), x2.stride(1), d2.stride(0), d2.stride(1),
        ROWS=rows, BLOCK_W=block_w, BF16_RTNE=triton_interpreter_enabled(), num_warps=num_warps,
    )
    return s, h


@register("add_rms_norm", "torch")
def _add_rms_norm_torch(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s, h = add_rms_norm_ref(x, delta, weight, eps)
    # x + delta keeps a permuted input's layout; the op's outputs are contiguous on every backend.
    return s.contiguous(), h.contiguous()


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one launch: ``(s, h) = (x + delta, rms_norm(x + delta))``.

    Inference only (the decode step): no autograd formula is registered.

    Args:
        x: ``[..., W]`` float32/float16/bfloat16, any strides; W in [1, 16384] for ``"triton"``.
        delta: same shape, dtype and device as x, any strides.
        weight: ``[W]``, float32 or x's dtype.
        eps: added to the mean square, a finite number >= 0.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"`` or ``"torch"``.

    Returns:
        ``(s, h)``, both contiguous ``[..., W]``: ``s`` is ``x + delta`` exactly as torch
        computes it (x's dtype); ``h`` is ``LlamaRMSNorm(s)``: ``s`` normalized in fp32, rounded
        to x's dtype, times ``weight``, in ``torch.promote_types(x.dtype, weight.dtype)``. The
        ``"torch"`` backend is bitwise the two steps done separately.
    """
    _check_inputs(x, delta, weight, None, eps)
    return call(_add_rms_norm_op, x, delta, weight, float(eps), resolve_backend(backend, x.device))


# The backend is resolved in the public function (use_backend is a contextvar a compiled graph
# would not see at run time) and reaches the op as a string; the body is the registry's impl.
@custom_op("vqim::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("add_rms_norm", backend, x.device)(x, delta, weight, eps)


@_add_rms_norm_op.register_fake
def _(x, delta, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
