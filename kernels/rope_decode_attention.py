"""One decode step of causal attention with rotary position embeddings (RoPE), fused with the
KV-cache write: the self-attention of Llama-style decoders (Janus-Pro, LlamaGen).

Each row b of the batch decodes one token at its own position ``pos[b]`` (= its cache slot):

* ``qr = rope(q)``, ``kr = rope(k_new)`` with the angles of row ``pos[b]`` of the model's
  ``cos``/``sin`` tables (``[P, Dh/2]`` float32: 1D RoPE for Janus-Pro; LlamaGen's 2D table,
  whose class-token rows are all zero);
* ``k_cache[b, :, pos[b]] = kr``, ``v_cache[b, :, pos[b]] = v_new`` (in place);
* ``out[b, h] = softmax(qr[b, h] . k_cache[b, h // G, :pos[b] + 1]^T * scale)
  @ v_cache[b, h // G, :pos[b] + 1]``, ``G = Hq / Hkv`` (grouped-query attention). Slots after
  ``pos[b]`` are never read.

``rope(x)`` is computed in fp32 and rounded back to x's dtype, in one of two layouts of the
rotated pairs: ``interleaved=False`` is Hugging Face Llama's ``rotate_half`` (pair i is
``(x[i], x[i + Dh/2])``), ``interleaved=True`` is LlamaGen's / GPT-J's (pair i is
``(x[2i], x[2i + 1])``); pair i is rotated by the angle of column i of the tables:
``(a, b) -> (a*cos - b*sin, b*cos + a*sin)``.

:func:`apply_rope_ref` is the rotation alone (the model's full-sequence path uses it);
:func:`rope_decode_attention_ref` is the definition of the step, dense attention in fp32.
"""

from __future__ import annotations

import math

import torch

from ._registry import (call, custom_op, dispatch, interpreter_dot_upcast, register, resolve_backend,
                        triton_interpreter_enabled)
from ._triton import tl, triton
from .add_layer_norm import _to_bf16_rtne
from .conv_attention import _dot, _precision

_LOG2E = 1.4426950408889634
_MAX_D = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- references

def _check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"the head dim Dh (last dim of x) must be even for RoPE, got {x.shape[-1]}")
    half = x.shape[-1] // 2
    if cos.shape != sin.shape or cos.shape[-1:] != (half,):
        raise ValueError(f"cos and sin must share a shape ending in Dh/2 = {half}, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """RoPE of ``x [..., Dh]`` with angles ``cos``, ``sin`` ``[..., Dh/2]`` (broadcast against
    x's leading dims), computed in fp32 and returned in x's dtype.

    ``interleaved=False``: Hugging Face's ``rotate_half`` layout, ``x1, x2 = x[..., :Dh/2],
    x[..., Dh/2:]``, ``cat(x1*c - x2*s, x2*c + x1*s)``. ``interleaved=True``: LlamaGen's layout,
    the pairs ``(x[2i], x[2i+1])`` rotated in place.
    """
    _check_rope(x, cos, sin)
    xf, c, s = x.float(), cos.float(), sin.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (..., Dh/2) each
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)  # (..., Dh)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]  # (..., Dh/2) each
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # (..., Dh)
    return out.to(x.dtype)


def _scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def rope_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                              k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                              interleaved: bool, scale: float | None = None) -> torch.Tensor:
    """The definition of the step: rotate q and k_new, write the caches by index, then dense
    attention of each row over slots ``0..pos[b]`` in fp32, returned in q's dtype. Slots after
    ``pos[b]`` do not reach the output (their scores and values are masked, not multiplied by 0)."""
    b, hq, _, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    pos = pos.long()
    c, s = cos[pos][:, None, None], sin[pos][:, None, None]  # (B, 1, 1, Dh/2)
    qr = apply_rope_ref(q, c, s, interleaved=interleaved)  # (B, Hq, 1, Dh)
    kr = apply_rope_ref(k_new, c, s, interleaved=interleaved)  # (B, Hkv, 1, Dh)
    rows = torch.arange(b, device=q.device)  # (B,)
    k_cache[rows, :, pos] = kr[:, :, 0]  # (B, Hkv, Dh)
    v_cache[rows, :, pos] = v_new[:, :, 0]  # (B, Hkv, Dh)
    vis = torch.arange(s_max, device=q.device)[None, :] <= pos[:, None]  # (B, S)
    # q head h = kvh * G + i reads kv head kvh: the group's queries are one [G, Dh] matrix.
    qg = qr.float().reshape(b, hkv, hq // hkv, d)  # (B, Hkv, G, Dh)
    scores = (qg @ k_cache.float().transpose(-1, -2)) * _scale(scale, d)  # (B, Hkv, G, S)
    scores = scores.masked_fill(~vis[:, None, None, :], float("-inf"))
    v = v_cache.float().masked_fill(~vis[:, None, :, None], 0.0)  # (B, Hkv, S, Dh)
    return (scores.softmax(dim=-1) @ v).reshape(b, hq, 1, d).to(q.dtype)  # (B, Hq, 1, Dh)


def _check_inputs(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, scale, validate: bool) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype} (one dtype for q, k/v and the caches), "
                             f"got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    b, hq, one, d = q.shape
    if one != 1:
        raise ValueError(f"q must be [B, Hq, 1, Dh] (one query per row), got {tuple(q.shape)}")
    if d < 2 or d % 2:
        raise ValueError(f"the head dim Dh must be even and >= 2 for RoPE, got q of shape {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d or k_cache.shape[2] < 1:
        raise ValueError(f"k_cache and v_cache must both be [B={b}, Hkv, S >= 1, Dh={d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    hkv = k_cache.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q's heads Hq = {hq} must be a multiple of the caches' kv heads Hkv = {hkv} "
                         "(grouped-query attention)")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != (b, hkv, 1, d):
            raise ValueError(f"{name} must be [B, Hkv, 1, Dh] = {(b, hkv, 1, d)}, got {tuple(t.shape)}")
    # The write goes through every row's own slot; a cache whose rows share memory (an
    # expanded view) would have one row's write land in another's keys.
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"{name} is written in place: it must not be an expanded view (stride 0 in a "
                             f"dimension of size > 1), got strides {t.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] != d // 2:
            raise ValueError(f"{name} must be a 2-D table [P >= 1, Dh/2 = {d // 2}], got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not isinstance(pos, torch.Tensor) or pos.shape != (b,) or pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pos must be an int64/int32 tensor [B={b}], got "
                         f"{getattr(pos, 'dtype', type(pos))} {tuple(getattr(pos, 'shape', ()))}")
    if pos.device != q.device:
        raise ValueError(f"pos must be on q's device {q.device}, got {pos.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    if validate and b > 0:
        limit = min(k_cache.shape[2], cos.shape[0])
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"pos must be in [0, {limit}) (cache length {k_cache.shape[2]}, cos/sin rows "
                             f"{cos.shape[0]}), got values in [{lo}, {hi}]")


@register("rope_decode_attention", "torch")
def _rope_decode_attention_torch(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved, scale):
    return rope_decode_attention_ref(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved=interleaved,
                                     scale=scale)


# --------------------------------------------------------------------------- Triton

@triton.jit
def _rounded(v, dtype: tl.constexpr, BF16_RTNE: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype``; BF16_RTNE: to bf16 by integer ops (the interpreter
    truncates fp32 -> bf16 casts, see :mod:`.add_layer_norm`)."""
    if BF16_RTNE:
        return _to_bf16_rtne(v)
    else:
        return v.to(dtype)


@triton.jit
def _rope(x, xp, c, s, first):
    """One rotated element per lane from the element ``x``, its pair partner ``xp`` and the
    pair's angle: the reference's products and sum, each rounded to fp32 (the launch turns off
    FMA contraction, so the cache write is bitwise the reference's)."""
    xc = x * c
    ps = xp * s
    return tl.where(first, xc - ps, xc + ps)


@triton.jit
def _rope_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr,
    HKV, G, D, HALF,
    sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sod,
    sknb, sknh, sknd, svnb, svnh, svnd, scp, scj, ssp, ssj,
    qk_scale,
    INTERLEAVED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 offsets: b * stride can pass 2^31 for a large cache.
    b = (pid // HKV).to(tl.int64)
    kvh = (pid % HKV).to(tl.int64)
    p = tl.load(pos_ptr + b).to(tl.int64)
    dtype = k_ptr.dtype.element_ty

    # Each lane d holds one element of its pair; `partner` is the pair's other element, `j`
    # the pair's angle column, `first` whether d is the pair's first element.
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if INTERLEAVED:
        first = offs_d % 2 == 0
        j = offs_d // 2
        partner = offs_d ^ 1
    else:
        first = offs_d < HALF
        j = tl.where(first, offs_d, offs_d - HALF)
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
    c = tl.load(cos_ptr + p * scp + j * scj, mask=d_ok, other=0.0)  # (BLOCK_D,)
    s = tl.load(sin_ptr + p * ssp + j * ssj, mask=d_ok, other=0.0)  # (BLOCK_D,)

    # The new token's K/V: rotate k, round to the cache dtype, store both into slot p. Only
    # this program touches (b, kvh)'s cache row, and slot p is never loaded back: on a GPU
    # nothing orders one thread's store before another thread's load within the CTA, so the
    # loop below reads slots 0..p-1 only and the current key and value come from registers.
    kn_base = kn_ptr + b * sknb + kvh * sknh
    kn = tl.load(kn_base + offs_d * sknd, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    kn_p = tl.load(kn_base + partner * sknd, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    kr = _rounded(_rope(kn, kn_p, c, s, first), dtype, BF16_RTNE)  # (BLOCK_D,)
    vn = tl.load(vn_ptr + b * svnb + kvh * svnh + offs_d * svnd, mask=d_ok, other=0.0)  # (BLOCK_D,)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    tl.store(k_base + p * sks + offs_d * skd, kr, mask=d_ok)
    tl.store(v_base + p * svs + offs_d * svd, vn, mask=d_ok)

    # The group's G query heads (kvh * G + i) as one [BLOCK_G, BLOCK_D] tile: every key block
    # is loaded once for all of them. Rotated in fp32 and rounded to q's dtype, as the reference.
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    gd_ok = g_ok[:, None] & d_ok[None, :]
    q_rows = q_ptr + b * sqb + (kvh * G + offs_g)[:, None] * sqh  # (BLOCK_G, 1)
    qx = tl.load(q_rows + offs_d[None, :] * sqd, mask=gd_ok, other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    qp = tl.load(q_rows + partner[None, :] * sqd, mask=gd_ok, other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    qr = _rounded(_rope(qx, qp, c[None, :], s[None, :], first[None, :]), dtype, BF16_RTNE)  # (BLOCK_G, BLOCK_D)

    # The online softmax starts from the current key, so the running max is finite throughout.
    m_i = tl.sum(qr.to(tl.float32) * kr.to(tl.float32)[None, :], axis=1) * qk_scale  # (BLOCK_G,), log2 units
    l_i = tl.full([BLOCK_G], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + vn.to(tl.float32)[None, :]  # (BLOCK_G, BLOCK_D)
    for n0 in range(0, p, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < p
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=nd_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=nd_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        sc = _dot(qr, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_G, BLOCK_N)
        sc = tl.where(n_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        pr = tl.exp2(sc - m_new[:, None])  # (BLOCK_G, BLOCK_N)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + _dot(pr.to(dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    out = _rounded(acc / l_i[:, None], dtype, BF16_RTNE)  # (BLOCK_G, BLOCK_D)
    o_rows = o_ptr + b * sob + (kvh * G + offs_g)[:, None] * soh
    tl.store(o_rows + offs_d[None, :] * sod, out, mask=gd_ok)


def _blocks(d: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): 64 keys a block up to Dh = 128, 32 at Dh = 256; 8 warps from
    Dh = 128 up. Chosen so that ptxas (sm_90) spills no registers at bf16, not yet timed."""
    if d <= 64:
        return 64, 4
    return (64, 8) if d <= 128 else (32, 8)


@register("rope_decode_attention", "triton")
def _rope_decode_attention_triton(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved, scale):
    b, hq, _, d = q.shape
    if d > _MAX_D:
        raise ValueError(f"Dh must be <= {_MAX_D} for backend='triton', got {d}")
    hkv = k_cache.shape[1]
    o = torch.empty(b, hq, 1, d, device=q.device, dtype=q.dtype)
    if b == 0 or hkv == 0:
        return o
    # The kernel reads pos[row] at unit stride; an expanded view (stride 0) would be read out of bounds.
    pos = pos.contiguous()
    g = hq // hkv
    block_n, num_warps = _blocks(d)
    _rope_decode_kernel[(b * hkv,)](
        q, k_cache, v_cache, o, pos, k_new, v_new, cos, sin,
        hkv, g, d, d // 2,
        q.stride(0), q.stride(1), q.stride(3), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.stride(3), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        o.stride(0), o.stride(1), o.stride(3), k_new.stride(0), k_new.stride(1), k_new.stride(3),
        v_new.stride(0), v_new.stride(1), v_new.stride(3), *cos.stride(), *sin.stride(),
        _scale(scale, d) * _LOG2E,
        # tl.dot needs 16 rows: a group smaller than that is padded with masked heads.
        INTERLEAVED=bool(interleaved), BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), DOT_PRECISION=_precision(q.dtype, q.device),
        UPCAST_DOT=interpreter_dot_upcast(q.dtype, q.device),
        BF16_RTNE=q.dtype == torch.bfloat16 and triton_interpreter_enabled(),
        # Without FMA contraction the rotation rounds like the reference: the cache write is exact.
        **({"num_warps": num_warps, "enable_fp_fusion": False} if q.is_cuda else {}),
    )
    return o


# --------------------------------------------------------------------------- public op

def rope_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                          interleaved: bool, scale: float | None = None, validate: bool = True,
                          backend: str | None = None) -> torch.Tensor:
    """One decode step of RoPE causal attention, writing the new token's K/V into the caches.

    Args:
        q: ``[B, Hq, 1, Dh]``, the new token's queries (before RoPE), any strides.
        k_cache, v_cache: ``[B, Hkv, S, Dh]``, slot = position; written in place at ``pos``.
            ``Hq % Hkv == 0``: q head h reads kv head ``h // (Hq // Hkv)``.
        pos: int64/int32 ``[B]``, each row's position (= its cache slot); rows may differ.
        k_new, v_new: ``[B, Hkv, 1, Dh]``, the new token's key (before RoPE) and value, any
            strides (views of a fused QKV projection).
        cos, sin: float32 ``[P, Dh/2]``, row p the angles of position p, ``P > max(pos)``.
        interleaved: the pair layout: False for Hugging Face Llama's ``rotate_half`` (Janus-Pro),
            True for pairs ``(x[2i], x[2i+1])`` (LlamaGen).
        scale: softmax scale, default ``1 / sqrt(Dh)``.
        validate: check the values of ``pos`` (a host sync); pass False inside CUDA graphs,
            where a ``pos`` out of range reads and writes out of bounds.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"`` or ``"torch"``.
            q, k/v and the caches share one dtype (float32/float16/bfloat16); Dh even, and
            ``<= 256`` for ``"triton"``.

    Returns:
        ``[B, Hq, 1, Dh]`` in q's dtype: attention of ``rope(q)`` over slots ``0..pos[b]`` of
        the caches after the write (``rope(k_new)`` in slot ``pos[b]``). One kernel launch on
        ``"triton"``.
    """
    _check_inputs(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, scale, validate)
    scale = None if scale is None else float(scale)
    return call(_rope_decode_attention_op, q, k_cache, v_cache, pos, k_new, v_new, cos, sin, bool(interleaved),
                scale, resolve_backend(backend, q.device))


# The public function validates and resolves the backend (use_backend is a contextvar a compiled
# graph would not see at run time); the op declares the caches mutated, so functionalization
# (compile, export) keeps the in-place write.
@custom_op("vqim::rope_decode_attention", mutates_args=("k_cache", "v_cache"))
def _rope_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                              k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              interleaved: bool, scale: float | None, backend: str) -> torch.Tensor:
    return dispatch("rope_decode_attention", backend, q.device)(q, k_cache, v_cache, pos, k_new, v_new, cos, sin,
                                                                interleaved, scale)


@_rope_decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved, scale, backend):
    return q.new_empty(q.shape)
