"""add_layer_norm: the Triton kernel (interpreter) and the torch backend against a float64
LayerNorm of the rounded sum, s bitwise against torch's ``x + delta``, the torch backend bitwise
against the two ops done separately, and the custom op (opcheck, meta shapes, torch.compile).

The tolerance on h is plain PyTorch's own error: the kernel's distance to the float64 reference
may be at most twice that of ``F.layer_norm`` in the same dtype, plus a few ulps of the output.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, EPS, assert_equal, assert_within_torch_error
from vqim.kernels import registered, use_backend
from vqim.kernels.add_layer_norm import _add_layer_norm_op, add_layer_norm, add_layer_norm_ref

BACKENDS = ("torch", "triton")
WIDTHS = (1, 7, 64, 100, 1024)
LEADING = ((3,), (2, 1), (5, 3))


def _params(w: int, dtype: torch.dtype, *, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Away from 1 and 0 so a dropped weight or bias shows.
    weight = (1 + 0.5 * torch.randn(w)).to(dtype)  # (W,)
    b = (0.5 * torch.randn(w)).to(dtype) if bias else None  # (W,)
    return weight, b


def _ref64(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of the rounded sum in float64: what h approximates."""
    b = None if bias is None else bias.double()
    return F.layer_norm(s.double(), (s.shape[-1],), weight.double(), b, eps)


def check(x, delta, weight, bias, backend, eps=1e-5, msg=""):
    """s bitwise torch's x + delta; h within torch's own error of the float64 LayerNorm of s."""
    s, h = add_layer_norm(x, delta, weight, bias, eps=eps, backend=backend)
    assert s.dtype == h.dtype == x.dtype and s.shape == h.shape == x.shape
    assert s.is_contiguous() and h.is_contiguous()
    want_s = x + delta
    assert_equal(s, want_s, msg=f"{msg} s")
    _, torch_h = add_layer_norm_ref(x, delta, weight, bias, eps)
    ref = _ref64(want_s, weight, bias, eps)
    floor = 4 * EPS[x.dtype] * max(1.0, ref.abs().max().item())
    assert_within_torch_error(h, ref, torch_h, floor=floor, msg=f"{msg} h")
    return s, h


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_float64(dtype, w, leading):
    x, delta = torch.randn(*leading, w).to(dtype), torch.randn(*leading, w).to(dtype)
    check(x, delta, *_params(w, dtype), "triton", msg=f"{dtype} {leading} W={w}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matches_float64(dtype):
    x, delta = torch.randn(4, 100).to(dtype), torch.randn(4, 100).to(dtype)
    check(x, delta, *_params(100, dtype), "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_none(dtype, backend):
    x, delta = torch.randn(3, 7, 64).to(dtype), torch.randn(3, 7, 64).to(dtype)
    check(x, delta, _params(64, dtype)[0], None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_params_with_low_precision_x(dtype, backend):
    """fp32 weight/bias are used as given: the float64 reference takes them unrounded."""
    x, delta = torch.randn(5, 100).to(dtype), torch.randn(5, 100).to(dtype)
    weight, bias = _params(100, torch.float32)
    check(x, delta, weight, bias, backend)
    # Mixed: one parameter fp32, the other in x's dtype.
    check(x, delta, weight.to(dtype), bias, backend)
    check(x, delta, weight, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_common_offset(backend):
    """A row far from zero: the variance is taken of s - mean, so the offset does not cancel."""
    x = 1000 + torch.randn(3, 100)  # (3, 100)
    delta = torch.randn(3, 100)
    check(x, delta, *_params(100, torch.float32), backend)


def _strided_cases(dtype):
    """(x, delta) pairs that are views with awkward strides, all [M or (5, 3), W]."""
    wide = torch.randn(6, 2 * 100).to(dtype)
    cols = torch.randn(6, 3 * 100).to(dtype)
    tall = torch.randn(100, 6).to(dtype)
    lead = torch.randn(3, 5, 64).to(dtype)
    lead_d = torch.randn(3, 5, 64).to(dtype)
    return {
        "slice_of_wider": (wide[:, :100], wide[:, 100:]),  # row stride 200
        "column_stride_3": (cols[:, ::3], torch.randn(6, 100).to(dtype)),  # column stride 3
        "transposed": (tall.t(), wide[:, 50:150]),  # (6, 100), strides (1, 6)
        "leading_dims_transposed": (lead.transpose(0, 1), lead_d.transpose(0, 1)),  # (5, 3, 64), a copy
    }


@pytest.mark.parametrize("case", ["slice_of_wider", "column_stride_3", "transposed", "leading_dims_transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(dtype, backend, case):
    x, delta = _strided_cases(dtype)[case]
    assert not x.is_contiguous()
    weight, bias = _params(x.shape[-1], dtype)
    s, h = check(x, delta, weight, bias, backend, msg=case)
    # The same rows contiguous give the same bits: the strides change addresses, not arithmetic.
    s_c, h_c = add_layer_norm(x.contiguous(), delta.contiguous(), weight, bias, backend=backend)
    assert_equal(s, s_c)
    assert_equal(h, h_c)


@pytest.mark.parametrize("w", [7, 64])
def test_many_rows_partial_last_program(w):
    """Narrow rows are packed several to a program; 37 rows leave the last program part-full."""
    x, delta = torch.randn(37, w), torch.randn(37, w)
    check(x, delta, *_params(w, torch.float32), "triton")


def test_widest_row():
    x, delta = torch.randn(2, 16384), torch.randn(2, 16384)
    check(x, delta, *_params(16384, torch.float32), "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    x = torch.randn(0, 3, 16)
    s, h = add_layer_norm(x, x.clone(), torch.ones(16), torch.zeros(16), backend=backend)
    assert s.shape == h.shape == (0, 3, 16)


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 0.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend_bitwise_separate_ops(bias, dtype, eps):
    """The decoder's CPU path: one call gives exactly the bits of ``s = x + d; ln(s)``."""
    x, delta = torch.randn(2, 3, 64).to(dtype), torch.randn(2, 3, 64).to(dtype)
    ln = torch.nn.LayerNorm(64, eps=eps, bias=bias, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.5 * torch.randn(64))
        if bias:
            ln.bias.copy_(0.5 * torch.randn(64))
        want_s = x + delta
        want_h = ln(want_s)
        for backend in ("torch", None):
            s, h = add_layer_norm(x, delta, ln.weight, ln.bias, eps=eps, backend=backend)
            assert torch.equal(s, want_s)
            assert torch.equal(h, want_h)


def test_registry():
    assert registered("add_layer_norm") == ("torch", "triton")


def _op_args(backend, *, bias=True):
    x, delta = torch.randn(3, 2, 24), torch.randn(3, 2, 24)
    weight, b = _params(24, torch.float32, bias=bias)
    return x, delta, weight, b, 1e-5, backend


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, bias):
    torch.library.opcheck(_add_layer_norm_op, _op_args(backend, bias=bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_non_contiguous(backend):
    x, _, weight, b, eps, _ = _op_args(backend)
    delta = torch.randn(2, 3, 48)[..., ::2]  # (2, 3, 24), column stride 2
    torch.library.opcheck(_add_layer_norm_op, (x.transpose(0, 1), delta, weight, b, eps, backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_meta_shapes(dtype):
    x, delta = (torch.empty(4, 3, 96, dtype=dtype, device="meta") for _ in range(2))
    weight, bias = torch.empty(96, device="meta"), torch.empty(96, dtype=dtype, device="meta")
    s, h = add_layer_norm(x, delta, weight, bias)
    for t in (s, h):
        assert t.device.type == "meta" and t.shape == (4, 3, 96) and t.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    x, delta, weight, bias, _, _ = _op_args(backend)

    def fn(x, delta, weight, bias):
        s, h = add_layer_norm(x, delta, weight, bias)
        return s * 2, h

    torch._dynamo.reset()
    # The backend is resolved when the public function is traced, so the block must enclose the call.
    with use_backend(backend):
        want = fn(x, delta, weight, bias)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, delta, weight, bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _bad_cases():
    x, d = torch.randn(3, 8), torch.randn(3, 8)
    w, b = torch.ones(8), torch.zeros(8)
    return {
        "delta_shape": ((x, torch.randn(3, 9), w, b), {}, "delta"),
        "delta_dtype": ((x, d.double(), w, b), {}, "delta"),
        "int_x": ((x.long(), d.long(), w, b), {}, "x"),
        "float64_x": ((x.double(), d.double(), w, b), {}, "x"),
        "scalar_x": ((torch.tensor(1.0), torch.tensor(1.0), w, b), {}, "x"),
        "empty_last_dim": ((x[:, :0], d[:, :0], w[:0], b[:0]), {}, "x's last dim"),
        "weight_shape": ((x, d, torch.ones(9), b), {}, "weight"),
        "weight_2d": ((x, d, torch.ones(1, 8), b), {}, "weight"),
        "weight_dtype": ((x.bfloat16(), d.bfloat16(), w.half(), b), {}, "weight"),
        "bias_shape": ((x, d, w, torch.zeros(7)), {}, "bias"),
        "bias_int": ((x, d, w, torch.zeros(8, dtype=torch.long)), {}, "bias"),
        "weight_device": ((x, d, w.to("meta"), b), {}, "weight"),
        "eps_negative": ((x, d, w, b), {"eps": -1e-5}, "eps"),
        "eps_nan": ((x, d, w, b), {"eps": float("nan")}, "eps"),
        "backend": ((x, d, w, b), {"backend": "nope"}, "backend"),
        "too_wide_for_triton": ((torch.randn(1, 16385), torch.randn(1, 16385), torch.ones(16385), None),
                                {"backend": "triton"}, "backend='triton'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs(case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        add_layer_norm(*args, **kwargs)


def test_cuda_backend_is_not_offered():
    """On CUDA the Triton kernel is the op; asking for 'cuda' on CPU tensors fails at resolve time."""
    with pytest.raises(ValueError, match="cuda"):
        add_layer_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), None, backend="cuda")
