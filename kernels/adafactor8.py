"""Adafactor with int8 first moments and fused step kernels.

The update is exactly ``vqim.train.Adafactor`` (see its docstring for the formulas); only the
first moment is stored differently: flattened in the param's logical (row-major) order and cut
into blocks of 256 values, each block kept as symmetric int8 ``q in [-127, 127]`` with one fp32
scale ``absmax / 127`` (``m = q * scale``). Every tensor is quantized, including tensors smaller
than one block (they are one partial block; its absmax comes from the values present), so
there is a single code path and no fp32 exception list.

One optimizer step of a parameter, viewed as ``(L, R, C)`` (rank >= 2: leading dims flattened
into L, factored over the last two; rank < 2: ``(1, 1, N)`` with the full second moment):

1. ``row_col_sums`` kernel (factored only): one reduction pass over g gives the row and column
   sums of g^2 as deterministic per-tile partials (no atomics). A small ``factors`` kernel sums
   the partials, updates the row/col statistics r, c and writes ``a = rsqrt(r / mean r)``,
   ``b = rsqrt(c)``, so ``u = g * a[row] * b[col]``. For rank < 2 the ``full_factors`` kernel
   updates the full v elementwise and writes ``b = rsqrt(v)`` with ``a = 1``: the same two
   kernels below then serve both cases.
2. Update clipping needs ``RMS(u)`` over the whole tensor before any moment is written, so a
   second reduction pass (``sumsq`` kernel, a fixed grid of at most 256 programs) writes
   partial sums of ``u^2``.
3. The fused step kernel re-sums those few partials (from L2) into
   ``clip = 1 / max(1, RMS(u) / d)`` (no host sync, no extra launch), reads g, p, the int8
   moment and its scales once, forms ``m = beta1 * q * scale + (1 - beta1) * u * clip``, writes
   ``p * (1 - lr * wd) - lr * m`` (the update uses the fp32 m, as bitsandbytes does) and
   re-quantizes m per 256-block.

So g is read three times (twice for rank < 2), p and the moment once each, in 4 launches per
factored tensor and 3 per vector (plus allocations): one launch per kernel, nothing from torch.
Each launch handles one parameter; a multi-tensor launch over all parameters would be the next
step where launch overhead dominates (many small tensors).

Rounding: nearest (half away from zero), chosen by measurement against the fp32 reference
(``benchmarks/bench_adafactor8.py --rounding-study``, CPU, 300 steps): fed the fp32 run's own
gradients on the MLP task, the dequantized moment is off by 1.7% (RMS, relative) with nearest
and 2.4% with stochastic rounding; run freely, the MLP ends 0.025 (nearest) vs 0.034
(stochastic) of fp32's total parameter movement away from the fp32 weights. Final losses are
within 0.25% of fp32 either way. ``rounding="stochastic"`` stays on the torch backend for that
study only (its generator is not part of the state_dict).

State: 1.023 bytes per parameter over what stage 2 trains in parti-350m (1 int8 + 1/64 for the
scales + 0.007 for the second-moment statistics); see tests/test_adafactor8.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch

from . import _ext
from .adafactor_hparams import (BETA1, BETA2, CLIP_THRESHOLD, EPS1, WEIGHT_DECAY, beta2_at, check_hyperparameters,
                                load_state_keeping_dtypes)
from ._registry import dispatch, register, resolve_backend
from ._triton import tl, triton

QBLOCK = 256  # values per int8 block (one fp32 scale each)
QMAX = 127.0  # symmetric int8: -128 is never used, so q and -q are both representable
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- quantization

def quantize_blockwise(m: torch.Tensor, *, generator: torch.Generator | None = None,
                       stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``m [N]`` -> (int8 ``[N]``, fp32 scales ``[ceil(N / 256)]``), the kernels' rule.

    ``scale = absmax / 127`` per block; ``q = round(m * (127 / absmax))`` half away from zero
    (an all-zero block gets scale 0 and q 0). Stochastic rounding adds U[0, 1) before flooring.
    """
    n = m.numel()
    nb = triton.cdiv(n, QBLOCK)
    padded = torch.zeros(nb * QBLOCK, dtype=torch.float32, device=m.device)
    padded[:n] = m
    absmax = padded.view(nb, QBLOCK).abs().amax(dim=1)  # (nb,)
    inv = torch.where(absmax > 0, QMAX / torch.where(absmax > 0, absmax, 1.0), 0.0)
    x = (padded.view(nb, QBLOCK) * inv[:, None]).view(-1)[:n]  # (N,) in [-127, 127]
    if stochastic:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        q = torch.floor(x + noise)
    else:
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)
    return q.clamp_(-QMAX, QMAX).to(torch.int8), absmax / QMAX


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 ``[N]`` + scales -> fp32 ``[N]`` (``q * scale`` of its block)."""
    return q.float() * scale.repeat_interleave(QBLOCK)[: q.numel()]


# ----------------------------------------------------------------------------- reduction pass

@triton.jit
def _adafactor8_row_col_sums_kernel(
    g_ptr, rowpart_ptr, colpart_ptr,
    L, R, C, n_row_groups,
    stride_gl, stride_gr, stride_gc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROW_TILES: tl.constexpr,
):
    # Axis 0 enumerates (slice, group of ROW_TILES row tiles), axis 1 the column tile. Every
    # program writes its own partial row sums (one per column tile) and column sums (one per row
    # group), so the reduction is deterministic (no atomics); row groups keep the column
    # partials few (<= 64) for tall matrices.
    pid0 = tl.program_id(0)
    pid_c = tl.program_id(1)
    sl = pid0 // n_row_groups
    rg = pid0 % n_row_groups
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = g_ptr + sl.to(tl.int64) * stride_gl
    col_acc = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(ROW_TILES):
        rows = (rg * ROW_TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        g = tl.load(base + rows[:, None].to(tl.int64) * stride_gr + cols[None, :].to(tl.int64) * stride_gc,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_C)
        g2 = g * g
        tl.store(rowpart_ptr + (pid_c * L + sl).to(tl.int64) * R + rows, tl.sum(g2, axis=1), mask=rmask)
        col_acc += tl.sum(g2, axis=0)
    tl.store(colpart_ptr + (rg * L + sl).to(tl.int64) * C + cols, col_acc, mask=cmask)


_MAX_COL_PARTIALS = 64


def _row_col_blocks(r: int, c: int) -> tuple[int, int, int]:
    block_r = min(32, max(16, triton.next_power_of_2(r)))
    block_c = min(128, max(16, triton.next_power_of_2(c)))
    row_tiles = triton.next_power_of_2(triton.cdiv(triton.cdiv(r, block_r), _MAX_COL_PARTIALS))
    return block_r, block_c, row_tiles


@register("adafactor8_row_col_sums", "triton")
def _row_col_sums_triton(g3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    L, R, C = g3.shape
    br, bc, tiles = _row_col_blocks(R, C)
    n_groups, ncb = triton.cdiv(R, br * tiles), triton.cdiv(C, bc)
    rowpart = torch.empty(ncb, L, R, dtype=torch.float32, device=g3.device)
    colpart = torch.empty(n_groups, L, C, dtype=torch.float32, device=g3.device)
    _adafactor8_row_col_sums_kernel[(L * n_groups, ncb)](
        g3, rowpart, colpart, L, R, C, n_groups, *g3.stride(), BLOCK_R=br, BLOCK_C=bc, ROW_TILES=tiles,
    )
    return rowpart, colpart  # partials: the factors kernel sums them


@register("adafactor8_row_col_sums", "cuda")
def _row_col_sums_cuda(g3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    L, R, C = g3.shape
    # Tiles of 32 rows x 256 columns (csrc: kRowsPerBlock, kColsPerBlock): a row partial per
    # column tile, a column partial per group of row tiles (at most 64 groups).
    row_blocks = triton.cdiv(R, 32)
    row_tiles = triton.next_power_of_2(triton.cdiv(row_blocks, _MAX_COL_PARTIALS))
    rowpart = torch.empty(triton.cdiv(C, 256), L, R, dtype=torch.float32, device=g3.device)
    colpart = torch.empty(triton.cdiv(row_blocks, row_tiles), L, C, dtype=torch.float32, device=g3.device)
    with _ext.launch(g3) as (C_, stream):
        C_.adafactor8_row_col_sums(_ext.params(
            C_.Adafactor8RowColSumsParams, **_ext.operand("g", g3), g_stride_l=g3.stride(0),
            g_stride_r=g3.stride(1), g_stride_c=g3.stride(2), **_ext.operand("row_part", rowpart),
            **_ext.operand("col_part", colpart), L=L, R=R, C=C, row_tiles=row_tiles,
            dtype=_ext.dtype_code(g3, "grad"), stream=stream,
        ))
    return rowpart, colpart


@register("adafactor8_row_col_sums", "torch")
def _row_col_sums_torch(g3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of g^2 as ``(P, L, R)`` and ``(P, L, C)`` partials (here P = 1)."""
    g2 = g3.float().square()  # (L, R, C)
    return g2.sum(dim=2)[None], g2.sum(dim=1)[None]


# ----------------------------------------------------------------------------- second-moment statistics

@triton.jit
def _adafactor8_factors_kernel(
    rowpart_ptr, colpart_ptr, r_ptr, c_ptr, a_ptr, b_ptr,
    L, R, C, n_rowparts, n_colparts,
    beta2_t, one_minus_beta2_t, eps1,
    BLOCK: tl.constexpr,
):
    # Program (l, 0) updates the row statistics of slice l and writes a = rsqrt(r / mean r);
    # program (l, 1) updates the column statistics and writes b = rsqrt(c). The vectors are
    # short (<= a few thousand), so one program per slice and side is enough.
    sl = tl.program_id(0)
    side = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    if side == 0:
        total = tl.zeros((BLOCK,), tl.float32)
        for i0 in range(0, R, BLOCK):
            rows = i0 + offs
            mask = rows < R
            s = tl.zeros((BLOCK,), tl.float32)
            for k in range(0, n_rowparts):
                s += tl.load(rowpart_ptr + (k * L + sl) * R + rows, mask=mask, other=0.0)
            r_new = beta2_t * tl.load(r_ptr + sl * R + rows, mask=mask, other=0.0) \
                + one_minus_beta2_t * (s / C + eps1)
            total += tl.where(mask, r_new, 0.0)
        mean = tl.sum(total, axis=0) / R
        # Second sweep recomputes r_new (same arithmetic) rather than re-reading what this
        # program just stored: no cross-thread visibility question.
        for i0 in range(0, R, BLOCK):
            rows = i0 + offs
            mask = rows < R
            s = tl.zeros((BLOCK,), tl.float32)
            for k in range(0, n_rowparts):
                s += tl.load(rowpart_ptr + (k * L + sl) * R + rows, mask=mask, other=0.0)
            r_new = beta2_t * tl.load(r_ptr + sl * R + rows, mask=mask, other=0.0) \
                + one_minus_beta2_t * (s / C + eps1)
            tl.store(r_ptr + sl * R + rows, r_new, mask=mask)
            tl.store(a_ptr + sl * R + rows, 1.0 / tl.sqrt(r_new / mean), mask=mask)
    else:
        for j0 in range(0, C, BLOCK):
            cols = j0 + offs
            mask = cols < C
            s = tl.zeros((BLOCK,), tl.float32)
            for k in range(0, n_colparts):
                s += tl.load(colpart_ptr + (k * L + sl) * C + cols, mask=mask, other=0.0)
            c_new = beta2_t * tl.load(c_ptr + sl * C + cols, mask=mask, other=1.0) \
                + one_minus_beta2_t * (s / R + eps1)
            tl.store(c_ptr + sl * C + cols, c_new, mask=mask)
            tl.store(b_ptr + sl * C + cols, 1.0 / tl.sqrt(c_new), mask=mask)


@register("adafactor8_factors", "triton")
def _factors_triton(rowpart, colpart, r, c, beta2_t, eps1):
    L, R = r.shape
    C = c.shape[1]
    a = torch.empty(L * R, dtype=torch.float32, device=r.device)
    b = torch.empty(L * C, dtype=torch.float32, device=r.device)
    _adafactor8_factors_kernel[(L, 2)](
        rowpart, colpart, r, c, a, b, L, R, C, rowpart.shape[0], colpart.shape[0], beta2_t, 1.0 - beta2_t, eps1,
        BLOCK=1024 if max(R, C) >= 1024 else max(16, triton.next_power_of_2(max(R, C))),
    )
    return a, b


@register("adafactor8_factors", "cuda")
def _factors_cuda(rowpart, colpart, r, c, beta2_t, eps1):
    L, R = r.shape
    C = c.shape[1]
    a = torch.empty(L * R, dtype=torch.float32, device=r.device)
    b = torch.empty(L * C, dtype=torch.float32, device=r.device)
    with _ext.launch(r) as (C_, stream):
        C_.adafactor8_factors(_ext.params(
            C_.Adafactor8FactorsParams, **_ext.operand("row_part", rowpart), **_ext.operand("col_part", colpart),
            **_ext.operand("r", r), **_ext.operand("c", c), **_ext.operand("a", a), **_ext.operand("b", b),
            L=L, R=R, C=C, n_rowparts=rowpart.shape[0], n_colparts=colpart.shape[0],
            beta2_t=beta2_t, one_minus_beta2_t=1.0 - beta2_t, eps1=eps1, stream=stream,
        ))
    return a, b


@register("adafactor8_factors", "torch")
def _factors_torch(rowpart, colpart, r, c, beta2_t, eps1):
    """r, c <- EMA of the row / column means of g^2 (+eps1); a = rsqrt(r / mean r), b = rsqrt(c)."""
    L, R = r.shape
    C = c.shape[1]
    r.mul_(beta2_t).add_(rowpart.sum(dim=0) / C + eps1, alpha=1.0 - beta2_t)  # (L, R)
    c.mul_(beta2_t).add_(colpart.sum(dim=0) / R + eps1, alpha=1.0 - beta2_t)  # (L, C)
    return (r / r.mean(dim=1, keepdim=True)).rsqrt().reshape(-1), c.rsqrt().reshape(-1)


@triton.jit
def _adafactor8_full_factors_kernel(g_ptr, v_ptr, b_ptr, N, stride_g, beta2_t, one_minus_beta2_t, eps1,
                                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs * stride_g, mask=mask, other=0.0).to(tl.float32)
    v_new = beta2_t * tl.load(v_ptr + offs, mask=mask, other=1.0) + one_minus_beta2_t * (g * g + eps1)
    tl.store(v_ptr + offs, v_new, mask=mask)
    tl.store(b_ptr + offs, 1.0 / tl.sqrt(v_new), mask=mask)


@register("adafactor8_full_factors", "triton")
def _full_factors_triton(g3, v, beta2_t, eps1):
    n = v.numel()
    b = torch.empty(n, dtype=torch.float32, device=v.device)
    _adafactor8_full_factors_kernel[(triton.cdiv(n, 1024),)](g3, v, b, n, g3.stride(2), beta2_t, 1.0 - beta2_t, eps1,
                                                             BLOCK=1024)
    return b


@register("adafactor8_full_factors", "cuda")
def _full_factors_cuda(g3, v, beta2_t, eps1):
    n = v.numel()
    b = torch.empty(n, dtype=torch.float32, device=v.device)
    with _ext.launch(v) as (C_, stream):
        C_.adafactor8_full_factors(_ext.params(
            C_.Adafactor8FullFactorsParams, **_ext.operand("g", g3), g_stride=g3.stride(2),
            **_ext.operand("v", v), **_ext.operand("b", b), N=n, beta2_t=beta2_t, one_minus_beta2_t=1.0 - beta2_t,
            eps1=eps1, dtype=_ext.dtype_code(g3, "grad"), stream=stream,
        ))
    return b


@register("adafactor8_full_factors", "torch")
def _full_factors_torch(g3, v, beta2_t, eps1):
    """Full second moment of a (1, 1, N) tensor: v <- EMA of g^2 + eps1; b = rsqrt(v)."""
    v.mul_(beta2_t).add_(g3.float().reshape(-1).square() + eps1, alpha=1.0 - beta2_t)
    return v.rsqrt()


# ----------------------------------------------------------------------------- fused update

# How the flat index of a value maps to (slice, row, col), as a constexpr so the integer
# divisions (slow on GPUs) are done per element only where they must be.
_LAYOUT_GENERAL = 0  # any (L, R, C): divide every flat index
_LAYOUT_ROWS = 1  # C % 256 == 0: a quantization block lies inside one row, divide once per block
_LAYOUT_FLAT = 2  # (1, 1, N): the flat index is the column


def _layout(L: int, R: int, C: int) -> int:
    if L == 1 and R == 1:
        return _LAYOUT_FLAT
    return _LAYOUT_ROWS if C % QBLOCK == 0 else _LAYOUT_GENERAL


@triton.jit
def _update_direction_tile(g_ptr, a_ptr, b_ptr, blk, N, R, C, stride_gl, stride_gr, stride_gc,
                           QBLOCK: tl.constexpr, LAYOUT: tl.constexpr):
    """u = g * a[l, row] * b[l, col] (= g / sqrt(V)) for the quantization blocks ``blk``."""
    lane = tl.arange(0, QBLOCK)
    idx = blk[:, None] * QBLOCK + lane[None, :]  # (BLOCKS, QBLOCK) flat logical index
    mask = idx < N
    zero = idx * 0
    if LAYOUT == 2:
        col = idx
        lr_row = zero  # l * R + row: the index into a
        sl = zero
        row = zero
    elif LAYOUT == 1:
        start = blk * QBLOCK  # (BLOCKS,)
        lr_b = start // C  # (BLOCKS,)
        col = (start % C)[:, None] + lane[None, :]
        lr_row = lr_b[:, None] + zero
        sl = (lr_b // R)[:, None] + zero
        row = (lr_b % R)[:, None] + zero
    else:
        col = idx % C
        lr_row = idx // C
        sl = lr_row // R
        row = lr_row % R
    g = tl.load(g_ptr + sl * stride_gl + row * stride_gr + col * stride_gc, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + lr_row, mask=mask, other=0.0)
    b = tl.load(b_ptr + sl * C + col, mask=mask, other=0.0)
    return g * a * b, idx, mask, sl, row, col


@triton.jit
def _adafactor8_sumsq_kernel(
    g_ptr, a_ptr, b_ptr, part_ptr,
    N, R, C, n_tiles,
    stride_gl, stride_gr, stride_gc,
    BLOCKS: tl.constexpr, QBLOCK: tl.constexpr, LAYOUT: tl.constexpr,
):
    # A fixed grid strides over the tiles, so there are few partials (the step kernel sums them
    # itself) and their order never depends on scheduling.
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCKS, QBLOCK), tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        blk = (t * BLOCKS + tl.arange(0, BLOCKS)).to(tl.int64)  # int64: idx = blk * QBLOCK may pass 2^31
        u, idx, mask, sl, row, col = _update_direction_tile(g_ptr, a_ptr, b_ptr, blk, N, R, C,
                                                            stride_gl, stride_gr, stride_gc, QBLOCK, LAYOUT)
        acc += u * u
    tl.store(part_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _adafactor8_step_kernel(
    g_ptr, p_ptr, q_ptr, scale_ptr, a_ptr, b_ptr, part_ptr,
    N, R, C, n_blocks, n_parts,
    stride_gl, stride_gr, stride_gc, stride_pl, stride_pr, stride_pc,
    lr, decay, beta1, one_minus_beta1, clip_threshold,
    BLOCKS: tl.constexpr, QBLOCK: tl.constexpr, PARTS: tl.constexpr, LAYOUT: tl.constexpr,
):
    # Update clipping: every program re-sums the (<= PARTS) partial sums of u^2 from L2.
    parts = tl.load(part_ptr + tl.arange(0, PARTS), mask=tl.arange(0, PARTS) < n_parts, other=0.0)
    rms = tl.sqrt(tl.sum(parts, axis=0) / N)
    clip = 1.0 / tl.maximum(rms / clip_threshold, 1.0)
    # One program owns BLOCKS whole quantization blocks, so each block's absmax is a row max.
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
    bmask = blk < n_blocks
    u, idx, mask, sl, row, col = _update_direction_tile(g_ptr, a_ptr, b_ptr, blk, N, R, C,
                                                        stride_gl, stride_gr, stride_gc, QBLOCK, LAYOUT)
    q = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.float32)
    s = tl.load(scale_ptr + blk, mask=bmask, other=0.0)
    m = beta1 * (q * s[:, None]) + one_minus_beta1 * (u * clip)  # fp32 first moment; 0 on masked lanes
    p_off = sl * stride_pl + row * stride_pr + col * stride_pc
    p = tl.load(p_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
    p_new = p * decay - lr * m
    tl.store(p_ptr + p_off, p_new.to(p_ptr.dtype.element_ty), mask=mask)
    absmax = tl.max(tl.abs(m), axis=1)  # (BLOCKS,)
    # Divide by a safe value: tl.where evaluates both branches.
    inv = tl.where(absmax > 0, 127.0 / tl.where(absmax > 0, absmax, 1.0), 0.0)
    x = m * inv[:, None]
    qn = tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(0.5 - x))
    qn = tl.minimum(tl.maximum(qn, -127.0), 127.0)
    tl.store(q_ptr + idx, qn.to(tl.int8), mask=mask)
    tl.store(scale_ptr + blk, absmax / 127.0, mask=bmask)


_BLOCKS_PER_PROGRAM = 4  # quantization blocks per program: 1024 values
_SUMSQ_PROGRAMS = 256  # most partial sums of u^2 (what each step program re-reads)


@register("adafactor8_sumsq", "triton")
def _sumsq_triton(g3: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    L, R, C = g3.shape
    n_tiles = triton.cdiv(triton.cdiv(g3.numel(), QBLOCK), _BLOCKS_PER_PROGRAM)
    grid = min(n_tiles, _SUMSQ_PROGRAMS)
    part = torch.empty(grid, dtype=torch.float32, device=g3.device)
    _adafactor8_sumsq_kernel[(grid,)](g3, a, b, part, g3.numel(), R, C, n_tiles, *g3.stride(),
                                      BLOCKS=_BLOCKS_PER_PROGRAM, QBLOCK=QBLOCK, LAYOUT=_layout(L, R, C))
    return part


@register("adafactor8_sumsq", "cuda")
def _sumsq_cuda(g3: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    L, R, C = g3.shape
    out = torch.empty(1, dtype=torch.float32, device=g3.device)
    workspace = torch.empty(1024, dtype=torch.float32, device=g3.device)  # per-CTA partials (csrc: kSumsqMaxBlocks)
    with _ext.launch(g3) as (C_, stream):
        C_.adafactor8_sumsq(_ext.params(
            C_.Adafactor8SumsqParams, **_ext.operand("g", g3), g_stride_l=g3.stride(0), g_stride_r=g3.stride(1),
            g_stride_c=g3.stride(2), **_ext.operand("a", a), **_ext.operand("b", b), **_ext.operand("out", out),
            **_ext.operand("workspace", workspace), L=L, R=R, C=C, dtype=_ext.dtype_code(g3, "grad"), stream=stream,
        ))
    return out


def _update_direction(g3: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    L, R, C = g3.shape
    return (g3.float() * a.view(L, R, 1) * b.view(L, 1, C)).reshape(-1)  # (N,) u = g / sqrt(V)


@register("adafactor8_sumsq", "torch")
def _sumsq_torch(g3: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _update_direction(g3, a, b).square().sum().reshape(1)


@register("adafactor8_step", "triton")
def _step_triton(g3, p3, q, scale, a, b, sumsq_parts, lr, decay, beta1, clip_threshold, rounding, generator):
    L, R, C = g3.shape
    nb = scale.numel()
    grid = (triton.cdiv(nb, _BLOCKS_PER_PROGRAM),)
    _adafactor8_step_kernel[grid](
        g3, p3, q, scale, a, b, sumsq_parts, q.numel(), R, C, nb, sumsq_parts.numel(), *g3.stride(), *p3.stride(),
        lr, decay, beta1, 1.0 - beta1, clip_threshold,
        BLOCKS=_BLOCKS_PER_PROGRAM, QBLOCK=QBLOCK, PARTS=max(16, triton.next_power_of_2(sumsq_parts.numel())),
        LAYOUT=_layout(L, R, C),
    )


@register("adafactor8_step", "cuda")
def _step_cuda(g3, p3, q, scale, a, b, sumsq_parts, lr, decay, beta1, clip_threshold, rounding, generator):
    L, R, C = g3.shape
    if g3.dtype != p3.dtype:  # the kernel is templated on one storage type
        g3 = g3.to(p3.dtype)
    with _ext.launch(g3) as (C_, stream):
        C_.adafactor8_step(_ext.params(
            C_.Adafactor8StepParams, **_ext.operand("g", g3), g_stride_l=g3.stride(0), g_stride_r=g3.stride(1),
            g_stride_c=g3.stride(2), **_ext.operand("p", p3), p_stride_l=p3.stride(0), p_stride_r=p3.stride(1),
            p_stride_c=p3.stride(2), **_ext.operand("q", q), **_ext.operand("scale", scale), **_ext.operand("a", a),
            **_ext.operand("b", b), **_ext.operand("sumsq_parts", sumsq_parts), n_parts=sumsq_parts.numel(),
            L=L, R=R, C=C, lr=lr, decay=decay, beta1=beta1, one_minus_beta1=1.0 - beta1,
            clip_threshold=clip_threshold, dtype=_ext.dtype_code(p3, "param"), stream=stream,
        ))


@register("adafactor8_step", "torch")
def _step_torch(g3, p3, q, scale, a, b, sumsq_parts, lr, decay, beta1, clip_threshold, rounding, generator):
    n = q.numel()
    clip = 1.0 / torch.clamp((sumsq_parts.sum() / n).sqrt() / clip_threshold, min=1.0)  # update clipping
    u = _update_direction(g3, a, b)  # (N,)
    m = beta1 * dequantize_blockwise(q, scale) + (1.0 - beta1) * (u * clip)
    p_new = p3.float().reshape(-1) * decay - lr * m
    p3.copy_(p_new.view(p3.shape))
    q_new, scale_new = quantize_blockwise(m, generator=generator, stochastic=rounding == "stochastic")
    q.copy_(q_new)
    scale.copy_(scale_new)


# ----------------------------------------------------------------------------- torch custom ops

# Each step piece as a vqim:: op whose body is the registry's implementation; the optimizer
# resolves the backend once per parameter and passes it as a string. The fakes mirror each
# backend's allocations (the partial-sum counts differ by backend).

def _row_col_parts(backend: str, R: int, C: int) -> tuple[int, int]:
    """How many row / column partials ``adafactor8_row_col_sums`` returns on ``backend``."""
    if backend == "torch":
        return 1, 1
    if backend == "cuda":
        row_blocks = triton.cdiv(R, 32)
        return triton.cdiv(C, 256), triton.cdiv(row_blocks, triton.next_power_of_2(
            triton.cdiv(row_blocks, _MAX_COL_PARTIALS)))
    br, bc, tiles = _row_col_blocks(R, C)
    return triton.cdiv(C, bc), triton.cdiv(R, br * tiles)


@torch.library.custom_op("vqim::adafactor8_row_col_sums", mutates_args=())
def _row_col_sums_op(g3: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("adafactor8_row_col_sums", backend, g3.device)(g3)


@_row_col_sums_op.register_fake
def _(g3, backend):
    L, R, C = g3.shape
    n_row, n_col = _row_col_parts(backend, R, C)
    return g3.new_empty(n_row, L, R, dtype=torch.float32), g3.new_empty(n_col, L, C, dtype=torch.float32)


@torch.library.custom_op("vqim::adafactor8_factors", mutates_args=("r", "c"))
def _factors_op(rowpart: torch.Tensor, colpart: torch.Tensor, r: torch.Tensor, c: torch.Tensor, beta2_t: float,
                eps1: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("adafactor8_factors", backend, r.device)(rowpart, colpart, r, c, beta2_t, eps1)


@_factors_op.register_fake
def _(rowpart, colpart, r, c, beta2_t, eps1, backend):
    return r.new_empty(r.numel(), dtype=torch.float32), c.new_empty(c.numel(), dtype=torch.float32)


@torch.library.custom_op("vqim::adafactor8_full_factors", mutates_args=("v",))
def _full_factors_op(g3: torch.Tensor, v: torch.Tensor, beta2_t: float, eps1: float, backend: str) -> torch.Tensor:
    return dispatch("adafactor8_full_factors", backend, v.device)(g3, v, beta2_t, eps1)


@_full_factors_op.register_fake
def _(g3, v, beta2_t, eps1, backend):
    return v.new_empty(v.numel(), dtype=torch.float32)


@torch.library.custom_op("vqim::adafactor8_sumsq", mutates_args=())
def _sumsq_op(g3: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    return dispatch("adafactor8_sumsq", backend, g3.device)(g3, a, b)


@_sumsq_op.register_fake
def _(g3, a, b, backend):
    n = 1
    if backend == "triton":
        n_tiles = triton.cdiv(triton.cdiv(g3.numel(), QBLOCK), _BLOCKS_PER_PROGRAM)
        n = min(n_tiles, _SUMSQ_PROGRAMS)
    return g3.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("vqim::adafactor8_step", mutates_args=("p3", "q", "scale"))
def _step_op(g3: torch.Tensor, p3: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, sumsq_parts: torch.Tensor, lr: float, decay: float, beta1: float, clip_threshold: float,
             backend: str) -> None:
    """One fused update with nearest rounding (stochastic rounding bypasses the op: see _step_param)."""
    dispatch("adafactor8_step", backend, g3.device)(g3, p3, q, scale, a, b, sumsq_parts, lr, decay, beta1,
                                                    clip_threshold, "nearest", None)


@_step_op.register_fake
def _(g3, p3, q, scale, a, b, sumsq_parts, lr, decay, beta1, clip_threshold, backend):
    return None


# ----------------------------------------------------------------------------- optimizer

@functools.cache
def _ones(device: torch.device) -> torch.Tensor:
    """The row factor of an unfactored tensor (one row): allocated once per device."""
    return torch.ones(1, dtype=torch.float32, device=device)


def _view3(t: torch.Tensor) -> torch.Tensor:
    """``(L, R, C)`` view of a param or grad: leading dims merged for rank >= 2, ``(1, 1, N)`` below."""
    shape = (math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1]) if t.dim() >= 2 else (1, 1, t.numel())
    return t.reshape(shape)  # a view where the strides allow, else a copy


class Adafactor8bit(torch.optim.Optimizer):
    """Adafactor (same update as ``vqim.train.Adafactor``) with the first moment stored as int8.

    Args:
        params: parameters or param groups; fp32, fp16 or bf16, any shape; grads may be
            non-contiguous.
        lr: absolute learning rate (relative step off); schedulers set ``group["lr"]``.
        betas: ``(beta1, beta2)``, default Parti's ``(0.9, 0.96)``.
        eps1: added to ``g^2`` (paper's eps1, 1e-30).
        weight_decay: decoupled, multiplied by ``lr`` (default 4.5e-2).
        clip_threshold: update clipping ``u / max(1, RMS(u) / d)`` (default 1.0).
        backend: ``None`` (Triton on CUDA, the torch path on CPU), ``"triton"``, ``"cuda"``,
            ``"torch"``; the torch path implements the kernels' semantics exactly.
        rounding: ``"nearest"`` (the kernels' rule) or ``"stochastic"`` (torch backend only; kept
            for the rounding study, it tracks fp32 less closely).

    State per parameter: ``step`` (int), ``exp_avg_q`` (int8 ``[numel]``, logical row-major
    order), ``exp_avg_scale`` (fp32 ``[ceil(numel / 256)]``), and ``exp_avg_sq_row`` +
    ``exp_avg_sq_col`` (fp32, factored) or ``exp_avg_sq`` (fp32, rank < 2). ``state_dict()``
    round-trips all of it exactly.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (BETA1, BETA2),
                 eps1: float = EPS1, weight_decay: float = WEIGHT_DECAY, clip_threshold: float = CLIP_THRESHOLD,
                 *, backend: str | None = None, rounding: str = "nearest"):
        check_hyperparameters(lr, betas, eps1, weight_decay, clip_threshold)
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps1=eps1, weight_decay=weight_decay,
                        clip_threshold=clip_threshold)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in _PARAM_DTYPES:
                    raise ValueError(f"params must be float32, float16 or bfloat16, got {p.dtype}")
        self.backend = backend
        self.rounding = rounding
        self._generator: torch.Generator | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_keeping_dtypes(self, state_dict)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        n = p.numel()
        kw = dict(dtype=torch.float32, device=p.device)
        state["step"] = 0
        state["exp_avg_q"] = torch.zeros(n, dtype=torch.int8, device=p.device)
        state["exp_avg_scale"] = torch.zeros(triton.cdiv(n, QBLOCK), **kw)
        if p.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **kw)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, **kw)
        return state

    def init_state(self) -> None:
        """Create every parameter's state now (e.g. to measure its memory before training)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def state_bytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps1, wd, d = group["lr"], group["eps1"], group["weight_decay"], group["clip_threshold"]
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                self._step_param(p, beta1, beta2, lr, eps1, wd, d)
        return loss

    def _step_param(self, p: torch.Tensor, beta1: float, beta2: float, lr: float, eps1: float, wd: float,
                    d: float) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise ValueError("Adafactor8bit does not support sparse gradients")
        if grad.dtype not in _PARAM_DTYPES:
            raise ValueError(f"grads must be float32, float16 or bfloat16, got {grad.dtype}")
        if self.rounding == "stochastic" and self.backend != "torch":
            raise ValueError("rounding='stochastic' runs only with backend='torch'")
        backend = resolve_backend(self.backend, p.device)
        state = self._init_state(p)
        state["step"] += 1
        beta2_t = beta2_at(beta2, state["step"])
        g3 = _view3(grad)  # (L, R, C)
        L, R, C = g3.shape
        if p.dim() >= 2:
            r, c = state["exp_avg_sq_row"].view(L, R), state["exp_avg_sq_col"].view(L, C)
            rowpart, colpart = torch.ops.vqim.adafactor8_row_col_sums(g3, backend)
            # a (L*R,), b (L*C,): u = g * a[l, row] * b[l, col]
            a, b = torch.ops.vqim.adafactor8_factors(rowpart, colpart, r, c, beta2_t, eps1, backend)
        else:
            v = state["exp_avg_sq"].view(-1)
            b = torch.ops.vqim.adafactor8_full_factors(g3, v, beta2_t, eps1, backend)  # (N,)
            a = _ones(p.device)
        # Partial sums of u^2 (their total is what matters); the step kernel turns them into the
        # clipping factor on the device, so there is no host sync.
        sumsq_parts = torch.ops.vqim.adafactor8_sumsq(g3, a, b, backend)

        p3 = _view3(p)
        # A param whose strides do not merge into (L, R, C) is updated in a copy, then written back.
        writes_back = p3.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
        if self.rounding == "stochastic" and self._generator is None:
            self._generator = torch.Generator(device=p.device).manual_seed(0)
        args = (g3, p3, state["exp_avg_q"], state["exp_avg_scale"], a, b, sumsq_parts, lr, 1.0 - lr * wd, beta1, d)
        if self.rounding == "stochastic":
            # A torch.Generator is no custom-op argument type; stochastic rounding is the torch
            # backend's alone, so it calls the reference directly.
            dispatch("adafactor8_step", backend, p.device)(*args, self.rounding, self._generator)
        else:
            torch.ops.vqim.adafactor8_step(*args, backend)
        if writes_back:
            p.copy_(p3.view(p.shape))

