"""cfg_sample: exact greedy, the sampled distribution, determinism, Triton (interpreter) parity,
the CUDA twin, bad input.

The Triton interpreter runs ~40 ms per row, so Triton tests batch many rows (different steps,
mixed per-row settings) into one call at small V; the large-sample distribution tests run on
the torch reference, which the Triton kernel matches token for token.
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch

from helpers import assert_close, assert_equal
from vqim.kernels import SamplingParams, _ext, cfg_sample, cfg_sample_ref, validate_sampling_params
from vqim.kernels.cfg_sample import _philox_uniform_cpu, philox_uniform, sampling_mask_ref

# -inf logits are legal input; numpy (under the interpreter) warns about the masked NaNs.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def exact_probs(cond, uncond, *, cfg_scale, temperature, top_k, top_p, min_p=0.0) -> torch.Tensor:
    """The target distribution in float64 for one setting, every row: CFG, temperature, the
    top-k/top-p/min-p mask of the definition, renormalized."""
    c = cond.double()
    x = c if uncond is None else uncond.double() + cfg_scale * (c - uncond.double())
    if uncond is not None:
        x = torch.where(c.isfinite() & uncond.isfinite(), x, float("-inf"))
    z = x / temperature  # (B, V)
    b = z.shape[0]
    keep = sampling_mask_ref(z, torch.full((b,), top_k), torch.full((b,), top_p, dtype=torch.float64),
                             torch.full((b,), min_p, dtype=torch.float64))
    w = torch.where(keep, torch.exp(z - z.max(1, keepdim=True).values), 0.0)
    return w / w.sum(1, keepdim=True)


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, str]:
    """Chi-square goodness of fit at level 1e-4 (Wilson-Hilferty quantile); bins with an expected
    count under 5 are pooled. Tokens of probability 0 must never be drawn (checked exactly)."""
    n = int(counts.sum())
    if int(counts[probs == 0].sum()) != 0:
        return False, f"drew a token of probability 0: {(counts * (probs == 0)).nonzero().flatten().tolist()}"
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = counts[big].double(), exp[big]
    small_exp = exp[~big & (probs > 0)].sum()
    if small_exp > 0:
        obs_b = torch.cat([obs_b, counts[~big & (probs > 0)].sum().double().view(1)])
        exp_b = torch.cat([exp_b, small_exp.view(1)])
    df = max(obs_b.numel() - 1, 1)
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum()) if obs_b.numel() > 1 else 0.0
    z = 3.719  # standard normal quantile at 1 - 1e-4
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat <= crit, f"chi2 {stat:.1f} > {crit:.1f} (df {df}, n {n})"


def draw_many(cond_row, uncond_row, n, backend, **kw):
    """n draws of one row's distribution in ONE call: the row repeated with steps 0..n-1."""
    c = cond_row.expand(n, -1)
    u = None if uncond_row is None else uncond_row.expand(n, -1)
    return cfg_sample(c, u, seed=1234, step=torch.arange(n), backend=backend, **kw)


def _logits(v, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, v, generator=g) * 1.5
    uncond = torch.randn(1, v, generator=g) * 1.5
    return cond, uncond


def brute_force_kept(z: list[float], k: int, p: float, min_p: float = 0.0) -> set[int]:
    """The top-k / top-p / min-p definition as a loop, in float64: top-k keeps every finite value
    >= the k-th largest; then, in descending value with ties broken by the lower index (a stable
    sort), a token is kept iff the mass of the tokens before it is < p * total; then, as Hugging
    Face's MinPLogitsWarper on what is left, iff its renormalized probability is >= min_p times
    the largest one."""
    fin = [i for i, x in enumerate(z) if math.isfinite(x)]
    kept_k = fin
    if 0 < k < len(fin):
        kth = sorted((z[i] for i in fin), reverse=True)[k - 1]
        kept_k = [i for i in fin if z[i] >= kth]
    m = max(z[i] for i in kept_k)
    e = {i: math.exp(z[i] - m) for i in kept_k}
    target = p * math.fsum(e.values())
    kept, before = set(), 0.0
    for i in sorted(kept_k, key=lambda i: -z[i]):  # sorted() is stable: equal values by index
        if before < target:
            kept.add(i)
        before += e[i]
    if min_p > 0:
        total = math.fsum(e[i] for i in kept)
        probs = {i: e[i] / total for i in kept}
        top = max(probs.values())
        kept = {i for i in kept if probs[i] >= min_p * top}
    return kept


def check_kept_draws(z: torch.Tensor, k: torch.Tensor, p: torch.Tensor, tok: torch.Tensor, lp: torch.Tensor,
                     min_p: torch.Tensor | None = None) -> None:
    """Each row's token is in the brute-force kept set and its log-probability (which counts the
    kept mass) matches that set: keeping one token more or less of a tie group moves it by at
    least that token's share."""
    for i in range(z.shape[0]):
        zi = z[i].double().cpu()
        kept = sorted(brute_force_kept(zi.tolist(), int(k[i]), float(p[i]), 0.0 if min_p is None else float(min_p[i])))
        t = int(tok[i])
        assert t in kept, f"row {i}: drew {t}, kept {kept[:20]}"
        zk = zi[kept]
        want = float(zi[t] - zk.max() - torch.exp(zk - zk.max()).sum().log())
        assert abs(float(lp[i]) - want) <= 1e-5, f"row {i}: logprob {float(lp[i])} != {want}, kept {kept[:20]}"


def tied_rows(b: int, v: int) -> torch.Tensor:
    """Rows with heavy exact ties: small integers, halves, and bf16-rounded normals."""
    ints = torch.randint(-3, 4, (b // 3, v)).float()
    halves = torch.randint(-6, 7, (b // 3, v)).float() / 2
    bf16 = (torch.randn(b - 2 * (b // 3), v) * 2).bfloat16().float()
    return torch.cat([ints, halves, bf16])


# ------------------------------------------------------------------------------------------------
# temperature = 0: exact argmax
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_exact_argmax_ties_to_lowest(backend, dtype):
    b, v = 9, 97
    cond = torch.randn(b, v).to(dtype)
    uncond = torch.randn(b, v).to(dtype)
    scale = torch.tensor([0.0, 1.0, 3.0, 10.0, 1.5, 2.0, 0.5, 7.0, 3.0])
    # Row 4: two exact maxima (ties -> lowest index); row 5: -inf entries including the max.
    cond[4] = uncond[4] = 0.0
    cond[4, 11] = cond[4, 60] = uncond[4, 11] = uncond[4, 60] = 1.0
    cond[5, :40] = float("-inf")
    x = uncond.double() + scale.double()[:, None] * (cond.double() - uncond.double())
    x = torch.where(cond.isfinite() & uncond.isfinite(), x, float("-inf"))
    expected = x.float().argmax(1)  # first maximal index
    got = cfg_sample(cond, uncond, cfg_scale=scale, temperature=0.0, seed=0, step=3, backend=backend)
    assert_equal(got, expected)
    assert int(got[4]) == 11
    assert int(got[5]) >= 40


# ------------------------------------------------------------------------------------------------
# Distribution
# ------------------------------------------------------------------------------------------------

_DIST_CASES = {
    # name: (cfg_scale, temperature, top_k, top_p, logits modifier)
    "plain_s1": (1.0, 1.0, 0, 1.0, None),
    "s0_uncond_only": (0.0, 1.0, 0, 1.0, None),
    "s3_temp07_k5": (3.0, 0.7, 5, 1.0, None),
    "s10_temp3": (10.0, 3.0, 0, 1.0, None),
    "k1": (3.0, 1.0, 1, 1.0, None),
    "k_ge_V": (3.0, 1.0, 1000, 1.0, None),
    "tiny_p": (3.0, 1.0, 0, 1e-6, None),
    "p0.6": (3.0, 1.5, 0, 0.6, None),
    "k8_p0.9": (1.0, 1.0, 8, 0.9, None),
    "ties_at_k": (1.0, 1.0, 3, 1.0, "ties"),
    "ties_at_p": (1.0, 1.0, 0, 0.5, "ties"),
    "neg_inf": (3.0, 1.0, 0, 0.95, "neginf"),
}


def _case_logits(mod, v):
    cond, uncond = _logits(v, seed=7)
    if mod == "ties":
        # Values 3 > 2 = 2 = 2 > 1 ...: the tie group straddles k = 3 (all three kept) and, with
        # equal cond and uncond, p = 0.5 (the mass before index 17 is past p: 2 and 9 are kept).
        cond = torch.zeros(1, v)
        cond[0, 5], cond[0, [2, 9, 17]], cond[0, 20:26] = 3.0, 2.0, 1.0
        uncond = cond.clone()
    elif mod == "neginf":
        cond[0, ::3] = float("-inf")
        uncond[0, 1::5] = float("-inf")
    return cond, uncond


@pytest.mark.parametrize("case", sorted(_DIST_CASES))
def test_reference_distribution(case):
    s, t, k, p, mod = _DIST_CASES[case]
    v, n = 24, 20000
    cond, uncond = _case_logits(mod, v)
    probs = exact_probs(cond, uncond, cfg_scale=s, temperature=t, top_k=k, top_p=p)[0]
    tok = draw_many(cond, uncond, n, "torch", cfg_scale=s, temperature=t, top_k=k, top_p=p)
    counts = torch.bincount(tok, minlength=v)
    ok, msg = chi_square_ok(counts, probs)
    assert ok, f"{case}: {msg}"
    if mod == "ties":
        kept = (probs > 0).nonzero().flatten().tolist()
        # Top-k keeps the whole tie group; top-p only the lowest indices of it that it needs.
        assert kept == ([2, 5, 9, 17] if case == "ties_at_k" else [2, 5, 9]), kept


@pytest.mark.parametrize("case", ["s3_temp07_k5", "p0.6", "ties_at_k"])
def test_triton_distribution(case):
    """Fewer draws through the interpreter; the same chi-square bound derived from n."""
    s, t, k, p, mod = _DIST_CASES[case]
    v, n = 24, 384
    cond, uncond = _case_logits(mod, v)
    probs = exact_probs(cond, uncond, cfg_scale=s, temperature=t, top_k=k, top_p=p)[0]
    tok = draw_many(cond, uncond, n, "triton", cfg_scale=s, temperature=t, top_k=k, top_p=p)
    ok, msg = chi_square_ok(torch.bincount(tok, minlength=v), probs)
    assert ok, f"{case}: {msg}"


def test_sampling_mask_matches_definition():
    """sampling_mask_ref against the brute-force loop on random rows with heavy ties and masked
    entries, every top-k/top-p/min-p mix."""
    b, v = 96, 30
    z = tied_rows(b, v)
    z[::5, ::4] = float("-inf")
    k = torch.randint(0, v + 3, (b,))
    k[::2] = 0
    p = torch.rand(b).clamp_min(1e-3)
    p[::7] = 1.0
    mp = torch.rand(b)
    mp[::3] = 0.0
    keep = sampling_mask_ref(z, k, p, mp)
    for i in range(b):
        expected = torch.zeros(v, dtype=torch.bool)
        expected[list(brute_force_kept(z[i].tolist(), int(k[i]), float(p[i]), float(mp[i])))] = True
        assert_equal(keep[i], expected,
                     msg=f"row {i} k={int(k[i])} p={float(p[i]):.4f} min_p={float(mp[i]):.4f} z={z[i].tolist()}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_p_tie_group_keeps_smallest_set(backend):
    """Hugging Face's example: the top token, then six equal tokens, with p reached by the third
    of them. The smallest set reaching p is the top token and the three lowest-index tied ones
    (P(top) 0.475 after renormalizing), not the whole tie group (0.312)."""
    z = torch.full((12,), -3.0)
    z[3] = 1.0
    ties = [0, 1, 2, 4, 5, 6]
    z[ties] = 0.0
    w = torch.exp(z.double() - 1)
    p = float((w[3] + 2.5 * w[0]) / w.sum())  # between top + 2 ties and top + 3 ties
    assert brute_force_kept(z.tolist(), 0, p) == {0, 1, 2, 3}
    n = 96
    tok, lp = cfg_sample(z.expand(n, -1), None, cfg_scale=1.0, top_p=p, seed=5, step=torch.arange(n),
                         backend=backend, return_logprob=True)
    assert set(tok.tolist()) <= {0, 1, 2, 3} and 3 in tok.tolist()
    p_top = 1 / (1 + 3 * math.exp(-1))  # 0.4754
    assert_close(lp[tok == 3], torch.full_like(lp[tok == 3], math.log(p_top)), atol=1e-5)
    assert_close(lp[tok != 3], torch.full_like(lp[tok != 3], math.log(p_top * math.exp(-1))), atol=1e-5)


@pytest.mark.parametrize("backend,block", [("torch", None), ("triton", None), ("triton", 16)])
def test_kept_set_with_heavy_ties_matches_brute_force(backend, block):
    """Draws and log-probabilities against the brute-force kept set, every top-k/top-p mix.
    block=16 streams the row through Triton in 3 blocks, so tie groups span blocks."""
    from vqim.kernels.cfg_sample import _cfg_sample_torch, _cfg_sample_triton, _row_params

    b, v = 48, 37
    z = tied_rows(b, v)
    z[5::6, 1::4] = float("-inf")
    k = torch.randint(0, v + 3, (b,))
    k[::2] = 0
    p = torch.rand(b).clamp_min(1e-3)
    prm = _row_params(b, z.device, cfg_scale=1.0, temperature=1.0, top_k=k, top_p=p,
                      seed=torch.randint(0, 2**62, (b,)), step=torch.arange(b))
    if backend == "triton":
        tok, lp = _cfg_sample_triton(z, None, block=block, **prm)
    else:
        tok, lp = _cfg_sample_torch(z, None, **prm)
    check_kept_draws(z, k, p, tok, lp)


# ------------------------------------------------------------------------------------------------
# min_p
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,block", [("torch", None), ("triton", None), ("triton", 16)])
def test_min_p_with_top_k_and_top_p_matches_brute_force(backend, block):
    """Draws and log-probabilities against Hugging Face's definition (brute_force_kept: min-p on
    the renormalized top-k/top-p survivors), with min_p alone and with top-k and top-p, on rows
    with heavy ties and masked entries."""
    from vqim.kernels.cfg_sample import _cfg_sample_torch, _cfg_sample_triton, _row_params

    b, v = 48, 37
    z = tied_rows(b, v) * 1.5  # steps of 0.75 and 1.5: ratios exp(-0.75) ... spread over (0, 1]
    z[5::6, 1::4] = float("-inf")
    k = torch.randint(0, v + 3, (b,))
    k[::3] = 0
    p = torch.rand(b).clamp_min(1e-3)
    p[1::3] = 1.0
    mp = torch.rand(b)
    mp[::4] = 1.0  # only the top value's tie group
    mp[2::8] = 0.0
    prm = _row_params(b, z.device, cfg_scale=1.0, temperature=1.0, top_k=k, top_p=p, min_p=mp,
                      seed=torch.randint(0, 2**62, (b,)), step=torch.arange(b))
    if backend == "triton":
        tok, lp = _cfg_sample_triton(z, None, block=block, **prm)
    else:
        tok, lp = _cfg_sample_torch(z, None, **prm)
    check_kept_draws(z, k, p, tok, lp, mp)


def test_min_p_distribution():
    """min_p = 0.2 keeps the tokens of probability >= 0.2 * the top one's (after temperature),
    drawn in proportion: chi-square against the float64 definition."""
    v, n = 24, 20000
    cond, uncond = _logits(v, seed=3)
    kw = dict(cfg_scale=2.0, temperature=0.8, top_k=0, top_p=1.0, min_p=0.2)
    probs = exact_probs(cond, uncond, **kw)[0]
    x = uncond.double() + 2.0 * (cond.double() - uncond.double())
    ratio = torch.exp((x - x.max()) / 0.8)[0]
    assert_equal(probs > 0, ratio >= 0.2)
    assert 2 < int((probs > 0).sum()) < v
    ok, msg = chi_square_ok(torch.bincount(draw_many(cond, uncond, n, "torch", **kw), minlength=v), probs)
    assert ok, msg


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_min_p_zero_is_off_and_one_is_greedy(backend):
    """min_p = 0 draws exactly what no min_p draws; min_p = 1 keeps only the top token, so the
    draw is the argmax (no ties here) and its log-probability 0."""
    b, v = 8, 40
    cond, uncond = torch.randn(b, v) * 2, torch.randn(b, v) * 2
    kw = dict(cfg_scale=3.0, temperature=1.3, top_k=torch.tensor([0, 5] * 4), top_p=torch.tensor([1.0, 0.7] * 4),
              seed=9, step=torch.arange(b), backend=backend)
    assert_equal(cfg_sample(cond, uncond, min_p=0.0, **kw), cfg_sample(cond, uncond, **kw))
    tok, lp = cfg_sample(cond, uncond, min_p=1.0, return_logprob=True, **kw)
    assert_equal(tok, cfg_sample(cond, uncond, **{**kw, "temperature": 0.0}))
    assert_close(lp, torch.zeros(b), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Randomness and determinism
# ------------------------------------------------------------------------------------------------

def test_philox_matches_known_words_and_is_uniform():
    # Philox4x32-10 known-answer: key (0, 0), counter (0, 0, 0, 0) -> first word 0x6627e8d5
    # (Random123's kat_vectors); the uniform keeps its top 24 bits.
    u = philox_uniform(torch.tensor([0]), torch.tensor([0]))
    assert float(u[0]) == (0x6627E8D5 >> 8) * 2.0**-24
    us = philox_uniform(torch.tensor(99), torch.arange(20000))
    assert 0.0 <= float(us.min()) and float(us.max()) < 1.0
    hist = torch.histc(us, bins=10, min=0, max=1)
    ok, msg = chi_square_ok(hist.long(), torch.full((10,), 0.1, dtype=torch.float64))
    assert ok, msg


def test_cpu_philox_matches_the_reference_words():
    g = torch.Generator().manual_seed(3)
    seed = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1]), torch.randint(0, 2**62, (200,), generator=g)])
    step = torch.cat([torch.tensor([2**63 - 1, 0, 2**32, 7, 2**32 - 1]), torch.randint(0, 2**62, (200,), generator=g)])
    assert_equal(_philox_uniform_cpu(seed, step), philox_uniform(seed, step))
    assert_equal(_philox_uniform_cpu(torch.tensor(5), torch.arange(9)), philox_uniform(torch.tensor(5), torch.arange(9)))


CPU_GRID = [dict(), dict(cfg_scale=1.5, temperature=0.5), dict(cfg_scale=-2.0, temperature=3.0),
            dict(cfg_scale=0.0), dict(temperature=0.0, cfg_scale=2.0), dict(top_k=5, temperature=0.7),
            dict(top_p=0.8), dict(min_p=0.1, temperature=2.0), dict(top_k=3, top_p=0.5, min_p=0.05),
            dict(cfg_scale=1e30, temperature=1.2e-38), dict(temperature=1.2e-38)]


@pytest.mark.parametrize("b,v", [(1, 7), (3, 2048), (16, 2049), (5, 97)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_path_draws_the_reference_tokens(b, v, dtype):
    """The torch backend's CPU path (what the engine samples with on a CPU, a third of the
    reference's ops) gives the reference's tokens and log-probabilities exactly: guided and not,
    greedy and sampled, each filter on and off, settings that overflow, masked tokens, a row with
    no finite logit, rows of other settings in the same call, seeds and steps up to 2^63 - 1."""
    g = torch.Generator().manual_seed(b * 10007 + v)
    seed = torch.randint(0, 2**63 - 1, (b,), generator=g)
    seed[0] = 2**63 - 1
    step = torch.randint(0, 2**40, (b,), generator=g)
    for guided in (True, False):
        for kw in CPU_GRID:
            cond = (torch.randn(b, v, generator=g) * 3).to(dtype)
            uncond = (torch.randn(b, v, generator=g) * 3).to(dtype) if guided else None
            cond[0, v // 2] = float("-inf")
            if guided and b > 1:
                uncond[1, 0] = float("-inf")
            if b > 2:
                cond[2] = float("-inf")  # no finite logit: -1
            want, want_lp = cfg_sample_ref(cond, uncond, seed=seed, step=step, validate=False, return_logprob=True,
                                           **kw)
            got, got_lp = cfg_sample(cond, uncond, seed=seed, step=step, validate=False, return_logprob=True,
                                     backend="torch", **kw)
            assert_equal(got, want, msg=f"{kw} guided={guided}")
            assert torch.equal(got_lp.isnan(), want_lp.isnan()), kw
            assert_equal(got_lp.nan_to_num(), want_lp.nan_to_num(), msg=f"logprob {kw}")
    # Per-row settings: rows that filter beside rows that do not, in one call.
    rows = [SamplingParams(**CPU_GRID[i % len(CPU_GRID)]) for i in range(b)]
    per_row = SamplingParams.rows(rows, torch.device("cpu"))
    cond, uncond = torch.randn(b, v, generator=g).to(dtype), torch.randn(b, v, generator=g).to(dtype)
    assert_equal(cfg_sample(cond, uncond, seed=seed, step=step, backend="torch", validate=False, **per_row),
                 cfg_sample_ref(cond, uncond, seed=seed, step=step, validate=False, **per_row))


@pytest.mark.parametrize("v", [37, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_ties_filters_and_greedy_rows_draw_the_reference_tokens(v, dtype):
    """The CPU path's top-k, min-p and greedy rows (no sort) on rows with heavy exact ties and
    masked entries: k at the tie groups, past the finite count and past V, min-p at the top
    value, greedy rows beside sampled ones, guided and not; the reference's tokens and
    log-probabilities exactly."""
    b = 48
    g = torch.Generator().manual_seed(v)
    torch.manual_seed(v)  # tied_rows draws from the global generator
    k = torch.randint(0, v + 3, (b,), generator=g)
    k[::4] = 0
    k[1::8] = v + 5
    k[3::8] = 1
    mp = torch.rand(b, generator=g)
    mp[::3] = 0.0
    mp[1::6] = 1.0
    t = torch.rand(b, generator=g) * 2 + 0.1
    t[::5] = 0.0
    seed = torch.randint(0, 2**63 - 1, (b,), generator=g)
    step = torch.randint(0, 2**40, (b,), generator=g)
    for guided in (False, True):
        cond = tied_rows(b, v).to(dtype)
        cond[5::6, 1::4] = float("-inf")
        uncond = tied_rows(b, v).to(dtype) if guided else None
        kw = dict(cfg_scale=torch.linspace(-1, 4, b), temperature=t, top_k=k, min_p=mp)
        want, want_lp = cfg_sample_ref(cond, uncond, seed=seed, step=step, validate=False, return_logprob=True, **kw)
        got, got_lp = cfg_sample(cond, uncond, seed=seed, step=step, validate=False, return_logprob=True,
                                 backend="torch", **kw)
        assert_equal(got, want, msg=f"guided={guided}")
        assert_equal(got_lp.nan_to_num(), want_lp.nan_to_num(), msg=f"logprob guided={guided}")


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.0), dict(top_k=5), dict(min_p=0.2),
                                dict(top_k=3, min_p=0.5, temperature=0.7)])
def test_cpu_path_samples_without_the_reference(kw, monkeypatch):
    """Without top-p and with a finite logit in every row, the CPU path never falls back to the
    reference (the grids above test its tokens; this, that they test the fast path)."""
    cs = importlib.import_module("vqim.kernels.cfg_sample")  # the package exports the function cfg_sample

    def fail(*args, **kwargs):
        raise AssertionError("the CPU path ran the reference")

    monkeypatch.setattr(cs, "_kept_weights", fail)
    cond, uncond = torch.randn(16, 2048) * 3, torch.randn(16, 2048) * 3
    cfg_sample(cond, uncond, seed=torch.arange(16), step=7, backend="torch", validate=False, **kw)
    with pytest.raises(AssertionError, match="ran the reference"):
        cfg_sample(cond, uncond, seed=0, step=7, backend="torch", validate=False, top_p=0.9, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_seed_step_same_token_across_batch_layouts(backend):
    b, v = 12, 61
    cond = torch.randn(b, v) * 2
    uncond = torch.randn(b, v) * 2
    seed = torch.randint(0, 2**40, (b,))
    step = torch.randint(0, 5000, (b,))
    kw = dict(cfg_scale=torch.linspace(0, 6, b), temperature=torch.linspace(0.5, 2, b),
              top_k=torch.tensor([0, 3, 10, 0] * 3), top_p=torch.tensor([1.0, 0.9, 0.5] * 4))
    full = cfg_sample(cond, uncond, seed=seed, step=step, backend=backend, **kw)
    again = cfg_sample(cond, uncond, seed=seed, step=step, backend=backend, **kw)
    assert_equal(again, full)
    perm = torch.randperm(b)
    permuted = cfg_sample(cond[perm], uncond[perm], seed=seed[perm], step=step[perm], backend=backend,
                          **{name: t[perm] for name, t in kw.items()})
    assert_equal(permuted, full[perm])
    for i in (0, 5):  # alone, in a batch of one, with python scalars
        one = cfg_sample(cond[i:i + 1], uncond[i:i + 1], seed=int(seed[i]), step=int(step[i]), backend=backend,
                         **{name: t[i].item() for name, t in kw.items()})
        assert int(one[0]) == int(full[i])


# ------------------------------------------------------------------------------------------------
# Triton kernel parity (interpreter): registers path and streamed path, mixed per-row settings
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 32])
def test_triton_matches_reference(dtype, block):
    from vqim.kernels.cfg_sample import _cfg_sample_torch, _cfg_sample_triton, _row_params

    b, v = 24, 111  # v not a multiple of the streamed block
    base = torch.randn(b, 2 * v) * 2
    cond = base[:, ::2].to(dtype)  # non-contiguous view
    uncond = (torch.randn(v, b) * 2).to(dtype).T  # column-major
    cond[3, :50] = float("-inf")
    uncond[4, 7::3] = float("-inf")
    cond[5] = torch.where(torch.arange(v) % 2 == 0, 1.0, -1.0).to(dtype)  # heavy ties
    prm = _row_params(
        b, cond.device,
        cfg_scale=torch.tensor([0.0, 1.0, 3.0, 10.0] * 6),
        temperature=torch.tensor([1.0, 0.7, 2.0, 0.0, 1.0, 1.3] * 4),
        top_k=torch.tensor([0, 1, 5, 0, 200, 40, 3, 0] * 3),
        top_p=torch.tensor([1.0, 0.9, 1e-6, 0.5, 1.0, 0.3] * 4),
        seed=torch.randint(0, 2**62, (b,)), step=torch.randint(0, 2**40, (b,)),
    )
    want_tok, want_lp = _cfg_sample_torch(cond, uncond, **prm)
    got_tok, got_lp = _cfg_sample_triton(cond, uncond, block=block, **prm)
    assert_equal(got_tok, want_tok)
    assert_close(got_lp, want_lp, atol=1e-5, rtol=1e-5)


def test_triton_no_guidance_and_all_masked_row():
    b, v = 4, 50
    cond = torch.randn(b, v)
    cond[2] = float("-inf")
    tok, lp = cfg_sample(cond, None, cfg_scale=5.0, top_k=4, seed=3, step=1, backend="triton",
                         return_logprob=True, validate=False)
    want, want_lp = cfg_sample(cond, None, cfg_scale=5.0, top_k=4, seed=3, step=1, backend="torch",
                               return_logprob=True, validate=False)
    assert_equal(tok, want)
    assert int(tok[2]) == -1 and math.isnan(float(lp[2]))
    assert_close(lp[[0, 1, 3]], want_lp[[0, 1, 3]], atol=1e-5)
    with pytest.raises(ValueError, match="no finite guided logit"):
        cfg_sample(cond, None, cfg_scale=5.0, seed=3, step=1, backend="triton")


def test_logprob_is_log_of_target_probability():
    v = 16
    cond, uncond = _logits(v, seed=3)
    kw = dict(cfg_scale=3.0, temperature=0.8, top_k=6, top_p=0.9)
    probs = exact_probs(cond, uncond, **kw)[0]
    tok, lp = cfg_sample(cond.expand(50, -1), uncond.expand(50, -1), seed=5, step=torch.arange(50),
                         return_logprob=True, **kw)
    assert_close(lp, probs[tok].log().float(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The CUDA twin
# ------------------------------------------------------------------------------------------------

def test_compiled_module_exposes_cfg_sample():
    if not _ext.available():
        pytest.skip("vqim.kernels._C is not built (no nvcc here)")
    C = _ext.load()
    assert "cfg_sample" in C.ops
    assert callable(C.cfg_sample)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("v", [8192, 65536 + 3])
def test_gpu_parity_with_reference(backend, v):
    b = 64
    dev = torch.device("cuda")
    cond = (torch.randn(b, v, device=dev) * 3).bfloat16()
    uncond = (torch.randn(b, v, device=dev) * 3).bfloat16()
    cond[1, ::7] = float("-inf")
    kw = dict(cfg_scale=torch.linspace(0, 10, b, device=dev), temperature=torch.linspace(0, 2, b, device=dev),
              top_k=torch.tensor([0, 1, 50, 5000] * (b // 4), device=dev),
              top_p=torch.tensor([1.0, 0.95, 0.5, 1e-4] * (b // 4), device=dev),
              min_p=torch.tensor([0.0, 0.0, 0.05, 0.3, 0.0, 1e-3, 0.6, 1.0] * (b // 8), device=dev),
              seed=torch.randint(0, 2**62, (b,), device=dev), step=torch.arange(b, device=dev))
    want, want_lp = cfg_sample(cond, uncond, backend="torch", return_logprob=True, **kw)
    got, got_lp = cfg_sample(cond, uncond, backend=backend, return_logprob=True, **kw)
    # Rounding (fast exp, summation order) may move a draw across a CDF boundary: rare.
    agree = (got == want).float().mean().item()
    assert agree >= 0.95, f"{backend} agrees with the reference on {agree:.1%} of rows"
    same = got == want
    assert_close(got_lp[same], want_lp[same], atol=1e-3, rtol=1e-3)
    assert_equal(cfg_sample(cond, uncond, backend=backend, **kw), got)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("v", [37, 8192, 20011])  # 20011: streamed (Triton) and uncached (CUDA) rows
def test_gpu_kept_set_with_heavy_ties_matches_brute_force(backend, v):
    b = 48
    z = tied_rows(b, v).cuda()
    k = torch.randint(0, v + 3, (b,))
    k[::2] = 0
    p = torch.rand(b).clamp_min(1e-3)
    mp = torch.rand(b)
    mp[::2] = 0.0
    tok, lp = cfg_sample(z, None, cfg_scale=1.0, top_k=k.cuda(), top_p=p.cuda(), min_p=mp.cuda(), seed=7,
                         step=torch.arange(b).cuda(), backend=backend, return_logprob=True)
    check_kept_draws(z, k, p, tok.cpu(), lp.cpu(), mp)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

_F32 = torch.finfo(torch.float32)
_CFG_SCALE_RANGE = re.escape(f"cfg_scale must be finite as float32 (|cfg_scale| <= {_F32.max!r})")
_TEMPERATURE_RANGE = re.escape(f"temperature must be 0 (greedy) or a normal float32 in [{_F32.tiny!r}, {_F32.max!r}]")


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=float("nan")), "top_p must not be NaN"),
    (dict(top_k=-1), "top_k must be in \\[0"),
    (dict(top_k=2.5), "top_k must be an int"),
    (dict(temperature=-0.1), _TEMPERATURE_RANGE),
    (dict(temperature=float("inf")), _TEMPERATURE_RANGE),
    (dict(cfg_scale=float("nan")), "cfg_scale must not be NaN"),
    # Past fp32 (the sampling math's dtype): would overflow to inf and mask every token.
    (dict(cfg_scale=1e39), _CFG_SCALE_RANGE),
    (dict(cfg_scale=-1e300), _CFG_SCALE_RANGE),
    (dict(cfg_scale=float("inf")), _CFG_SCALE_RANGE),
    (dict(temperature=1e-39), _TEMPERATURE_RANGE),  # subnormal in fp32
    (dict(temperature=1e-300), _TEMPERATURE_RANGE),  # 0 in fp32, yet not greedy
    (dict(temperature=1e39), _TEMPERATURE_RANGE),
    (dict(cfg_scale=torch.tensor([1.0, 1e39, 1.0], dtype=torch.float64)), _CFG_SCALE_RANGE),
    (dict(temperature=torch.tensor([1.0, 1e-39, 0.0], dtype=torch.float64)), _TEMPERATURE_RANGE),
    (dict(temperature=torch.tensor([1.0, 1e-39, 0.0])), _TEMPERATURE_RANGE),  # fp32 subnormal
    (dict(seed=-1), "seed must be in \\[0"),
    (dict(step=-3), "step must be in \\[0"),
    (dict(top_p=torch.tensor([0.5, 0.0, 1.0])), "top_p must be in \\(0, 1\\]"),
    (dict(temperature=torch.tensor([1.0, float("nan"), 1.0])), "temperature must not be NaN"),
    (dict(top_k=torch.tensor([0, -2, 1])), "top_k must be in \\[0"),
    (dict(top_k=torch.tensor([0.5, 1.0, 1.0])), "top_k must be an integer tensor"),
    (dict(cfg_scale=torch.ones(4)), "cfg_scale must be a scalar, a 0-d tensor or a tensor of shape \\[B\\]"),
    (dict(min_p=-0.1), "min_p must be in \\[0, 1\\]"),
    (dict(min_p=1.5), "min_p must be in \\[0, 1\\]"),
    (dict(min_p=float("nan")), "min_p must not be NaN"),
    (dict(min_p=torch.tensor([0.0, 2.0, 0.1])), "min_p must be in \\[0, 1\\]"),
])
def test_bad_parameters_raise(kw, match):
    cond, uncond = torch.randn(3, 10), torch.randn(3, 10)
    args = dict(cfg_scale=2.0, seed=0, step=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        cfg_sample(cond, uncond, **args)
    # The once-per-request helper the engine calls gives the same errors.
    with pytest.raises(ValueError, match=match):
        validate_sampling_params(batch=3, **kw)


@pytest.mark.parametrize("kw", [
    dict(cfg_scale=_F32.max), dict(cfg_scale=-_F32.max), dict(temperature=_F32.tiny), dict(temperature=_F32.max),
    dict(temperature=0.0), dict(temperature=-0.0),
    dict(cfg_scale=torch.tensor([_F32.max, -_F32.max, 0.0])), dict(temperature=torch.tensor([0.0, _F32.tiny, _F32.max])),
])
def test_extreme_valid_parameters_pass(kw):
    args = dict(cfg_scale=2.0, seed=0, step=0)
    args.update(kw)
    validate_sampling_params(batch=3, **kw)
    cfg_sample(torch.randn(3, 10), torch.randn(3, 10), validate=False, **args)


def test_bad_logits_raise():
    with pytest.raises(ValueError, match="cond_logits must be a 2-D tensor"):
        cfg_sample(torch.randn(10), None, cfg_scale=1.0, seed=0, step=0)
    with pytest.raises(ValueError, match="uncond_logits must be None or a tensor of cond_logits' shape"):
        cfg_sample(torch.randn(2, 10), torch.randn(2, 9), cfg_scale=1.0, seed=0, step=0)
    with pytest.raises(ValueError, match="cond_logits must be float32, float16 or bfloat16"):
        cfg_sample(torch.zeros(2, 10, dtype=torch.long), None, cfg_scale=1.0, seed=0, step=0)
    bad = torch.randn(2, 10)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="must not contain NaN or \\+inf"):
        cfg_sample(bad, None, cfg_scale=1.0, seed=0, step=0)
    with pytest.raises(ValueError, match="no finite guided logit"):
        cfg_sample(torch.full((2, 10), float("-inf")), None, cfg_scale=1.0, seed=0, step=0)
    # validate=False skips the synced checks: the masked row is marked -1 instead.
    tok = cfg_sample(torch.full((2, 10), float("-inf")), None, cfg_scale=1.0, seed=0, step=0, validate=False)
    assert tok.tolist() == [-1, -1]


def test_reference_function_is_the_torch_backend():
    cond, uncond = torch.randn(5, 33), torch.randn(5, 33)
    kw = dict(cfg_scale=2.0, temperature=0.9, top_k=7, top_p=0.8, seed=11, step=torch.arange(5))
    assert_equal(cfg_sample_ref(cond, uncond, **kw), cfg_sample(cond, uncond, backend="torch", **kw))


# ------------------------------------------------------------------------------------------------
# SamplingParams: the one definition of the settings
# ------------------------------------------------------------------------------------------------

def test_sampling_params_define_defaults_json_flags_and_rows():
    import argparse
    import dataclasses

    fields = dataclasses.fields(SamplingParams)
    assert SamplingParams().to_dict() == {f.name: f.default for f in fields}
    assert SamplingParams.from_dict({"top_k": 3}, "g.json") == SamplingParams(top_k=3)
    assert SamplingParams(top_k=3).updated(top_k=None, temperature=0.5) == SamplingParams(top_k=3, temperature=0.5)
    with pytest.raises(ValueError, match="g.json: top_p must be in \\(0, 1\\]"):
        SamplingParams.from_dict({"top_p": 2.0}, "g.json")
    with pytest.raises(ValueError, match="g.json: must be a JSON object with keys among"):
        SamplingParams.from_dict({"topk": 1}, "g.json")
    with pytest.raises(ValueError, match="g.json: must be a JSON object"):
        SamplingParams.from_dict([1], "g.json")
    # One flag per field, typed and with the field's help text; not given -> not in given().
    ap = argparse.ArgumentParser()
    SamplingParams.add_arguments(ap, "default {default}")
    for f in fields:
        action = ap._option_string_actions["--" + f.name.replace("_", "-")]
        assert action.dest == f.name and action.default is None
        assert action.help == f"{f.metadata['help']}; default {f.default}"
    assert SamplingParams.given(ap.parse_args([])) == {}
    assert SamplingParams.given(ap.parse_args(["--top-k", "5", "--cfg", "2"])) == {"top_k": 5, "cfg_scale": 2.0}
    # Per-row tensors, in the dtypes the kernels read.
    rows = SamplingParams.rows([SamplingParams(top_k=2), SamplingParams(temperature=0.5)], torch.device("cpu"))
    assert set(rows) == {f.name for f in fields}
    assert rows["top_k"].dtype == torch.int64 and rows["top_k"].tolist() == [2, 0]
    assert rows["temperature"].dtype == torch.float32 and rows["temperature"].tolist() == [1.0, 0.5]


def test_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match="unknown sampling settings \\['topk'\\]"):
        cfg_sample(torch.randn(2, 10), None, seed=0, step=0, topk=3)
    with pytest.raises(TypeError, match="unknown sampling parameter 'topk'"):
        validate_sampling_params(topk=3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cfg_sample_rows_draws_cfg_samples_tokens(backend):
    """The engine's per-step entry (checked rows in, no checks) draws cfg_sample's tokens: rows
    of SamplingParams.rows with every filter, greedy rows and a row with no finite logit (-1),
    guided and not, on the device's default backend and under use_backend."""
    from vqim.kernels import cfg_sample_rows, use_backend

    b, v = 12, 61
    g = torch.Generator().manual_seed(3)
    params = [SamplingParams(cfg_scale=1.0 + i / 4, temperature=(0.0 if i % 5 == 0 else 0.3 + i / 10),
                             top_k=(0, 3, 70)[i % 3], top_p=(1.0, 0.8)[i % 2], min_p=(0.0, 0.1, 0.0)[i % 3])
              for i in range(b)]
    settings = SamplingParams.rows(params, torch.device("cpu"))
    seed = torch.randint(0, 2**63 - 1, (b,), generator=g)
    step = torch.randint(0, 2**40, (b,), generator=g)
    for guided in (False, True):
        cond = torch.randn(b, v, generator=g) * 3
        cond[4] = float("-inf")
        uncond = torch.randn(b, v, generator=g) * 3 if guided else None
        with use_backend(backend):
            want = cfg_sample(cond, uncond, seed=seed, step=step, validate=False, **settings)
            got = cfg_sample_rows(cond, uncond, settings, seed, step)
        assert_equal(got, want, msg=f"guided={guided}")
        assert int(got[4]) == -1


def test_sampling_uniforms_are_the_philox_words_of_every_token():
    from vqim.kernels import sampling_uniforms

    g = torch.Generator().manual_seed(11)
    seed = torch.cat([torch.tensor([0, 2**32 - 1, 2**32, 2**63 - 1]), torch.randint(0, 2**62, (5,), generator=g)])
    # 9 rows of up to 256 steps: one chunk of lanes; of 1000: chunks of 4, 4 and 1 rows; of 5000:
    # a chunk per row.
    for rows, steps in ((seed, 1), (seed, 7), (seed, 256), (seed, 1000), (seed[:3], 5000), (seed[:0], 7)):
        got = sampling_uniforms(rows, steps)
        assert got.shape == (len(rows), steps) and got.dtype == torch.float32
        assert_equal(got, philox_uniform(rows[:, None], torch.arange(steps)[None]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_sample_rows_with_the_callers_uniforms_draws_the_same_tokens(backend, dtype, monkeypatch):
    """Given the rows' uniforms (what the engine's CPU runner draws once per image), the CPU path
    skips drawing them and draws cfg_sample's tokens: every filter, greedy rows, masked tokens
    in cond and in uncond (the guided mask folded into the row maximum's finiteness), a row with
    no finite logit, overflowing settings; the caller's logits are left as they were. And it does
    use them: all-zero uniforms draw each row's first kept token."""
    from vqim.kernels import cfg_sample_rows, use_backend

    cs = importlib.import_module("vqim.kernels.cfg_sample")
    b, v = 14, 67
    g = torch.Generator().manual_seed(5)
    grid = CPU_GRID + [dict(top_k=4), dict(min_p=0.3)]
    params = [SamplingParams(**{**grid[i % len(grid)], **({"cfg_scale": 1.0} if i == 9 else {})}) for i in range(b)]
    settings = SamplingParams.rows(params, torch.device("cpu"))
    seed = torch.randint(0, 2**63 - 1, (b,), generator=g)
    step = torch.randint(0, 2**40, (b,), generator=g)
    uniforms = philox_uniform(seed, step)
    for guided in (False, True):
        for masked in (False, True):
            cond = (torch.randn(b, v, generator=g) * 3).to(dtype)
            uncond = (torch.randn(b, v, generator=g) * 3).to(dtype) if guided else None
            if masked:
                cond[0, 3] = float("-inf")
                cond[4] = float("-inf")  # no finite logit: -1
                cond[6, 10] = float("nan")
                if guided:
                    uncond[1, 5] = float("-inf")
            before = (cond.clone(), None if uncond is None else uncond.clone())
            with use_backend(backend):
                want = cfg_sample(cond, uncond, seed=seed, step=step, validate=False, **settings)
                with monkeypatch.context() as m:
                    if backend == "torch":
                        m.setattr(cs, "_philox_uniform_cpu", lambda *a: (_ for _ in ()).throw(
                            AssertionError("drew the uniforms it was given")))
                    with torch.no_grad():  # as the engine samples (grad on, the op runs and draws its own)
                        got = cfg_sample_rows(cond, uncond, settings, seed, step, uniforms=uniforms)
            assert_equal(got, want, msg=f"guided={guided} masked={masked}")
            torch.testing.assert_close(cond, before[0], rtol=0, atol=0, equal_nan=True)
            if guided:
                torch.testing.assert_close(uncond, before[1], rtol=0, atol=0, equal_nan=True)
            if masked:
                assert int(got[4]) == -1
    if backend == "torch":
        cond = torch.randn(b, v, generator=g)
        cond[:, 0] = float("-inf")
        plain = SamplingParams.rows([SamplingParams(temperature=0.9)] * b, torch.device("cpu"))
        with torch.no_grad():
            first = cfg_sample_rows(cond, None, plain, seed, step, uniforms=torch.zeros(b))
        assert_equal(first, torch.ones(b, dtype=torch.long))


@pytest.mark.parametrize("rows", [
    [dict()] * 3,  # every temperature 1: no division
    [dict(cfg_scale=1.5, temperature=0.5)] * 2,
    [dict(temperature=0.0, cfg_scale=2.0), dict(top_k=5, temperature=0.7), dict(min_p=0.1, temperature=2.0)],
    [dict(top_p=0.8), dict()],  # top-p: the reference
    CPU_GRID,
])
def test_cfg_sample_rows_with_a_plan_draws_the_same_tokens(rows, monkeypatch):
    """The plan of the rows' settings (the decode loop makes it once per join) gives the tokens
    of cfg_sample, and so does a plan of more rows (the runner's padding slots at the defaults,
    or rows of other settings); a call given one reads no setting on the host. A plan that
    lies (no division where the temperatures are not 1) would change the tokens: checked."""
    from vqim.kernels import cfg_sample_rows, rows_plan

    cs = importlib.import_module("vqim.kernels.cfg_sample")
    g = torch.Generator().manual_seed(7)
    b, v = len(rows), 211
    settings = SamplingParams.rows([SamplingParams(**r) for r in rows], torch.device("cpu"))
    more = SamplingParams.rows([SamplingParams(**r) for r in rows] + [SamplingParams(top_k=2, temperature=0.0)] * 2,
                               torch.device("cpu"))
    seed = torch.randint(0, 2**63 - 1, (b,), generator=g)
    step = torch.randint(0, 2**40, (b,), generator=g)
    uniforms = philox_uniform(seed, step)
    for trial in range(20):
        cond = torch.randn(b, v, generator=g) * 4
        uncond = torch.randn(b, v, generator=g) * 4
        want = cfg_sample(cond, uncond, seed=seed, step=step, validate=False, **settings)
        plans = (rows_plan(settings), rows_plan(more))
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(cs, "rows_plan", lambda *a: (_ for _ in ()).throw(AssertionError("read the settings")))
            for plan in plans:
                assert_equal(cfg_sample_rows(cond, uncond, settings, seed, step, uniforms=uniforms, plan=plan), want,
                             msg=f"trial {trial} {plan}")
    if not plans[0].unit_temperature and not plans[0].top_p and not plans[0].greedy:
        lie = plans[0]._replace(unit_temperature=True)
        with torch.no_grad():
            differ = sum(int((cfg_sample_rows(cond, uncond, settings, seed, s, uniforms=philox_uniform(seed, s),
                                              plan=lie) != cfg_sample(cond, uncond, seed=seed, step=s, validate=False,
                                                                      **settings)).sum())
                         for s in (step + i for i in range(20)))
        assert differ > 0
