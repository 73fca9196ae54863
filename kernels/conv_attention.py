"""Conv-shaped masked sparse attention (DESIGN §4): the decoder's self-attention.

Image tokens sit on a ``grid_h x grid_w`` grid in raster order after ``prefix`` positions
(BOS, class token). A query at image token (r, c) sees the prefix and the image keys
(r', c') that are not later in raster order with ``r - r' <= kernel_h // 2`` and
``|c - c'| <= kernel_w // 2``; prefix positions see each other causally and no image token.

* :func:`conv_attention` (training / prefill): q, k, v ``[B, H, S, Dh]``, differentiable.
* :func:`conv_decode_attention` (generation): one query per sequence at its own position,
  reading only the prefix and the window's keys from the KV cache, either the plain cache
  (slot = position) or the ring layout of :func:`conv_cache_slot` / :func:`conv_cache_len`
  that keeps only the ``kernel_h // 2 + 1`` grid rows the window can still reach.

:func:`conv_mask_ref` builds the dense boolean mask, the definition every kernel is tested
against; :func:`conv_attention_ref` / :func:`conv_decode_attention_ref` are dense masked
attention in fp32 with it.
"""

from __future__ import annotations

import math

import torch

from ._registry import dispatch, register

_LOG2E = 1.4426950408889634


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
        raise ValueError(f"{arg} must be <= prefix + grid_h * grid_w = {full} for grid {grid}, prefix {prefix}; got {s}")


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


@register("conv_decode_attention", "torch")
def _conv_decode_attention_torch(q, k_cache, v_cache, pos, grid, kernel, prefix, scale, ring):
    return conv_decode_attention_ref(q, k_cache, v_cache, pos, grid=grid, kernel=kernel, prefix=prefix,
                                     scale=scale, ring=ring)


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
    return dispatch("conv_attention", backend, q.device)(q, k, v, grid, kernel, prefix, scale)


def conv_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, *,
                          grid, kernel=(11, 11), prefix: int = 0, scale: float | None = None, ring: bool = False,
                          validate: bool = True, backend: str | None = None) -> torch.Tensor:
    """One decode step of conv-shaped attention: equals row ``pos`` of :func:`conv_attention`.

    Args:
        q: ``[B, H, 1, Dh]``, the new token's query per sequence.
        k_cache, v_cache: ``[B, H, S_max, Dh]`` already holding the new token's K/V. Plain
            layout (``ring=False``): slot = sequence position. Ring layout (``ring=True``):
            slot = :func:`conv_cache_slot`, ``S_max >= conv_cache_len(grid, kernel, prefix)``.
        pos: int64/int32 ``[B]``: each row's sequence position (prefix included); rows may differ.
        grid, kernel, prefix, scale: as in :func:`conv_attention`.
        validate: check the values of ``pos`` (a host sync); pass False inside CUDA graphs.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"``, ``"cuda"``, ``"torch"``.

    Returns:
        ``[B, H, 1, Dh]`` in q's dtype. Reads only the prefix and the window's keys.
    """
    grid, kernel, prefix = _check_geometry(grid, kernel, prefix)
    _check_decode(q, k_cache, v_cache, pos, grid, kernel, prefix, ring, validate)
    return dispatch("conv_decode_attention", backend, q.device)(q, k_cache, v_cache, pos, grid, kernel, prefix,
                                                                scale, ring)
