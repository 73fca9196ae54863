"""Fused classifier-free-guidance sampling: CFG combine, temperature, top-k, top-p, min-p, the draw.

Every generated image token goes through this op once per decode step. The definition
(``cfg_sample_ref``), for each row with guided logits ``x = uncond + s * (cond - uncond)``:

* **Masked entries.** A token whose guided logit is not finite is masked: it is never drawn.
  With guidance on, ``-inf`` in ``cond`` or in ``uncond`` masks the token (the product
  ``s * (cond - uncond)`` would otherwise be NaN for ``s = 0`` or ``-inf - -inf``).
* **temperature = 0** is greedy: the index of the largest guided logit, ties to the lowest index.
* Otherwise ``z = x / temperature`` (fp32). **Top-k** (``k = 0`` off, ``k >= `` number of finite
  entries off) keeps every token with ``z >= `` the k-th largest value, ties included.
* **Top-p** (``p = 1`` off) then orders the tokens top-k kept by descending value, equal values
  by ascending token index, and keeps each token whose *preceding mass* (the mass of the tokens
  before it in that order) is ``< p * Zk``, ``Zk`` the mass top-k kept: the smallest set whose
  mass reaches p, as Hugging Face's warper (which breaks ties by an unstable sort). The largest
  token is always kept. Exactly, with ``w = exp(z - max z)`` in fp32 and ``target = p * Zk``:
  ``tau`` is the smallest value whose mass strictly above, ``M_above = sum(w[z > tau])``, is
  ``< target``; every token with ``z > tau`` is kept; of the tokens with ``z == tau`` (each of
  mass ``e = exp(tau - max z)``), in index order, the j-th (from 0) is kept iff
  ``M_above + j * e < target`` (fp32 product, then fp32 sum; j = 0 always). So a tie group
  straddling the cut keeps only its lowest indices that are needed, where top-k keeps a tie
  group whole.
* **Min-p** (``min_p = 0`` off) last keeps, of the tokens top-p kept, those with
  ``exp(z - max z) >= min_p`` (fp32): a probability at least ``min_p`` times the most probable
  token's, Hugging Face's ``MinPLogitsWarper`` applied after temperature, top-k and top-p. The
  ratio does not depend on which tokens the earlier filters removed (they always keep the most
  probable token), so the largest token (``exp(0) = 1``) is always kept, and min-p changes
  neither top-k's nor top-p's cut: top-p's mass ``Zk`` counts the tokens min-p removes.
* **The draw** is an inverse CDF in vocabulary order with one uniform per row:
  ``w_i = exp(z_i - max z)`` on kept tokens (0 elsewhere), ``u`` from Philox4x32-10 keyed by the
  row's ``seed`` (key = seed's low/high 32 bits) at counter ``(step_lo, step_hi, 0, 0)``, taking
  the top 24 bits of the first output word, ``u = (r >> 8) * 2**-24`` in [0, 1), exactly
  representable in fp32. The token is the first index whose running sum of ``w`` is
  ``> u * sum(w)``; if rounding leaves none, the last kept index. The uniform depends only on
  ``(seed, step)``: never on the row index, the batch size or the vocabulary size, so a request
  draws the same token whatever batch it shares. ``tl.randint4x`` in the Triton kernel, this
  file's int64 Philox and the CUDA twin compute the same 32-bit word.
* A row with **no finite guided logit** gets token ``-1`` (the kernels mark it instead of
  syncing with the host); ``validate=True`` turns that into a ``ValueError``.

Exact token equality between backends holds except where float rounding of the running sum
(summation order, ``exp``, FMA contraction) differs right at a CDF boundary, or that of
``Zk``, ``M_above`` and ``M_above + j * e`` (which the Triton compiler may contract into an FMA)
right at the top-p cut, a probability of order 1e-7 per draw; tests compare distributions and
check each backend's determinism.

Validation: python-scalar parameters are checked on every call (cheap). Checks that need a
host sync (ranges/NaN inside parameter tensors, logits that are NaN or ``+inf``, rows with no
finite logit) run only with ``validate=True`` (the default for direct calls). The ranges are
:class:`~vqim.kernels.sampling_params.SamplingParams`' (its fields' rules, which also check
``seed`` and ``step``). The engine validates one ``SamplingParams`` per request (it checks on
construction) and passes ``validate=False`` per step, then checks the returned tokens for ``-1``
once at the end.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _ext
from ._registry import call, custom_op, dispatch, eager_inference, register, resolve_backend
from ._triton import tl, triton
from .sampling_params import DEFAULTS, SamplingParams, check_tensor, check_tensor_values, check_value, row_tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_ROUNDS = 10
# ---------------------------------------------------------------------------------------------
# Counter-based randomness shared by every backend
# ---------------------------------------------------------------------------------------------

def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` in [0, 2^32).

    Splits ``a`` into 16-bit halves so every intermediate stays below 2^49: no int64 overflow.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo  # < 2^48
    p_hi = b * a_hi  # < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = t & _MASK32
    hi = (p_hi >> 16) + (t >> 32)
    return hi & _MASK32, lo


def philox_uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The per-row uniform in [0, 1) (fp32) for int64 tensors ``seed`` and ``step`` (broadcast).

    Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter ``(step_lo, step_hi, 0, 0)``; the
    top 24 bits of the first output word, times 2^-24. Same word as ``tl.randint4x(seed, step)``.
    """
    seed, step = torch.broadcast_tensors(seed.long(), step.long())
    c0, c1 = step & _MASK32, (step >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return (c0 >> 8).to(torch.float32) * 2.0**-24


# ---------------------------------------------------------------------------------------------
# Parameters: scalars or per-row tensors
# ---------------------------------------------------------------------------------------------

def _row_params(batch: int, device: torch.device, **params) -> dict[str, torch.Tensor]:
    """Every setting (a default where not given), ``seed`` and ``step`` as ``[B]`` tensors on
    ``device`` (fp32 floats, int64 ints); no sync."""
    params = {**DEFAULTS, **params}
    return {name: row_tensor(name, v, batch, device) for name, v in params.items()}


def _check_logits(cond: torch.Tensor, uncond: torch.Tensor | None) -> None:
    if not isinstance(cond, torch.Tensor) or cond.dim() != 2:
        raise ValueError(f"cond_logits must be a 2-D tensor [B, V], got {getattr(cond, 'shape', type(cond))}")
    if cond.shape[1] == 0:
        raise ValueError("cond_logits must have V >= 1 columns, got V = 0")
    if not cond.is_floating_point() or cond.dtype == torch.float64 and cond.device.type == "cuda":
        raise ValueError(f"cond_logits must be float32, float16 or bfloat16, got {cond.dtype}")
    if uncond is not None:
        if not isinstance(uncond, torch.Tensor) or uncond.shape != cond.shape:
            raise ValueError(f"uncond_logits must be None or a tensor of cond_logits' shape {tuple(cond.shape)}, "
                             f"got {getattr(uncond, 'shape', type(uncond))}")
        if not uncond.is_floating_point():
            raise ValueError(f"uncond_logits must be a float tensor, got {uncond.dtype}")
        if uncond.device != cond.device:
            raise ValueError(f"cond_logits and uncond_logits must be on the same device, "
                             f"got {cond.device} and {uncond.device}")


# ---------------------------------------------------------------------------------------------
# Reference: the definition of the op
# ---------------------------------------------------------------------------------------------

def guided_logits_ref(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: torch.Tensor) -> torch.Tensor:
    """``uncond + s * (cond - uncond)`` in fp32, with non-finite entries set to -inf (masked)."""
    c = cond.float()
    if uncond is None:
        x = c
    else:
        u = uncond.float()
        x = u + cfg_scale.float()[:, None] * (c - u)  # (B, V)
        x = torch.where(c.isfinite() & u.isfinite(), x, float("-inf"))
    return torch.where(x.isfinite(), x, float("-inf"))


def sampling_mask_ref(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, V]``: the tokens top-k, top-p then min-p keep, for temperature-scaled logits ``z``
    (-inf = masked). Sort-based: the readable definition the threshold search must match, with
    the same arithmetic for the tie group at the cut (see the module docstring)."""
    b, v = z.shape
    finite = z.isfinite()
    n_finite = finite.sum(1)  # (B,)
    zs, _ = z.sort(dim=1, descending=True)  # (B, V)
    k = top_k.long()
    k_on = (k > 0) & (k < n_finite)
    kth = zs.gather(1, (k.clamp(1, v) - 1)[:, None])  # (B, 1)
    keep = finite & (~k_on[:, None] | (z >= kth))

    m = z.max(dim=1, keepdim=True).values  # (B, 1)
    e = torch.where(keep, torch.exp(z - m), 0.0)  # (B, V)
    target = top_p.to(z.dtype)[:, None] * e.sum(1, keepdim=True)  # (B, 1)
    # M_above of each token: the mass strictly above its value, the exclusive running sum at
    # the first element of its tie group (equal z) in descending order.
    zs, order = torch.where(keep, z, float("-inf")).sort(dim=1, descending=True, stable=True)  # (B, V)
    es = e.gather(1, order)
    excl = es.cumsum(1) - es
    neg = -zs
    first_of_group = torch.searchsorted(neg, neg, side="left")  # (B, V)
    above_sorted = excl.gather(1, first_of_group)
    above = torch.empty_like(above_sorted).scatter_(1, order, above_sorted)  # (B, V)
    # tau: the smallest kept value with M_above < target (the largest value always qualifies).
    qualifies = keep & ((above < target) | (z == m))
    tau = torch.where(qualifies, z, float("inf")).min(dim=1, keepdim=True).values  # (B, 1)
    at_tau = keep & (z == tau)
    j = at_tau.cumsum(1) - at_tau.long()  # rank in index order within the tau group
    keep_tau = at_tau & ((j == 0) | (above + j.to(z.dtype) * e < target))
    p_on = (top_p < 1)[:, None]
    return keep & (~p_on | (z > tau) | keep_tau) & (e >= min_p.to(z.dtype)[:, None])


def cfg_sample_ref(cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, *, seed, step,
                   return_logprob: bool = False, validate: bool = True, **sampling):
    """The definition of the op (plain PyTorch, fp32). See the module docstring."""
    _check_logits(cond_logits, uncond_logits)
    prm = _prepare(cond_logits, uncond_logits, validate, sampling, seed, step)
    tokens, logprob = _cfg_sample_torch(cond_logits, uncond_logits, **prm)
    if validate:
        _check_rows(tokens)
    return (tokens, logprob) if return_logprob else tokens


def cfg_probs_ref(cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, **sampling) -> torch.Tensor:
    """The distribution ``[B, V]`` (fp32, rows sum to 1) that :func:`cfg_sample` draws each row's
    token from: guided, temperature-scaled, top-k/top-p/min-p kept, renormalized; one-hot on the
    argmax for ``temperature = 0``. A row with no finite guided logit is all zeros. What a
    sampler that draws with other randomness (speculative decoding's acceptance test) needs."""
    _check_logits(cond_logits, uncond_logits)
    prm = _prepare(cond_logits, uncond_logits, False, sampling, 0, 0)
    x, _, greedy, _, _, w = _kept_weights(cond_logits, uncond_logits, prm["cfg_scale"], prm["temperature"],
                                          prm["top_k"], prm["top_p"], prm["min_p"])
    p = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    top = F.one_hot(x.argmax(1), x.shape[1]).to(p.dtype)  # (B, V)
    p = torch.where(greedy[:, None], top, p)
    return torch.where(x.isfinite().any(1, keepdim=True), p, 0.0)


def _kept_weights(cond, uncond, cfg_scale, temperature, top_k, top_p, min_p):
    """The definition's steps up to the draw: guided logits ``x``, temperature-scaled ``z`` (``x``
    itself on greedy rows), ``greedy [B]``, the kept mask, ``m = max z [B, 1]`` and the kept
    tokens' weights ``w = exp(z - m)`` (0 elsewhere), each ``[B, V]``."""
    x = guided_logits_ref(cond, uncond, cfg_scale)  # (B, V)
    greedy = temperature == 0
    z = torch.where(greedy[:, None], x, x / torch.where(greedy[:, None], 1.0, temperature[:, None]))  # (B, V)
    keep = sampling_mask_ref(z, top_k, top_p, min_p)
    m = z.max(dim=1, keepdim=True).values
    return x, z, greedy, keep, m, torch.where(keep, torch.exp(z - m), 0.0)


def _cfg_sample_torch(cond, uncond, *, cfg_scale, temperature, top_k, top_p, min_p, seed, step):
    x, z, greedy, keep, m, w = _kept_weights(cond, uncond, cfg_scale, temperature, top_k, top_p, min_p)  # (B, V)
    return _draw(x, z, greedy, keep, m, w, philox_uniform(seed, step))


def _draw(x, z, greedy, keep, m, w, u):
    """The definition's draw from :func:`_kept_weights`' outputs and the uniforms ``u [B]``:
    tokens ``[B]`` and their log-probabilities ``[B]``."""
    v = x.shape[1]
    total = w.sum(1)  # (B,)
    cum = w.cumsum(1)
    idx = (cum <= (u * total)[:, None]).sum(1)  # first index with cum > u * total
    cols = torch.arange(v, device=x.device)
    last_kept = torch.where(keep, cols, -1).max(1).values
    idx = torch.where(idx >= v, last_kept, idx)
    # argmax: first maximal index (torch.argmax's documented tie rule).
    idx = torch.where(greedy, x.argmax(1), idx)
    no_finite = ~x.isfinite().any(1)
    idx = torch.where(no_finite, -1, idx)
    zi = z.gather(1, idx.clamp_min(0)[:, None])[:, 0]
    logprob = zi - m[:, 0] - torch.log(total)
    logprob = torch.where(greedy, 0.0, logprob)
    logprob = torch.where(no_finite, float("nan"), logprob)
    return idx, logprob


def _prepare(cond, uncond, validate: bool, sampling: dict, seed, step) -> dict[str, torch.Tensor]:
    """Checks of every parameter (``sampling``: any of :meth:`SamplingParams.names`, the rest
    defaults) and of the logits, then each parameter as a ``[B]`` tensor."""
    unknown = set(sampling) - set(SamplingParams.names())
    if unknown:
        raise TypeError(f"cfg_sample got unknown sampling settings {sorted(unknown)}; "
                        f"expected among {list(SamplingParams.names())}")
    b = cond.shape[0]
    params = {**sampling, "seed": seed, "step": step}
    for name, v in params.items():
        if isinstance(v, torch.Tensor):
            check_tensor(name, v, b, cond.device)
            if validate:
                check_tensor_values(name, v)
        else:
            check_value(name, v)
    if validate:
        for nm, t in (("cond_logits", cond), ("uncond_logits", uncond)):
            if t is not None and bool((t.isnan() | (t == float("inf"))).any()):
                raise ValueError(f"{nm} must not contain NaN or +inf (use -inf to mask a token)")
    return _row_params(b, cond.device, **params)


def _check_rows(tokens: torch.Tensor) -> None:
    bad = tokens < 0
    if bool(bad.any()):
        rows = bad.nonzero()[:5, 0].tolist()
        raise ValueError(f"cond_logits/uncond_logits: rows {rows} have no finite guided logit "
                         f"(every token masked); nothing to sample")


@functools.lru_cache(maxsize=64)
def _lane_masks(b: int) -> tuple[int, int]:
    """For ``b`` 64-bit lanes of one python int: (1 in every lane, 2^32 - 1 in every lane)."""
    one = int.from_bytes((1).to_bytes(8, "little") * b, "little")  # sum of 2^(64 i), i < b; linear in b
    return one, one * _MASK32


def _philox_uniform_cpu(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """:func:`philox_uniform` of CPU tensors: the same words, every row at once in python's
    integers. Row i is the 64-bit lane i of one big int: a 32-bit word times a 32-bit constant
    is below 2^64 and a key plus its 32-bit increment below 2^33, so no product, sum, shift or
    mask carries into the next lane, and one operation on the big int serves every row (~25 us
    for 1 or 16 rows; numpy's uint64 ufuncs took ~100 calls of ~1 us each)."""
    seed, step = torch.broadcast_tensors(seed.long(), step.long())
    shape, b = seed.shape, seed.numel()
    one, low = _lane_masks(b)
    order = sys.byteorder  # int64 bytes in native order: each lane holds the two's complement bits

    def lanes(t: torch.Tensor) -> int:
        return int.from_bytes(t.reshape(-1).numpy().tobytes(), order)

    s, t = lanes(seed), lanes(step)
    c0, c1, c2, c3 = t & low, (t >> 32) & low, 0, 0
    k0, k1 = s & low, (s >> 32) & low
    ka, kb = _PHILOX_KEY_A * one, _PHILOX_KEY_B * one
    for _ in range(_PHILOX_ROUNDS):
        pb, pa = _PHILOX_ROUND_B * c2, _PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = ((pb >> 32) & low) ^ c1 ^ k0, pb & low, ((pa >> 32) & low) ^ c3 ^ k1, pa & low
        k0, k1 = (k0 + ka) & low, (k1 + kb) & low
    words = np.frombuffer(((c0 >> 8) & low).to_bytes(8 * b, order), dtype=np.int64)
    # < 2^24: exact in fp32, as the reference's conversion.
    return torch.from_numpy(words.astype(np.float32) * np.float32(2.0**-24)).view(shape)


class RowsPlan(NamedTuple):
    """What the CPU path branches on, read from the rows' settings (host values): made once by
    :func:`rows_plan` where a caller samples the same rows many times (the decode loop, between
    joins and leaves) instead of on every call. A plan of more rows than a call samples (the
    runner's padding slots, at the defaults) is still right for it: each flag only adds work."""

    top_p: bool  # some row filters with top-p: the call runs the reference
    greedy: bool  # some row has temperature 0
    unit_temperature: bool  # every temperature is 1: z = x / 1 is x exactly, so no division
    top_k: int  # the largest top_k (0: no row filters with top-k)
    min_p: bool  # some row filters with min-p


def rows_plan(settings: dict[str, torch.Tensor]) -> RowsPlan:
    """The :class:`RowsPlan` of ``settings`` (:meth:`SamplingParams.rows`' ``[B]`` tensors; a
    host read of each on a GPU)."""
    k, t, p, mp = (settings[n].tolist() for n in ("top_k", "temperature", "top_p", "min_p"))
    return RowsPlan(any(r != 1 for r in p), 0 in t, all(r == 1 for r in t), max(k, default=0), any(mp))


def _cfg_sample_cpu(cond, uncond, *, cfg_scale, temperature, top_k, top_p, min_p, seed, step,
                    u: torch.Tensor | None = None, logprob: bool = True, plan: RowsPlan | None = None):
    """The torch backend on CPU: the reference's tokens and log-probabilities exactly (tested on
    the sampler's grids), in a fraction of its time. Calls where a row filters with top-p run
    the reference (its cut needs the sorted order). Otherwise no sort is needed: top-k keeps
    the tokens ``>=`` the k-th largest value (``topk``'s), min-p those whose weight is
    ``>= min_p``, and the rest is the reference's arithmetic on the same ``[B, V]`` tensors (so
    the same rounding) with its masks folded, the inverse CDF as a binary search of the running
    sum (non-decreasing, so the first index past ``u * total`` is the count of entries ``<=``
    it) and the counter-based uniform in python integers (or ``u [B]``, the caller's, when it
    holds them). The guided mask needs no pass of its own: a masked entry (a non-finite
    ``cond`` or ``uncond``, or an overflow) makes ``x`` either ``-inf``, as the reference's mask
    does, or NaN/``+inf``, and then the row's maximum is not finite, which sends the call to
    the reference, as do a temperature that overflows a logit to ``+inf`` and a draw that
    rounding leaves past the end (the reference's fallbacks). ``logprob=False`` returns
    ``(tokens, None)``; ``plan`` is the settings' :func:`rows_plan` where the caller holds it.
    It runs once per decode step, where the reference's ~100 small ops cost more than the rest
    of the step on a small model."""
    b, v = cond.shape
    if u is None:
        u = _philox_uniform_cpu(seed, step)
    if plan is None:
        plan = rows_plan(dict(top_k=top_k, temperature=temperature, top_p=top_p, min_p=min_p))
    # A temperature tensor not in fp32 (the op's own, from _row_params) would change the
    # reference's dtype; top-p values other than 1 (out of range too) go to the reference.
    if b == 0 or plan.top_p or temperature.dtype != torch.float32:
        return _draw(*_kept_weights(cond, uncond, cfg_scale, temperature, top_k, top_p, min_p), u)
    # Here the calls that make up a decode step's sampling are counted: a dtype test, not a
    # .float() call, and unsqueeze, not [:, None] (each a dispatch of its own).
    cond = cond if cond.dtype == torch.float32 else cond.float()
    if uncond is None:
        x = cond  # (B, V)
    else:
        un = uncond if uncond.dtype == torch.float32 else uncond.float()
        s = cfg_scale if cfg_scale.dtype == torch.float32 else cfg_scale.float()
        # un + s * (c - un), the reference's three roundings; never in place on the caller's logits.
        x = (cond - un).mul_(s.unsqueeze(1)).add_(un)  # (B, V)
    greedy = None
    if plan.greedy:
        greedy = temperature == 0
        z = x / temperature.masked_fill(greedy, 1.0).unsqueeze(1)  # (B, V); greedy rows keep x for the argmax
    elif plan.unit_temperature:
        z = x  # never written in place below: it may be the caller's cond
    else:
        z = x.div_(temperature.unsqueeze(1)) if x is not cond else x / temperature.unsqueeze(1)
    m = z.amax(1, keepdim=True)  # (B, 1); NaN where any entry is NaN
    if not (math.isfinite(m) if b == 1 else all(map(math.isfinite, m.view(-1).tolist()))):
        return _draw(*_kept_weights(cond, uncond, cfg_scale, temperature, top_k, top_p, min_p), u)
    w = (z - m).exp_()  # (B, V), 0 on masked tokens
    if plan.top_k > 0:
        # The k-th largest value (rows with k <= 0 keep all; k past the finite count keeps all
        # finite tokens, as the reference's k_on does, since the k-th value is then <= them).
        kth = z.topk(min(plan.top_k, v), dim=1).values.gather(1, (top_k.long().clamp(1, v) - 1)[:, None])  # (B, 1)
        w.masked_fill_((z < kth) & (top_k > 0)[:, None], 0.0)
    if plan.min_p:
        w = torch.where(w >= min_p.float()[:, None], w, 0.0)
    total = w.sum(1)  # (B,)
    idx = torch.searchsorted(w.cumsum(1), (u * total).unsqueeze(1), right=True).squeeze(1)  # first cum > u * total
    if greedy is not None:
        idx = torch.where(greedy, x.argmax(1), idx)
    if int(idx if b == 1 else idx.max()) >= v:
        return _draw(*_kept_weights(cond, uncond, cfg_scale, temperature, top_k, top_p, min_p), u)
    if not logprob:
        return idx, None
    lp = z.gather(1, idx[:, None])[:, 0] - m[:, 0] - torch.log(total)
    return idx, lp if greedy is None else torch.where(greedy, 0.0, lp)


@register("cfg_sample", "torch")
def _cfg_sample_torch_backend(cond, uncond, **prm):
    if cond.device.type == "cpu":
        return _cfg_sample_cpu(cond, uncond, **prm)
    return _cfg_sample_torch(cond, uncond, **prm)


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per row, the vocabulary streamed in blocks (or held in registers)
# ---------------------------------------------------------------------------------------------

# Rows up to this many entries are loaded once and kept in registers for every pass
# (8192 fp32 over 8 warps = 32 registers per thread for z, 32 for exp(z - max)).
_MAX_RESIDENT = 8192
_STREAM_BLOCK = 4096


@triton.jit
def _guided_block(c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, HAS_UNCOND: tl.constexpr):
    """Temperature-scaled guided logits of one block, fp32; masked (non-finite) entries -inf."""
    inb = cols < V
    c = tl.load(c_row + cols * stride_cv, mask=inb, other=float("-inf")).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_row + cols * stride_uv, mask=inb, other=float("-inf")).to(tl.float32)
        x = u + s * (c - u)
        ok = (c > float("-inf")) & (c < float("inf")) & (u > float("-inf")) & (u < float("inf"))
    else:
        x = c
        ok = c == c
    z = x / tdiv
    # NaN fails both comparisons, so NaN/+-inf are masked; -0.0 -> +0.0 so that the integer
    # key below orders them as equal, as float comparison does.
    ok = ok & (z > float("-inf")) & (z < float("inf"))
    z = tl.where(z == 0.0, 0.0, z)
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
               HAS_UNCOND: tl.constexpr, ONE_BLOCK: tl.constexpr, WITH_E: tl.constexpr):
    """One block of the row for a pass: its guided logits z and, with WITH_E, e = exp(z - m)
    (else e is z, for the caller to ignore). With ONE_BLOCK they are the registers z0, e0 the
    kernel loaded once; otherwise the block is re-streamed (L2-resident after the first pass)."""
    if ONE_BLOCK:
        z = z0
        e = e0
    else:
        z = _guided_block(c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, HAS_UNCOND)
        if WITH_E:
            e = tl.exp(z - m)
        else:
            e = z
    return z, e


@triton.jit
def _ordered_key(z):
    """Monotone map of fp32 to int64 (the bit pattern with the magnitude of negatives flipped):
    a threshold search over keys finds exact float values in at most 32 halvings."""
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _kept(z, e, cols, tau, cut, min_p):
    """The tokens top-k and top-p keep (key above tau, or at tau with index <= cut) whose
    e = exp(z - max) min-p keeps."""
    key = _ordered_key(z)
    return (z > float("-inf")) & ((key > tau) | ((key == tau) & (cols <= cut))) & (e >= min_p)


@triton.jit
def _cfg_sample_kernel(
    cond_ptr, uncond_ptr, scale_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, step_ptr,
    tok_ptr, logp_ptr,
    V, stride_cb, stride_cv, stride_ub, stride_uv,
    HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(scale_ptr + row)
    t = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    min_p = tl.load(minp_ptr + row)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    greedy = t == 0.0
    tdiv = tl.where(greedy, 1.0, t)
    c_row = cond_ptr + row * stride_cb
    u_row = uncond_ptr + row * stride_ub
    ar = tl.arange(0, BLOCK)
    # With ONE_BLOCK the row is loaded here once and every pass below reuses these registers;
    # otherwise each pass re-streams the row (L2-resident after the first pass).
    z0 = _guided_block(c_row, u_row, ar, V, stride_cv, stride_uv, s, tdiv, HAS_UNCOND)  # (BLOCK,)

    # Pass 1: max, first argmax, number of finite entries, smallest finite key.
    m = tl.full((), float("-inf"), tl.float32)
    amax = tl.full((), 0, tl.int32) + V
    n = tl.full((), 0, tl.int32)
    kmin = tl.full((), 2**40, tl.int64)
    for b0 in range(0, V, BLOCK):
        cols = b0 + ar
        z, _ = _row_block(z0, z0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                          HAS_UNCOND, ONE_BLOCK, False)
        fin = z > float("-inf")
        bm = tl.max(z, 0)
        bidx = tl.min(tl.where(z == bm, cols, V), 0)
        # Strict '>' keeps the lowest index on ties across blocks.
        amax = tl.where(bm > m, bidx, amax)
        m = tl.maximum(m, bm)
        n += tl.sum(fin.to(tl.int32), 0)
        kmin = tl.minimum(kmin, tl.min(tl.where(fin, _ordered_key(z), 2**40), 0))
    if ONE_BLOCK:
        e0 = tl.exp(z0 - m)  # (BLOCK,) 0 on masked entries
    else:
        e0 = z0  # unused: streamed passes recompute e per block
    sampling = (n > 0) & (t > 0.0)
    kmax = _ordered_key(m)

    # Top-k: the largest key lo with count(key >= lo) >= k is exactly the k-th largest value.
    # Invariant count(key >= lo) >= k > count(key >= hi); off (or k >= n) leaves lo = min key.
    # Each pass also finds the data keys on either side of mid and moves the bound onto them
    # (the count is constant between them), so the search ends once the k-th and (k+1)-th
    # values are separated: ~log2(V) + a few passes instead of 32.
    k_on = sampling & (k > 0) & (k < n)
    lo = kmin
    hi = tl.where(k_on, kmax + 1, kmin + 1)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        cnt = tl.full((), 0, tl.int64)
        nxt = tl.full((), 2**40, tl.int64)
        prv = tl.full((), -(2**40), tl.int64)
        for b0 in range(0, V, BLOCK):
            cols = b0 + ar
            z, _ = _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                              HAS_UNCOND, ONE_BLOCK, False)
            key = tl.where(z > float("-inf"), _ordered_key(z), -(2**40))
            above = key >= mid
            cnt += tl.sum(above.to(tl.int64), 0)
            nxt = tl.minimum(nxt, tl.min(tl.where(above, key, 2**40), 0))
            prv = tl.maximum(prv, tl.max(tl.where(above, -(2**40), key), 0))
        ok = cnt >= k
        lo = tl.where(ok, nxt, lo)
        hi = tl.where(ok, hi, prv + 1)
    tau_k = lo

    # Top-p: the smallest key tau with M_above = mass(key > tau) < p * Zk, Zk = mass(key >= tau_k);
    # every token with key > tau is kept. Invariant: mass(key > lo) >= p * Zk > mass(key > hi);
    # off leaves tau = tau_k.
    p_on = sampling & (p < 1.0)
    zk = tl.full((), 0.0, tl.float32)
    if p_on:
        for b0 in range(0, V, BLOCK):
            cols = b0 + ar
            z, e = _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                              HAS_UNCOND, ONE_BLOCK, True)
            sel = (z > float("-inf")) & (_ordered_key(z) >= tau_k)
            zk += tl.sum(tl.where(sel, e, 0.0), 0)
    target = p * zk
    lo = tau_k - 1
    hi = tl.where(p_on, kmax, tau_k)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        mass = tl.full((), 0.0, tl.float32)
        nxt = tl.full((), 2**40, tl.int64)
        prv = tl.full((), -(2**40), tl.int64)
        for b0 in range(0, V, BLOCK):
            cols = b0 + ar
            z, e = _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                              HAS_UNCOND, ONE_BLOCK, True)
            key = tl.where(z > float("-inf"), _ordered_key(z), -(2**40))
            above = key > mid
            mass += tl.sum(tl.where(above, e, 0.0), 0)
            nxt = tl.minimum(nxt, tl.min(tl.where(above, key, 2**40), 0))
            prv = tl.maximum(prv, tl.max(tl.where(above, -(2**40), key), 0))
        # mass(key > t) is the same for every t in [prv, nxt - 1]: snap the bound to that range.
        ok = mass < target
        hi = tl.where(ok, prv, hi)
        lo = tl.where(ok, lo, nxt - 1)
    tau = hi

    # The tokens at tau (each of mass e_tau) in index order: the j-th is kept iff
    # M_above + j * e_tau < target, i.e. the first c of the g of them. Kept: key > tau, or
    # key == tau and index <= cut. Off (or c == g) keeps the whole group, as top-k does.
    cut = tl.full((), 0, tl.int32) + V
    if p_on:
        m_above = tl.full((), 0.0, tl.float32)
        g = tl.full((), 0, tl.int32)
        e_tau = tl.full((), 0.0, tl.float32)
        for b0 in range(0, V, BLOCK):
            cols = b0 + ar
            z, e = _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                              HAS_UNCOND, ONE_BLOCK, True)
            key = tl.where(z > float("-inf"), _ordered_key(z), -(2**40))
            at = key == tau
            m_above += tl.sum(tl.where(key > tau, e, 0.0), 0)
            g += tl.sum(at.to(tl.int32), 0)
            e_tau = tl.maximum(e_tau, tl.max(tl.where(at, e, 0.0), 0))
        # Bisection over j; j = 0 is always kept (the search leaves M_above < target, and the
        # largest token is kept even where p * Zk rounds to 0). Invariant: j < c_lo kept,
        # j >= c_hi not.
        c_lo = tl.full((), 1, tl.int32)
        c_hi = g
        while c_lo < c_hi:
            mid = (c_lo + c_hi + 1) // 2
            ok = m_above + (mid - 1).to(tl.float32) * e_tau < target
            c_lo = tl.where(ok, mid, c_lo)
            c_hi = tl.where(ok, c_hi, mid - 1)
        if c_lo < g:
            # cut = the index of the c_lo-th token at tau: a running count in index order.
            seen = tl.full((), 0, tl.int32)
            cut = tl.full((), -1, tl.int32)
            for b0 in range(0, V, BLOCK):
                cols = b0 + ar
                z, _ = _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                                  HAS_UNCOND, ONE_BLOCK, False)
                at = (z > float("-inf")) & (_ordered_key(z) == tau)
                rank = tl.cumsum(at.to(tl.int32), 0) + seen  # 1-based among the tokens at tau
                cut = tl.maximum(cut, tl.max(tl.where(at & (rank <= c_lo), cols, -1), 0))
                seen += tl.sum(at.to(tl.int32), 0)

    # The draw: total kept mass, then the first index whose running sum exceeds u * total.
    total = tl.full((), 0.0, tl.float32)
    for b0 in range(0, V, BLOCK):
        cols = b0 + ar
        z, e = _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                          HAS_UNCOND, ONE_BLOCK, True)
        sel = _kept(z, e, cols, tau, cut, min_p)
        total += tl.sum(tl.where(sel, e, 0.0), 0)
    r, _, _, _ = tl.randint4x(seed, step)
    u01 = (r.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)
    thresh = u01 * total
    idx = tl.full((), -1, tl.int32)
    zsel = tl.full((), 0.0, tl.float32)
    last = tl.full((), -1, tl.int32)
    zlast = tl.full((), 0.0, tl.float32)
    carry = tl.full((), 0.0, tl.float32)
    for b0 in range(0, V, BLOCK):
        cols = b0 + ar
        z, e = _row_block(z0, e0, c_row, u_row, cols, V, stride_cv, stride_uv, s, tdiv, m,
                          HAS_UNCOND, ONE_BLOCK, True)
        sel = _kept(z, e, cols, tau, cut, min_p)
        w = tl.where(sel, e, 0.0)
        cs = tl.cumsum(w, 0) + carry
        first = tl.min(tl.where(cs > thresh, cols, V), 0)
        take = (idx < 0) & (first < V)
        idx = tl.where(take, first, idx)
        zsel = tl.where(take, tl.sum(tl.where(cols == first, z, 0.0), 0), zsel)
        blast = tl.max(tl.where(sel, cols, -1), 0)
        zlast = tl.where(blast > last, tl.sum(tl.where(cols == blast, z, 0.0), 0), zlast)
        last = tl.maximum(last, blast)
        carry += tl.sum(w, 0)
    # Rounding can leave u * total at or past the running sum's end: the last kept token.
    zsel = tl.where(idx < 0, zlast, zsel)
    idx = tl.where(idx < 0, last, idx)
    logp = zsel - m - tl.log(total)

    tok = tl.where(greedy, amax, idx)
    logp = tl.where(greedy, 0.0, logp)
    tok = tl.where(n > 0, tok, -1)
    logp = tl.where(n > 0, logp, float("nan"))
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(logp_ptr + row, logp)


def _launch_config(v: int, block: int | None) -> tuple[int, bool, int]:
    if block is None:
        block = triton.next_power_of_2(v) if v <= _MAX_RESIDENT else _STREAM_BLOCK
    one_block = v <= block
    num_warps = 8 if block >= 2048 else 4 if block >= 512 else 1
    return block, one_block, num_warps


@register("cfg_sample", "triton")
def _cfg_sample_triton(cond, uncond, *, cfg_scale, temperature, top_k, top_p, min_p, seed, step, block=None):
    b, v = cond.shape
    tok = torch.empty(b, dtype=torch.long, device=cond.device)
    logp = torch.empty(b, dtype=torch.float32, device=cond.device)
    if b == 0:
        return tok, logp
    blk, one_block, num_warps = _launch_config(v, block)
    has_u = uncond is not None
    u = uncond if has_u else cond
    _cfg_sample_kernel[(b,)](
        cond, u, cfg_scale, temperature, top_k, top_p, min_p, seed, step, tok, logp,
        v, cond.stride(0), cond.stride(1), u.stride(0), u.stride(1),
        HAS_UNCOND=has_u, BLOCK=blk, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    return tok, logp



@register("cfg_sample", "cuda")
def _cfg_sample_cuda(cond, uncond, *, cfg_scale, temperature, top_k, top_p, min_p, seed, step):
    b, v = cond.shape
    tok = torch.empty(b, dtype=torch.long, device=cond.device)
    logp = torch.empty(b, dtype=torch.float32, device=cond.device)
    if b == 0:
        return tok, logp
    has_u = uncond is not None
    u = (uncond if uncond.dtype == cond.dtype else uncond.to(cond.dtype)) if has_u else cond
    with _ext.launch(cond) as (C, stream):
        C.cfg_sample(_ext.params(
            C.CfgSampleParams,
            **_ext.operand("cond", cond), cond_stride0=cond.stride(0), cond_stride1=cond.stride(1),
            **_ext.operand("uncond", u), uncond_stride0=u.stride(0), uncond_stride1=u.stride(1), has_uncond=has_u,
            **_ext.operand("cfg_scale", cfg_scale), **_ext.operand("temperature", temperature),
            **_ext.operand("top_k", top_k), **_ext.operand("top_p", top_p), **_ext.operand("min_p", min_p),
            **_ext.operand("seed", seed),
            **_ext.operand("step", step), **_ext.operand("tokens", tok), **_ext.operand("logprob", logp), B=b, V=v,
            dtype=_ext.dtype_code(cond, "cond_logits"), stream=stream,
        ))
    return tok, logp

# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------

def cfg_sample(cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, *, seed, step,
               backend: str | None = None, return_logprob: bool = False, validate: bool = True, **sampling):
    """Guided, temperature-scaled, top-k/top-p/min-p filtered draw of one token per row.

    Args:
        cond_logits: ``[B, V]`` float32/float16/bfloat16 (any strides).
        uncond_logits: same shape, or ``None`` for no guidance.
        seed: python int or int tensor (0-d or ``[B]``) in [0, 2^63).
        step: python int or int tensor (0-d or ``[B]``), the decode step: with ``seed`` the
            whole key of the row's random draw.
        backend: ``None`` (Triton on CUDA, reference on CPU), ``"triton"``, ``"cuda"``, ``"torch"``.
        return_logprob: also return the fp32 log-probability of each chosen token under the
            final (guided, scaled, filtered, renormalized) distribution; 0 for greedy rows.
        validate: run the checks that need a host sync (parameter tensor ranges, NaN/+inf
            logits, rows with no finite logit -> ValueError). ``False`` for the engine's decode
            loop, which validates once per request (a ``SamplingParams`` per request) and
            checks for token ``-1`` (a row with no finite logit) once at the end.
        **sampling: the settings, by :class:`~vqim.kernels.SamplingParams` field name (its
            defaults for those not given; an unknown name is a TypeError): python scalars or
            per-row tensors (0-d or ``[B]``) on the logits' device. ``temperature = 0`` is
            greedy (argmax); ``top_k = 0``, ``top_p = 1`` and ``min_p = 0`` are off.

    Returns:
        LongTensor ``[B]`` (and fp32 ``[B]`` log-probs with ``return_logprob``).
    """
    _check_logits(cond_logits, uncond_logits)
    prm = _prepare(cond_logits, uncond_logits, validate, sampling, seed, step)
    tokens, logprob = call(_cfg_sample_op, cond_logits, uncond_logits, **prm,
                           backend=resolve_backend(backend, cond_logits.device))
    if validate:
        _check_rows(tokens)
    return (tokens, logprob) if return_logprob else tokens


def cfg_sample_rows(cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, settings: dict[str, torch.Tensor],
                    seed: torch.Tensor, step: torch.Tensor, *, uniforms: torch.Tensor | None = None,
                    plan: RowsPlan | None = None) -> torch.Tensor:
    """:func:`cfg_sample`'s tokens ``[B]`` (``-1`` for a row with no finite logit), for a caller
    that holds checked rows: ``settings`` as :meth:`SamplingParams.rows` makes them (every
    setting, ``[B]``, on the logits' device), ``seed`` and ``step`` int64 ``[B]``, logits as
    :func:`cfg_sample` takes them. Nothing is checked (the engine's decode loop checks each
    request's settings once, not every step); the backend is the device's default (or
    :func:`~vqim.kernels.use_backend`'s).

    ``uniforms [B]``: the rows' ``philox_uniform(seed, step)``, where the caller drew them ahead
    (:func:`sampling_uniforms`, once per image). The torch backend on a CPU then skips drawing
    them and the log-probabilities (~70 us of a decode step's sampling in python integers and
    small ops); other backends draw in-kernel and ignore it. ``plan``: the settings'
    :func:`rows_plan` (or a plan of more rows), where the caller made it once for many calls;
    used with ``uniforms``, where it saves the path's host reads of the settings."""
    backend = resolve_backend(None, cond_logits.device)
    if uniforms is not None and backend == "torch" and cond_logits.device.type == "cpu" and eager_inference(cond_logits):
        return _cfg_sample_cpu(cond_logits, uncond_logits, **settings, seed=seed, step=step, u=uniforms,
                               logprob=False, plan=plan)[0]
    return call(_cfg_sample_op, cond_logits, uncond_logits, **settings, seed=seed, step=step, backend=backend)[0]


_UNIFORM_LANES = 4096


def sampling_uniforms(seed: torch.Tensor, steps: int) -> torch.Tensor:
    """The uniforms ``[B, steps]`` the sampler draws for tokens ``0 .. steps - 1`` of rows keyed by
    ``seed`` (int64 ``[B]``): ``philox_uniform(seed[:, None], arange(steps))``, on a CPU in python
    integers (several rows and all their steps per int)."""
    steps_t = torch.arange(steps, device=seed.device)
    seed = seed.long()[:, None]  # (B, 1)
    if seed.device.type != "cpu":
        return philox_uniform(seed, steps_t[None])
    if len(seed) == 0:
        return torch.zeros(0, steps)
    # Rows in chunks of ~4096 lanes: python's big-int work grows faster than the lanes (64 rows
    # x 1024 steps: 19 ms in one int, 14 ms in chunks).
    rows = max(1, _UNIFORM_LANES // max(steps, 1))
    return torch.cat([_philox_uniform_cpu(seed[i:i + rows], steps_t[None]) for i in range(0, len(seed), rows)])


# The public function validates and resolves the backend (use_backend is a contextvar a compiled
# graph would not see at run time); the op takes it as a string and every setting as a [B]
# tensor, so compile/export see one opaque call whose body is the registry's implementation.
@custom_op("vqim::cfg_sample", mutates_args=())
def _cfg_sample_op(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: torch.Tensor,
                   temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                   seed: torch.Tensor, step: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch("cfg_sample", backend, cond.device)(
        cond, uncond, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        seed=seed, step=step)


@_cfg_sample_op.register_fake
def _(cond, uncond, cfg_scale, temperature, top_k, top_p, min_p, seed, step, backend):
    b = cond.shape[0]
    return cond.new_empty(b, dtype=torch.long), cond.new_empty(b, dtype=torch.float32)
