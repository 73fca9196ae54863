"""codebook_lookup / codebook_quantize against the torch reference (and float64 scores).

Indices must match the reference except where the reference's top scores are within rounding
of each other; there the chosen code's exact (float64) score must be within twice PyTorch's
own fp32 error of the best score.
"""

import itertools
import os
import platform
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DTYPES, EPS, assert_close, assert_equal
from vqim.kernels import codebook_lookup, codebook_lookup_ref, codebook_quantize
from vqim.kernels.codebook_lookup import codebook_scores_ref


def check_indices(idx: torch.Tensor, z: torch.Tensor, cb: torch.Tensor, *, normalized: bool = False) -> None:
    """Exact match with the reference, or a near-tie the reference itself cannot resolve."""
    ref = codebook_lookup_ref(z.cpu(), cb.cpu(), codebook_normalized=normalized)
    idx = idx.cpu()
    assert idx.dtype == torch.long and idx.shape == ref.shape
    assert ((idx >= 0) & (idx < cb.shape[0])).all(), "index out of range"
    differ = idx != ref
    if not differ.any():
        return
    zc, cc = z.cpu(), cb.cpu()
    scores64 = codebook_scores_ref(zc, cc) if not normalized else zc.double() @ cc.double().T  # (N, K)
    if normalized:
        scores64 = scores64 / zc.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    # PyTorch's own fp32 error on these scores sets the tolerance.
    zn = zc.float() / zc.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    cn = cc.float() if normalized else cc.float() / cc.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    torch_err = (zn @ cn.T - scores64).abs().max().item()
    tol = 2 * torch_err + 4 * EPS[torch.float32]
    rows = differ.nonzero().squeeze(1)
    best = scores64[rows].max(dim=1).values
    chosen = scores64[rows, idx[rows]]
    gap = best - chosen
    assert (gap <= tol).all(), (
        f"{int(differ.sum())} indices differ from the reference and are not near-ties "
        f"(worst gap {gap.max().item():.3g} > tol {tol:.3g}); first rows {rows[:5].tolist()}: "
        f"got {idx[rows[:5]].tolist()}, reference {ref[rows[:5]].tolist()}"
    )


def check_exact_argmax(idx: torch.Tensor, z: torch.Tensor, cb: torch.Tensor) -> None:
    """Every chosen code is the float64 argmax, or within PyTorch's own fp32 error of it.

    Unlike ``check_indices`` this does not trust the fp32 reference, so it also tests the
    reference (and catches a backend that computes in less than fp32)."""
    idx, zc, cc = idx.cpu(), z.cpu(), cb.cpu()
    scores64 = codebook_scores_ref(zc, cc)  # (N, K)
    zn = zc.float() / zc.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    cn = cc.float() / cc.float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    tol = 2 * (zn @ cn.T - scores64).abs().max().item() + 4 * EPS[torch.float32]
    gap = scores64.max(dim=1).values - scores64.gather(1, idx[:, None])[:, 0]
    bad = (gap > tol).nonzero().squeeze(1)
    assert bad.numel() == 0, (
        f"{bad.numel()}/{idx.numel()} indices are not the float64 argmax nor a near-tie (worst gap "
        f"{gap.max().item():.3g} > tol {tol:.3g}); rows {bad[:5].tolist()}: got {idx[bad[:5]].tolist()}, "
        f"exact {scores64[bad[:5]].argmax(1).tolist()}"
    )


def finer_than(dtype: torch.dtype, n_pairs: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 codes in pairs (a, b) that ``dtype`` cannot tell apart, and one row per pair that b
    wins by far more than fp32 rounding: a computation that rounds the codes to ``dtype`` sees
    a tie and returns a (the lower index), the fp32 one returns b.

    a has every component representable in ``dtype`` and a[0] in [1.5, 2); b adds a quarter of
    ``dtype``'s spacing at a[0], which rounds away. The row is a tilted towards +e0, so moving
    the code along +e0 raises the score at first order: b beats a by about 1e-5 (bf16: 1e-4)."""
    a = torch.randn(n_pairs, d).to(dtype).float()
    a[:, 0] = (1.5 + 0.5 * torch.rand(n_pairs)).to(dtype).float()
    b = a.clone()
    b[:, 0] += 0.25 * EPS[dtype]  # EPS is the spacing on [1, 2)
    z = a.clone()
    z[:, 0] += 0.3 * a.norm(dim=1)
    return torch.cat([a, b]), z  # a at index i, b at index n_pairs + i


# Covers every N, K, D and dtype of the issue in the interpreter without the full product
# (the GPU test below runs the full product).
INTERP_CASES = [
    (1, 1, 8, torch.float32),
    (1, 8192, 32, torch.bfloat16),
    (97, 7, 64, torch.float16),
    (97, 1000, 32, torch.float32),
    (1024, 7, 8, torch.bfloat16),
    (1024, 1000, 64, torch.float16),
    (4099, 1, 32, torch.float16),
    (4099, 7, 64, torch.bfloat16),
    (256, 8192, 8, torch.float32),
    (1024, 257, 32, torch.bfloat16),
]


@pytest.mark.parametrize("n,k,d,dtype", INTERP_CASES)
def test_triton_matches_reference(n, k, d, dtype):
    z = torch.randn(n, d).to(dtype)
    cb = torch.randn(k, d).to(dtype)
    check_indices(codebook_lookup(z, cb, backend="triton"), z, cb)


MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("z_dtype,cb_dtype", MIXED, ids=lambda t: str(t).removeprefix("torch."))
def test_mixed_dtypes_match_exact_argmax(backend, z_dtype, cb_dtype):
    """z and the codebook in different dtypes: computed in fp32, nothing rounded to the lower one."""
    z = torch.randn(1024, 32).to(z_dtype)
    cb = torch.randn(1000, 32).to(cb_dtype)
    check_exact_argmax(codebook_lookup(z, cb, backend=backend), z, cb)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_codes_finer_than_z_dtype(backend, z_dtype):
    cb, z = finer_than(z_dtype, 64, 32)
    z = z.to(z_dtype)
    idx = codebook_lookup(z, cb, backend=backend)
    check_exact_argmax(idx, z, cb)
    assert (idx == torch.arange(64, 128)).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend):
    base = torch.randn(2 * 211, 3 * 32)
    z = base[::2, ::3]  # (211, 32), strides (192, 3)
    cb = torch.randn(32, 300).T  # (300, 32), column-major
    assert not z.is_contiguous() and not cb.is_contiguous()
    idx = codebook_lookup(z, cb, backend=backend)
    assert_equal(idx, codebook_lookup_ref(z.contiguous(), cb.contiguous()))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_go_to_lowest_index(backend, dtype):
    d = 32
    cb = torch.randn(600, d).to(dtype)
    # Identical codes tie exactly: within one tile (5, 9) and across tiles (9, 300, 599).
    cb[9] = cb[5]
    cb[300] = cb[5]
    cb[599] = cb[5]
    z = torch.cat([cb[5:6].repeat(3, 1), torch.randn(40, d).to(dtype), cb[300:301]])
    z[3:40] = cb[[5, 300, 599]].repeat(13, 1)[:37]  # rows that point straight at a tied code
    idx = codebook_lookup(z, cb, backend=backend)
    tied = torch.tensor([5, 9, 300, 599])
    hit = torch.isin(idx, tied)
    assert hit[:40].all() and hit[-1]
    assert (idx[hit] == 5).all(), f"ties must go to the lowest index, got {idx[hit].unique().tolist()}"


# The tie rule must not depend on the BLAS. The interpreter's tl.dot is numpy's OpenBLAS sgemm,
# which with its Haswell kernels gives unequal results for equal codebook columns; torch's own
# matmul (the reference) is MKL here, which does the same under MKL_CBWR=COMPATIBLE. Both libraries
# read these variables when they load, so each setting runs the tie test in a fresh process.
_OPENBLAS_NAMES = {"Haswell": ("Haswell",), "Prescott": ("Prescott", "Katmai")}  # DYNAMIC_ARCH builds
_BLAS_ENVS = [("OPENBLAS_CORETYPE", "Haswell"), ("OPENBLAS_CORETYPE", "Prescott"), ("MKL_CBWR", "COMPATIBLE")]
_TIE_RUNNER = r"""
import ctypes, sys
import numpy  # loads numpy's OpenBLAS, which reads OPENBLAS_CORETYPE now
import pytest

def openblas_core():
    libs = [ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln.lower() and ".so" in ln]
    if not libs:
        return None
    lib = ctypes.CDLL(libs[0])
    for sym in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                "openblas_get_corename"):
        if hasattr(lib, sym):
            getattr(lib, sym).restype = ctypes.c_char_p
            return getattr(lib, sym)().decode()
    return None

print("OPENBLAS_CORE=" + str(openblas_core()), flush=True)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1]]))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="these core types are x86 kernels")
@pytest.mark.parametrize("var,value", _BLAS_ENVS, ids=[f"{k}={v}" for k, v in _BLAS_ENVS])
def test_exact_ties_hold_with_every_blas_kernel(var, value):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "MKL_CBWR")}
    env.update({var: value, "TRITON_INTERPRET": "1"})
    node = f"{__file__}::test_exact_ties_go_to_lowest_index"
    run = subprocess.run([sys.executable, "-c", _TIE_RUNNER, node], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    out = run.stdout + run.stderr
    if var == "OPENBLAS_CORETYPE":
        core = next((ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("OPENBLAS_CORE=")), "None")
        if core == "None":
            pytest.skip("numpy is not linked to an OpenBLAS that reports its core")
        assert core in _OPENBLAS_NAMES[value], f"OPENBLAS_CORETYPE={value} ran OpenBLAS's {core} kernels"
    assert run.returncode == 0, f"tie test failed with {var}={value}:\n{out[-4000:]}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_rows_and_zero_codes(backend):
    z = torch.randn(50, 16)
    z[[0, 7, 49]] = 0
    cb = torch.randn(130, 16)
    cb[[0, 64, 129]] = 0
    idx = codebook_lookup(z, cb, backend=backend)
    assert idx[[0, 7, 49]].tolist() == [0, 0, 0], "zero rows of z give index 0"
    check_indices(idx, z, cb)
    # A zero code scores 0, so it wins only where every other code scores below 0.
    all_negative = torch.randn(3, 16).abs()
    cb_neg = -all_negative.clone()
    cb_neg[2] = 0
    assert codebook_lookup(all_negative[:1], cb_neg, backend=backend).item() == 2


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_normalized_codebook(backend):
    cb = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
    z = torch.randn(77, 32)
    check_indices(codebook_lookup(z, cb, codebook_normalized=True, backend=backend), z, cb, normalized=True)
    assert_equal(codebook_lookup(z, cb, codebook_normalized=True, backend=backend),
                 codebook_lookup(z, cb, backend=backend))


def test_quantize_returns_normalized_codes_with_codebook_gradient():
    cb = torch.randn(64, 8, requires_grad=True)
    z = torch.randn(33, 8, dtype=torch.float32)
    idx, codes = codebook_quantize(z, cb, backend="triton")
    assert_equal(idx, codebook_lookup_ref(z, cb.detach()))
    expected = cb.detach()[idx] / cb.detach()[idx].norm(dim=1, keepdim=True)
    assert_close(codes, expected, atol=1e-6)
    codes.sum().backward()
    assert cb.grad is not None and cb.grad[idx].abs().sum() > 0
    unused = torch.ones(64, dtype=torch.bool)
    unused[idx] = False
    assert (cb.grad[unused] == 0).all()


def test_quantize_keeps_dtype():
    cb = torch.randn(64, 8)
    z = torch.randn(10, 8, dtype=torch.bfloat16)
    _, codes = codebook_quantize(z, cb)
    assert codes.dtype == torch.bfloat16 and codes.shape == (10, 8)


def test_empty_z():
    assert codebook_lookup(torch.randn(0, 8), torch.randn(5, 8), backend="triton").shape == (0,)


@pytest.mark.parametrize(
    "z,cb,match",
    [
        (torch.randn(4), torch.randn(3, 4), "z must be a 2-D"),
        (torch.randn(4, 8), torch.randn(3, 4), "share D"),
        (torch.randn(4, 8), torch.randn(0, 8), "at least one code"),
        (torch.randint(0, 3, (4, 8)), torch.randn(3, 8), "z must be float"),
        (torch.randn(4, 8), torch.randn(2, 3, 8), "codebook must be a 2-D"),
    ],
)
def test_bad_inputs(z, cb, match):
    with pytest.raises(ValueError, match=match):
        codebook_lookup(z, cb)


def test_triton_rejects_d_past_limit():
    with pytest.raises(ValueError, match="D must be <= 256"):
        codebook_lookup(torch.randn(2, 300), torch.randn(3, 300), backend="triton")


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    d=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(n, k, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype)
    cb = torch.randn(k, d, generator=g).to(dtype)
    check_indices(codebook_lookup(z, cb, backend="triton"), z, cb)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_full_grid(backend, dtype):
    for n, k, d in itertools.product([1, 97, 1024, 4099], [1, 7, 1000, 8192], [8, 32, 64]):
        z = torch.randn(n, d, device="cuda").to(dtype)
        cb = torch.randn(k, d, device="cuda").to(dtype)
        check_indices(codebook_lookup(z, cb, backend=backend), z, cb)
    zt = torch.randn(64, 2 * 1025, device="cuda").to(dtype)[:, ::2]  # non-contiguous (64, 1025)
    cb = torch.randn(333, 1025 // 5 + 1, device="cuda").to(dtype)
    check_indices(codebook_lookup(zt[:, : cb.shape[1]], cb, backend=backend), zt[:, : cb.shape[1]], cb)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("z_dtype,cb_dtype", MIXED, ids=lambda t: str(t).removeprefix("torch."))
def test_gpu_mixed_dtypes(backend, z_dtype, cb_dtype):
    z = torch.randn(4099, 32, device="cuda").to(z_dtype)
    cb = torch.randn(8192, 32, device="cuda").to(cb_dtype)
    check_exact_argmax(codebook_lookup(z, cb, backend=backend), z, cb)
    if cb_dtype == torch.float32:
        cb, z = finer_than(z_dtype, 64, 32)
        z = z.to("cuda", z_dtype)
        idx = codebook_lookup(z, cb.cuda(), backend=backend)
        check_exact_argmax(idx, z, cb)
        assert (idx.cpu() == torch.arange(64, 128)).all()
