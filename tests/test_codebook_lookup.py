"""codebook_lookup / codebook_quantize against the tie rule on float64 scores and the torch reference.

Every index must obey the rule (kernels/codebook_lookup.py: the lowest index whose fp32 score
is within ``TIE_TOL`` of the row's best) on the exact scores up to fp32 error, and equal the
reference except on rows where a code scores within fp32 error of the threshold itself
(tests/codebook_checks.py). Codes that tie in exact arithmetic (copies of one direction at other
scales) must give the same index, the group's lowest, on every backend.
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

from codebook_checks import (THRESHOLD_CASES, check_contract, check_lookup, check_true_argmax, exact_scores,
                             issue_case, scaled_duplicates, tie_threshold_case)
from helpers import DTYPES, EPS, assert_close, assert_equal
from vqim.kernels import codebook_lookup, codebook_lookup_ref, codebook_quantize
from vqim.kernels.codebook_lookup import TIE_TOL

BACKENDS = ["triton", "torch"]  # the CPU's; the CUDA kernel runs these cases in tests/test_cuda_harness.py


def finer_than(dtype: torch.dtype, n_pairs: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 codes in pairs (a, b) that ``dtype`` cannot tell apart, and one row per pair (in
    ``dtype``) that b wins by more than ``3 * TIE_TOL``: a computation that rounds the codes to
    ``dtype`` sees a tie and returns a (the lower index), the fp32 one returns b.

    a has every component representable in ``dtype`` and a[0] in [1.5, 2]; b adds 0.45 of
    ``dtype``'s spacing at a[0], which rounds away. The row is ``a + |a| e0``, so moving the code
    along +e0 raises the score at first order: b beats a by 3e-5 or more (bf16: 2.5e-4). Checks
    that margin on the rows as rounded to ``dtype``."""
    a = torch.randn(n_pairs, d).to(dtype).float()
    a[:, 0] = (1.5 + 0.5 * torch.rand(n_pairs)).to(dtype).float()
    b = a.clone()
    b[:, 0] += 0.45 * EPS[dtype]  # EPS is the spacing on [1, 2)
    z = a.clone()
    z[:, 0] += a.norm(dim=1)
    cb, z = torch.cat([a, b]), z.to(dtype)
    scores64, _ = exact_scores(z, cb)  # (n_pairs, 2 n_pairs)
    rows = torch.arange(n_pairs)
    assert (scores64[rows, rows + n_pairs] - scores64[rows, rows] > 3 * TIE_TOL).all(), "b must win by 3 TIE_TOL"
    return cb, z  # a at index i, b at n_pairs + i


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
    check_lookup(codebook_lookup(z, cb, backend="triton"), z, cb)


MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("z_dtype,cb_dtype", MIXED, ids=lambda t: str(t).removeprefix("torch."))
def test_mixed_dtypes_match_exact_argmax(backend, z_dtype, cb_dtype):
    """z and the codebook in different dtypes: computed in fp32, nothing rounded to the lower one."""
    z = torch.randn(1024, 32).to(z_dtype)
    cb = torch.randn(1000, 32).to(cb_dtype)
    idx = codebook_lookup(z, cb, backend=backend)
    check_contract(idx, z, cb)
    check_true_argmax(idx, z, cb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_codes_finer_than_z_dtype(backend, z_dtype):
    cb, z = finer_than(z_dtype, 64, 32)
    idx = codebook_lookup(z, cb, backend=backend)
    check_contract(idx, z, cb)
    assert (idx == torch.arange(64, 128)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = torch.randn(2 * 211, 3 * 32)
    z = base[::2, ::3]  # (211, 32), strides (192, 3)
    cb = torch.randn(32, 300).T  # (300, 32), column-major
    assert not z.is_contiguous() and not cb.is_contiguous()
    idx = codebook_lookup(z, cb, backend=backend)
    assert_equal(idx, codebook_lookup_ref(z.contiguous(), cb.contiguous()))


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_scaled_code_ties(backend):
    """Issue 25 #11: with e[40] = 2.5 * e[7] the reference returned 7 and the Triton kernel 40."""
    z, cb = issue_case()
    assert codebook_lookup(z, cb, backend=backend).tolist() == [7] * z.shape[0]


# N, K, D off the blocks (Triton: 16/64 rows, 64/128 codes; CUDA: 32 rows, 8192 / DMAX codes a tile).
TIE_SHAPES = [(97, 600, 31), (40, 130, 8), (17, 30, 100)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", TIE_SHAPES)
def test_scaled_duplicates_tie_to_lowest_index(backend, dtype, n, k, d):
    """Copies of a code at other scales tie exactly in cosine: every backend returns the lowest
    index of the group, as the reference does."""
    z, cb, expected = scaled_duplicates(n, k, d, dtype)
    idx = codebook_lookup(z, cb, backend=backend)
    assert_equal(idx, expected)
    assert_equal(codebook_lookup_ref(z, cb), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step,normalized", THRESHOLD_CASES)
def test_tie_threshold(backend, step, normalized):
    """A lower code ties the best within TIE_TOL, the threshold included, and not beyond."""
    z, cb, expected = tie_threshold_case(step)
    idx = codebook_lookup(z, cb, codebook_normalized=normalized, backend=backend)
    assert idx.tolist() == [expected] * z.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_codebook_gives_the_true_argmax(backend, dtype):
    """Codes whose cosines differ by more than 2 * TIE_TOL are never taken for a tie."""
    z = torch.randn(1024, 32).to(dtype)
    cb = torch.randn(1000, 32).to(dtype)
    idx = codebook_lookup(z, cb, backend=backend)
    check_true_argmax(idx, z, cb)
    check_lookup(idx, z, cb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_and_codes_give_an_index_in_range(backend):
    z = torch.randn(6, 16)
    z[2, 5] = float("nan")
    cb = torch.randn(70, 16)
    idx = codebook_lookup(z, cb, backend=backend)
    assert ((idx >= 0) & (idx < 70)).all(), idx.tolist()
    cb[3, 0] = float("nan")
    idx = codebook_lookup(z, cb, backend=backend)
    assert ((idx >= 0) & (idx < 70)).all(), idx.tolist()


# The tie rule must not depend on the BLAS. The interpreter's tl.dot is numpy's OpenBLAS sgemm,
# which with its Haswell kernels gives unequal results for equal codebook columns; torch's own
# matmul (the reference) is MKL here, which does the same under MKL_CBWR=COMPATIBLE. Both libraries
# read these variables when they load, so each setting runs the tie tests in a fresh process.
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
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="these core types are x86 kernels")
@pytest.mark.parametrize("var,value", _BLAS_ENVS, ids=[f"{k}={v}" for k, v in _BLAS_ENVS])
def test_exact_ties_hold_with_every_blas_kernel(var, value):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "MKL_CBWR")}
    env.update({var: value, "TRITON_INTERPRET": "1"})
    nodes = [f"{__file__}::{name}" for name in ("test_exact_ties_go_to_lowest_index", "test_issue_scaled_code_ties",
                                                "test_scaled_duplicates_tie_to_lowest_index")]
    run = subprocess.run([sys.executable, "-c", _TIE_RUNNER, *nodes], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    out = run.stdout + run.stderr
    if var == "OPENBLAS_CORETYPE":
        core = next((ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("OPENBLAS_CORE=")), "None")
        if core == "None":
            pytest.skip("numpy is not linked to an OpenBLAS that reports its core")
        assert core in _OPENBLAS_NAMES[value], f"OPENBLAS_CORETYPE={value} ran OpenBLAS's {core} kernels"
    assert run.returncode == 0, f"tie test failed with {var}={value}:\n{out[-4000:]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_and_zero_codes(backend):
    z = torch.randn(50, 16)
    z[[0, 7, 49]] = 0
    cb = torch.randn(130, 16)
    cb[[0, 64, 129]] = 0
    idx = codebook_lookup(z, cb, backend=backend)
    assert idx[[0, 7, 49]].tolist() == [0, 0, 0], "zero rows of z give index 0"
    check_lookup(idx, z, cb)
    # A zero code scores 0, so it wins only where every other code scores below 0.
    all_negative = torch.randn(3, 16).abs()
    cb_neg = -all_negative.clone()
    cb_neg[2] = 0
    assert codebook_lookup(all_negative[:1], cb_neg, backend=backend).item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_codebook(backend):
    cb = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
    z = torch.randn(77, 32)
    check_lookup(codebook_lookup(z, cb, codebook_normalized=True, backend=backend), z, cb, normalized=True)
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
    check_lookup(codebook_lookup(z, cb, backend="triton"), z, cb)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_full_grid(backend, dtype):
    for n, k, d in itertools.product([1, 97, 1024, 4099], [1, 7, 1000, 8192], [8, 32, 64]):
        z = torch.randn(n, d, device="cuda").to(dtype)
        cb = torch.randn(k, d, device="cuda").to(dtype)
        check_lookup(codebook_lookup(z, cb, backend=backend), z, cb)
    zt = torch.randn(64, 2 * 1025, device="cuda").to(dtype)[:, ::2]  # non-contiguous (64, 1025)
    cb = torch.randn(333, 1025 // 5 + 1, device="cuda").to(dtype)
    check_lookup(codebook_lookup(zt[:, : cb.shape[1]], cb, backend=backend), zt[:, : cb.shape[1]], cb)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("z_dtype,cb_dtype", MIXED, ids=lambda t: str(t).removeprefix("torch."))
def test_gpu_mixed_dtypes(backend, z_dtype, cb_dtype):
    z = torch.randn(4099, 32, device="cuda").to(z_dtype)
    cb = torch.randn(8192, 32, device="cuda").to(cb_dtype)
    check_contract(codebook_lookup(z, cb, backend=backend), z, cb)
    if cb_dtype == torch.float32:
        cb, z = finer_than(z_dtype, 64, 32)
        idx = codebook_lookup(z.cuda(), cb.cuda(), backend=backend)
        check_contract(idx, z, cb)
        assert (idx.cpu() == torch.arange(64, 128)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_ties(backend, dtype):
    """The tie cases of the CPU tests on the GPU's kernels (tensor-core dots, nvcc's FMAs), at the
    benchmark's codebook size too."""
    if dtype == torch.float32:
        z, cb = issue_case()
        assert codebook_lookup(z.cuda(), cb.cuda(), backend=backend).tolist() == [7] * z.shape[0]
        for step, normalized in THRESHOLD_CASES:
            z, cb, expected = tie_threshold_case(step)
            idx = codebook_lookup(z.cuda(), cb.cuda(), codebook_normalized=normalized, backend=backend)
            assert idx.tolist() == [expected] * z.shape[0], (step, normalized)
    for n, k, d, groups in [(n, k, d, 6) for n, k, d in TIE_SHAPES] + [(4099, 8192, 32, 20), (1024, 1000, 256, 20)]:
        z, cb, expected = scaled_duplicates(n, k, d, dtype, groups=groups)
        assert_equal(codebook_lookup(z.cuda(), cb.cuda(), backend=backend), expected)
    z = torch.randn(4099, 32).to(dtype)
    cb = torch.randn(8192, 32).to(dtype)
    idx = codebook_lookup(z.cuda(), cb.cuda(), backend=backend)
    check_true_argmax(idx, z, cb)
    check_lookup(idx, z, cb)
