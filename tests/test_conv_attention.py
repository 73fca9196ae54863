"""conv_attention / conv_decode_attention against dense attention with conv_mask_ref.

The Triton kernels run through the interpreter at small shapes, plus one full 32 x 32 grid
with the 11 x 11 kernel; the torch reference path sweeps the whole matrix of grids, kernels,
prefixes, head dims and dtypes. Tolerances follow DESIGN §6: the kernel's error against the
high-precision reference may be at most twice that of plain PyTorch in the kernel's dtype.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, EPS, assert_close, assert_within_torch_error, max_abs_err
from vqim.kernels import (conv_attention, conv_attention_ref, conv_cache_len, conv_cache_slot, conv_decode_attention,
                          conv_decode_attention_ref, conv_mask_ref)
from vqim.kernels import _ext
from vqim.kernels.conv_attention import _conv_attention_triton

GRIDS = [(1, 1), (5, 7), (16, 16), (32, 32)]
KERNELS = [(1, 1), (3, 3), (5, 7), (11, 11)]
PREFIXES = [0, 1, 3]


def mask_by_rule(grid, kernel, prefix, s):
    """DESIGN §4 written out element by element, independent of conv_mask_ref's vectorized form."""
    gw = grid[1]
    m = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(i + 1):
            if j < prefix:
                m[i, j] = True
            elif i >= prefix:
                (r, c), (r2, c2) = divmod(i - prefix, gw), divmod(j - prefix, gw)
                m[i, j] = r - r2 <= kernel[0] // 2 and abs(c - c2) <= kernel[1] // 2
    return m


def naive_attention(q, k, v, mask, scale=None):
    """Plain PyTorch attention in the inputs' dtype (the 'torch in the kernel's dtype' of the tolerance rule)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(dim=-1) @ v


def make_qkv(b, h, s, d, dtype, *, transposed=False, requires_grad=True):
    if transposed:
        # The projection's natural layout [B, S, H, Dh] viewed as [B, H, S, Dh]: non-contiguous.
        qkv = [torch.randn(b, s, h, d).to(dtype).transpose(1, 2) for _ in range(3)]
    else:
        qkv = [torch.randn(b, h, s, d).to(dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in qkv]


def check_against_dense(out_fn, q, k, v, grid, kernel, prefix, *, grads=True, msg=""):
    """out_fn's output (and gradients) vs dense attention in float64, within 2x torch's own error."""
    s = q.shape[2]
    mask = conv_mask_ref(grid, kernel, prefix, seq_len=s, device=q.device)
    do = torch.randn(q.shape, device=q.device).to(q.dtype)
    out = out_fn(q, k, v)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*hi, mask)
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = naive_attention(*lo, mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_within_torch_error(out, ref, low, msg=f"{msg} out")
    if not grads:
        return
    g_out = torch.autograd.grad(out, (q, k, v), do)
    g_ref = torch.autograd.grad(ref, hi, do.double())
    g_low = torch.autograd.grad(low, lo, do)
    scale = 1.0 / math.sqrt(q.shape[-1])
    dp_scale = ((do.double() @ v.detach().double().transpose(-1, -2)).abs().max()
                * max(q.detach().abs().max(), k.detach().abs().max()).double() * scale).item()
    for name, a, r, w in zip("qkv", g_out, g_ref, g_low):
        assert a.dtype == q.dtype
        # The kernel forms dS = P * (dP - rowsum(dO * O)) from the rounded O: a cancellation
        # worth a few ulps of the terms |dP| * |q or k| * scale even where the exact gradient
        # is 0 (a single visible key), where torch's softmax backward happens to be exact.
        floor = 4 * EPS[q.dtype] * max(1.0, r.abs().max().item(), dp_scale)
        assert_within_torch_error(a, r, w, floor=floor, msg=f"{msg} d{name}")


# --------------------------------------------------------------------------- the mask

@pytest.mark.parametrize("grid,kernel,prefix", [((1, 1), (1, 1), 0), ((5, 7), (3, 3), 1), ((5, 7), (5, 7), 3),
                                                ((4, 6), (11, 11), 2), ((6, 5), (4, 2), 0)])
def test_mask_matches_rule(grid, kernel, prefix):
    full = prefix + grid[0] * grid[1]
    for s in (full, max(1, full - 4)):
        assert torch.equal(conv_mask_ref(grid, kernel, prefix, seq_len=s), mask_by_rule(grid, kernel, prefix, s))


def test_mask_window_size_default():
    m = conv_mask_ref((32, 32), (11, 11), 1)
    image_keys = m[1:, 1:].sum(dim=1)  # (1024,)
    assert int(image_keys.max()) == 61  # 5 full rows of 11 plus 6 on the query's own row
    assert bool(m[1:, 0].all())  # every image query sees the prefix
    assert not bool(m[0, 1:].any())  # the prefix sees no image token


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(0, 4), kernel=(3, 3), prefix=0), "grid must be >= 1"),
    (dict(grid=(4, 4), kernel=(3, -1), prefix=0), "kernel must be >= 1"),
    (dict(grid=(4, 4), kernel=(3, 3), prefix=-1), "prefix must be an int >= 0"),
    (dict(grid="ab", kernel=(3, 3), prefix=0), "grid must be an int or a pair"),
])
def test_mask_bad_geometry(kwargs, match):
    with pytest.raises(ValueError, match=match):
        conv_mask_ref(**kwargs)


# --------------------------------------------------------------------------- torch reference path

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_reference_path_matches_sdpa(grid, kernel):
    """conv_attention(backend='torch') vs SDPA in float64 with the rule's mask: every grid,
    kernel, prefix, head dim and dtype, full and shortened sequences, values and gradients."""
    for prefix, d, dtype in itertools.product(PREFIXES, (32, 64, 128), DTYPES):
        full = prefix + grid[0] * grid[1]
        s = full if (d + prefix) % 2 else max(1, full - 3)  # half the cases stop before the end of the grid
        q, k, v = make_qkv(1, 1, s, d, dtype)
        mask = conv_mask_ref(grid, kernel, prefix, seq_len=s)
        out = conv_attention(q, k, v, grid=grid, kernel=kernel, prefix=prefix, backend="torch")
        hi = [t.detach().double() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*hi, attn_mask=mask)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert_close(out, ref, atol=tol, rtol=tol, msg=f"{grid} {kernel} P={prefix} d={d} {dtype}")
    q, k, v = make_qkv(1, 2, s, 32, torch.float32)
    do = torch.randn(q.shape)
    g = torch.autograd.grad(conv_attention(q, k, v, grid=grid, kernel=kernel, prefix=prefix, backend="torch"),
                            (q, k, v), do)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    g_ref = torch.autograd.grad(F.scaled_dot_product_attention(*hi, attn_mask=mask), hi, do.double())
    for a, r in zip(g, g_ref):
        assert_close(a, r, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Triton prefill kernel

# (grid, kernel, prefix, S or None for the full grid, Dh, dtype, block sizes or None, transposed)
SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
TRITON_CASES = [
    ((1, 1), (1, 1), 0, None, 32, torch.float32, None, False),
    ((1, 1), (11, 11), 3, None, 64, torch.float16, None, False),
    ((5, 7), (3, 3), 1, None, 32, torch.float32, SMALL_BLOCKS, True),
    ((5, 7), (5, 7), 3, 30, 64, torch.bfloat16, SMALL_BLOCKS, False),
    ((5, 7), (11, 11), 0, 23, 128, torch.float16, SMALL_BLOCKS, False),
    ((5, 7), (1, 1), 1, None, 32, torch.bfloat16, {"BLOCK_M": 16, "BLOCK_N": 32}, False),
    ((16, 16), (11, 11), 1, None, 32, torch.float16, None, True),
    ((16, 16), (3, 3), 3, 200, 64, torch.float32, {"BLOCK_M": 32, "BLOCK_N": 16}, False),
    ((16, 16), (5, 7), 0, None, 32, torch.bfloat16, {"BLOCK_M": 32, "BLOCK_N": 32}, False),
    ((6, 40), (3, 5), 3, 211, 32, torch.float32, SMALL_BLOCKS, False),
    ((3, 4), (3, 3), 70, None, 32, torch.float32, SMALL_BLOCKS, False),  # a prefix wider than its key tile  # wide grid: key blocks outside windows skipped
    ((32, 32), (11, 11), 1, None, 64, torch.bfloat16, None, False),
    ((32, 32), (5, 7), 0, 1000, 32, torch.float16, None, True),
]


@pytest.mark.parametrize("grid,kernel,prefix,s,d,dtype,blocks,transposed", TRITON_CASES)
def test_triton_matches_dense(grid, kernel, prefix, s, d, dtype, blocks, transposed):
    s = prefix + grid[0] * grid[1] if s is None else s
    b, h = (1, 1) if s > 150 else (2, 2)
    q, k, v = make_qkv(b, h, s, d, dtype, transposed=transposed)
    if blocks is None:
        def fn(q, k, v):
            return conv_attention(q, k, v, grid=grid, kernel=kernel, prefix=prefix, backend="triton")
    else:
        cfg = {**blocks, "BLOCK_D": max(16, 1 << (d - 1).bit_length())}

        def fn(q, k, v):
            return _conv_attention_triton(q, k, v, grid, kernel, prefix, None, cfg)
    check_against_dense(fn, q, k, v, grid, kernel, prefix, msg=f"{grid} {kernel} P={prefix} S={s} d={d} {dtype}")


def test_triton_custom_scale():
    q, k, v = make_qkv(1, 2, 36, 32, torch.float32)
    mask = conv_mask_ref((5, 7), (3, 3), 1)
    out = conv_attention(q, k, v, grid=(5, 7), kernel=(3, 3), prefix=1, scale=0.3, backend="triton")
    ref = naive_attention(*(t.detach().double() for t in (q, k, v)), mask, scale=0.3)
    low = naive_attention(*(t.detach() for t in (q, k, v)), mask, scale=0.3)
    assert_within_torch_error(out, ref, low)


@pytest.mark.parametrize("q_shape,s,match", [
    ((1, 2, 37, 8), 37, "must be <= prefix \\+ grid_h \\* grid_w = 36"),
    ((1, 2, 36), 36, "q must be a 4-D tensor"),
])
def test_bad_inputs(q_shape, s, match):
    q = torch.randn(q_shape)
    k = v = torch.randn(1, 2, s, 8)
    with pytest.raises(ValueError, match=match):
        conv_attention(q, k, v, grid=(5, 7), kernel=(3, 3), prefix=1)


def test_bad_dtype_and_shape_mismatch():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="q, k, v must have the same shape"):
        conv_attention(q, q[:, :1], q, grid=(3, 3), prefix=1)
    with pytest.raises(ValueError, match="must share a dtype"):
        conv_attention(q, q.half(), q, grid=(3, 3), prefix=1)
    with pytest.raises(ValueError, match="q must be float32, float16 or bfloat16"):
        conv_attention(q.double(), q, q, grid=(3, 3), prefix=1)
    with pytest.raises(ValueError, match="Dh must be <= 256"):
        big = torch.randn(1, 1, 4, 300)
        conv_attention(big, big, big, grid=(2, 2), backend="triton")


# --------------------------------------------------------------------------- ring cache layout

def test_ring_layout_geometry():
    assert conv_cache_len((32, 32), (11, 11), 1) == 1 + 6 * 32
    assert conv_cache_len((5, 7), (11, 11), 3) == 3 + 5 * 7  # never more rows than the grid has
    slots = conv_cache_slot(torch.arange(1 + 1024), (32, 32), (11, 11), 1)
    assert slots[0] == 0 and int(slots.max()) == 192 and int(slots[1:].min()) == 1
    assert [conv_cache_slot(p, (32, 32), (11, 11), 1) for p in (1, 192, 193, 194)] == [1, 192, 1, 2]
    # Every key a query can see is still in its slot when the query runs: the slot's latest
    # writer up to the query position is the key itself.
    grid, kernel, prefix = (9, 8), (7, 5), 2
    m = conv_mask_ref(grid, kernel, prefix)
    pos = torch.arange(m.shape[0])
    slot = conv_cache_slot(pos, grid, kernel, prefix)
    for i in range(m.shape[0]):
        for j in m[i].nonzero().flatten().tolist():
            writers = ((slot == slot[j]) & (pos <= i)).nonzero().flatten()
            assert int(writers.max()) == j, (i, j)


# --------------------------------------------------------------------------- decode

def decode_inputs(grid, kernel, prefix, d, dtype, *, h=2):
    """One sequence's q/k/v and a decode batch with one row at every position (rows in shuffled order)."""
    s = prefix + grid[0] * grid[1]
    q, k, v = (t.detach() for t in make_qkv(1, h, s, d, dtype, requires_grad=False))
    pos = torch.randperm(s)  # (B = S,)
    q_dec = q[0, :, pos].transpose(0, 1)[:, :, None]  # (B, H, 1, Dh)
    return q, k, v, pos, q_dec


def plain_cache(t, pos):
    """[B, H, S, Dh]: row b holds the sequence up to pos[b]; later slots hold NaN (never read)."""
    cache = t.expand(pos.shape[0], -1, -1, -1).clone()
    later = torch.arange(t.shape[2])[None, :] > pos[:, None]  # (B, S)
    cache[later[:, None, :, None].expand_as(cache)] = float("nan")
    return cache


def ring_cache(t, pos, grid, kernel, prefix, fill=float("nan")):
    """[B, H, L, Dh]: row b's ring after writing positions 0..pos[b] in order; unwritten slots hold `fill`."""
    b = pos.shape[0]
    cache = torch.full((b, t.shape[1], conv_cache_len(grid, kernel, prefix), t.shape[3]), fill, dtype=t.dtype)
    for j in range(t.shape[2]):
        rows = pos >= j
        cache[rows, :, conv_cache_slot(j, grid, kernel, prefix)] = t[0, :, j]
    return cache


DECODE_CASES = [
    ((5, 7), (3, 3), 1, 32, torch.float32),
    ((6, 9), (5, 7), 0, 64, torch.float16),
    ((4, 6), (11, 11), 3, 128, torch.bfloat16),
    ((8, 8), (11, 11), 1, 32, torch.float32),
]


@pytest.mark.parametrize("grid,kernel,prefix,d,dtype", DECODE_CASES)
@pytest.mark.parametrize("ring", [False, True])
def test_decode_equals_prefill_row(grid, kernel, prefix, d, dtype, ring):
    q, k, v, pos, q_dec = decode_inputs(grid, kernel, prefix, d, dtype)
    full = conv_attention(q, k, v, grid=grid, kernel=kernel, prefix=prefix, backend="triton")  # (1, H, S, Dh)
    expected = full[0, :, pos].transpose(0, 1)[:, :, None]  # (B, H, 1, Dh)
    if ring:
        kc, vc = ring_cache(k, pos, grid, kernel, prefix), ring_cache(v, pos, grid, kernel, prefix)
    else:
        kc, vc = plain_cache(k, pos), plain_cache(v, pos)
    out = conv_decode_attention(q_dec, kc, vc, pos, grid=grid, kernel=kernel, prefix=prefix, ring=ring,
                                backend="triton")
    mask = conv_mask_ref(grid, kernel, prefix)
    rows = mask[pos][:, None, None, :]  # (B, 1, 1, S)
    ref = naive_attention(q_dec.double(), k.double(), v.double(), rows)
    low = naive_attention(q_dec, k, v, rows)
    assert_within_torch_error(out, ref, low, msg="decode vs dense")
    torch_err = max_abs_err(low, ref)
    assert_close(out, expected, atol=4 * torch_err + 1e-6, msg="decode vs prefill row")


@pytest.mark.parametrize("ring", [False, True])
def test_decode_reference_path(ring):
    """The torch reference of the decode step (dense over the whole cache) and the torch backend
    (its CPU path here) equal the prefill reference row."""
    grid, kernel, prefix = (6, 7), (5, 5), 2
    q, k, v, pos, q_dec = decode_inputs(grid, kernel, prefix, 32, torch.float32)
    full = conv_attention_ref(q, k, v, grid=grid, kernel=kernel, prefix=prefix)
    expected = full[0, :, pos].transpose(0, 1)[:, :, None]
    if ring:
        kc, vc = ring_cache(k, pos, grid, kernel, prefix, 0.0), ring_cache(v, pos, grid, kernel, prefix, 0.0)
    else:
        kc, vc = k.expand(pos.shape[0], -1, -1, -1), v.expand(pos.shape[0], -1, -1, -1)
    ref = conv_decode_attention_ref(q_dec, kc, vc, pos, grid=grid, kernel=kernel, prefix=prefix, ring=ring)
    assert_close(ref, expected, atol=1e-6, rtol=1e-5)
    out = conv_decode_attention(q_dec, kc, vc, pos, grid=grid, kernel=kernel, prefix=prefix, ring=ring)
    assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("path", ["dense", "gather"])
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("grid,kernel,prefix,d,dtype", DECODE_CASES)
def test_decode_cpu_path_matches_definition(grid, kernel, prefix, d, dtype, ring, path, layout, monkeypatch):
    """The torch backend on CPU tensors, each of its attention paths forced (SDPA over the whole
    cache with a boolean mask; the window's slots gathered, by index_select from a contiguous
    cache or by indexing a transposed one): one row per position writing its own K/V with
    k_new/v_new. The caches equal an index write exactly; the output is within the tolerance
    rule of float64 attention under the §4 mask, with a custom scale. The gather path never reads
    the slots the query does not see (they hold NaN); the dense one reads them, as the reference."""
    ca = importlib.import_module("vqim.kernels.conv_attention")
    monkeypatch.setattr(ca, "_DENSE_RATIO", 10**9 if path == "dense" else 0)
    monkeypatch.setattr(ca, "_DENSE_WORK", 10**18 if path == "dense" else 0)
    q, k, v, pos, q_dec = decode_inputs(grid, kernel, prefix, d, dtype)
    b, h = pos.shape[0], k.shape[1]
    fill = float("nan") if path == "gather" else 7.0
    if ring:
        kc, vc = ring_cache(k, pos, grid, kernel, prefix, fill), ring_cache(v, pos, grid, kernel, prefix, fill)
        slot = conv_cache_slot(pos, grid, kernel, prefix)
    else:
        later = torch.arange(k.shape[2])[None, :] > pos[:, None]  # (B, S)
        kc, vc = (t.expand(b, -1, -1, -1).clone().masked_fill_(later[:, None, :, None], fill) for t in (k, v))
        slot = pos
    k_new, v_new = (t[0, :, pos].transpose(0, 1)[:, :, None] for t in (k, v))  # (B, H, 1, Dh)
    index = (torch.arange(b)[:, None], torch.arange(h)[None, :], slot[:, None])
    k_want, v_want = kc.clone(), vc.clone()
    for t in (kc, vc):
        t[index] = fill  # the new token's slot: written by the call
    if layout == "transposed":
        kc, vc = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kc, vc))  # [B, S, H, Dh] memory
    out = conv_decode_attention(q_dec, kc, vc, pos, k_new=k_new, v_new=v_new, grid=grid, kernel=kernel, prefix=prefix,
                                scale=0.3, ring=ring, backend="torch")
    assert torch.equal(kc.nan_to_num(), k_want.nan_to_num()) and torch.equal(vc.nan_to_num(), v_want.nan_to_num())
    rows = conv_mask_ref(grid, kernel, prefix)[pos][:, None, None, :]  # (B, 1, 1, S)
    ref = naive_attention(q_dec.double(), k.double(), v.double(), rows, scale=0.3)
    low = naive_attention(q_dec, k, v, rows, scale=0.3)
    assert out.dtype == dtype and out.shape == q_dec.shape
    assert_within_torch_error(out, ref, low, msg=f"{path} ring={ring} {layout}")


def test_decode_cpu_path_empty_batch():
    q, kc = torch.randn(0, 2, 1, 8), torch.randn(0, 2, 17, 8)
    pos = torch.zeros(0, dtype=torch.long)
    for k_new in (None, q):
        out = conv_decode_attention(q, kc, kc.clone(), pos, k_new=k_new, v_new=k_new, grid=(4, 4), kernel=(3, 3),
                                    prefix=1, backend="torch")
        assert out.shape == q.shape



def test_decode_accepts_expanded_pos():
    """The engine passes one position for the whole batch as pos.expand(B) (stride 0)."""
    grid, kernel, prefix, b = (4, 4), (3, 3), 1, 3
    q = torch.randn(b, 2, 1, 16)
    kc, vc = torch.randn(b, 2, prefix + 16, 16), torch.randn(b, 2, prefix + 16, 16)
    pos = torch.tensor([9]).expand(b)
    assert pos.stride(0) == 0
    out = conv_decode_attention(q, kc, vc, pos, grid=grid, kernel=kernel, prefix=prefix, backend="triton")
    expected = conv_decode_attention(q, kc, vc, pos.contiguous(), grid=grid, kernel=kernel, prefix=prefix,
                                     backend="torch")
    assert_close(out, expected, atol=1e-5, rtol=1e-5)

def test_decode_bad_inputs():
    grid, kernel, prefix = (4, 4), (3, 3), 1
    q = torch.randn(2, 2, 1, 8)
    cache = torch.randn(2, 2, 17, 8)
    ok = torch.tensor([3, 16])
    with pytest.raises(ValueError, match="pos must be in \\[0, 17\\)"):
        conv_decode_attention(q, cache, cache, torch.tensor([3, 17]), grid=grid, kernel=kernel, prefix=prefix)
    with pytest.raises(ValueError, match="pos must be an int64/int32 tensor"):
        conv_decode_attention(q, cache, cache, ok.float(), grid=grid, kernel=kernel, prefix=prefix)
    with pytest.raises(ValueError, match="q must be \\[B, H, 1, Dh\\]"):
        conv_decode_attention(torch.randn(2, 2, 3, 8), cache, cache, ok, grid=grid, kernel=kernel, prefix=prefix)
    with pytest.raises(ValueError, match="conv_cache_len"):
        conv_decode_attention(q, cache[:, :, :8], cache[:, :, :8], ok, grid=grid, kernel=kernel, prefix=prefix,
                              ring=True)
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        conv_decode_attention(q, cache, cache[:1], ok, grid=grid, kernel=kernel, prefix=prefix)


# --------------------------------------------------------------------------- decode with the cache write fused

def fused_qkv_new(b, h, d, dtype):
    """q, k_new, v_new as the decoder has them: strided [B, H, 1, Dh] views of one fused QKV projection."""
    w = h * d
    qkv = torch.randn(b, 3 * w).to(dtype)  # (B, 3W)
    return [qkv[:, i * w:(i + 1) * w].view(b, h, d)[:, :, None] for i in range(3)]


def write_positions(grid, kernel, prefix):
    """One row per interesting position: every prefix position, the first image token, the ends
    of the first grid row, the first token past the ring's span (its slot wraps), and the last two."""
    full = prefix + grid[0] * grid[1]
    span = conv_cache_len(grid, kernel, prefix) - prefix
    image = [prefix, prefix + grid[1] - 1, prefix + grid[1], prefix + span, prefix + span + 3, full - 2, full - 1]
    return torch.tensor(sorted(set(range(prefix)) | set(image)))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("ring", [False, True])
def test_decode_write_equals_index_put_then_decode(backend, dtype, prefix, ring):
    """k_new/v_new given: the same caches (exactly) and output as writing the rows with index_put
    and then calling the op without them."""
    grid, kernel, h, d = (5, 6), (5, 3), 3, 20
    pos = write_positions(grid, kernel, prefix)
    b = pos.shape[0]
    n_slots = conv_cache_len(grid, kernel, prefix) if ring else prefix + grid[0] * grid[1]
    # Earlier tokens' K/V: any values (the ring's unwritten slots are masked, not read). The ring
    # caches are [B, S, H, Dh] buffers viewed as [B, H, S, Dh] (non-contiguous).
    if ring:
        k_cache, v_cache = (torch.randn(b, n_slots, h, d).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        k_cache, v_cache = (torch.randn(b, h, n_slots, d).to(dtype) for _ in range(2))
    q, k_new, v_new = fused_qkv_new(b, h, d, dtype)
    geo = dict(grid=grid, kernel=kernel, prefix=prefix, ring=ring, backend=backend)

    slot = conv_cache_slot(pos, grid, kernel, prefix) if ring else pos
    k_want, v_want = k_cache.clone(), v_cache.clone()
    index = (torch.arange(b)[:, None], torch.arange(h)[None, :], slot[:, None])  # (B, H) each, broadcast
    k_want.index_put_(index, k_new[:, :, 0])  # (B, H, Dh) into [b, h, slot[b], :]
    v_want.index_put_(index, v_new[:, :, 0])
    want = conv_decode_attention(q, k_want, v_want, pos, **geo)

    out = conv_decode_attention(q, k_cache, v_cache, pos, k_new=k_new, v_new=v_new, **geo)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    assert out.dtype == dtype and out.shape == (b, h, 1, d)
    assert_close(out, want, atol=EPS[dtype], rtol=EPS[dtype], msg=f"{backend} ring={ring} P={prefix} {dtype}")


def test_decode_write_ring_steps_match_prefill():
    """Generation on the ring: each step writes its token with k_new/v_new and must equal that
    position's row of the prefill, through the slot overwrites of the ring."""
    grid, kernel, prefix, d = (5, 4), (3, 3), 1, 16
    q, k, v = (t.detach() for t in make_qkv(2, 2, prefix + grid[0] * grid[1], d, torch.float32,
                                            requires_grad=False))
    full = conv_attention_ref(q, k, v, grid=grid, kernel=kernel, prefix=prefix)  # (2, H, S, Dh)
    n_slots = conv_cache_len(grid, kernel, prefix)
    k_cache, v_cache = torch.zeros(2, 2, n_slots, d), torch.zeros(2, 2, n_slots, d)
    for p in range(q.shape[2]):
        pos = torch.tensor([p, p])
        sl = slice(p, p + 1)
        out = conv_decode_attention(q[:, :, sl], k_cache, v_cache, pos, k_new=k[:, :, sl], v_new=v[:, :, sl],
                                    grid=grid, kernel=kernel, prefix=prefix, ring=True, backend="triton")
        assert_close(out, full[:, :, sl], atol=1e-5, rtol=1e-5, msg=f"pos {p}")


def test_decode_write_size_one_dims():
    """B = H = Dh = 1 and an int32 pos."""
    grid, kernel, prefix = (3, 3), (3, 3), 1
    k_cache, v_cache = torch.randn(1, 1, 10, 1), torch.randn(1, 1, 10, 1)
    q, k_new, v_new = fused_qkv_new(1, 1, 1, torch.float32)
    pos = torch.tensor([6], dtype=torch.int32)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[0, 0, 6], want_v[0, 0, 6] = k_new[0, 0, 0], v_new[0, 0, 0]
    want = conv_decode_attention(q, want_k, want_v, pos, grid=grid, kernel=kernel, prefix=prefix, backend="torch")
    out = conv_decode_attention(q, k_cache, v_cache, pos, k_new=k_new, v_new=v_new, grid=grid, kernel=kernel,
                                prefix=prefix, backend="triton")
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_decode_write_bad_inputs():
    grid, kernel, prefix = (4, 4), (3, 3), 1
    q = torch.randn(2, 2, 1, 8)
    kc, vc = torch.randn(2, 2, 17, 8), torch.randn(2, 2, 17, 8)
    pos = torch.tensor([3, 16])
    new = torch.randn(2, 2, 1, 8)
    kc0, vc0 = kc.clone(), vc.clone()

    def call(k_new, v_new, k_cache=kc, v_cache=vc):
        conv_decode_attention(q, k_cache, v_cache, pos, k_new=k_new, v_new=v_new, grid=grid, kernel=kernel,
                              prefix=prefix)

    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        call(new, None)
    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        call(None, new)
    with pytest.raises(ValueError, match="k_new must be a tensor \\[B, H, 1, Dh\\]"):
        call(torch.randn(2, 2, 8), new)
    with pytest.raises(ValueError, match="v_new must be a tensor \\[B, H, 1, Dh\\]"):
        call(new, torch.randn(2, 1, 1, 8))
    with pytest.raises(ValueError, match="k_new must be a tensor"):
        call(new.tolist(), new)
    with pytest.raises(ValueError, match="v_new must have the cache's dtype"):
        call(new, new.bfloat16())
    with pytest.raises(ValueError, match="k_new must be on q's device"):
        call(new.to("meta"), new)
    with pytest.raises(ValueError, match="v_cache is written in place"):
        call(new, new, v_cache=torch.randn(1, 2, 17, 8).expand(2, -1, -1, -1))
    # The refused calls wrote nothing.
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


# --------------------------------------------------------------------------- CUDA twin

def test_cuda_twin_is_built():
    if not shutil.which("nvcc") or os.environ.get("VQIM_SKIP_CUDA_BUILD"):
        pytest.skip("no nvcc here: the CUDA extension is not built")
    assert "conv_decode_attention" in _ext.load().ops


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ring", [False, True])
def test_gpu_decode(backend, dtype, ring):
    for grid, kernel, prefix, d in [((32, 32), (11, 11), 1, 64), ((5, 7), (3, 3), 3, 128), ((16, 16), (5, 7), 0, 32)]:
        q, k, v, pos, q_dec = decode_inputs(grid, kernel, prefix, d, dtype, h=4)
        if ring:
            kc, vc = ring_cache(k, pos, grid, kernel, prefix, 0.0), ring_cache(v, pos, grid, kernel, prefix, 0.0)
        else:
            kc, vc = k.expand(pos.shape[0], -1, -1, -1).contiguous(), v.expand(pos.shape[0], -1, -1, -1).contiguous()
        kc, vc, q_dec, pos = kc.cuda(), vc.cuda(), q_dec.cuda(), pos.cuda()
        out = conv_decode_attention(q_dec, kc, vc, pos, grid=grid, kernel=kernel, prefix=prefix, ring=ring,
                                    backend=backend)
        ref = conv_decode_attention_ref(q_dec.float(), kc.float(), vc.float(), pos, grid=grid, kernel=kernel,
                                        prefix=prefix, ring=ring)
        low = conv_decode_attention_ref(q_dec, kc, vc, pos, grid=grid, kernel=kernel, prefix=prefix, ring=ring)
        # The reference computes in fp32 and rounds once; allow a few units in the last place of the dtype.
        assert_close(out, ref, atol=4 * max_abs_err(low, ref) + 1e-5, msg=f"{backend} {grid} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_prefill(dtype):
    cases = [((32, 32), (11, 11), 1, None), ((32, 32), (5, 7), 0, 1000), ((5, 7), (3, 3), 3, None)]
    for grid, kernel, prefix, s in cases:
        s = prefix + grid[0] * grid[1] if s is None else s
        q, k, v = (t.detach().cuda().requires_grad_() for t in make_qkv(2, 4, s, 64, dtype))
        check_against_dense(lambda q, k, v: conv_attention(q, k, v, grid=grid, kernel=kernel, prefix=prefix),
                            q, k, v, grid, kernel, prefix, msg=f"gpu {grid} {kernel} {dtype}")


# --------------------------------------------------------------------------- GPU code path, compiled on CPU

_COMPILE_FOR_H100 = r'''
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ca = importlib.import_module("vqim.kernels.conv_attention")
cases = [
    (ca._conv_attention_fwd_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_P=16, BLOCK_D=64)),
    (ca._conv_attention_bwd_dq_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_P=16, BLOCK_D=64)),
    (ca._conv_attention_bwd_dkdv_kernel, dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=128)),
    (ca._conv_decode_kernel, dict(RING=True, WRITE=False, BLOCK_P=2, BLOCK_R=8, BLOCK_C=16, BLOCK_D=64)),
    (ca._conv_decode_kernel, dict(RING=True, WRITE=True, BLOCK_P=2, BLOCK_R=8, BLOCK_C=16, BLOCK_D=64)),
]
for fn, consts in cases:
    if "DOT_PRECISION" in fn.arg_names:
        consts = {**consts, "DOT_PRECISION": "ieee", "UPCAST_DOT": False}
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("lse_ptr", "delta_ptr"):
            sig[n] = "*fp32"
        elif n == "pos_ptr":
            sig[n] = "*i64"
        elif n.endswith("_ptr"):
            sig[n] = "*bf16"
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 2})
    assert k.asm["cubin"], fn.__name__
    print("compiled", fn.__name__)
'''


def test_triton_kernels_compile_for_sm90(tmp_path):
    """The interpreter never lowers the kernels; compile them for an H100 (bf16) so a construct
    that only the real compiler rejects fails here, on a machine without a GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled") == 5, res.stdout
