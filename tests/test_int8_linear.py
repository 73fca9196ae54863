"""quantize_int8 / int8_linear against the definition and a float64 computation.

Both the Triton kernel (interpreter) and the reference (int8_linear_ref) are compared with
``x.double() @ (qweight.double() * scale).T``; the kernel's error may be at most twice the
reference's plus one unit of the output dtype (helpers.assert_within_torch_error).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import DTYPES, EPS, assert_equal, assert_within_torch_error
from vqim.kernels._registry import use_backend
from vqim.kernels.int8_linear import _int8_linear_op, int8_linear, int8_linear_ref, quantize_int8

BACKENDS = ("torch", "triton")


def _exact(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * s.double()[:, None]).T


def _weights(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized random weights with row magnitudes spread over 1e-3..1e1, so scales differ."""
    w = torch.randn(n, k) * torch.logspace(-3, 1, n)[torch.randperm(n), None]
    return quantize_int8(w)


def check(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, backend: str = "triton", msg: str = "") -> None:
    y = int8_linear(x, q, s, backend=backend)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], q.shape[0]), (y.dtype, y.shape)
    assert_within_torch_error(y, _exact(x, q, s), int8_linear_ref(x, q, s), msg=msg)


# --- quantize_int8 -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_round_trip(dtype):
    w = (torch.randn(37, 91) * torch.logspace(-4, 2, 37)[:, None]).to(dtype)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (37,)
    assert int(q.abs().max()) <= 127
    # The row's amax maps to +-127; the float32 division may move a value by 127 * 2**-24 of a
    # step, which can only flip a round at .5.
    assert (q.abs().amax(dim=1) == 127).all()
    err = (q.double() * s.double()[:, None] - w.double()).abs()
    bound = s.double()[:, None] * (0.5 + 128 * EPS[torch.float32])
    assert (err <= bound).all(), f"worst error / scale {(err / s.double()[:, None]).max().item()}"
    torch.testing.assert_close(s, w.float().abs().amax(dim=1) / 127, rtol=0, atol=0)


def test_quantize_zero_and_tiny_rows():
    w = torch.randn(4, 9)
    w[1] = 0
    w[3] = 0
    w[3, 2] = 1e-45  # amax / 127 underflows to 0: treated as a zero row, never a division by zero
    q, s = quantize_int8(w)
    assert s[1].item() == 1.0 and s[3].item() == 1.0
    assert (q[1] == 0).all() and (q[3] == 0).all()
    assert torch.isfinite(s).all()


def test_quantize_empty_rows():
    q, s = quantize_int8(torch.empty(3, 0))
    assert q.shape == (3, 0) and q.dtype == torch.int8
    assert_equal(s, torch.ones(3))


@pytest.mark.parametrize("bad", [torch.randn(3), torch.randn(2, 3, 4), torch.randn(2, 3).double(),
                                 torch.ones(2, 3, dtype=torch.int8), torch.tensor([[1.0, float("nan")]]),
                                 torch.tensor([[float("inf"), 1.0]]), [[1.0]]])
def test_quantize_bad_weight(bad):
    with pytest.raises(ValueError, match="^weight "):
        quantize_int8(bad)


# --- int8_linear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_vs_reference(dtype, m):
    for n in (1, 7, 64, 130):
        for k in (1, 5, 64, 200):
            q, s = _weights(n, k)
            check(torch.randn(m, k).to(dtype), q, s, msg=f"{dtype} M={m} N={n} K={k}")


@pytest.mark.parametrize("m", [64, 70])
def test_triton_many_rows(m):
    # 64 rows fill one M-block; 70 need a second.
    q, s = _weights(9, 33)
    check(torch.randn(m, 33, dtype=torch.bfloat16), q, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_1d(dtype, backend):
    q, s = _weights(7, 40)
    check(torch.randn(2, 1, 40).to(dtype), q, s, backend)
    check(torch.randn(3, 2, 4, 40).to(dtype), q, s, backend)
    check(torch.randn(40).to(dtype), q, s, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(dtype, backend):
    q, s = _weights(130, 75)
    wide = torch.randn(5, 90).to(dtype)
    check(wide[:, 4:79], q, s, backend, msg="column slice")
    check(torch.randn(75, 3).to(dtype).T, q, s, backend, msg="transposed (K stride != 1)")
    check(torch.randn(2, 6, 75).to(dtype)[:, ::3], q, s, backend, msg="strided leading dim")
    # A transposed int8 weight and a strided scale are read through their strides too.
    qt = q.T.contiguous().T
    sw = torch.stack([s, s], dim=1)[:, 0]
    check(torch.randn(3, 75).to(dtype), qt, sw, backend, msg="strided qweight/scale")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    q, s = _weights(7, 5)
    assert int8_linear(torch.randn(0, 5), q, s, backend=backend).shape == (0, 7)
    assert int8_linear(torch.randn(2, 0, 5), q, s, backend=backend).shape == (2, 0, 7)
    q0, s0 = quantize_int8(torch.empty(4, 0))
    assert_equal(int8_linear(torch.randn(3, 0), q0, s0, backend=backend), torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_is_reference(dtype):
    q, s = _weights(130, 200)
    x = torch.randn(2, 3, 200).to(dtype)
    want = int8_linear_ref(x, q, s)
    assert_equal(int8_linear(x, q, s, backend="torch"), want)
    assert_equal(int8_linear(x, q, s), want)  # the CPU default


def test_dequantized_linear():
    # The quantized layer approximates the float one: error within K * scale/2 * |x| terms.
    w = torch.randn(48, 96)
    x = torch.randn(5, 96)
    q, s = quantize_int8(w)
    y = int8_linear(x, q, s, backend="triton")
    bound = (x.abs() @ torch.ones(96, 48)) * s / 2 * (1 + 1e-3) + 1e-5
    assert ((y - x @ w.T).abs() <= bound).all()


# --- custom op, fake, compile --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, dtype):
    q, s = _weights(7, 20)
    torch.library.opcheck(_int8_linear_op, (torch.randn(2, 3, 20).to(dtype), q, s, backend))


@pytest.mark.parametrize("dtype", DTYPES)
def test_meta_shapes(dtype):
    x, q, s = torch.randn(2, 1, 20).to(dtype), *_weights(7, 20)
    got = int8_linear(x.to("meta"), q.to("meta"), s.to("meta"))
    assert got.device.type == "meta" and got.shape == (2, 1, 7) and got.dtype == dtype
    with FakeTensorMode() as mode:
        fx, fq, fs = (mode.from_tensor(t) for t in (x, q, s))
        for backend in BACKENDS:
            got = _int8_linear_op(fx, fq, fs, backend)
            assert got.shape == (2, 1, 7) and got.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    q, s = _weights(7, 20)
    x = torch.randn(2, 1, 20, dtype=torch.bfloat16)

    def fn(x):
        return int8_linear(x, q, s) * 2

    torch._dynamo.reset()
    # The backend is resolved when the public function is traced, so the block must enclose the call.
    with use_backend(backend):
        want = fn(x)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- bad inputs ----------------------------------------------------------------------------------

def _bad_cases():
    x, q, s = torch.randn(3, 8), *quantize_int8(torch.randn(5, 8))
    return {
        "x int": ("x", (x.to(torch.int32), q, s)),
        "x float64": ("x", (x.double(), q, s)),
        "x 0-dim": ("x", (torch.tensor(1.0), q, s)),
        "x not a tensor": ("x", (x.tolist(), q, s)),
        "qweight float": ("qweight", (x, q.float(), s)),
        "qweight 1-D": ("qweight", (x, q[0], s)),
        "qweight 3-D": ("qweight", (x, q[None], s)),
        "qweight K mismatch": ("qweight", (x, q[:, :7], s)),
        "qweight device": ("qweight", (x, q.to("meta"), s)),
        "scale bf16": ("scale", (x, q, s.bfloat16())),
        "scale wrong N": ("scale", (x, q, s[:4])),
        "scale 2-D": ("scale", (x, q, s[:, None])),
        "scale not a tensor": ("scale", (x, q, s.tolist())),
        "scale device": ("scale", (x, q, s.to("meta"))),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs(case):
    name, args = _bad_cases()[case]
    with pytest.raises(ValueError, match=f"^{name} "):
        int8_linear(*args)
