"""The backend registry and the compiled extension."""

import contextlib
import importlib
import shutil
from types import SimpleNamespace

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from vqim import kernels as K
from vqim.kernels import _ext, _registry, _triton, codebook_lookup, registered, use_backend


def test_every_public_op_has_all_backends():
    """Every op has its reference and its Triton kernel, and a CUDA twin where csrc has one
    (conv_attention's forward/backward, add_layer_norm, int8_linear and the Llama decoder's
    add_rms_norm and rope_decode_attention are Triton-only; the decode step has a twin, whose
    cache-writing form writes with torch first)."""
    ops = {op: registered(op) for op in _registry._IMPLS}
    cuda_twins = {"codebook_lookup", "cfg_sample", "conv_decode_attention", "conv_decode_attention_write",
                  "adafactor8_step", "adafactor8_sumsq", "adafactor8_row_col_sums", "adafactor8_factors",
                  "adafactor8_full_factors"}
    assert set(ops) == cuda_twins | {"conv_attention", "add_layer_norm", "int8_linear", "add_rms_norm",
                                     "rope_decode_attention"}
    for op, backends in ops.items():
        want = ("cuda", "torch", "triton") if op in cuda_twins else ("torch", "triton")
        assert backends == want, op


def test_default_backend_by_device():
    assert _registry.resolve_backend(None, torch.device("cpu")) == "torch"
    # Where triton is not installed (macOS, Windows) the reference serves CUDA tensors too
    # (tests/test_no_triton.py runs that case on every machine).
    cuda_default = "triton" if _triton.AVAILABLE else "torch"
    assert _registry.resolve_backend(None, torch.device("cuda", 0)) == cuda_default


def test_use_backend_overrides_default_and_restores():
    with use_backend("triton"):
        assert _registry.resolve_backend(None, torch.device("cpu")) == "triton"
        with use_backend(None):
            assert _registry.resolve_backend(None, torch.device("cpu")) == "torch"
    assert _registry.resolve_backend(None, torch.device("cpu")) == "torch"


def test_override_reaches_the_op(monkeypatch):
    calls = []
    impl = _registry._IMPLS["codebook_lookup"]["triton"]
    monkeypatch.setitem(_registry._IMPLS["codebook_lookup"], "triton", lambda *a: calls.append(1) or impl(*a))
    with use_backend("triton"):
        codebook_lookup(torch.randn(3, 8), torch.randn(4, 8))
    assert calls == [1]


def test_backend_errors(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        _registry.resolve_backend("cutlass", cpu)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        codebook_lookup(torch.randn(3, 8), torch.randn(4, 8), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _registry.resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("gpu"):
            pass


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA build is skipped by design")
def test_extension_built_and_exposes_ops():
    C = _ext.load()
    assert "codebook_lookup" in C.ops
    assert hasattr(C, "codebook_lookup")
    assert C.cuda_runtime_version() >= 12000


needs_ext = pytest.mark.skipif(shutil.which("nvcc") is None,
                               reason="nvcc not on PATH: the CUDA build is skipped by design")

# The params structs are checked in C++ before any CUDA call (the device check comes last), so
# every check below runs on a CPU-only machine. CPU tensors give real, readable pointers: params
# that pass every host-side check fail only at the device check. The structs hold raw pointers,
# so the tensors behind them live at module scope.
_Z, _Z3, _CB, _OUT = torch.zeros(5, 8), torch.zeros(3, 8), torch.zeros(4, 8), torch.zeros(5, dtype=torch.long)


def _codebook_lookup_params(C, z=_Z):
    return _ext.params(C.CodebookLookupParams, **_ext.operand("z", z), z_stride0=z.stride(0), z_stride1=z.stride(1),
                       **_ext.operand("codebook", _CB), cb_stride0=8, cb_stride1=1, **_ext.operand("out", _OUT),
                       N=z.shape[0], K=4, D=8, dtype=0, normalized=False, stream=0)


@needs_ext
def test_codebook_lookup_params_by_name():
    C = _ext.load()
    p = _codebook_lookup_params(C)
    assert (p.N, p.K, p.D, p.z_stride0) == (5, 4, 8, 8)
    with pytest.raises(AttributeError):
        p.z_stride = 1  # a misspelt field is an error, not a silently ignored attribute
    with pytest.raises(TypeError):
        C.codebook_lookup(0, 1, 1, 0, 1, 1, 0, 4, 4, 8, 0, False, 0)  # no positional ints any more


@needs_ext
@pytest.mark.parametrize("field,value,match", [
    ("D", 300, r"D must be in \[1, 256\]"),
    ("K", 0, "K >= 1"),
    ("dtype", 7, r"dtype must be a known dtype code \(0 float32, 1 float16, 2 bfloat16\), got 7"),
    ("z", 0, "z is a null pointer"),
    ("out", 0, "out is a null pointer"),
    ("z_stride1", -1, "z_stride1 must be >= 0"),
    ("z_extent", 0, "z_extent must be >= 1"),
    ("z_stride0", 9, "z with sizes and strides .*reaches element 43 but z_extent is 40"),
    ("out_extent", 4, "out with sizes and strides .*reaches element 4 but out_extent is 4"),
])
def test_codebook_lookup_rejects_bad_params(field, value, match):
    C = _ext.load()
    p = _codebook_lookup_params(C)
    setattr(p, field, value)
    with pytest.raises(ValueError, match=match):
        C.codebook_lookup(p)


@needs_ext
def test_swapped_strides_are_caught():
    C = _ext.load()
    p = _codebook_lookup_params(C, _Z3)
    p.z_stride0, p.z_stride1 = p.z_stride1, p.z_stride0  # [3, 8] read as (1, 8): reaches 2 + 7 * 8 = 58 >= 24
    with pytest.raises(ValueError, match="z_stride0=1.*z_stride1=8.*strides swapped"):
        C.codebook_lookup(p)


@needs_ext
def test_unset_fields_fail_the_checks():
    C = _ext.load()
    with pytest.raises(ValueError, match="N must be >= 0, got -1"):
        C.codebook_lookup(C.CodebookLookupParams())
    p = _codebook_lookup_params(C)
    p.cb_stride1 = C.CodebookLookupParams().cb_stride1  # left unset
    with pytest.raises(ValueError, match=r"cb_stride1 must be >= 0 \(negative strides are not supported\), got -1"):
        C.codebook_lookup(p)


@needs_ext
def test_valid_host_params_reach_the_device_check():
    """Host memory passes every host-side check and is refused by the pointer check (or, without
    a driver, by the CUDA call that makes it), never launched."""
    C = _ext.load()
    with pytest.raises((ValueError, RuntimeError), match="z is not device memory|CUDA error"):
        C.codebook_lookup(_codebook_lookup_params(C))


def _conv_decode_params(C):
    q, o = torch.zeros(2, 3, 1, 8), torch.zeros(2, 3, 1, 8)
    k, v = torch.zeros(2, 3, 10, 8), torch.zeros(2, 3, 10, 8)
    pos = torch.zeros(2, dtype=torch.long)
    fields = dict(**_ext.operand("q", q), q_stride_b=24, q_stride_h=8, q_stride_d=1,
                  **_ext.operand("o", o), o_stride_b=24, o_stride_h=8, o_stride_d=1, **_ext.operand("pos", pos),
                  B=2, H=3, D=8, S=10, P=2, GW=4, HH=1, HW=1, SPAN=8, NROWS=2, NCOLS=3, ring=False, scale=0.3,
                  dtype=1, stream=0)
    for name, t in (("k", k), ("v", v)):
        fields.update(_ext.operand(name, t), **{f"{name}_stride_{a}": s for a, s in zip("bhsd", t.stride())})
    return _ext.params(C.ConvDecodeAttentionParams, **fields), (q, o, k, v, pos)


@needs_ext
@pytest.mark.parametrize("field,value,match", [
    ("dtype", 3, "dtype must be a known dtype code"),
    ("V", 0, "V must be >= 1"),
    ("top_p", 0, "top_p is a null pointer"),
    ("min_p_extent", 1, "min_p with sizes and strides .*reaches element 1 but min_p_extent is 1"),
    ("tokens_extent", 1, "tokens with sizes and strides .*reaches element 1 but tokens_extent is 1"),
    ("uncond_stride1", -16, "uncond_stride1 must be >= 0"),
    ("cond_extent", 31, "cond with sizes and strides .*reaches element 31 but cond_extent is 31"),
])
def test_cfg_sample_rejects_bad_params(field, value, match):
    C = _ext.load()
    cond = torch.zeros(2, 16)
    # Every sampling setting's row (whatever SamplingParams holds), then the outputs.
    rows = {**importlib.import_module("vqim.kernels.cfg_sample")._row_params(2, torch.device("cpu"), seed=0, step=0),
            "tokens": torch.zeros(2, dtype=torch.long), "logprob": torch.zeros(2)}
    p = _ext.params(C.CfgSampleParams, **_ext.operand("cond", cond), cond_stride0=16, cond_stride1=1,
                    **_ext.operand("uncond", cond), uncond_stride0=16, uncond_stride1=1, has_uncond=True,
                    B=2, V=16, dtype=0, stream=0,
                    **{k: v for name, t in rows.items() for k, v in _ext.operand(name, t).items()})
    setattr(p, field, value)
    with pytest.raises(ValueError, match=match):
        C.cfg_sample(p)


@needs_ext
@pytest.mark.parametrize("field,value,match", [
    ("dtype", -1, "dtype must be a known dtype code"),
    ("S", 0, "S >= 1"),
    ("pos", 0, "pos is a null pointer"),
    ("o_stride_h", 4, "o is written, so its axes must not overlap"),
    ("v_extent", 479, "v with sizes and strides .*reaches element 479 but v_extent is 479"),
])
def test_conv_decode_attention_rejects_bad_params(field, value, match):
    C = _ext.load()
    p, keep = _conv_decode_params(C)
    setattr(p, field, value)
    with pytest.raises(ValueError, match=match):
        C.conv_decode_attention(p)
    del keep


@needs_ext
def test_conv_decode_attention_swapped_strides_are_caught():
    C = _ext.load()
    p, keep = _conv_decode_params(C)
    p.q_stride_h, p.q_stride_d = p.q_stride_d, p.q_stride_h  # q [2, 3, 8] read as (24, 1, 8): reaches 82 >= 48
    with pytest.raises(ValueError, match="q_stride_h=1.*q_stride_d=8.*strides swapped"):
        C.conv_decode_attention(p)
    del keep


@needs_ext
def test_conv_decode_attention_valid_host_params_reach_the_device_check():
    C = _ext.load()
    p, keep = _conv_decode_params(C)
    with pytest.raises((ValueError, RuntimeError), match="q is not device memory|CUDA error"):
        C.conv_decode_attention(p)
    del keep


@needs_ext
def test_cuda_launchers_fill_every_field(monkeypatch):
    """Each backend='cuda' launcher, run on CPU tensors with the device guard and stream stubbed,
    names every field right (a typo raises AttributeError, a forgotten one fails a host check), so
    its params pass all host-side checks and stop only at the device check."""
    cfg_mod = importlib.import_module("vqim.kernels.cfg_sample")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    rows = cfg_mod._row_params(3, torch.device("cpu"), cfg_scale=2.0, temperature=1.0, top_k=5, top_p=0.9, seed=1,
                               step=2)
    g3, p3 = torch.randn(2, 40, 300), torch.randn(2, 40, 300)
    a, b = torch.ones(80), torch.ones(600)
    kv = torch.randn(2, 3, 40, 16)
    calls = [
        ("codebook_lookup", (torch.randn(5, 8), torch.randn(4, 8).bfloat16(), False), {}),
        ("cfg_sample", (torch.randn(3, 50), torch.randn(3, 50)), rows),
        ("cfg_sample", (torch.randn(3, 50), None), rows),
        ("conv_decode_attention", (torch.randn(2, 3, 1, 16), kv, kv.clone(), torch.tensor([5, 7]), (4, 8), (3, 3), 2,
                                   None, False), {}),
        ("adafactor8_row_col_sums", (g3,), {}),
        ("adafactor8_factors", (torch.zeros(2, 2, 40), torch.zeros(1, 2, 300), torch.ones(2, 40), torch.ones(2, 300),
                                0.9, 1e-30), {}),
        ("adafactor8_full_factors", (torch.randn(1, 1, 100), torch.ones(100), 0.9, 1e-30), {}),
        ("adafactor8_sumsq", (g3, a, b), {}),
        ("adafactor8_step", (g3, p3, torch.zeros(p3.numel(), dtype=torch.int8), torch.zeros(p3.numel() // 256 + 1),
                             a, b, torch.zeros(3), 1e-3, 1.0, 0.9, 1.0, None, None), {}),
    ]
    for op, args, kwargs in calls:
        with pytest.raises((ValueError, RuntimeError), match="is not device memory|CUDA error"):
            _registry._IMPLS[op]["cuda"](*args, **kwargs)


def test_default_backend_carries_torchs_constant_mark_without_importing_dynamo():
    """The mark torch.compiler.assume_constant_result sets is the one _registry sets by hand
    (so compiled graphs keep the backend they were traced under, test_custom_ops), and
    importing vqim does not import torch._dynamo."""
    import subprocess
    import sys

    marked = torch.compiler.assume_constant_result(lambda: None)
    added = set(vars(marked)) - set(vars(lambda: None))
    assert added and all(getattr(_registry._default_backend, k) == getattr(marked, k) for k in added), added
    code = "import sys, vqim.engine, vqim.train.main; print('torch._dynamo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_loading_and_generating_do_not_import_dynamo():
    """README's main job (load the bundled model, draw an image, upscale it) never imports
    torch._dynamo (~1 s): the model is built on the meta device with its initializers skipped
    (initializing a meta tensor ran torch's meta kernels, which import it), and eager inference
    calls the ops' bodies (a custom op's CPU kernel is wrapped by torch to import it)."""
    import subprocess
    import sys

    code = ("import sys\nfrom vqim.engine import Engine\neng = Engine.from_pretrained(device='cpu')\n"
            "eng.generate(['a red circle'], seed=0, upscale=True)\nprint('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "False", r.stdout + r.stderr


def test_the_kernels_folder_cannot_be_imported_a_second_time_as_top_level_kernels():
    """From the checkout's root, `import kernels` (what transformers tries, for Hugging Face's
    kernel hub) would run this package again and register every vqim:: op a second time, after
    which op calls failed at random; it is refused, and transformers' Llama leaves the ops alone."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import torch, vqim.kernels as K\n"
        "op = torch.ops.vqim.add_rms_norm.default\n"
        "try:\n    import kernels\nexcept ImportError as e:\n    print('refused', 'vqim.kernels' in str(e))\n"
        "from transformers.models.llama.modeling_llama import LlamaRMSNorm\n"
        "LlamaRMSNorm(8)(torch.randn(2, 8))\n"
        "x = torch.randn(3, 8)\n"
        "s, h = K.add_rms_norm(x, x, torch.ones(8), eps=1e-6)\n"
        "print('kernels' in sys.modules, torch.ops.vqim.add_rms_norm.default is op, bool(torch.equal(s, x + x)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["refused", "True", "False", "True", "True"], r.stdout


class _Seen(TorchDispatchMode):
    """Records the ops it sees; its presence is what makes vqim ops run as ops."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _decode_op_calls():
    """One call of every public op the decode step makes, on fresh random CPU inputs (awkward
    sizes), each a thunk returning its outputs (and the caches it writes)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, d, w, b = r(3, 5, 37), r(3, 5, 37), r(37), r(37)
    k_cache, v_cache = r(2, 3, 40, 8), r(2, 3, 40, 8)
    q, kn, vn = r(2, 3, 1, 8), r(2, 3, 1, 8), r(2, 3, 1, 8)
    pos = torch.tensor([17, 30])
    qw, sc = K.quantize_int8(r(11, 37))
    cos, sin = r(64, 4), r(64, 4)
    z, codebook = r(7, 6), r(19, 6)
    cond, uncond = r(4, 50), r(4, 50)

    def conv_write():
        kc, vc = k_cache.clone(), v_cache.clone()
        o = K.conv_decode_attention(q, kc, vc, pos, grid=(6, 6), kernel=(3, 5), prefix=4, k_new=kn, v_new=vn)
        return o, kc, vc

    def rope():
        kc, vc = k_cache.clone(), v_cache.clone()
        return K.rope_decode_attention(q, kc, vc, pos, kn, vn, cos, sin, interleaved=False), kc, vc

    return {
        "add_layer_norm": lambda: K.add_layer_norm(x, d, w, b),
        "add_rms_norm": lambda: K.add_rms_norm(x, d, w),
        "int8_linear": lambda: K.int8_linear(x, qw, sc),
        "codebook_lookup": lambda: K.codebook_lookup(z, codebook),
        "conv_decode_attention": lambda: K.conv_decode_attention(q, k_cache, v_cache, pos, grid=(6, 6),
                                                                 kernel=(3, 5), prefix=4),
        "conv_decode_attention_write": conv_write,
        "rope_decode_attention": rope,
        "cfg_sample": lambda: K.cfg_sample(cond, uncond, seed=torch.arange(4), step=3, cfg_scale=2.0,
                                           top_k=7, return_logprob=True),
    }


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_eager_inference_calls_run_the_op_body_and_equal_the_op():
    """Under no_grad/inference mode with nothing watching, a public op runs its body without the
    torch.library round trip (no ``vqim::`` op reaches a dispatch mode); inside a dispatch mode it
    runs as the one op, and the two give bitwise the same outputs and cache writes."""
    for name, thunk in _decode_op_calls().items():
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                direct = _flat(thunk())
                seen = _Seen()
                with seen:
                    as_op = _flat(thunk())
            assert f"vqim.{name}.default" in seen.ops, (name, seen.ops[:5])
            assert len(direct) == len(as_op)
            for a, b in zip(direct, as_op):
                assert a.dtype == b.dtype and torch.equal(a, b), name


def test_recording_autograd_keeps_the_op(monkeypatch):
    """The body is used only in plain eager inference: with autograd recording the call goes
    through the op (whose missing autograd formula is then torch.library's to report). (A compiled
    function keeping the op in its graph: tests/test_decode_step.py's fullgraph tests.)"""
    called = []
    op = importlib.import_module("vqim.kernels.add_layer_norm")._add_layer_norm_op  # the name is the function
    body = _registry._BODIES[op]
    monkeypatch.setitem(_registry._BODIES, op, lambda *a: called.append(1) or body(*a))
    x = torch.randn(2, 8)
    with torch.no_grad():
        K.add_layer_norm(x, x, torch.ones(8), None)
    assert called == [1]
    K.add_layer_norm(x, x, torch.ones(8), None)  # grad mode on: through the op
    assert called == [1]


def test_meta_tensors_get_the_ops_fake_shapes():
    """Meta tensors (shapes only) go through the op, whose fake implementation answers, also in
    eager inference where the body would otherwise run."""
    q = torch.empty(2, 3, 1, 8, device="meta")
    kc = torch.empty(2, 3, 40, 8, device="meta")
    with torch.no_grad():
        o = K.conv_decode_attention(q, kc, kc.clone(), torch.empty(2, dtype=torch.long, device="meta"),
                                    grid=(6, 6), kernel=(3, 5), prefix=4, k_new=q, v_new=q, validate=False)
        x = torch.empty(3, 5, 37, device="meta")
        s, h = K.add_layer_norm(x, x, torch.empty(37, device="meta"), None)
    assert o.is_meta and o.shape == (2, 3, 1, 8)
    assert s.is_meta and h.is_meta and h.shape == (3, 5, 37)
