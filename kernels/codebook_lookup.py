"""Fused l2-normalized codebook lookup: ``argmax_k <z/|z|, e_k/|e_k|>``.

The image tokenizer's quantizer (ViT-VQGAN with factorized, l2-normalized codes). The Triton
kernel scores codebook tiles in registers, so the ``[N, K]`` score matrix never exists; the code
norms come from the tile already loaded (or are skipped with ``codebook_normalized=True``) and
``1/|z|`` is applied once per row. A zero row of z scores 0 against every code and so gets
index 0; a zero code scores 0.

**Ties.** A code ties the best when its fp32 score is not below ``best - TIE_TOL``, ``best``
being the row's largest fp32 score; the answer is the lowest index among the codes that tie.
An exact-equality rule cannot hold across backends: equal cosines computed by different
formulas (the reference normalizes, then multiplies; the kernels scale the dot by ``1/|e|`` and
``1/|z|``; BLAS kernels round equal columns differently) differ in their last bits, so with
``e[40] = 2.5 * e[7]`` the reference returned 7 and the Triton kernel 40.

``TIE_TOL = 2^-17`` (about 7.6e-6, 128 units in the last place of 1.0). Cosines lie in
[-1, 1], so an absolute tolerance fits every row. The fp32 error of one score (a dot over
D <= 256 and two norms; tf32x3 on tensor cores) grows like sqrt(D) ulps: scored by the
reference's formula and by the kernels', two copies of one direction differed by at most 23
ulps (1.4e-6) at D = 256 on the CPU, so copies tie with a margin of 5x. Codes whose exact
cosines differ by more than ``2 * TIE_TOL`` are never confused, and choosing within the
tolerance costs at most 2^-17 of cosine. The backends can still differ where some code's score
lies within rounding of the threshold ``best - TIE_TOL`` itself, which copies never do.

The threshold needs the row's final best, so both kernels make two passes over the codebook:
the best score, then the lowest index that ties it. The comparison is written "not below the
threshold" rather than ">=", so a row with a NaN still gets an index in range.

z and the codebook may have different float dtypes; the scores are computed in fp32 from both
exactly as given (bf16/fp16 -> fp32 is exact), never by rounding one operand to the other's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext
from ._registry import call, custom_op, dispatch, interpreter_dot_upcast, register, resolve_backend
from ._triton import tl, triton

_MAX_D = 256
# A code ties the row's best when its fp32 score is not below best - TIE_TOL (module docstring);
# csrc/codebook_lookup.cu's kTieTol is the same number.
TIE_TOL = 2.0**-17


def _l2_normalize_exact(x: torch.Tensor) -> torch.Tensor:
    """x / |x| row-wise, with zero rows left at zero (F.normalize would divide by eps)."""
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def codebook_scores_ref(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Cosine scores ``[N, K]`` in float64 (for tests: the exact quantity the argmax is over)."""
    return _l2_normalize_exact(z.double()) @ _l2_normalize_exact(codebook.double()).T


def codebook_lookup_ref(z: torch.Tensor, codebook: torch.Tensor, *, codebook_normalized: bool = False,
                        chunk: int = 4096) -> torch.Tensor:
    """The definition of the op, in fp32: the lowest index whose score ties the row's best
    (within ``TIE_TOL``). Chunks over N to bound memory."""
    _check_inputs(z, codebook)
    cb = codebook.float() if codebook_normalized else _l2_normalize_exact(codebook.float())  # (K, D)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for s in range(0, z.shape[0], chunk):
        scores = _l2_normalize_exact(z[s:s + chunk].float()) @ cb.T  # (n, K)
        best = scores.max(dim=1, keepdim=True).values  # (n, 1)
        tie = ~(scores < best - TIE_TOL)  # (n, K); not below, so a NaN row still picks an index
        out[s:s + chunk] = tie.to(torch.uint8).argmax(dim=1)  # argmax gives the first maximal index: the first tie
    return out


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor [N, D], got {getattr(z, 'shape', type(z))}")
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
        raise ValueError(f"codebook must be a 2-D tensor [K, D], got {getattr(codebook, 'shape', type(codebook))}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must have at least one code (K >= 1), got K = 0")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z and codebook must share D: z is [N, {z.shape[1]}], codebook is [K, {codebook.shape[1]}]")
    if z.shape[1] == 0:
        raise ValueError("D must be >= 1, got 0")
    for name, t in (("z", z), ("codebook", codebook)):
        if not t.is_floating_point() or t.dtype == torch.float64 and t.device.type == "cuda":
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")


@triton.jit
def _tile_scores(z, inv_z, cb_ptr, k0, K, stride_ck, stride_cd, dims, dim_mask,
                 NORMALIZED: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 cosines of the rows against codes ``k0 .. k0 + BLOCK_K - 1``, ``-inf`` past K.
    Both passes call it, so a code scores the same in each."""
    codes = k0 + tl.arange(0, BLOCK_K)
    code_mask = codes < K
    cb = tl.load(cb_ptr + codes[:, None] * stride_ck + dims[None, :] * stride_cd,
                 mask=code_mask[:, None] & dim_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
    if DOT_FP32:
        s = tl.dot(z, tl.trans(cb.to(tl.float32)), input_precision=DOT_PRECISION)
    else:
        s = tl.dot(z, tl.trans(cb), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_K) fp32
    if not NORMALIZED:
        cbf = cb.to(tl.float32)
        sq = tl.sum(cbf * cbf, axis=1)  # (BLOCK_K,)
        # A zero code scores 0 against everything, as in the reference.
        inv = tl.where(sq > 0, 1.0 / tl.sqrt(sq), 0.0)
        s = s * inv[None, :]
    s = s * inv_z[:, None]
    return tl.where(code_mask[None, :], s, float("-inf")), codes


@triton.jit
def _codebook_lookup_kernel(
    z_ptr, cb_ptr, out_ptr,
    N, K, D,
    stride_zn, stride_zd, stride_ck, stride_cd,
    NORMALIZED: tl.constexpr, TIE_TOL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    dim_mask = dims < D
    # With one dtype, z stays in it: for fp16/bf16 the products are exact in the fp32
    # accumulator, so the tensor-core dot is as good as an fp32 one. With two (DOT_FP32),
    # both operands go to fp32 in registers (exact), never one down to the other's dtype.
    z = tl.load(z_ptr + rows[:, None] * stride_zn + dims[None, :] * stride_zd,
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    zf = z.to(tl.float32)
    sq_z = tl.sum(zf * zf, axis=1)  # (BLOCK_N,)
    # A zero row scores 0 against every code, so every code ties and it gets index 0.
    inv_z = tl.where(sq_z > 0, 1.0 / tl.sqrt(sq_z), 0.0)
    if DOT_FP32:
        z = zf

    # Pass 1: the row's best score.
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        s, codes = _tile_scores(z, inv_z, cb_ptr, k0, K, stride_ck, stride_cd, dims, dim_mask,
                                NORMALIZED, BLOCK_K, DOT_FP32, DOT_PRECISION)
        best = tl.maximum(best, tl.max(s, axis=1))
    # Pass 2: the lowest index whose score is not below best - TIE_TOL (fp32, as in the reference).
    # The best code itself qualifies, so the index is always < K.
    threshold = best - TIE_TOL  # (BLOCK_N,)
    first_tie = tl.zeros((BLOCK_N,), tl.int32) + K
    for k0 in range(0, K, BLOCK_K):
        s, codes = _tile_scores(z, inv_z, cb_ptr, k0, K, stride_ck, stride_cd, dims, dim_mask,
                                NORMALIZED, BLOCK_K, DOT_FP32, DOT_PRECISION)
        tie = (codes[None, :] < K) & ~(s < threshold[:, None])  # (BLOCK_N, BLOCK_K)
        first_tie = tl.minimum(first_tie, tl.min(tl.where(tie, codes[None, :], K), axis=1))
    tl.store(out_ptr + rows, first_tie.to(tl.int64), mask=row_mask)


def _block_sizes(n: int, d: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    # Keep the (BLOCK_N, BLOCK_K) score tile and the code tile in registers.
    block_k = 128 if block_d <= 64 else 64
    return block_n, block_k, block_d


@register("codebook_lookup", "triton")
def _codebook_lookup_triton(z: torch.Tensor, codebook: torch.Tensor, codebook_normalized: bool) -> torch.Tensor:
    n, d = z.shape
    k = codebook.shape[0]
    if d > _MAX_D:
        raise ValueError(f"D must be <= {_MAX_D} for backend='triton', got {d}")
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    block_n, block_k, block_d = _block_sizes(n, d)
    # Two dtypes: both operands go to fp32 (exact); so does bf16 under the interpreter, whose
    # bf16 tl.dot is wrong (interpreter_dot_upcast).
    dot_fp32 = z.dtype != codebook.dtype or interpreter_dot_upcast(z.dtype, z.device)
    # fp32 operands: 3xTF32 keeps fp32 accuracy on tensor cores.
    precision = "tf32x3" if dot_fp32 or z.dtype == torch.float32 else "ieee"
    grid = (triton.cdiv(n, block_n),)
    _codebook_lookup_kernel[grid](
        z, codebook, out, n, k, d,
        z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        NORMALIZED=codebook_normalized, TIE_TOL=TIE_TOL, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
    )
    return out


@register("codebook_lookup", "cuda")
def _codebook_lookup_cuda(z: torch.Tensor, codebook: torch.Tensor, codebook_normalized: bool) -> torch.Tensor:
    # The kernel loads both operands as fp32 (to_float), so with two dtypes the fp32 kernel on
    # upcast copies computes exactly what a two-dtype kernel would; only the copy costs.
    if codebook.dtype != z.dtype:
        z, codebook = z.float(), codebook.float()
    n, d = z.shape
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    with _ext.launch(z) as (C, stream):
        C.codebook_lookup(_ext.params(
            C.CodebookLookupParams,
            **_ext.operand("z", z), z_stride0=z.stride(0), z_stride1=z.stride(1),
            **_ext.operand("codebook", codebook), cb_stride0=codebook.stride(0), cb_stride1=codebook.stride(1),
            **_ext.operand("out", out), N=n, K=codebook.shape[0], D=d,
            dtype=_ext.dtype_code(z, "z"), normalized=codebook_normalized, stream=stream,
        ))
    return out


@register("codebook_lookup", "torch")
def _codebook_lookup_torch(z: torch.Tensor, codebook: torch.Tensor, codebook_normalized: bool) -> torch.Tensor:
    return codebook_lookup_ref(z, codebook, codebook_normalized=codebook_normalized)


def codebook_lookup(z: torch.Tensor, codebook: torch.Tensor, *, codebook_normalized: bool = False,
                    backend: str | None = None) -> torch.Tensor:
    """Index of the nearest code by cosine similarity.

    Args:
        z: ``[N, D]`` float32/float16/bfloat16, any strides.
        codebook: ``[K, D]`` float32/float16/bfloat16, same device; its dtype may differ from z's
            (the scores are fp32 either way).
        codebook_normalized: the codes already have unit norm; skips their norms.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"``, ``"cuda"``, ``"torch"``.

    Returns:
        LongTensor ``[N]``.
    """
    _check_inputs(z, codebook)
    return call(_codebook_lookup_op, z, codebook, codebook_normalized, resolve_backend(backend, z.device))


# The backend is resolved in the public function (use_backend is a contextvar a compiled graph
# would not see at run time) and reaches the op as a string; the body is the registry's impl.
@custom_op("vqim::codebook_lookup", mutates_args=())
def _codebook_lookup_op(z: torch.Tensor, codebook: torch.Tensor, codebook_normalized: bool,
                        backend: str) -> torch.Tensor:
    return dispatch("codebook_lookup", backend, z.device)(z, codebook, codebook_normalized)


@_codebook_lookup_op.register_fake
def _(z, codebook, codebook_normalized, backend):
    return z.new_empty(z.shape[0], dtype=torch.long)


def codebook_quantize(z: torch.Tensor, codebook: torch.Tensor, *, codebook_normalized: bool = False,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [N], codes [N, D])``: the l2-normalized chosen codes, in z's dtype.

    ``codes`` is differentiable with respect to ``codebook`` (the codebook term of the VQ loss);
    the straight-through estimator is ``z_n + (codes - z_n).detach()`` in the caller.
    """
    idx = codebook_lookup(z, codebook, codebook_normalized=codebook_normalized, backend=backend)
    chosen = codebook[idx]  # (N, D)
    codes = chosen if codebook_normalized else F.normalize(chosen.float(), dim=-1, eps=1e-12)
    return idx, codes.to(z.dtype)
