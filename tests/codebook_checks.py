"""The tie rule of codebook_lookup, checked against float64 scores, and the inputs that probe it.

Shared by tests/test_codebook_lookup.py (torch and Triton) and tests/test_cuda_harness.py (the
CUDA kernel on the CPU), so every backend answers the same cases under the same checks.

The rule (kernels/codebook_lookup.py): the answer is the lowest index whose fp32 score is not
below the row's best fp32 score minus ``TIE_TOL``. On exact (float64) scores, up to the fp32
error ``err`` of a score, that means: the chosen code's score is at least
``best - TIE_TOL - err``, and no lower code scores ``best - TIE_TOL + err`` or more. Two correct
fp32 computations may choose differently only on a row where some code scores within ``err`` of
the threshold ``best - TIE_TOL``.
"""

from __future__ import annotations

import torch

from helpers import EPS
from vqim.kernels import codebook_lookup_ref
from vqim.kernels.codebook_lookup import TIE_TOL, codebook_scores_ref


def exact_scores(z: torch.Tensor, cb: torch.Tensor, *, normalized: bool = False) -> tuple[torch.Tensor, float]:
    """The float64 scores ``[N, K]`` the op ranks, and the fp32 error margin: twice PyTorch's own
    fp32 error on these scores, plus 4 ulps of 1 for where PyTorch happens to be exact."""
    zc, cc = z.cpu(), cb.cpu()
    if normalized:  # the codes are taken as they are, as the op does
        zn64 = zc.double() / zc.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
        scores64 = zn64 @ cc.double().T  # (N, K)
        cn = cc.float()
    else:
        scores64 = codebook_scores_ref(zc, cc)  # (N, K)
        cn = cc.float() / cc.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    zn = zc.float() / zc.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    err = 2 * (zn @ cn.T - scores64).abs().max().item() + 4 * EPS[torch.float32]
    return scores64, err


def check_contract(idx: torch.Tensor, z: torch.Tensor, cb: torch.Tensor, *, normalized: bool = False) -> None:
    """Every index obeys the tie rule on the float64 scores, up to fp32 error. It does not trust
    the fp32 reference, so it also tests the reference and catches a backend that computes in
    less than fp32."""
    idx = idx.cpu()
    assert idx.dtype == torch.long and idx.shape == (z.shape[0],), f"got {idx.dtype} {tuple(idx.shape)}"
    assert ((idx >= 0) & (idx < cb.shape[0])).all(), "index out of range"
    scores64, err = exact_scores(z, cb, normalized=normalized)
    threshold = scores64.max(dim=1).values - TIE_TOL  # (N,)
    chosen = scores64.gather(1, idx[:, None])[:, 0]  # (N,)
    short = (chosen < threshold - err).nonzero().squeeze(1)
    assert short.numel() == 0, (
        f"{short.numel()}/{idx.numel()} chosen codes do not tie the best (score below best - TIE_TOL by more than "
        f"{err:.3g}); rows {short[:5].tolist()}: got {idx[short[:5]].tolist()}, best "
        f"{scores64[short[:5]].argmax(1).tolist()}")
    lower = torch.arange(cb.shape[0])[None, :] < idx[:, None]  # (N, K)
    missed = ((scores64 >= (threshold + err)[:, None]) & lower).any(dim=1).nonzero().squeeze(1)
    assert missed.numel() == 0, (
        f"{missed.numel()}/{idx.numel()} rows have a lower index that ties the best; rows {missed[:5].tolist()}: "
        f"got {idx[missed[:5]].tolist()}")


def check_lookup(idx: torch.Tensor, z: torch.Tensor, cb: torch.Tensor, *, normalized: bool = False) -> None:
    """The tie rule on the float64 scores (``check_contract``), and the reference's index on every
    row but those with a code within fp32 error of the threshold ``best - TIE_TOL``."""
    check_contract(idx, z, cb, normalized=normalized)
    ref = codebook_lookup_ref(z.cpu(), cb.cpu(), codebook_normalized=normalized)
    scores64, err = exact_scores(z, cb, normalized=normalized)
    threshold = scores64.max(dim=1, keepdim=True).values - TIE_TOL  # (N, 1)
    ambiguous = ((scores64 - threshold).abs() <= err).any(dim=1)  # (N,)
    differ = ((idx.cpu() != ref) & ~ambiguous).nonzero().squeeze(1)
    assert differ.numel() == 0, (
        f"{differ.numel()}/{idx.numel()} indices differ from the reference on rows with no code near the tie "
        f"threshold; rows {differ[:5].tolist()}: got {idx.cpu()[differ[:5]].tolist()}, reference "
        f"{ref[differ[:5]].tolist()}")


def check_true_argmax(idx: torch.Tensor, z: torch.Tensor, cb: torch.Tensor) -> None:
    """Where the float64 best beats the runner-up by more than ``2 * TIE_TOL``, nothing else ties
    it: the index is the float64 argmax. Asks that such rows are almost all of them, so the check
    means something."""
    scores64, _ = exact_scores(z, cb)
    top2 = scores64.topk(2, dim=1).values  # (N, 2)
    clear = top2[:, 0] - top2[:, 1] > 2 * TIE_TOL  # (N,)
    assert clear.float().mean() > 0.95, f"only {int(clear.sum())}/{clear.numel()} rows have a clear best"
    argmax = scores64.argmax(dim=1)
    wrong = (clear & (idx.cpu() != argmax)).nonzero().squeeze(1)
    assert wrong.numel() == 0, (
        f"{wrong.numel()} rows with a clear best chose another code; rows {wrong[:5].tolist()}: got "
        f"{idx.cpu()[wrong[:5]].tolist()}, float64 argmax {argmax[wrong[:5]].tolist()}")


# Scale factors whose products with small integers / 8 are exact in fp32, fp16 and bf16 (at most
# 7 significant bits), so a scaled copy has bit for bit the direction of its original.
SCALES = (0.5, 0.75, 1.25, 2.5, 3.0, 4.0)


def small_integer_codes(k: int, d: int, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[k, d]`` codes of integers in [-15, 15] / 8: 4 significant bits, exact in every dtype and
    after any scale of ``SCALES``."""
    return (torch.randint(-15, 16, (k, d), generator=generator).float() / 8).to(dtype)


def issue_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Issue 25 #11, as reported: fp32 codes with ``e[40] = 2.5 * e[7]``; rows along e[7] (scaled
    by 1 and 3) and slightly off it (1% and 10% noise). The two codes tie in cosine, so every
    backend must return 7, the lower index, for every row."""
    cb = torch.randn(64, 32)
    cb[40] = 2.5 * cb[7]
    e7 = cb[7]
    noise = torch.randn(3, 32) * e7.norm() / 32**0.5
    z = torch.stack([e7, 3 * e7, e7 + 0.01 * noise[0], e7 + 0.1 * noise[1], e7 - 0.1 * noise[2]])  # (5, 32)
    return z, cb


def scaled_duplicates(n: int, k: int, d: int, dtype: torch.dtype, *, groups: int = 6,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A codebook ``[k, d]`` with ``groups`` groups of 2 to 4 codes at random positions, each
    group one code and copies of it scaled by ``SCALES`` (exact: the same direction), and rows
    ``[n, d]`` near the groups' directions (exact, 1% and 10% noise). Returns ``(z, cb, expected)``,
    ``expected [n]`` the lowest index of each row's group.

    Checks its own construction: each row's group beats every other code by more than
    ``2 * TIE_TOL`` in float64, so the group is the only tie."""
    g = torch.Generator().manual_seed(seed)
    cb = small_integer_codes(k, d, torch.float32, g)
    sizes = torch.randint(2, 5, (groups,), generator=g).tolist()
    assert sum(sizes) <= k, f"k = {k} is too small for {groups} groups"
    positions = torch.randperm(k, generator=g)[:sum(sizes)].split(sizes)
    member = torch.zeros(groups, k, dtype=torch.bool)
    for i, pos in enumerate(positions):
        scales = torch.tensor(SCALES)[torch.randint(len(SCALES), (len(pos) - 1,), generator=g)]
        cb[pos[1:]] = scales[:, None] * cb[pos[0]]
        member[i, pos] = True
    cb_t = cb.to(dtype)
    assert torch.equal(cb_t.float(), cb), "the scaled copies must be exact in the dtype"
    group = torch.arange(n) % groups  # (n,)
    base = cb[torch.stack([pos[0] for pos in positions])[group]]  # (n, d)
    level = torch.tensor([0.0, 0.01, 0.1])[torch.arange(n) % 3]  # (n,)
    z = base + level[:, None] * base.norm(dim=1, keepdim=True) / d**0.5 * torch.randn(n, d, generator=g)
    z = z.to(dtype)
    expected = torch.stack([pos.min() for pos in positions])[group]  # (n,)
    scores64 = codebook_scores_ref(z, cb_t)  # (n, k)
    own = scores64.gather(1, expected[:, None])[:, 0]  # (n,)
    others = scores64.masked_fill(member[group], float("-inf")).max(dim=1).values  # (n,)
    assert (others < own - 2 * TIE_TOL).all(), "a code outside the group comes too close"
    return z, cb_t, expected


# (step, codebook_normalized) for tie_threshold_case: a lower code sits step * TIE_TOL below the
# best and ties at steps 0, 0.5 and 1 (the threshold itself: "not below"), not at 1.5 and 3.
# With normalized codes every backend's score is exact; otherwise a code's norm rounds, putting
# its score an ulp either side of its cosine, so the threshold itself is checked only normalized.
THRESHOLD_STEPS = (0.0, 0.5, 1.0, 1.5, 3.0)
THRESHOLD_CASES = [(step, True) for step in THRESHOLD_STEPS] + [(s, False) for s in THRESHOLD_STEPS if s != 1.0]


def tie_threshold_case(step: float, k: int = 300, d: int = 32) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A codebook ``[k, d]`` of unit codes whose cosine with e0 is exactly representable: the best,
    0.75, at index k - 1; 0.75 - step * TIE_TOL at index 3; the rest 0. Rows ``[3, d]`` are e0
    scaled by 1, 2 and 1/4, so with ``codebook_normalized=True`` every backend's fp32 score of a
    code is its cosine exactly (the dot is one exact product, ``1/|z|`` a power of two). Returns
    ``(z, cb, expected)``: 3 where the code ties (``step <= 1``), else k - 1."""
    cb = torch.randn(k, d)
    cb[:, 0] = 0  # the fillers score 0
    cb = torch.nn.functional.normalize(cb, dim=1)
    for i, x in ((3, 0.75 - step * TIE_TOL), (k - 1, 0.75)):
        cb[i] = 0
        cb[i, 0], cb[i, 1] = x, (1 - x * x) ** 0.5
    z = torch.zeros(3, d)
    z[:, 0] = torch.tensor([1.0, 2.0, 0.25])
    return z, cb, 3 if step <= 1 else k - 1
