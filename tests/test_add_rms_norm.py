"""add_rms_norm: the Triton kernel (interpreter) and the torch backend against a float64
RMSNorm of the rounded sum, s bitwise against torch's ``x + delta``, the torch backend bitwise
against Hugging Face's LlamaRMSNorm and LlamaGen's RMSNorm written out, and bad input named.
The custom op (opcheck, meta shapes, torch.compile) is tested in test_custom_ops.py.

The tolerance on h is plain PyTorch's own error: the kernel's distance to the float64 reference
may be at most twice that of the reference in the same dtype, plus one ulp of x's dtype.
"""

import pytest
import torch

from helpers import DTYPES, EPS, assert_equal, assert_within_torch_error
from vqim.kernels import add_rms_norm, add_rms_norm_ref, registered, rms_norm_ref

BACKENDS = ("torch", "triton")
WIDTHS = (1, 7, 97, 1025, 4096)


def _weight(w: int, dtype: torch.dtype) -> torch.Tensor:
    # Away from 1 so a dropped or misplaced weight shows.
    return (1 + 0.5 * torch.randn(w)).to(dtype)  # (W,)


def _ref64(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rounded sum in float64, no intermediate rounding: what h approximates."""
    sd = s.double()
    return sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def check(x, delta, weight, backend, eps=1e-5, msg=""):
    """s bitwise torch's x + delta; h within torch's own error of the float64 RMSNorm of s."""
    s, h = add_rms_norm(x, delta, weight, eps=eps, backend=backend)
    assert s.dtype == x.dtype and h.dtype == torch.promote_types(x.dtype, weight.dtype)
    assert s.shape == h.shape == x.shape and s.is_contiguous() and h.is_contiguous()
    want_s = x + delta
    assert_equal(s, want_s, msg=f"{msg} s")
    _, torch_h = add_rms_norm_ref(x, delta, weight, eps)
    ref = _ref64(want_s, weight, eps)
    # One ulp of x's dtype: h is rounded to it once before the weight, whatever the weight's dtype.
    floor = EPS[x.dtype] * max(1.0, ref.abs().max().item())
    assert_within_torch_error(h, ref, torch_h, floor=floor, msg=f"{msg} h")
    return s, h


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_float64(dtype, w):
    """Decode rows [B, 1, W] and prefill rows [B, T, W]."""
    for shape in ((3, 1, w), (2, 5, w)):
        x, delta = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        check(x, delta, _weight(w, dtype), "triton", msg=f"{dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matches_float64(dtype):
    x, delta = torch.randn(4, 3, 97).to(dtype), torch.randn(4, 3, 97).to(dtype)
    check(x, delta, _weight(97, dtype), "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_with_low_precision_x(dtype, backend):
    """An fp32 weight: h is fp32 (torch's promotion), the normalized s rounded to x's dtype first."""
    x, delta = torch.randn(5, 1, 1025).to(dtype), torch.randn(5, 1, 1025).to(dtype)
    _, h = check(x, delta, _weight(1025, torch.float32), backend)
    assert h.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_values_and_eps(backend):
    """Rows far from unit scale (the mean square in fp32 neither overflows nor loses the small
    row) and eps large enough to matter."""
    x = torch.cat([1e3 * torch.randn(2, 97), 1e-3 * torch.randn(2, 97)])  # (4, 97)
    delta = torch.randn(4, 97) * x.abs().mean(-1, keepdim=True)
    check(x, delta, _weight(97, torch.float32), backend)
    check(x, delta, _weight(97, torch.float32), backend, eps=1e-2)


def _strided_cases(dtype):
    """(x, delta) pairs that are views with awkward strides."""
    wide = torch.randn(6, 2 * 97).to(dtype)
    cols = torch.randn(6, 3 * 97).to(dtype)
    tall = torch.randn(97, 6).to(dtype)
    lead = torch.randn(3, 5, 64).to(dtype)
    return {
        "slice_of_wider": (wide[:, :97], wide[:, 97:]),  # row stride 194
        "column_stride_3": (cols[:, ::3], torch.randn(6, 97).to(dtype)),  # column stride 3
        "transposed": (tall.t(), wide[:, 50:147]),  # (6, 97), strides (1, 6)
        "leading_dims_transposed": (lead.transpose(0, 1), torch.randn(3, 5, 64).to(dtype).transpose(0, 1)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(dtype, backend):
    for case, (x, delta) in _strided_cases(dtype).items():
        assert not x.is_contiguous()
        weight = _weight(x.shape[-1], dtype)
        s, h = check(x, delta, weight, backend, msg=case)
        if backend == "triton":
            # The same rows contiguous give the same bits: the strides change addresses, not
            # arithmetic (torch's own mean may sum a permuted row in another order).
            s_c, h_c = add_rms_norm(x.contiguous(), delta.contiguous(), weight, backend=backend)
            assert_equal(s, s_c, msg=case)
            assert_equal(h, h_c, msg=case)


def test_many_rows_partial_last_program():
    """Narrow rows are packed several to a program; 37 rows leave the last program part-full."""
    x, delta = torch.randn(37, 7), torch.randn(37, 7)
    check(x, delta, _weight(7, torch.float32), "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    x = torch.randn(0, 3, 16)
    s, h = add_rms_norm(x, x.clone(), torch.ones(16), backend=backend)
    assert s.shape == h.shape == (0, 3, 16)


def _llama_rms_norm(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward, line for line."""
    input_dtype = s.dtype
    hidden_states = s.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _llamagen_rms_norm(s: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaGen's RMSNorm.forward (gpt.py), line for line."""
    xf = s.float()
    output = (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + eps)).type_as(s)
    return output * weight


@pytest.mark.parametrize("wdtype", ["x", torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_bitwise_llama_rms_norm(dtype, wdtype):
    """The CPU path: one call gives exactly the bits of ``s = x + d; LlamaRMSNorm(s)``, which
    LlamaGen's RMSNorm also gives."""
    x, delta = torch.randn(2, 3, 64).to(dtype), torch.randn(2, 3, 64).to(dtype)
    weight = _weight(64, dtype if wdtype == "x" else wdtype)
    want_s = x + delta
    for eps in (1e-5, 1e-6):
        want_h = _llama_rms_norm(want_s, weight, eps)
        assert torch.equal(_llamagen_rms_norm(want_s, weight, eps), want_h)
        assert torch.equal(rms_norm_ref(want_s, weight, eps), want_h)
        for backend in ("torch", None):
            s, h = add_rms_norm(x, delta, weight, eps=eps, backend=backend)
            assert torch.equal(s, want_s) and torch.equal(h, want_h)


def test_registry():
    assert registered("add_rms_norm") == ("torch", "triton")


def _bad_cases():
    x, d = torch.randn(3, 8), torch.randn(3, 8)
    w = torch.ones(8)
    return {
        "delta_shape": ((x, torch.randn(3, 9), w), {}, "delta must have x's shape"),
        "delta_dtype": ((x, d.double(), w), {}, "delta must have x's dtype"),
        "int_x": ((x.long(), d.long(), w), {}, "x must be float32, float16 or bfloat16"),
        "float64_x": ((x.double(), d.double(), w), {}, "x must be float32, float16 or bfloat16"),
        "scalar_x": ((torch.tensor(1.0), torch.tensor(1.0), w), {}, "x must be a tensor"),
        "empty_last_dim": ((x[:, :0], d[:, :0], w[:0]), {}, "x's last dim W must be >= 1"),
        "weight_shape": ((x, d, torch.ones(9)), {}, "weight must be a 1-D tensor"),
        "weight_2d": ((x, d, torch.ones(1, 8)), {}, "weight must be a 1-D tensor"),
        "weight_dtype": ((x.bfloat16(), d.bfloat16(), w.half()), {}, "weight must be float32 or x's dtype"),
        "weight_device": ((x, d, w.to("meta")), {}, "weight must be on x's device"),
        "delta_device": ((x, d.to("meta"), w), {}, "delta must be on x's device"),
        "eps_negative": ((x, d, w), {"eps": -1e-5}, "eps must be a finite number >= 0"),
        "eps_nan": ((x, d, w), {"eps": float("nan")}, "eps must be a finite number >= 0"),
        "backend": ((x, d, w), {"backend": "nope"}, "backend must be one of"),
        "too_wide_for_triton": ((torch.randn(1, 16385), torch.randn(1, 16385), torch.ones(16385)),
                                {"backend": "triton"}, "W must be <= 16384 for backend='triton'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs(case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        add_rms_norm(*args, **kwargs)


def test_cuda_backend_is_not_offered():
    """On CUDA the Triton kernel is the op; asking for 'cuda' on CPU tensors fails at resolve time."""
    with pytest.raises(ValueError, match="cuda"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_triton_matches_float64(dtype):
    """The compiled kernel at model widths (Janus-Pro 1B / 7B), decode and prefill rows."""
    for w in (2048, 4096):
        for shape in ((16, 1, w), (2, 333, w)):
            x, delta = (torch.randn(shape, device="cuda").to(dtype) for _ in range(2))
            for wdtype in (dtype, torch.float32):
                check(x, delta, _weight(w, wdtype).cuda(), "triton", msg=f"{dtype} {shape} weight {wdtype}")
