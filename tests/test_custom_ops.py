"""The public ops as torch custom ops (vqim::*): opcheck, fake (meta) shapes, torch.compile
with fullgraph=True, torch.export, and conv_attention's gradient through register_autograd."""

import pytest
import torch

from vqim.kernels import add_rms_norm, codebook_lookup, cfg_sample, conv_attention, conv_decode_attention, use_backend
from vqim.kernels.add_rms_norm import _add_rms_norm_op
from vqim.kernels.rope_decode_attention import _rope_decode_attention_op, rope_decode_attention
from vqim.kernels.cfg_sample import _cfg_sample_op, _row_params
from vqim.kernels.codebook_lookup import _codebook_lookup_op
from vqim.kernels.conv_attention import (_conv_attention_backward_op, _conv_attention_op, _conv_attention_triton,
                                         _conv_decode_attention_op, _conv_decode_attention_write_op)

GRID, KERNEL, PREFIX = (3, 4), (3, 3), 1
S = PREFIX + GRID[0] * GRID[1]
BACKENDS = ("torch", "triton")


def _qkv(requires_grad=False, device="cpu"):
    return [torch.randn(2, 2, S, 16, device=device, requires_grad=requires_grad) for _ in range(3)]


def _decode_args(device="cpu"):
    q = torch.randn(2, 2, 1, 16, device=device)
    kc, vc = torch.randn(2, 2, S, 16, device=device), torch.randn(2, 2, S, 16, device=device)
    return q, kc, vc, torch.tensor([3, S - 1], device=device)


def _decode_write_args(device="cpu"):
    """Decode inputs plus the new token's K/V as strided views of one fused QKV output."""
    q, kc, vc, pos = _decode_args(device)
    new = torch.randn(2, 3 * 2 * 16, device=device)  # (B, 3W)
    k_new, v_new = (new[:, i * 32:(i + 1) * 32].view(2, 2, 16)[:, :, None] for i in (1, 2))
    return q, kc, vc, pos, k_new, v_new


def _rope_args(device="cpu"):
    """A GQA step (4 q heads on 2 kv heads) at two positions; q, k_new, v_new strided views of one
    fused projection."""
    qkv = torch.randn(2, 8 * 16, device=device)  # (B, (Hq + 2 Hkv) Dh)
    q, k_new, v_new = (t.view(2, -1, 16)[:, :, None] for t in qkv.split([64, 32, 32], dim=1))
    kc, vc = torch.randn(2, 2, 9, 16, device=device), torch.randn(2, 2, 9, 16, device=device)
    ang = torch.rand(9, 8, device=device) * 6
    return q, kc, vc, torch.tensor([3, 8], device=device), k_new, v_new, ang.cos(), ang.sin()


def _cfg_args(device="cpu"):
    cond, uncond = torch.randn(3, 50, device=device), torch.randn(3, 50, device=device)
    prm = _row_params(3, torch.device(device), cfg_scale=2.0, temperature=0.8, top_k=10, top_p=0.9, seed=7, step=1)
    return cond, uncond, prm


def _op_cases(backend):
    g, k = list(GRID), list(KERNEL)
    cond, uncond, prm = _cfg_args()
    q, kc, vc, pos = _decode_args()
    return {
        "codebook_lookup": (_codebook_lookup_op, (torch.randn(5, 8), torch.randn(7, 8), False, backend)),
        "conv_attention": (_conv_attention_op, (*_qkv(requires_grad=True), g, k, PREFIX, None, backend)),
        "conv_decode_attention": (_conv_decode_attention_op, (q, kc, vc, pos, g, k, PREFIX, None, False, backend)),
        "conv_decode_attention_write": (_conv_decode_attention_write_op,
                                        (*_decode_write_args(), g, k, PREFIX, None, False, backend)),
        "cfg_sample": (_cfg_sample_op, (cond, uncond, *prm.values(), backend)),
        # x a transposed view; an fp32 weight with bf16 x makes h fp32.
        "add_rms_norm": (_add_rms_norm_op, (torch.randn(2, 3, 24).transpose(0, 1), torch.randn(3, 2, 24),
                                            torch.randn(24), 1e-5, backend)),
        "add_rms_norm_bf16": (_add_rms_norm_op, (torch.randn(3, 1, 24).bfloat16(), torch.randn(3, 1, 24).bfloat16(),
                                                 torch.randn(24), 1e-5, backend)),
        "rope_decode_attention": (_rope_decode_attention_op, (*_rope_args(), False, None, backend)),
        "rope_decode_attention_interleaved": (_rope_decode_attention_op, (*_rope_args(), True, 0.3, backend)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["codebook_lookup", "conv_attention", "conv_decode_attention",
                                  "conv_decode_attention_write", "cfg_sample", "add_rms_norm", "add_rms_norm_bf16",
                                  "rope_decode_attention", "rope_decode_attention_interleaved"])
def test_opcheck(name, backend):
    op, args = _op_cases(backend)[name]
    torch.library.opcheck(op, args)


def test_opcheck_conv_attention_backward():
    q, k, v = _qkv()
    o, lse = _conv_attention_op(q, k, v, list(GRID), list(KERNEL), PREFIX, None, "triton")
    torch.library.opcheck(_conv_attention_backward_op, (torch.randn_like(o), q, k, v, o, lse, list(GRID),
                                                        list(KERNEL), PREFIX, 0.25))


def _calls():
    """Small functions calling each public forward op, with their (real-tensor) inputs."""
    cond, uncond, _ = _cfg_args()
    return {
        "codebook_lookup": (lambda z, cb: codebook_lookup(z, cb), (torch.randn(5, 8), torch.randn(7, 8))),
        "conv_attention": (lambda q, k, v: conv_attention(q, k, v, grid=GRID, kernel=KERNEL, prefix=PREFIX) * 2,
                           tuple(_qkv())),
        "conv_decode_attention": (
            lambda q, kc, vc, pos: conv_decode_attention(q, kc, vc, pos, grid=GRID, kernel=KERNEL, prefix=PREFIX,
                                                         validate=False),
            _decode_args()),
        "cfg_sample": (
            lambda c, u: cfg_sample(c, u, seed=7, step=1, cfg_scale=2.0, temperature=0.8, top_k=10,
                                    return_logprob=True, validate=False),
            (cond, uncond)),
        "add_rms_norm": (lambda x, d, w: add_rms_norm(x, d, w), (torch.randn(3, 1, 24).bfloat16(),
                                                                  torch.randn(3, 1, 24).bfloat16(), torch.randn(24))),
    }


@pytest.mark.parametrize("name", ["codebook_lookup", "conv_attention", "conv_decode_attention", "cfg_sample",
                                  "add_rms_norm"])
def test_meta_shapes(name):
    fn, args = _calls()[name]
    want = fn(*args)
    got = fn(*(a.to("meta") for a in args))
    for w, g in zip(*(t if isinstance(t, tuple) else (t,) for t in (want, got))):
        assert g.device.type == "meta" and g.shape == w.shape and g.dtype == w.dtype


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["codebook_lookup", "conv_attention", "conv_decode_attention", "cfg_sample",
                                  "add_rms_norm"])
def test_compile_fullgraph(name, backend, compile_backend):
    fn, args = _calls()[name]
    torch._dynamo.reset()
    # The backend is resolved when the public function is traced, so the block must enclose the call.
    with use_backend(backend):
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend=compile_backend)(*args)
    for w, g in zip(*(t if isinstance(t, tuple) else (t,) for t in (want, got))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _decode_write(q, kc, vc, pos, k_new, v_new):
    return conv_decode_attention(q, kc, vc, pos, k_new=k_new, v_new=v_new, grid=GRID, kernel=KERNEL, prefix=PREFIX,
                                 validate=False)


def test_meta_shapes_conv_decode_attention_write():
    args = _decode_write_args()
    got = _decode_write(*(a.to("meta") for a in args))
    assert got.device.type == "meta" and got.shape == args[0].shape and got.dtype == args[0].dtype


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_conv_decode_attention_write_mutates_cache(backend, compile_backend):
    """The compiled call writes k_new/v_new into the caches in place (mutates_args survives
    functionalization), with the eager call's cache values and output."""
    q, kc, vc, pos, k_new, v_new = _decode_write_args()
    kc_eager, vc_eager = kc.clone(), vc.clone()
    torch._dynamo.reset()
    with use_backend(backend):
        want = _decode_write(q, kc_eager, vc_eager, pos, k_new, v_new)
        got = torch.compile(_decode_write, fullgraph=True, backend=compile_backend)(q, kc, vc, pos, k_new, v_new)
    for b, p in enumerate(pos.tolist()):
        assert torch.equal(kc[b, :, p], k_new[b, :, 0]) and torch.equal(vc[b, :, p], v_new[b, :, 0])
    torch.testing.assert_close(kc, kc_eager, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_eager, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _rope_step(q, kc, vc, pos, k_new, v_new, cos, sin):
    return rope_decode_attention(q, kc, vc, pos, k_new, v_new, cos, sin, interleaved=True, validate=False)


def test_meta_shapes_rope_decode_attention():
    args = _rope_args()
    got = _rope_step(*(a.to("meta") for a in args))
    assert got.device.type == "meta" and got.shape == args[0].shape and got.dtype == args[0].dtype


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_rope_decode_attention_mutates_cache(backend, compile_backend):
    """The compiled step writes rope(k_new)/v_new into the caches in place (mutates_args survives
    functionalization), with the eager call's cache values and output; Dynamo sees one op."""
    q, kc, vc, pos, k_new, v_new, cos, sin = _rope_args()
    kc_eager, vc_eager = kc.clone(), vc.clone()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compile_backend)(gm, example_inputs)

    torch._dynamo.reset()
    with use_backend(backend):
        want = _rope_step(q, kc_eager, vc_eager, pos, k_new, v_new, cos, sin)
        got = torch.compile(_rope_step, fullgraph=True, backend=capture)(q, kc, vc, pos, k_new, v_new, cos, sin)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.vqim.rope_decode_attention.default]
    for b, p in enumerate(pos.tolist()):
        assert torch.equal(vc[b, :, p], v_new[b, :, 0])
    torch.testing.assert_close(kc, kc_eager, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_eager, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_attention_grad_through_op(backend):
    q, k, v = _qkv(requires_grad=True)
    do = torch.randn(2, 2, S, 16)
    got = torch.autograd.grad(conv_attention(q, k, v, grid=GRID, kernel=KERNEL, prefix=PREFIX, backend=backend),
                              (q, k, v), do)
    # The autograd paths before the custom op: the reference's graph, or the Triton autograd.Function.
    if backend == "torch":
        from vqim.kernels import conv_attention_ref
        out = conv_attention_ref(q, k, v, grid=GRID, kernel=KERNEL, prefix=PREFIX)
    else:
        out = _conv_attention_triton(q, k, v, GRID, KERNEL, PREFIX, None)
    want = torch.autograd.grad(out, (q, k, v), do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_conv_attention_grad_compiled():
    q, k, v = _qkv(requires_grad=True)

    def fn(q, k, v):
        return conv_attention(q, k, v, grid=GRID, kernel=KERNEL, prefix=PREFIX).square().sum()

    want = torch.autograd.grad(fn(q, k, v), (q, k, v))
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_export_codebook_lookup():
    class Quantizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codebook = torch.nn.Parameter(torch.randn(7, 8))

        def forward(self, z):
            return codebook_lookup(z, self.codebook)

    m, z = Quantizer(), torch.randn(5, 8)
    ep = torch.export.export(m, (z,))
    assert any(n.target is torch.ops.vqim.codebook_lookup.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(z), m(z), rtol=0, atol=0)


def _adafactor_cases(backend):
    """Each Adafactor8bit step piece with inputs from the previous one (L, R, C) = (2, 8, 300)."""
    ops = torch.ops.vqim
    g3 = torch.randn(2, 8, 300)
    r, c, v = torch.rand(2, 8) + 0.5, torch.rand(2, 300) + 0.5, torch.rand(300) + 0.5
    rowpart, colpart = ops.adafactor8_row_col_sums(g3, backend)
    a, b = ops.adafactor8_factors(rowpart, colpart, r.clone(), c.clone(), 0.9, 1e-30, backend)
    parts = ops.adafactor8_sumsq(g3, a, b, backend)
    q = torch.randint(-127, 128, (g3.numel(),), dtype=torch.int8)
    scale = torch.rand(-(-g3.numel() // 256))
    return {
        "row_col_sums": (ops.adafactor8_row_col_sums.default, (g3, backend)),
        "factors": (ops.adafactor8_factors.default, (rowpart, colpart, r, c, 0.9, 1e-30, backend)),
        "full_factors": (ops.adafactor8_full_factors.default, (g3[:1, :1], v, 0.9, 1e-30, backend)),
        "sumsq": (ops.adafactor8_sumsq.default, (g3, a, b, backend)),
        "step": (ops.adafactor8_step.default,
                 (g3, torch.randn(2, 8, 300), q, scale, a, b, parts, 1e-3, 1.0, 0.9, 1.0, backend)),
    }


ADAFACTOR_OPS = ["row_col_sums", "factors", "full_factors", "sumsq", "step"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ADAFACTOR_OPS)
def test_opcheck_adafactor8(name, backend):
    op, args = _adafactor_cases(backend)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ADAFACTOR_OPS)
def test_meta_shapes_adafactor8(name, backend):
    op, args = _adafactor_cases(backend)[name]
    want = op(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    got = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    if name == "step":  # writes p3, q, scale in place and returns nothing
        assert want is None and got is None
        return
    for w, g in zip(*(t if isinstance(t, tuple) else (t,) for t in (want, got))):
        assert g.device.type == "meta" and g.shape == w.shape and g.dtype == w.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_sees_one_add_rms_norm_op(backend):
    """Dynamo's graph holds the whole fused op as one opaque vqim::add_rms_norm call."""
    fn, args = _calls()["add_rms_norm"]
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with use_backend(backend):
        torch.compile(fn, fullgraph=True, backend=capture)(*args)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vqim.add_rms_norm.default) == 1
    assert not [t for t in targets if t is not torch.ops.vqim.add_rms_norm.default and "getitem" not in str(t)]
