"""int8 weight-only linear for the decode step: ``y = (x @ qweight.T) * scale``.

The weights are quantized symmetrically per output channel, as gpt-fast's
``WeightOnlyInt8QuantHandler``: row n of the ``[N, K]`` weight keeps one float32 scale
``amax(|w_n|) / 127`` and int8 values in ``[-127, 127]``; activations stay in their float dtype.

Decode multiplies a few rows (M = batch, 1..64) by a large weight, so the time is the time to
read the weight. The Triton kernel reads each int8 weight tile once per M-block (with
``BLOCK_M >= M``, once in all: N*K bytes instead of 2*N*K for a bf16 weight, the point of the
op), dequantizes it in registers and accumulates in fp32; the per-channel scale multiplies the
fp32 accumulator once at the end. The other traffic is small: x (M*K, re-read by each of the
``cdiv(N, BLOCK_N)`` programs, from L2), the scale (4*N bytes) and y (M*N).
"""

from __future__ import annotations

import math

import torch

from ._registry import call, custom_op, dispatch, register, resolve_backend, triton_interpreter_enabled
from ._triton import tl, triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization (gpt-fast's ``WeightOnlyInt8QuantHandler``).

    Computed in float32: ``scale[n] = amax(|weight[n]|) / 127`` and
    ``qweight = round(weight / scale[:, None]).clamp(-127, 127)``, so
    ``|qweight * scale - weight| <= scale / 2`` up to float32 rounding. A row whose scale would be
    0 (all zeros, or so tiny that amax / 127 underflows) gets scale 1.0 and zeros.

    Args:
        weight: ``[N, K]`` float32/float16/bfloat16, finite.

    Returns:
        ``(qweight, scale)``: int8 ``[N, K]`` contiguous, float32 ``[N]``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    w = weight.float()  # (N, K)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight must be finite (it has inf or nan)")
    # amax over an empty row (K == 0) is an error in torch; such a row is all zeros.
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])  # (N,)
    scale = amax / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    qweight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()  # (N, K)
    return qweight, scale


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The definition of the op: fp32 matmul against the int8 values, scaled per output channel.

    ``[..., K] -> [..., N]`` in x's dtype. Materializes the fp32 weight (4*N*K bytes)."""
    return (x.float() @ qweight.float().T * scale).to(x.dtype)


def _check_inputs(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., K] with at least 1 dim, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D tensor [N, K], got {getattr(qweight, 'shape', type(qweight))}")
    if qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8, got {qweight.dtype}")
    if qweight.shape[1] != x.shape[-1]:
        raise ValueError(f"qweight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, got {tuple(qweight.shape)}")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 tensor, got {getattr(scale, 'dtype', type(scale))}")
    if tuple(scale.shape) != (qweight.shape[0],):
        raise ValueError(f"scale must be [N] with N = qweight.shape[0] = {qweight.shape[0]}, got {tuple(scale.shape)}")
    for name, t in (("qweight", qweight), ("scale", scale)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


@triton.jit
def _int8_linear_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_s, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    # N * K reaches 2**28 at N = K = 16384; int64 keeps larger weights addressable.
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_rows + ks[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0)  # (BLOCK_N, BLOCK_K) int8
        if DOT_F64:
            # The interpreter: its tl.dot is numpy's sgemm, whose error depends on the machine's
            # OpenBLAS kernel (OPENBLAS_CORETYPE=Haswell summed these blocks 3 ulps off, past
            # the tests' bound); in fp64 each block's sum is exact to fp32, as the GPU's is close to.
            acc += tl.dot(x.to(tl.float64), tl.trans(w.to(tl.float64))).to(tl.float32)
        elif DOT_FP32:
            # fp32 x (and any x under the interpreter without DOT_F64, whose bf16 tl.dot is broken).
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
        else:
            # |q| <= 127 is exact in bf16/fp16, and their products are exact in the fp32
            # accumulator: the same sums as fp32 operands, on the half-precision tensor cores.
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # (BLOCK_M, BLOCK_N) fp32
    s = tl.load(scale_ptr + cols * stride_s, mask=col_mask, other=0.0)  # (BLOCK_N,)
    acc = acc * s[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _block_sizes(m: int) -> tuple[int, int, int]:
    # tl.dot needs tiles of at least 16; up to M = 64 one M-block covers every row, so the
    # weight is read once. 128 int8 along K is one 128-byte line per weight row.
    return max(16, min(64, triton.next_power_of_2(m))), 64, 128


@register("int8_linear", "triton")
def _int8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = qweight.shape
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, k)  # (M, K)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    block_m, block_n, block_k = _block_sizes(m)
    on_gpu = x.device.type == "cuda"
    dot_fp32 = x.dtype == torch.float32 or not on_gpu
    # fp32 on tensor cores: 3xTF32 keeps fp32 accuracy. The interpreter's dot is numpy's sgemm.
    precision = "tf32x3" if on_gpu else "ieee"
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _int8_linear_kernel[grid](
        x2, qweight, scale, y, m, n, k,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scale.stride(0),
        y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
        DOT_F64=triton_interpreter_enabled(),
    )
    return y.reshape(*x.shape[:-1], n)


# Not torch._weight_int8pack_mm (gpt-fast's CPU path): in torch 2.13 it takes the scales in x's
# dtype (a second rounding of the float32 scale), and for bf16 x it returned nan at K = 5 and
# K = 200 and crashed the process at (M, N, K) = (1, 7, 5) and (17, 130, 200); its fp32 error
# was up to 4x the reference's. So the CPU backend is the definition.
@register("int8_linear", "torch")
def _int8_linear_torch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return int8_linear_ref(x, qweight, scale)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """``(x @ qweight.T) * scale`` with fp32 accumulation: a linear layer on int8 weights.

    Args:
        x: ``[..., K]`` float32/float16/bfloat16, any strides; the leading dims are the M rows.
        qweight: ``[N, K]`` int8 (from :func:`quantize_int8`), same device.
        scale: ``[N]`` float32, the per-output-channel scales, same device.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"``, ``"torch"``.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    _check_inputs(x, qweight, scale)
    return call(_int8_linear_op, x, qweight, scale, resolve_backend(backend, x.device))


# The backend is resolved in the public function (use_backend is a contextvar a compiled graph
# would not see at run time) and reaches the op as a string; the body is the registry's impl.
@custom_op("vqim::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    return dispatch("int8_linear", backend, x.device)(x, qweight, scale)


@_int8_linear_op.register_fake
def _(x, qweight, scale, backend):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
