"""Conv-shaped masked sparse attention (DESIGN §4): the decoder's self-attention.

Image tokens sit on a ``grid_h x grid_w`` grid in raster order after ``prefix`` positions
(BOS, class token). A query at image token (r, c) sees the prefix and the image keys
(r', c') that are not later in raster order with ``r - r' <= kernel_h // 2`` and
``|c - c'| <= kernel_w // 2``; prefix positions see each other causally and no image token.

* :func:`conv_attention` (training / prefill): q, k, v ``[B, H, S, Dh]``, differentiable.
* :func:`conv_decode_attention` (generation): one query per sequence at its own position,
  reading only the prefix and the window's keys from the KV cache, either the plain cache
  (slot = position) or the ring layout of :func:`conv_cache_slot` / :func:`conv_cache_len`
  that keeps only the ``kernel_h // 2 + 1`` grid rows the window can still reach. Given the
  new token's ``k_new`` / ``v_new`` it also writes them into the cache (one Triton launch
  for the write and the attention, op ``vqim::conv_decode_attention_write``).

:func:`conv_mask_ref` builds the dense boolean mask, the definition every kernel is tested
against; :func:`conv_attention_ref` / :func:`conv_decode_attention_ref` are dense masked
attention in fp32 with it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _ext
from ._registry import call, custom_op, dispatch, interpreter_dot_upcast, register, resolve_backend
from ._triton import tl, triton

_LOG2E = 1.4426950408889634
_MAX_D = 256


# --------------------------------------------------------------------------- the mask

def _pair(x, name: str) -> tuple[int, int]:
    if isinstance(x, int) and not isinstance(x, bool):
        x = (x, x)
    try:
        a, b = (int(v) for v in x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints (h, w), got {x!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{name} must be >= 1 in both dimensions, got {(a, b)}")
    return a, b


def _check_geometry(grid, kernel, prefix) -> tuple[tuple[int, int], tuple[int, int], int]:
    grid = _pair(grid, "grid")
    kernel = _pair(kernel, "kernel")
    if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
        raise ValueError(f"prefix must be an int >= 0, got {prefix!r}")
    return grid, kernel, prefix


def _visible(qs: torch.Tensor, ks: torch.Tensor, grid: tuple[int, int], kernel: tuple[int, int],
             prefix: int) -> torch.Tensor:
    """Whether sequence position ``qs`` sees ``ks`` (broadcasting), the §4 rule in one place."""
    gw = grid[1]
    qt, kt = qs - prefix, ks - prefix
    # Floor division keeps negative (prefix) positions off the grid; they never reach the
    # window test because ks <= qs < prefix there.
    window = (torch.div(qt, gw, rounding_mode="floor") - torch.div(kt, gw, rounding_mode="floor") <= kernel[0] // 2) & (
        (torch.remainder(qt, gw) - torch.remainder(kt, gw)).abs() <= kernel[1] // 2)
    return (ks <= qs) & ((ks < prefix) | window)


def conv_mask_ref(grid, kernel=(11, 11), prefix: int = 0, *, seq_len: int | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The dense boolean mask ``[S, S]`` (True = query row may attend to key column).

    ``S = prefix + grid_h * grid_w`` unless ``seq_len`` asks for a shorter sequence (a prefix
    of the full one: the mask of a shorter sequence is the top-left block of the full mask).
    """
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    full = prefix + grid[0] * grid[1]
    s = full if seq_len is None else int(seq_len)
    if not 0 <= s <= full:
        raise ValueError(f"seq_len must be in [0, prefix + grid_h * grid_w = {full}], got {seq_len}")
    pos = torch.arange(s, device=device)
    return _visible(pos[:, None], pos[None, :], grid, kernel, prefix)  # (S, S)


# --------------------------------------------------------------------------- ring KV cache

def _ring_rows(grid: tuple[int, int], kernel: tuple[int, int]) -> int:
    """Grid rows the ring keeps: the query's own row plus the kernel_h // 2 rows above it."""
    return min(kernel[0] // 2 + 1, grid[0])


def conv_cache_len(grid, kernel=(11, 11), prefix: int = 0) -> int:
    """Slots per sequence of the ring KV-cache layout: ``prefix + min(kernel_h//2 + 1, grid_h) * grid_w``.

    The plain layout needs ``prefix + grid_h * grid_w``; for a 32 x 32 grid and an 11 x 11
    kernel the ring keeps 6 of the 32 rows (192 + prefix slots instead of 1024 + prefix).
    """
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    return prefix + _ring_rows(grid, kernel) * grid[1]


def conv_cache_slot(pos, grid, kernel=(11, 11), prefix: int = 0):
    """Slot of sequence position ``pos`` (int or LongTensor) in the ring layout.

    Prefix positions keep their own slot; image token ``t = pos - prefix`` goes to
    ``prefix + t % (rows * grid_w)`` with ``rows = min(kernel_h // 2 + 1, grid_h)``. Writing
    token (r, c) overwrites (r - rows, c), which neither it nor any later query can see (they
    reach back at most kernel_h // 2 rows), so every key a query may see is still in the ring.
    """
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    span = _ring_rows(grid, kernel) * grid[1]
    if isinstance(pos, torch.Tensor):
        return torch.where(pos < prefix, pos, prefix + torch.remainder(pos - prefix, span))
    pos = int(pos)
    return pos if pos < prefix else prefix + (pos - prefix) % span


def _ring_positions(pos: torch.Tensor, n_slots: int, grid, kernel, prefix: int) -> torch.Tensor:
    """``[B, n_slots]``: the sequence position each ring slot holds once ``pos`` is written
    (the latest position <= pos mapping to it), or -1 for a slot not written yet."""
    span = _ring_rows(grid, kernel) * grid[1]
    slots = torch.arange(n_slots, device=pos.device)[None, :]  # (1, L)
    p = pos[:, None]  # (B, 1)
    t = p - prefix
    img = t - torch.remainder(t - (slots - prefix), span) + prefix
    held = torch.where(slots < prefix, slots, img)
    ok = (held <= p) & (held >= 0) & ((slots < prefix) | (held >= prefix)) & (slots < prefix + span)
    return torch.where(ok, held, torch.full_like(held, -1))


# --------------------------------------------------------------------------- references

def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, Dh], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape [B, H, S, Dh], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] == 0:
        raise ValueError("Dh must be >= 1, got 0")


def _check_seq(s: int, grid, prefix: int, arg: str = "S") -> None:
    full = prefix + grid[0] * grid[1]
    if s > full:
        raise ValueError(f"{arg} must be <= prefix + grid_h * grid_w = {full} for grid {grid}, prefix {prefix}; "
                         f"got {s}")


def conv_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, kernel=(11, 11),
                       prefix: int = 0, scale: float | None = None) -> torch.Tensor:
    """Dense attention with :func:`conv_mask_ref` computed in fp32, returned in q's dtype."""
    _check_qkv(q, k, v)
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    s = q.shape[2]
    _check_seq(s, grid, prefix)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = conv_mask_ref(grid, kernel, prefix, seq_len=s, device=q.device)  # (S, S)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, S, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # (B, H, S, Dh)


def _check_decode(q, k_cache, v_cache, pos, grid, kernel, prefix, ring: bool, validate: bool) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    b, h, one, d = q.shape
    if one != 1:
        raise ValueError(f"q must be [B, H, 1, Dh] (one query per sequence), got {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (b, h) or k_cache.shape[3] != d:
        raise ValueError(f"k_cache and v_cache must be [B={b}, H={h}, S_max, Dh={d}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not isinstance(pos, torch.Tensor) or pos.shape != (b,) or pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pos must be an int64/int32 tensor [B={b}], got "
                         f"{getattr(pos, 'dtype', type(pos))} {tuple(getattr(pos, 'shape', ()))}")
    if pos.device != q.device:
        raise ValueError(f"pos must be on q's device {q.device}, got {pos.device}")
    full = prefix + grid[0] * grid[1]
    s_max = k_cache.shape[2]
    if ring:
        need = conv_cache_len(grid, kernel, prefix)
        if s_max < need:
            raise ValueError(f"k_cache/v_cache need >= conv_cache_len(grid, kernel, prefix) = {need} slots "
                             f"for ring=True, got {s_max}")
        limit = full
    else:
        limit = min(full, s_max)
    if validate and b > 0:
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"pos must be in [0, {limit}) (prefix + grid_h * grid_w = {full}, cache length "
                             f"{s_max}{', ring layout' if ring else ''}), got values in [{lo}, {hi}]")


def _check_new(q, k_cache, v_cache, k_new, v_new) -> None:
    """``k_new`` / ``v_new``: both or neither, each ``[B, H, 1, Dh]`` like q in the cache's dtype."""
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (or neither), got "
                         f"k_new={'None' if k_new is None else 'a tensor'}, "
                         f"v_new={'None' if v_new is None else 'a tensor'}")
    if k_new is None:
        return
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or t.shape != q.shape:
            raise ValueError(f"{name} must be a tensor [B, H, 1, Dh] = {tuple(q.shape)} like q, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} must have the cache's dtype {k_cache.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    # The write goes through every row's own slot; a cache whose rows share memory (an
    # expanded view) would have one row's write land in another's keys.
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"{name} is written in place with k_new/v_new: it must not be an expanded view "
                             f"(stride 0 in a dimension of size > 1), got strides {t.stride()}")


def _write_cache(k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix: int, ring: bool) -> None:
    """Row b's new K/V into its slot: ``pos[b]`` (plain layout) or :func:`conv_cache_slot` (ring)."""
    pos = pos.long()
    slot = conv_cache_slot(pos, grid, kernel, prefix) if ring else pos  # (B,)
    rows = torch.arange(pos.shape[0], device=pos.device)  # (B,)
    k_cache[rows, :, slot] = k_new[:, :, 0]  # (B, H, Dh)
    v_cache[rows, :, slot] = v_new[:, :, 0]  # (B, H, Dh)


def conv_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, *,
                              grid, kernel=(11, 11), prefix: int = 0, scale: float | None = None,
                              ring: bool = False) -> torch.Tensor:
    """Dense masked attention of each row's query over its whole cache, in fp32 (the definition).

    Plain layout: slot j holds position j. Ring layout: each slot holds the latest position
    mapping to it (:func:`conv_cache_slot`); slots not written yet are masked.
    """
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    _check_decode(q, k_cache, v_cache, pos, grid, kernel, prefix, ring, True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pos = pos.long()
    n_slots = k_cache.shape[2]
    if ring:
        held = _ring_positions(pos, n_slots, grid, kernel, prefix)  # (B, L)
        vis = (held >= 0) & _visible(pos[:, None], held, grid, kernel, prefix)
    else:
        slots = torch.arange(n_slots, device=q.device)[None, :]  # (1, S_max)
        vis = _visible(pos[:, None], slots, grid, kernel, prefix)  # (B, S_max)
    scores = (q.float() @ k_cache.float().transpose(-1, -2)) * scale  # (B, H, 1, S_max)
    scores = scores.masked_fill(~vis[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v_cache.float()).to(q.dtype)  # (B, H, 1, Dh)


@register("conv_attention", "torch")
def _conv_attention_torch(q, k, v, grid, kernel, prefix, scale):
    return conv_attention_ref(q, k, v, grid=grid, kernel=kernel, prefix=prefix, scale=scale)


# --------------------------------------------------------------------------- torch backend on CPU

# The decode reference attends densely over every cache slot, builds the §4 mask from scratch
# and re-validates pos (a host sync) on each call: right as a definition, but per decode step on
# a CPU it costs more than the layer's matmuls. The CPU path looks the query's keys up in tables
# built once per geometry and leaves validation to the public function (which ran it unless
# validate=False). It attends with one SDPA call, in fp32, either over the window's slots alone
# (gathered) or over the whole cache with a boolean mask, whichever is faster: gathering costs a
# fixed ~15 us, so the dense call wins where the cache holds at most _DENSE_RATIO times the
# window's keys (the ring layout) or the whole call is small. Measured (one thread, 2 cores):
# the bundled model (8 heads x 32, 9 x 9 kernel on 16 x 16) plain 256 slots dense 42 us vs
# gathered 55 us, ring 81 slots 32 vs 56 us; 8 x 16 heads x 64, 11 x 11 on 32 x 32: plain 1025
# slots gathered 0.85 ms vs dense 5.6 ms, ring 193 slots dense 0.65 ms vs 0.75 ms.
_DENSE_RATIO = 4
_DENSE_WORK = 2**17  # B * H * S_max * Dh


@functools.lru_cache(maxsize=32)
def _decode_window(grid: tuple[int, int], kernel: tuple[int, int], prefix: int,
                   ring: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a decode query at each position reads, from :func:`conv_mask_ref` (the §4 rule),
    for the ``S = prefix + grid_h * grid_w`` positions:

    * ``slots [S, n]`` (int64): the cache slots of the keys it sees, in position order, padded
      with slot 0 to ``n``, the most keys any position sees (prefix + window);
    * ``bias [S, n]`` (fp32): 0 on its keys, -inf on the padding (an additive softmax mask);
    * ``own [S]`` (int64): its own slot, where its K/V are written.

    Ring layout: slots by :func:`conv_cache_slot` (every key a query sees is still held). CPU
    tensors built outside inference mode, so they serve every later call.
    """
    with torch.inference_mode(False):
        mask = conv_mask_ref(grid, kernel, prefix)  # (S, S)
        count = mask.sum(1)  # (S,)
        n = int(count.max())
        qi, ki = mask.nonzero(as_tuple=True)  # row-major: each row's keys in ascending order
        col = torch.arange(qi.numel()) - (count.cumsum(0) - count)[qi]
        keys = torch.zeros(mask.shape[0], n, dtype=torch.long)
        keys[qi, col] = ki
        own = torch.arange(mask.shape[0])
        if ring:
            keys, own = (conv_cache_slot(t, grid, kernel, prefix) for t in (keys, own))
        bias = torch.zeros(mask.shape[0], n).masked_fill_(torch.arange(n) >= count[:, None], float("-inf"))
    return keys, bias, own


@functools.lru_cache(maxsize=32)
def _decode_visible(grid: tuple[int, int], kernel: tuple[int, int], prefix: int, ring: bool,
                    n_slots: int) -> torch.Tensor:
    """``[S, n_slots]`` bool: the cache slots a query at each position sees (:func:`_decode_window`
    scattered over a cache of ``n_slots``; slots past a short plain cache are never seen)."""
    slots, bias, _ = _decode_window(grid, kernel, prefix, ring)
    with torch.inference_mode(False):
        ok = (bias == 0) & (slots < n_slots)  # (S, n)
        vis = torch.zeros(slots.shape[0], n_slots, dtype=torch.bool)
        vis[torch.arange(slots.shape[0])[:, None].expand_as(slots)[ok], slots[ok]] = True
    return vis


@functools.lru_cache(maxsize=64)
def _row_offsets(b: int, h: int, s: int) -> torch.Tensor:
    """``[B, H, 1]``: the first row of each (batch row, head) in a contiguous cache viewed ``[B*H*S, Dh]``."""
    with torch.inference_mode(False):
        return (torch.arange(b * h) * s).view(b, h, 1)


def _gather_slots(cache: torch.Tensor, idx: torch.Tensor, flat: torch.Tensor | None) -> torch.Tensor:
    """``cache [B, H, S, Dh]`` at slots ``idx [B, n]`` per row: ``[B, H, n, Dh]``, contiguous
    (``flat``: the same slots as rows of a contiguous cache viewed ``[B*H*S, Dh]``)."""
    b, h, _, d = cache.shape
    if flat is not None and cache.is_contiguous():
        return cache.view(-1, d).index_select(0, flat).view(b, h, -1, d)
    rows = torch.arange(b)[:, None, None]
    heads = torch.arange(h)[None, :, None]
    return cache[rows, heads, idx[:, None, :]]


def _conv_decode_cpu(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring):
    """The torch backend on CPU tensors: the optional cache write (the reference's index write),
    then attention over the slots the query sees in fp32 (see above)."""
    slots, bias, own = _decode_window(grid, kernel, prefix, ring)
    pos = pos.long()
    b, h, _, d = q.shape
    n_slots = k_cache.shape[2]
    if k_new is not None:
        at = own[pos]  # (B,)
        rows = torch.arange(b)
        k_cache[rows, :, at] = k_new[:, :, 0]  # (B, H, Dh)
        v_cache[rows, :, at] = v_new[:, :, 0]
    if q.numel() == 0:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if n_slots <= _DENSE_RATIO * slots.shape[1] or b * h * n_slots * d <= _DENSE_WORK:
        mask = _decode_visible(grid, kernel, prefix, ring, n_slots)[pos]  # (B, S_max)
        o = F.scaled_dot_product_attention(q.float(), k_cache.float(), v_cache.float(),
                                           attn_mask=mask[:, None, None, :], scale=scale)
        return o.to(q.dtype)  # (B, H, 1, Dh)
    idx = slots[pos]  # (B, n)
    flat = None
    if k_cache.is_contiguous() or v_cache.is_contiguous():
        flat = (_row_offsets(b, h, n_slots) + idx[:, None, :]).view(-1)  # (B * H * n,)
    kw = _gather_slots(k_cache, idx, flat).float()  # (B, H, n, Dh)
    vw = _gather_slots(v_cache, idx, flat).float()
    o = F.scaled_dot_product_attention(q.float(), kw, vw, attn_mask=bias[pos][:, None, None, :], scale=scale)
    return o.to(q.dtype)  # (B, H, 1, Dh)


@register("conv_decode_attention", "torch")
def _conv_decode_attention_torch(q, k_cache, v_cache, pos, grid, kernel, prefix, scale, ring):
    if q.device.type == "cpu":
        return _conv_decode_cpu(q, k_cache, v_cache, pos, None, None, grid, kernel, prefix, scale, ring)
    return conv_decode_attention_ref(q, k_cache, v_cache, pos, grid=grid, kernel=kernel, prefix=prefix,
                                     scale=scale, ring=ring)


@register("conv_decode_attention_write", "torch")
def _conv_decode_attention_write_torch(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring):
    if q.device.type == "cpu":
        return _conv_decode_cpu(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring)
    _write_cache(k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, ring)
    return conv_decode_attention_ref(q, k_cache, v_cache, pos, grid=grid, kernel=kernel, prefix=prefix,
                                     scale=scale, ring=ring)


# --------------------------------------------------------------------------- Triton: prefill

# Query blocks are raster runs of BLOCK_M positions: the prefix is split into its own blocks
# and image blocks start at image token 0, so a block never mixes the two and its image keys
# lie in one raster interval [first window key of the block, its last query]; key tiles in that
# interval that no query of the block sees are skipped, the rest are masked element-wise.
# Spatial query tiles were counted exactly against this (benchmarks/bench_conv_attention.py,
# `visited_work`): on the 32 x 32 grid with the 11 x 11 kernel and a BOS token, raster 64 x 64
# tiles compute 255k (query, key) pairs for 53k visible ones, 8 x 8 spatial query tiles 304k
# (spatial key tiles) or 427k (raster key tiles), so raster runs are what ships.


@triton.jit
def _conv_visible(qs, ks, P, GW, HH, HW):
    """The §4 rule on sequence positions (broadcast shapes). Row/column are taken of clamped
    image indices: where a position is in the prefix the window term is not needed."""
    qt = tl.maximum(qs - P, 0)
    kt = tl.maximum(ks - P, 0)
    qr = qt // GW
    kr = kt // GW
    dc = qt - qr * GW - (kt - kr * GW)
    window = (qr - kr <= HH) & (dc <= HW) & (dc >= -HW)
    return (ks <= qs) & ((ks < P) | window)


@triton.jit
def _first_key(q_start, q_end, P, GW, HH, HW):
    """First image key (sequence position) any query in [q_start, q_end) sees.

    For a query at (r, c) it is max(0, r - HH) * GW + max(0, c - HW): increasing along a row,
    and the start of every later row is no smaller except in the top HH rows, where the row
    clamps to 0 and the next row's c = 0 query reaches further left than the first query.
    So the block's minimum is at its first query or at the start of its second row.
    """
    qt = tl.maximum(q_start - P, 0)
    r = qt // GW
    c = qt - r * GW
    first = tl.maximum(r - HH, 0) * GW + tl.maximum(c - HW, 0)
    if P + (r + 1) * GW < q_end:
        first = tl.minimum(first, tl.maximum(r + 1 - HH, 0) * GW)
    return P + first


@triton.jit
def _last_query(ks, S, P, GW, HH, HW):
    """One past the last position that sees the image key at ``ks`` (monotone in ks)."""
    kt = ks - P
    r = kt // GW
    c = kt - r * GW
    return tl.minimum(S, P + (r + HH) * GW + tl.minimum(GW - 1, c + HW) + 1)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _block_range(pid, P, S, BLOCK: tl.constexpr):
    """[start, end) of block ``pid``: the first blocks tile the prefix, the rest the image."""
    NPB = tl.cdiv(tl.minimum(P, S), BLOCK)
    if pid < NPB:
        start = pid * BLOCK
        end = tl.minimum(P, start + BLOCK)
    else:
        start = P + (pid - NPB) * BLOCK
        end = tl.minimum(S, start + BLOCK)
    return start, end


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_m, offs_n, n_ok, d_ok, m_ok,
              P, GW, HH, HW, qk_scale,
              DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    vis = _conv_visible(offs_m[:, None], offs_n[None, :], P, GW, HH, HW) & m_ok[:, None] & n_ok[None, :]
    # Window gaps: a key block no query of this block sees is skipped, not just masked.
    if tl.max(vis.to(tl.int32)) > 0:
        k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet (padding) keep m = -inf; subtract 0 there, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_keys(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, m_ok, d_ok, start, end,
              P, GW, HH, HW, sks, skd, svs, svd, qk_scale,
              BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Folds keys [start, end), in tiles of BLOCK, into the running softmax (acc, m_i, l_i)."""
    for n0 in range(start, end, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base + offs_n[:, None] * sks + offs_d[None, :] * skd,
                                  v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                                  offs_m, offs_n, offs_n < end, d_ok, m_ok, P, GW, HH, HW, qk_scale,
                                  DOT_PRECISION, UPCAST_DOT)
    return acc, m_i, l_i


@triton.jit
def _conv_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    H, S, D, P, GW, HH, HW,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, q_end = _block_range(pid, P, S, BLOCK_M)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_end
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # The prefix: every image query sees all of it, prefix queries see it causally. Its own
    # narrow key tiles (BLOCK_P, typically 16) so one BOS token does not cost a 64-wide tile.
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, m_ok, d_ok, 0, tl.minimum(P, q_end),
                              P, GW, HH, HW, sks, skd, svs, svd, qk_scale, BLOCK_P, DOT_PRECISION, UPCAST_DOT)
    # Image keys: the raster interval from the first query's first window key to the last query
    # (empty for a prefix block, where lo >= P >= q_end).
    lo = _first_key(q_start, q_end, P, GW, HH, HW)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, m_ok, d_ok, lo, q_end,
                              P, GW, HH, HW, sks, skd, svs, svd, qk_scale, BLOCK_N, DOT_PRECISION, UPCAST_DOT)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # log-sum-exp in log2 units for the backward pass.
    tl.store(lse_ptr + bh * S + offs_m, tl.where(m_ok, m_i + tl.log2(l_safe), 0.0), mask=m_ok)


@triton.jit
def _bwd_dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_m, offs_n, n_ok, d_ok, m_ok,
                 P, GW, HH, HW, qk_scale,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    vis = _conv_visible(offs_m[:, None], offs_n[None, :], P, GW, HH, HW) & m_ok[:, None] & n_ok[None, :]
    if tl.max(vis.to(tl.int32)) > 0:
        k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    return dq


@triton.jit
def _bwd_dq_keys(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_d, m_ok, d_ok, start, end,
                 P, GW, HH, HW, sks, skd, svs, svd, qk_scale,
                 BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Accumulates into dq the keys [start, end), in tiles of BLOCK."""
    for n0 in range(start, end, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        dq = _bwd_dq_step(dq, q, do, lse, delta, k_base + offs_n[:, None] * sks + offs_d[None, :] * skd,
                          v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                          offs_m, offs_n, offs_n < end, d_ok, m_ok, P, GW, HH, HW, qk_scale,
                          DOT_PRECISION, UPCAST_DOT)
    return dq


@triton.jit
def _conv_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
    H, S, D, P, GW, HH, HW,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, q_end = _block_range(pid, P, S, BLOCK_M)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_end
    d_ok = offs_d < D
    md = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=md, other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=md, other=0.0)
    lse = tl.load(lse_ptr + bh * S + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(delta_ptr + bh * S + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # The same two key ranges as the forward: the prefix in BLOCK_P tiles, then the image interval.
    dq = _bwd_dq_keys(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_d, m_ok, d_ok, 0, tl.minimum(P, q_end),
                      P, GW, HH, HW, sks, skd, svs, svd, qk_scale, BLOCK_P, DOT_PRECISION, UPCAST_DOT)
    lo = _first_key(q_start, q_end, P, GW, HH, HW)
    dq = _bwd_dq_keys(dq, q, do, lse, delta, k_base, v_base, offs_m, offs_d, m_ok, d_ok, lo, q_end,
                      P, GW, HH, HW, sks, skd, svs, svd, qk_scale, BLOCK_N, DOT_PRECISION, UPCAST_DOT)
    tl.store(dq_ptr + bh * S * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=md)


@triton.jit
def _conv_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr,
    H, S, D, P, GW, HH, HW,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    k_start, k_end = _block_range(pid, P, S, BLOCK_N)
    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_end
    d_ok = offs_d < D
    nd = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=nd, other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=nd, other=0.0)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdb + h * sdh
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Queries that see this block: every later position for prefix keys, else up to the last
    # query whose window reaches the block's last key.
    if k_start < P:
        q_stop = S
    else:
        q_stop = _last_query(k_end - 1, S, P, GW, HH, HW)
    for m0 in range(k_start, q_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_stop
        vis = _conv_visible(offs_m[:, None], offs_n[None, :], P, GW, HH, HW) & m_ok[:, None] & n_ok[None, :]
        if tl.max(vis.to(tl.int32)) > 0:
            md = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=md, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=md, other=0.0)
            lse = tl.load(lse_ptr + bh * S + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
            delta = tl.load(delta_ptr + bh * S + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
            s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST_DOT)
            dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, UPCAST_DOT)
    out = bh * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=nd)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=nd)


def _default_blocks(d: int) -> dict:
    """Block sizes where no autotuning happens (the interpreter): 64 x 64 tiles, the shape the
    visited-work count favours among tensor-core friendly sizes on the 32 x 32 grid."""
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": max(16, triton.next_power_of_2(d))}


# On CUDA the tile shape is autotuned per geometry: the exact work count (bench, `visited_work`)
# says smaller key blocks skip more masked work, larger tiles run the tensor cores better;
# which wins depends on the GPU, so it is measured there rather than fixed here.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3),
                          (32, 32, 4, 2)]
]
_TUNE_KEY = ["S", "D", "P", "GW", "HH", "HW"]


@functools.cache
def _tuned(name: str):
    kernel = {"fwd": _conv_attention_fwd_kernel, "dq": _conv_attention_bwd_dq_kernel,
              "dkdv": _conv_attention_bwd_dkdv_kernel}[name]
    return triton.autotune(configs=_CUDA_CONFIGS, key=_TUNE_KEY)(kernel)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    # fp32 inputs: 3xTF32 keeps fp32 accuracy on tensor cores; the interpreter computes in ieee.
    return "tf32x3" if dtype == torch.float32 and device.type == "cuda" else "ieee"


def _launch(name: str, block_key: str, q: torch.Tensor, s: int, prefix: int, cfg: dict | None, args: tuple) -> None:
    """Launch kernel ``name`` over the prefix blocks + image blocks of ``block_key``'s size, with
    the explicit ``cfg`` (tests, the interpreter) or the autotuned one (CUDA, no cfg)."""
    b, h = q.shape[0], q.shape[1]
    d = q.shape[-1]

    def launch_grid(meta):
        blk = meta[block_key]
        return (triton.cdiv(min(prefix, s), blk) + triton.cdiv(max(0, s - prefix), blk), b * h)

    consts = {"DOT_PRECISION": _precision(q.dtype, q.device), "UPCAST_DOT": interpreter_dot_upcast(q.dtype, q.device)}
    if name != "dkdv":
        consts["BLOCK_P"] = _prefix_block(prefix)
    if cfg is None and q.is_cuda:
        _tuned(name)[launch_grid](*args, BLOCK_D=max(16, triton.next_power_of_2(d)), **consts)
        return
    cfg = dict(cfg or _default_blocks(d))
    kernel = {"fwd": _conv_attention_fwd_kernel, "dq": _conv_attention_bwd_dq_kernel,
              "dkdv": _conv_attention_bwd_dkdv_kernel}[name]
    kernel[launch_grid(cfg)](*args, **cfg, **consts)


def _prefix_block(prefix: int) -> int:
    """Key tile width for the prefix loop: the prefix rounded up to a power of two, at least 16
    (the smallest tl.dot operand) and at most 64."""
    return min(64, max(16, triton.next_power_of_2(max(prefix, 1))))


def _geometry(grid, kernel, prefix: int) -> tuple[int, int, int, int]:
    """The kernels' (P, GW, HH, HW) arguments."""
    return (prefix, grid[1], kernel[0] // 2, kernel[1] // 2)


def _conv_attention_fwd(q, k, v, grid, kernel, prefix, scale, cfg=None):
    b, h, s, d = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, S, Dh)
    lse = torch.empty(b * h, s, device=q.device, dtype=torch.float32)  # (B*H, S), log2 units
    if q.numel() == 0:
        return o, lse
    _launch("fwd", "BLOCK_M", q, s, prefix, cfg,
            (q, k, v, o, lse, h, s, d, *_geometry(grid, kernel, prefix),
             *q.stride(), *k.stride(), *v.stride(), *o.stride(), scale * _LOG2E))
    return o, lse


def _conv_attention_bwd(do, q, k, v, o, lse, grid, kernel, prefix, scale, cfg=None):
    b, h, s, d = q.shape
    dq = torch.empty(b, h, s, d, device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if q.numel() == 0:
        return dq, dk, dv
    delta = (do.float() * o.float()).sum(-1).reshape(b * h, s).contiguous()  # (B*H, S): rowsum(dO * O)
    geo = _geometry(grid, kernel, prefix)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), scale * _LOG2E, scale)
    _launch("dq", "BLOCK_M", q, s, prefix, cfg,
            (q, k, v, do, dq, lse, delta, h, s, d, *geo, *strides))
    _launch("dkdv", "BLOCK_N", q, s, prefix, cfg,
            (q, k, v, do, dk, dv, lse, delta, h, s, d, *geo, *strides))
    return dq, dk, dv


class _ConvAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, grid, kernel, prefix, scale, cfg):
        o, lse = _conv_attention_fwd(q, k, v, grid, kernel, prefix, scale, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geom = (grid, kernel, prefix, scale, cfg)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grid, kernel, prefix, scale, cfg = ctx.geom
        dq, dk, dv = _conv_attention_bwd(do, q, k, v, o, lse, grid, kernel, prefix, scale, cfg)
        return dq, dk, dv, None, None, None, None, None


@register("conv_attention", "triton")
def _conv_attention_triton(q, k, v, grid, kernel, prefix, scale, cfg=None):
    if q.shape[-1] > _MAX_D:
        raise ValueError(f"Dh must be <= {_MAX_D} for backend='triton', got {q.shape[-1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _ConvAttentionFn.apply(q, k, v, grid, kernel, prefix, scale, cfg)


# --------------------------------------------------------------------------- Triton: decode

@triton.jit
def _conv_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, kn_ptr, vn_ptr,
    H, D, P, GW, HH, HW, SPAN, NROWS, NCOLS,
    sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sod, sknb, sknh, sknd, svnb, svnh, svnd,
    qk_scale,
    RING: tl.constexpr, WRITE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    p = tl.load(pos_ptr + b).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    t = tl.maximum(p - P, 0)

    # WRITE: store the new token's K/V (kn_ptr, vn_ptr) into its own slot first. Only this
    # program touches row (b, h) of the cache. The slot is then never loaded back: on a GPU
    # nothing orders one thread's store before another thread's load within the CTA, so a
    # load could see the stale value. The current key is masked out of the loads below and its
    # K/V taken from registers instead (tl.where), which is exactly what the store wrote.
    if WRITE:
        kn = tl.load(kn_ptr + b * sknb + h * sknh + offs_d * sknd, mask=d_ok, other=0.0)  # (BLOCK_D,)
        vn = tl.load(vn_ptr + b * svnb + h * svnh + offs_d * svnd, mask=d_ok, other=0.0)  # (BLOCK_D,)
        if RING:
            own = tl.where(p < P, p, P + t % SPAN)
        else:
            own = p
        tl.store(k_base + own * sks + offs_d * skd, kn, mask=d_ok)
        tl.store(v_base + own * svs + offs_d * svd, vn, mask=d_ok)

    # Prefix keys (causal among themselves). Prefix slots are the same in both layouts.
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = (offs_p < P) & (offs_p <= p)
    if WRITE:
        p_cur = offs_p == p  # (BLOCK_P,): the query itself, when it is a prefix token
    else:
        p_cur = offs_p < 0  # nothing to substitute: the cache holds the current key
    p_ld = (p_ok & ~p_cur)[:, None] & d_ok[None, :]
    kp = tl.load(k_base + offs_p[:, None] * sks + offs_d[None, :] * skd, mask=p_ld, other=0.0)  # (BLOCK_P, BLOCK_D)
    if WRITE:
        kp = tl.where(p_cur[:, None], kn[None, :], kp)
    s_p = tl.where(p_ok, tl.sum(kp.to(tl.float32) * q[None, :], axis=1) * qk_scale, float("-inf"))  # (BLOCK_P,)

    # The window: rows r - NROWS + 1 .. r, columns from max(0, c - HW), NCOLS of them, gathered
    # as one (BLOCK_R * BLOCK_C) block; only those keys are read.
    r = t // GW
    c = t - r * GW
    idx = tl.arange(0, BLOCK_R * BLOCK_C)
    kr = r - NROWS + 1 + idx // BLOCK_C
    kc = tl.maximum(c - HW, 0) + idx % BLOCK_C
    kt = kr * GW + kc
    w_ok = ((idx // BLOCK_C) < NROWS) & ((idx % BLOCK_C) < NCOLS) & (kr >= 0) & (kc < GW) & (kc <= c + HW) \
        & (kt <= t) & (p >= P)
    if RING:
        slot = P + kt % SPAN
    else:
        slot = P + kt
    slot = tl.where(w_ok, slot, 0)
    if WRITE:
        # In the ring no other visible key shares the query's slot (the span outreaches the window).
        w_cur = w_ok & (kt == t)  # (BLOCK_R * BLOCK_C,): the query itself, when it is an image token
    else:
        w_cur = idx < 0
    w_ld = (w_ok & ~w_cur)[:, None] & d_ok[None, :]
    kw = tl.load(k_base + slot[:, None] * sks + offs_d[None, :] * skd, mask=w_ld,
                 other=0.0)  # (BLOCK_R * BLOCK_C, BLOCK_D)
    if WRITE:
        kw = tl.where(w_cur[:, None], kn[None, :], kw)
    s_w = tl.where(w_ok, tl.sum(kw.to(tl.float32) * q[None, :], axis=1) * qk_scale, float("-inf"))

    m = tl.maximum(tl.max(s_p, axis=0), tl.max(s_w, axis=0))
    e_p = tl.exp2(s_p - m)
    e_w = tl.exp2(s_w - m)
    denom = tl.sum(e_p, axis=0) + tl.sum(e_w, axis=0)
    vp = tl.load(v_base + offs_p[:, None] * svs + offs_d[None, :] * svd, mask=p_ld, other=0.0)
    vw = tl.load(v_base + slot[:, None] * svs + offs_d[None, :] * svd, mask=w_ld, other=0.0)
    if WRITE:
        vp = tl.where(p_cur[:, None], vn[None, :], vp)
        vw = tl.where(w_cur[:, None], vn[None, :], vw)
    out = (tl.sum(e_p[:, None] * vp.to(tl.float32), axis=0) + tl.sum(e_w[:, None] * vw.to(tl.float32), axis=0)) \
        / denom  # (BLOCK_D,)
    tl.store(o_ptr + b * sob + h * soh + offs_d * sod, out.to(o_ptr.dtype.element_ty), mask=d_ok)


def _decode_geometry(grid, kernel, prefix: int, ring: bool) -> dict:
    hh, hw = kernel[0] // 2, kernel[1] // 2
    return {
        "P": prefix, "GW": grid[1], "HH": hh, "HW": hw,
        # The span of the ring; for the plain layout it is unused (the slot is the position).
        "SPAN": _ring_rows(grid, kernel) * grid[1],
        "NROWS": min(hh + 1, grid[0]),
        "NCOLS": min(2 * hw + 1, grid[1]),
    }


def _conv_decode_launch(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring):
    """The decode kernel; with ``k_new``/``v_new`` it also writes them into each row's slot."""
    b, h, _, d = q.shape
    if d > _MAX_D:
        raise ValueError(f"Dh must be <= {_MAX_D} for backend='triton', got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = torch.empty(b, h, 1, d, device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    # The kernel reads pos[row] at unit stride; an expanded view (stride 0) would be read out of bounds.
    pos = pos.contiguous()
    write = k_new is not None
    # Without a write the kernel never dereferences kn_ptr / vn_ptr; q stands in for them.
    kn, vn = (k_new, v_new) if write else (q, q)
    g = _decode_geometry(grid, kernel, prefix, ring)
    _conv_decode_kernel[(b * h,)](
        q, k_cache, v_cache, o, pos, kn, vn,
        h, d, g["P"], g["GW"], g["HH"], g["HW"], g["SPAN"], g["NROWS"], g["NCOLS"],
        q.stride(0), q.stride(1), q.stride(3), *k_cache.stride(), *v_cache.stride(),
        o.stride(0), o.stride(1), o.stride(3), kn.stride(0), kn.stride(1), kn.stride(3),
        vn.stride(0), vn.stride(1), vn.stride(3),
        scale * _LOG2E,
        RING=ring, WRITE=write, BLOCK_P=max(2, triton.next_power_of_2(max(prefix, 1))),
        BLOCK_R=triton.next_power_of_2(g["NROWS"]), BLOCK_C=triton.next_power_of_2(g["NCOLS"]),
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        **({"num_warps": 4} if q.is_cuda else {}),
    )
    return o


@register("conv_decode_attention", "triton")
def _conv_decode_attention_triton(q, k_cache, v_cache, pos, grid, kernel, prefix, scale, ring):
    return _conv_decode_launch(q, k_cache, v_cache, pos, None, None, grid, kernel, prefix, scale, ring)


@register("conv_decode_attention_write", "triton")
def _conv_decode_attention_write_triton(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring):
    """One launch: the cache write and the attention (see the WRITE path of the kernel)."""
    return _conv_decode_launch(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring)


@register("conv_decode_attention", "cuda")
def _conv_decode_attention_cuda(q, k_cache, v_cache, pos, grid, kernel, prefix, scale, ring):
    b, h, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = torch.empty(b, h, 1, d, device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    pos = pos.to(torch.int64).contiguous()
    g = _decode_geometry(grid, kernel, prefix, ring)
    with _ext.launch(q) as (C, stream):
        C.conv_decode_attention(_ext.params(
            C.ConvDecodeAttentionParams,
            **_ext.operand("q", q), q_stride_b=q.stride(0), q_stride_h=q.stride(1), q_stride_d=q.stride(3),
            **_ext.operand("k", k_cache), k_stride_b=k_cache.stride(0), k_stride_h=k_cache.stride(1),
            k_stride_s=k_cache.stride(2), k_stride_d=k_cache.stride(3),
            **_ext.operand("v", v_cache), v_stride_b=v_cache.stride(0), v_stride_h=v_cache.stride(1),
            v_stride_s=v_cache.stride(2), v_stride_d=v_cache.stride(3),
            **_ext.operand("o", o), o_stride_b=o.stride(0), o_stride_h=o.stride(1), o_stride_d=o.stride(3),
            **_ext.operand("pos", pos), B=b, H=h, D=d, S=k_cache.shape[2], **g, ring=bool(ring), scale=scale,
            dtype=_ext.dtype_code(q, "q"), stream=stream,
        ))
    return o


@register("conv_decode_attention_write", "cuda")
def _conv_decode_attention_write_cuda(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring):
    """Two launches on this backend: the torch index write, then the csrc decode kernel (which
    only reads the cache)."""
    _write_cache(k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, ring)
    return _conv_decode_attention_cuda(q, k_cache, v_cache, pos, grid, kernel, prefix, scale, ring)


# --------------------------------------------------------------------------- public ops

def conv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, kernel=(11, 11), prefix: int = 0,
                   scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Conv-shaped masked attention (DESIGN §4), differentiable with respect to q, k, v.

    Args:
        q, k, v: ``[B, H, S, Dh]`` float32/float16/bfloat16, any strides, ``S = prefix + n``
            with ``n <= grid_h * grid_w`` (a sequence may stop before the end of the grid).
        grid: ``(grid_h, grid_w)`` (or one int for a square grid).
        kernel: ``(kernel_h, kernel_w)`` window; ``kernel_h // 2`` rows up, ``kernel_w // 2`` columns each side.
        prefix: positions before the image tokens (BOS, class token).
        scale: softmax scale, default ``1 / sqrt(Dh)``.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"``, ``"torch"``.

    Returns:
        ``[B, H, S, Dh]`` in q's dtype.
    """
    _check_qkv(q, k, v)
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    _check_seq(q.shape[2], grid, prefix)
    return call(_conv_attention_op, q, k, v, list(grid), list(kernel), prefix, scale,
                resolve_backend(backend, q.device))[0]


def conv_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, *,
                          k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None, grid,
                          kernel=(11, 11), prefix: int = 0, scale: float | None = None, ring: bool = False,
                          validate: bool = True, backend: str | None = None) -> torch.Tensor:
    """One decode step of conv-shaped attention: equals row ``pos`` of :func:`conv_attention`.

    Args:
        q: ``[B, H, 1, Dh]``, the new token's query per sequence.
        k_cache, v_cache: ``[B, H, S_max, Dh]``. Plain layout (``ring=False``): slot = sequence
            position. Ring layout (``ring=True``): slot = :func:`conv_cache_slot`,
            ``S_max >= conv_cache_len(grid, kernel, prefix)``. Without ``k_new``/``v_new`` they
            already hold the new token's K/V; with them they are written in place.
        pos: int64/int32 ``[B]``: each row's sequence position (prefix included); rows may differ.
        k_new, v_new: ``[B, H, 1, Dh]`` in the cache's dtype, any strides (views of a fused QKV
            projection), both or neither. Given, row b's K/V are written into slot ``pos[b]``
            (plain) or ``conv_cache_slot(pos[b], ...)`` (ring) of the caches and the attention
            is computed as if the caller had written them first: the same caches and output as
            an index write followed by the call without them. One kernel launch on
            ``backend="triton"``; the index write then the decode kernel (two launches) on
            ``"cuda"`` and ``"torch"``.
        grid, kernel, prefix, scale: as in :func:`conv_attention`.
        validate: check the values of ``pos`` (a host sync); pass False inside CUDA graphs,
            where a ``pos`` out of range reads (and, with ``k_new``, writes) out of bounds.
        backend: ``None`` (Triton on CUDA, torch on CPU), ``"triton"``, ``"cuda"``, ``"torch"``
            (on CPU tensors a path that reads the window through tables built once per geometry
            and does not re-validate; elsewhere the reference).

    Returns:
        ``[B, H, 1, Dh]`` in q's dtype. The kernels read only the prefix and the window's keys;
        the reference (and the CPU path where the cache is small) attends over every slot with
        the others masked, so their values must be finite (the engine's caches start zeroed).
    """
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    _check_decode(q, k_cache, v_cache, pos, grid, kernel, prefix, ring, validate)
    _check_new(q, k_cache, v_cache, k_new, v_new)
    backend = resolve_backend(backend, q.device)
    if k_new is None:
        return call(_conv_decode_attention_op, q, k_cache, v_cache, pos, list(grid), list(kernel), prefix, scale,
                    ring, backend)
    return call(_conv_decode_attention_write_op, q, k_cache, v_cache, pos, k_new, v_new, list(grid), list(kernel),
                prefix, scale, ring, backend)


# --------------------------------------------------------------------------- torch custom ops

# The public functions validate and resolve the backend (use_backend is a contextvar a compiled
# graph would not see at run time); the ops take it as a string, so compile/export see one opaque
# call whose body is the registry's implementation.
#
# vqim::conv_attention returns (o, lse): the Triton forward's log-sum-exp is what its backward
# needs, so the op saves it instead of recomputing the forward. The torch backend returns an
# empty lse; its backward re-runs the reference under autograd (the same graph as before).

@custom_op("vqim::conv_attention", mutates_args=())
def _conv_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], kernel: list[int],
                       prefix: int, scale: float | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    grid, kernel = tuple(grid), tuple(kernel)
    if backend == "triton":
        # The registry's Triton entry wraps this forward in an autograd.Function; here
        # register_autograd below plays that part.
        if q.shape[-1] > _MAX_D:
            raise ValueError(f"Dh must be <= {_MAX_D} for backend='triton', got {q.shape[-1]}")
        return _conv_attention_fwd(q, k, v, grid, kernel, prefix, _scale(scale, q))
    o = dispatch("conv_attention", backend, q.device)(q, k, v, grid, kernel, prefix, scale)
    return o, q.new_empty(0, dtype=torch.float32)


@_conv_attention_op.register_fake
def _(q, k, v, grid, kernel, prefix, scale, backend):
    b, h, s, _ = q.shape
    lse = q.new_empty((b * h, s) if backend == "triton" else (0,), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("vqim::conv_attention_backward", mutates_args=())
def _conv_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                o: torch.Tensor, lse: torch.Tensor, grid: list[int], kernel: list[int], prefix: int,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backward (dq, dk, dv)."""
    return _conv_attention_bwd(do, q, k, v, o, lse, tuple(grid), tuple(kernel), prefix, scale)


@_conv_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, grid, kernel, prefix, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _scale(scale: float | None, q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _conv_attention_setup(ctx, inputs, output):
    q, k, v, grid, kernel, prefix, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.geom = (grid, kernel, prefix, scale, backend)


def _conv_attention_grad(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    grid, kernel, prefix, scale, backend = ctx.geom
    if backend == "triton":
        dq, dk, dv = _conv_attention_backward_op(do, q, k, v, o, lse, grid, kernel, prefix, _scale(scale, q))
    else:
        # Autograd through the reference, outside any op body (where autograd is off).
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in (q, k, v)]
            out = conv_attention_ref(*qkv, grid=tuple(grid), kernel=tuple(kernel), prefix=prefix, scale=scale)
            dq, dk, dv = torch.autograd.grad(out, qkv, do)
    return dq, dk, dv, None, None, None, None, None


_conv_attention_op.register_autograd(_conv_attention_grad, setup_context=_conv_attention_setup)


@custom_op("vqim::conv_decode_attention", mutates_args=())
def _conv_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                              grid: list[int], kernel: list[int], prefix: int, scale: float | None, ring: bool,
                              backend: str) -> torch.Tensor:
    return dispatch("conv_decode_attention", backend, q.device)(q, k_cache, v_cache, pos, tuple(grid), tuple(kernel),
                                                                prefix, scale, ring)


@_conv_decode_attention_op.register_fake
def _(q, k_cache, v_cache, pos, grid, kernel, prefix, scale, ring, backend):
    return q.new_empty(q.shape)


# vqim::conv_decode_attention_write declares the caches mutated, so functionalization (compile,
# export) keeps the in-place write; vqim::conv_decode_attention stays a pure read.
@custom_op("vqim::conv_decode_attention_write", mutates_args=("k_cache", "v_cache"))
def _conv_decode_attention_write_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                                    k_new: torch.Tensor, v_new: torch.Tensor, grid: list[int], kernel: list[int],
                                    prefix: int, scale: float | None, ring: bool, backend: str) -> torch.Tensor:
    return dispatch("conv_decode_attention_write", backend, q.device)(q, k_cache, v_cache, pos, k_new, v_new,
                                                                      tuple(grid), tuple(kernel), prefix, scale, ring)


@_conv_decode_attention_write_op.register_fake
def _(q, k_cache, v_cache, pos, k_new, v_new, grid, kernel, prefix, scale, ring, backend):
    return q.new_empty(q.shape)
