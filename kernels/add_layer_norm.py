"""Fused residual add + LayerNorm: ``s = x + delta``, ``h = layer_norm(s) * weight + bias``.

The decoder's pre-norm blocks add each sublayer's output to the residual stream and normalize
the sum for the next sublayer; in the decode step both are tiny, launch-bound ops, so one
kernel does both (vLLM's ``fused_add_rms_norm`` and Liger-Kernel's layer norm are the models,
with LayerNorm's mean, weight and bias instead of RMSNorm's).

The definition (``add_layer_norm_ref``) is plain PyTorch:

* ``s = x + delta`` in x's dtype: for fp16/bf16 the sum is taken in fp32 and rounded once,
  which is what ``x + delta`` does in torch on CPU and CUDA.
* ``h = F.layer_norm(s, (W,), weight, bias, eps)`` over the *rounded* s, in x's dtype. The
  statistics and the affine step run in fp32 (torch's accumulation type for all three dtypes)
  and h is rounded once. An fp32 weight/bias with fp16/bf16 x is used exactly (the fp32
  computation on the upcast s, whose upcast is exact), never rounded to x's dtype first.

The Triton kernel computes the same thing: it loads a row of x and delta, adds in fp32, rounds
s to x's dtype and stores it, takes the mean and then the biased variance of ``s - mean``
(two passes over registers, so a large common offset does not cancel), and stores
``(s - mean) * rsqrt(var + eps) * weight + bias``. s is bitwise torch's; h differs from torch's
only by fp32 rounding (the order of the reductions and of the affine step, rsqrt's precision).

Inference only: the custom op has no autograd formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._registry import call, custom_op, dispatch, register, resolve_backend, triton_interpreter_enabled
from ._triton import tl, triton

# One row lives in registers; 16384 fp32 values over 16 warps is 32 per thread.
_MAX_W = 16384
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def add_layer_norm_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of the op: ``(x + delta, F.layer_norm(x + delta, (W,), weight, bias, eps))``."""
    s = x + delta
    w = x.shape[-1]
    if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        return s, F.layer_norm(s, (w,), weight, bias, eps)
    # fp32 parameters with fp16/bf16 x: normalize in fp32 on the exact upcast of s.
    b = None if bias is None else bias.float()
    return s, F.layer_norm(s.float(), (w,), weight.float(), b, eps).to(x.dtype)


def _check_inputs(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  eps: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., W] with at least 1 dim, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] < 1:
        raise ValueError(f"x's last dim W must be >= 1, got shape {tuple(x.shape)}")
    if not isinstance(delta, torch.Tensor) or delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {getattr(delta, 'shape', type(delta))}")
    if delta.dtype != x.dtype:
        raise ValueError(f"delta must have x's dtype {x.dtype}, got {delta.dtype}")
    w = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (w,):
            raise ValueError(f"{name} must be a 1-D tensor [W] = [{w}], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.float32, x.dtype):
            raise ValueError(f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    for name, t in (("delta", delta), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


# Triton 3.6's interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even), which
# would break s's bitwise match with torch on CPU; there the kernel rounds by integer ops instead
# (a constexpr, so GPU code is unchanged).
@triton.jit
def _to_bf16_rtne(v):
    """fp32 -> bf16 rounded to nearest even by integer ops on the bits (finite values and inf;
    torch's default NaN stays NaN)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, d_ptr, w_ptr, b_ptr, s_ptr, h_ptr,
    M, W, eps,
    stride_xm, stride_xw, stride_dm, stride_dw,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BF16_RTNE: tl.constexpr,
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
    if BF16_RTNE:
        s = _to_bf16_rtne(x.to(tl.float32) + d.to(tl.float32))
    else:
        s = (x.to(tl.float32) + d.to(tl.float32)).to(s_ptr.dtype.element_ty)
    out = rows[:, None] * W + cols[None, :]
    tl.store(s_ptr + out, s, mask=mask)
    # The statistics are over the rounded s, as torch's layer_norm sees it.
    sf = s.to(tl.float32)
    mean = tl.sum(sf, axis=1) / W  # (ROWS,)
    # Masked lanes hold 0 in s but not in s - mean: zero them before the variance.
    diff = tl.where(mask, sf - mean[:, None], 0.0)  # (ROWS, BLOCK_W)
    var = tl.sum(diff * diff, axis=1) / W  # (ROWS,)
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_W,)
    h = diff * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        h += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if BF16_RTNE:
        tl.store(h_ptr + out, _to_bf16_rtne(h), mask=mask)
    else:
        tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)


def _launch_sizes(m: int, w: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_W, num_warps): narrow rows are packed so a program has ~1024 lanes of work,
    but never more rows than there are (a decode step has a handful)."""
    block_w = triton.next_power_of_2(w)
    rows = min(max(1, 1024 // block_w), triton.next_power_of_2(max(m, 1)))
    tile = rows * block_w
    num_warps = 4 if tile < 2048 else 8 if tile < 8192 else 16
    return rows, block_w, num_warps


@register("add_layer_norm", "triton")
def _add_layer_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = x.shape[-1]
    if w > _MAX_W:
        raise ValueError(f"x's last dim W must be <= {_MAX_W} for backend='triton', got {w}")
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # A view wherever the leading dims merge (any 2-D input, any slice of the last dim); the
    # kernel takes both strides, so only leading dims that do not merge cost a copy.
    x2, d2 = x.reshape(-1, w), delta.reshape(-1, w)  # (M, W)
    m = x2.shape[0]
    if m == 0:
        return s, h
    rows, block_w, num_warps = _launch_sizes(m, w)
    _add_layer_norm_kernel[(triton.cdiv(m, rows),)](
        x2, d2, weight, weight if bias is None else bias, s, h,
        m, w, eps,
        x2.stride(0), x2.stride(1), d2.stride(0), d2.stride(1),
        HAS_BIAS=bias is not None, ROWS=rows, BLOCK_W=block_w,
        BF16_RTNE=x.dtype == torch.bfloat16 and triton_interpreter_enabled(), num_warps=num_warps,
    )
    return s, h


@register("add_layer_norm", "torch")
def _add_layer_norm_torch(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s, h = add_layer_norm_ref(x, delta, weight, bias, eps)
    # x + delta keeps a permuted input's layout; the op's outputs are contiguous on every backend.
    return s.contiguous(), h.contiguous()


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                   eps: float = 1e-5, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and LayerNorm in one launch: ``(s, h) = (x + delta, layer_norm(x + delta))``.

    Inference only (the decode step): no autograd formula is registered.

    Args:
        x: ``[..., W]`` float32/float16/bfloat16, any strides; W in [1, 16384] for ``"triton"``.
        delta: same shape, dtype and device as x, any strides.
        weight: ``[W]``, float32 or x's dtype.
        bias: ``[W]``, float32 or x's dtype, or ``None``.
        eps: added to the variance, a finite number >= 0.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"`` or ``"torch"``. There
            is no ``"cuda"`` backend: on CUDA the Triton kernel is the fused op.

    Returns:
        ``(s, h)``, both contiguous ``[..., W]`` in x's dtype: ``s`` is ``x + delta`` exactly as
        torch computes it, ``h`` is ``F.layer_norm(s, (W,), weight, bias, eps)`` (fp32 statistics
        over the rounded s; fp32 parameters used unrounded). The ``"torch"`` backend is bitwise
        the two ops done separately.
    """
    _check_inputs(x, delta, weight, bias, eps)
    return call(_add_layer_norm_op, x, delta, weight, bias, float(eps), resolve_backend(backend, x.device))


# The backend is resolved in the public function (use_backend is a contextvar a compiled graph
# would not see at run time) and reaches the op as a string; the body is the registry's impl.
@custom_op("vqim::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("add_layer_norm", backend, x.device)(x, delta, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(x, delta, weight, bias, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)
