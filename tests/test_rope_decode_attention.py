"""rope_decode_attention and apply_rope_ref: the Triton kernel (interpreter) and the torch
backend against a float64 definition written independently here (RoPE as complex rotation,
attention per row over its slots), the cache writes bit for bit, decode steps against the
full-sequence path (apply_rope_ref + causal SDPA), and bad input named. The custom op
(opcheck with the mutation, meta shapes, torch.compile) is tested in test_custom_ops.py.

Tolerance (DESIGN §6): the kernel's distance to the float64 reference may be at most twice that
of plain PyTorch attention done in the inputs' dtype, plus one ulp of the output.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, EPS, assert_close, assert_within_torch_error
from vqim.kernels import apply_rope_ref, registered, rope_decode_attention, rope_decode_attention_ref

BACKENDS = ("torch", "triton")
S = 70  # not a multiple of the kernel's 64-key block
POS = (0, 1, 35, 64, 65, S - 1)  # the first slot, a full block before the query, one key past it, the last slot
# (Hkv, group Hq / Hkv, Dh, scale): MHA and GQA, head dims 8 / 64 / 128.
HEADS = [(2, 1, 8, None), (2, 2, 64, None), (1, 4, 128, 0.05)]


def rope_tables(p: int, d: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's 1D tables [P, Dh/2] in float32: angle of pair i at position t is t / base^(2i/Dh)."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (Dh/2,)
    ang = torch.arange(p, dtype=torch.float64)[:, None] * inv[None, :]  # (P, Dh/2)
    return ang.cos().float(), ang.sin().float()


def rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE in float64 written as complex rotation: pair (a, b) is a + ib, times e^(i angle)."""
    d = x.shape[-1]
    if interleaved:
        pairs = x.double().unflatten(-1, (d // 2, 2))  # (..., Dh/2, 2): (x[2i], x[2i+1])
    else:
        pairs = x.double().unflatten(-1, (2, d // 2)).transpose(-1, -2)  # (..., Dh/2, 2): (x[i], x[i+Dh/2])
    z = torch.view_as_complex(pairs.contiguous()) * torch.complex(cos.double(), sin.double())
    out = torch.view_as_real(z)  # (..., Dh/2, 2)
    return out.flatten(-2) if interleaved else out.transpose(-1, -2).flatten(-2)


def attend(qr: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Plain attention of row b over slots 0..pos[b] in the inputs' dtype, q head h on kv head
    h // G (repeat_interleave): [B, Hq, 1, Dh]."""
    g = qr.shape[1] // k_cache.shape[1]
    out = []
    for b, p in enumerate(pos.tolist()):
        k = k_cache[b, :, :p + 1].repeat_interleave(g, 0)  # (Hq, p + 1, Dh)
        v = v_cache[b, :, :p + 1].repeat_interleave(g, 0)  # (Hq, p + 1, Dh)
        out.append(((qr[b] @ k.transpose(-1, -2)) * scale).softmax(-1) @ v)  # (Hq, 1, Dh)
    return torch.stack(out)


def fused_qkv(b: int, hq: int, hkv: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """q [B, Hq, 1, Dh], k_new and v_new [B, Hkv, 1, Dh] as the model has them: strided views of
    one fused QKV projection."""
    qkv = torch.randn(b, (hq + 2 * hkv) * d).to(dtype)  # (B, (Hq + 2 Hkv) Dh)
    sizes = (hq * d, hkv * d, hkv * d)
    return [t.view(b, -1, d)[:, :, None] for t in qkv.split(sizes, dim=1)]


def caches(b: int, hkv: int, d: int, dtype: torch.dtype, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, S, Dh] caches holding earlier tokens' K/V; slots after each row's position hold
    NaN, which must never reach the output."""
    kc, vc = (torch.randn(b, hkv, S, d).to(dtype) for _ in range(2))
    later = torch.arange(S)[None, :] > pos[:, None]  # (B, S)
    for c in (kc, vc):
        c[later[:, None, :, None].expand_as(c)] = float("nan")
    return kc, vc


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so NaN slots compare equal to themselves."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def written(k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved):
    """The caches as the op must leave them: rope(k_new) and v_new at each row's slot, the rest unchanged."""
    k_want, v_want = k_cache.clone(), v_cache.clone()
    kr = apply_rope_ref(k_new, cos[pos][:, None, None], sin[pos][:, None, None], interleaved=interleaved)
    rows = torch.arange(pos.shape[0])
    k_want[rows, :, pos] = kr[:, :, 0]  # (B, Hkv, Dh)
    v_want[rows, :, pos] = v_new[:, :, 0]
    return k_want, v_want


def check_step(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved, scale, backend, msg=""):
    """One call: the caches written exactly as the definition, the output within torch's own
    error of the float64 reference over the written caches."""
    k_want, v_want = written(k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved)
    out = rope_decode_attention(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved=interleaved,
                                scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.equal(bits(k_cache), bits(k_want)), f"{msg} k_cache"
    assert torch.equal(bits(v_cache), bits(v_want)), f"{msg} v_cache"
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    c, s = cos[pos][:, None, None], sin[pos][:, None, None]
    ref = attend(rope64(q, c, s, interleaved), k_want.double(), v_want.double(), pos, sc)
    low = attend(apply_rope_ref(q, c, s, interleaved=interleaved), k_want, v_want, pos, sc)
    assert_within_torch_error(out, ref, low, msg=msg)  # plus one ulp of the output
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hkv,group,d,scale", HEADS, ids=lambda v: str(v))
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(dtype, interleaved, hkv, group, d, scale, backend):
    """Rows at different positions in one call; q, k_new, v_new strided views of a fused projection."""
    pos = torch.tensor(POS)
    b = pos.shape[0]
    q, k_new, v_new = fused_qkv(b, hkv * group, hkv, d, dtype)
    assert not q.is_contiguous()
    k_cache, v_cache = caches(b, hkv, d, dtype, pos)
    cos, sin = rope_tables(S + 5, d)
    check_step(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved, scale, backend,
               msg=f"{dtype} interleaved={interleaved} Hkv={hkv} G={group} Dh={d}")


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_steps_equal_full_sequence(interleaved):
    """Decoding a sequence token by token from an empty cache gives each position's row of the
    full-sequence path the model's prefill takes: apply_rope_ref on q and k, then causal SDPA."""
    b, hq, hkv, d, n = 2, 4, 2, 16, 9
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    cos, sin = rope_tables(n, d)
    qr = apply_rope_ref(q, cos, sin, interleaved=interleaved)  # (B, Hq, n, Dh)
    kr = apply_rope_ref(k, cos, sin, interleaved=interleaved)  # (B, Hkv, n, Dh)
    full = F.scaled_dot_product_attention(qr, kr.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    k_cache, v_cache = torch.zeros(b, hkv, n, d), torch.zeros(b, hkv, n, d)
    for t in range(n):
        sl = slice(t, t + 1)
        out = rope_decode_attention(q[:, :, sl], k_cache, v_cache, torch.full((b,), t), k[:, :, sl], v[:, :, sl],
                                    cos, sin, interleaved=interleaved, backend="triton")
        assert_close(out, full[:, :, sl], atol=1e-5, rtol=1e-5, msg=f"step {t}")
    assert_close(k_cache, kr, atol=0)
    assert_close(v_cache, v, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_table_rows_llamagen_class_token(backend):
    """LlamaGen's 2D table has all-zero rows for the class token: q and k rotate to zero, so the
    key is stored as zeros and a row whose query angle row is zero attends uniformly."""
    d, b = 16, 2
    cos, sin = rope_tables(S, d)
    cos[:4], sin[:4] = 0.0, 0.0
    pos = torch.tensor([0, 3])
    q, k_new, v_new = fused_qkv(b, 2, 2, d, torch.float32)
    k_cache, v_cache = caches(b, 2, d, torch.float32, pos)
    out = rope_decode_attention(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved=True, backend=backend)
    assert torch.equal(k_cache[torch.arange(b), :, pos].abs(), torch.zeros(b, 2, d))  # rows' written slots
    assert torch.equal(out[0], v_new[0])  # one key: its value
    assert_close(out[1, :, 0], v_cache[1, :, :4].mean(1), atol=1e-6)  # uniform over slots 0..3


def test_strided_inputs_give_the_same_bits():
    """Caches in the [B, S, Hkv, Dh] layout viewed as [B, Hkv, S, Dh], q from a [B, 1, Hq, Dh]
    tensor, cos/sin column slices of wider tables, pos int32 and an expanded pos: the same
    output and caches as contiguous inputs."""
    b, hkv, g, d = 3, 2, 2, 32
    cos, sin = rope_tables(S, d)
    wide = torch.cat([cos, sin], 1)  # (S, Dh): cos then sin columns
    for pos in (torch.tensor([5, 0, S - 1], dtype=torch.int32), torch.tensor([40]).expand(b)):
        q = torch.randn(b, 1, hkv * g, d).bfloat16().transpose(1, 2)  # (B, Hq, 1, Dh)
        k_new, v_new = (torch.randn(b, hkv, 1, d).bfloat16() for _ in range(2))
        kc, vc = (torch.randn(b, S, hkv, d).bfloat16().transpose(1, 2) for _ in range(2))
        kc2, vc2 = kc.contiguous(), vc.contiguous()
        out = rope_decode_attention(q, kc, vc, pos, k_new, v_new, wide[:, :d // 2], wide[:, d // 2:],
                                    interleaved=False, backend="triton")
        want = rope_decode_attention(q.contiguous(), kc2, vc2, pos.long().contiguous(), k_new, v_new, cos, sin,
                                     interleaved=False, backend="triton")
        assert torch.equal(out, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    q = torch.randn(0, 2, 1, 8)
    kc, vc = torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 8)
    cos, sin = rope_tables(5, 8)
    out = rope_decode_attention(q, kc, vc, torch.zeros(0, dtype=torch.long), q, q, cos, sin, interleaved=True,
                                backend=backend)
    assert out.shape == (0, 2, 1, 8)


def test_reference_ignores_slots_after_pos():
    """rope_decode_attention_ref is the definition: NaN or inf after a row's slot never reaches it."""
    pos = torch.tensor([2, S - 1])
    q, k_new, v_new = fused_qkv(2, 2, 2, 8, torch.float32)
    kc, vc = caches(2, 2, 8, torch.float32, pos)
    kc[0, :, 10] = float("inf")
    cos, sin = rope_tables(S, 8)
    assert torch.isfinite(rope_decode_attention_ref(q, kc, vc, pos, k_new, v_new, cos, sin, interleaved=False)).all()


def test_registry():
    assert registered("rope_decode_attention") == ("torch", "triton")


# --------------------------------------------------------------------------- apply_rope_ref

def test_apply_rope_ref_by_hand():
    """x = [1, 2, 3, 4]; pair 0 turned by 90 degrees (cos 0, sin 1), pair 1 not at all."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cos, sin = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    # Pairs (x0, x1), (x2, x3): (1, 2) -> (-2, 1); (3, 4) stays.
    assert apply_rope_ref(x, cos, sin, interleaved=True).tolist() == [-2.0, 1.0, 3.0, 4.0]
    # Pairs (x0, x2), (x1, x3): (1, 3) -> (-3, 1); (2, 4) stays.
    assert apply_rope_ref(x, cos, sin, interleaved=False).tolist() == [-3.0, 2.0, 1.0, 4.0]


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rope_ref_one_pair_by_60_degrees(interleaved):
    """(1, 0) turned by 60 degrees is (1/2, sqrt(3)/2); (0, 2) is (-sqrt(3), 1)."""
    c, s = torch.tensor([0.5]), torch.tensor([math.sqrt(3) / 2])
    assert_close(apply_rope_ref(torch.tensor([1.0, 0.0]), c, s, interleaved=interleaved),
                 torch.tensor([0.5, math.sqrt(3) / 2]), atol=1e-7)
    assert_close(apply_rope_ref(torch.tensor([0.0, 2.0]), c, s, interleaved=interleaved),
                 torch.tensor([-math.sqrt(3), 1.0]), atol=2e-7)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rope_ref_full_sequence(dtype, interleaved):
    """[B, H, T, Dh] with [T, Dh/2] tables broadcast: fp32 arithmetic rounded once to x's dtype."""
    x = torch.randn(2, 3, 11, 64).to(dtype)
    cos, sin = rope_tables(11, 64)
    out = apply_rope_ref(x, cos, sin, interleaved=interleaved)
    ref = rope64(x, cos, sin, interleaved)
    assert out.dtype == dtype
    assert_close(out, ref, atol=2 * EPS[torch.float32] * 4, rtol=EPS[dtype])


def test_apply_rope_ref_bad_inputs():
    with pytest.raises(ValueError, match="Dh .* must be even"):
        apply_rope_ref(torch.randn(2, 5), torch.randn(2), torch.randn(2), interleaved=False)
    with pytest.raises(ValueError, match="cos and sin must share a shape ending in Dh/2 = 4"):
        apply_rope_ref(torch.randn(2, 8), torch.randn(3), torch.randn(3), interleaved=True)


# --------------------------------------------------------------------------- bad input

def _bad_cases():
    b, hkv, g, d = 2, 2, 2, 8
    q = torch.randn(b, hkv * g, 1, d)
    kc, vc = torch.randn(b, hkv, 10, d), torch.randn(b, hkv, 10, d)
    kn, vn = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
    cos, sin = rope_tables(12, d)
    pos = torch.tensor([3, 9])
    args = {"q": q, "k_cache": kc, "v_cache": vc, "pos": pos, "k_new": kn, "v_new": vn, "cos": cos, "sin": sin}
    odd = torch.randn(b, hkv, 10, 7)
    return {
        "q_two_tokens": ({"q": torch.randn(b, 4, 2, d)}, {}, r"q must be \[B, Hq, 1, Dh\]"),
        "q_3d": ({"q": torch.randn(b, 4, d)}, {}, "q must be a 4-D tensor"),
        "q_float64": ({"q": q.double()}, {}, "q must be float32, float16 or bfloat16"),
        "k_new_dtype": ({"k_new": kn.bfloat16()}, {}, "k_new must have q's dtype"),
        "cache_dtype": ({"k_cache": kc.half()}, {}, "k_cache must have q's dtype"),
        "cache_device": ({"v_cache": vc.to("meta")}, {}, "v_cache must be on q's device"),
        "cache_shapes": ({"v_cache": vc[:, :, :9]}, {}, "k_cache and v_cache must both be"),
        "cache_batch": ({"k_cache": kc[:1], "v_cache": vc[:1]}, {}, "k_cache and v_cache must both be"),
        "groups": ({"q": torch.randn(b, 3, 1, d)}, {}, r"Hq = 3 must be a multiple of the caches' kv heads Hkv = 2"),
        "k_new_shape": ({"k_new": torch.randn(b, 4, 1, d)}, {}, r"k_new must be \[B, Hkv, 1, Dh\]"),
        "v_new_device": ({"v_new": vn.to("meta")}, {}, "v_new must be on q's device"),
        "odd_dh": ({"q": torch.randn(b, 4, 1, 7), "k_cache": odd, "v_cache": odd.clone(),
                    "k_new": torch.randn(b, hkv, 1, 7), "v_new": torch.randn(b, hkv, 1, 7)}, {},
                   "the head dim Dh must be even"),
        "expanded_cache": ({"k_cache": kc[:1].expand(b, -1, -1, -1)}, {}, "k_cache is written in place"),
        "cos_shape": ({"cos": cos[:, :3]}, {}, r"cos must be a 2-D table \[P >= 1, Dh/2 = 4\]"),
        "sin_dtype": ({"sin": sin.double()}, {}, "sin must be float32"),
        "cos_device": ({"cos": cos.to("meta")}, {}, "cos must be on q's device"),
        "tables_differ": ({"sin": sin[:11]}, {}, "cos and sin must have one shape"),
        "pos_float": ({"pos": pos.float()}, {}, "pos must be an int64/int32 tensor"),
        "pos_shape": ({"pos": pos[:1]}, {}, "pos must be an int64/int32 tensor"),
        "pos_device": ({"pos": pos.to("meta")}, {}, "pos must be on q's device"),
        "pos_past_cache": ({"pos": torch.tensor([3, 10])}, {}, r"pos must be in \[0, 10\)"),
        "pos_negative": ({"pos": torch.tensor([-1, 3])}, {}, r"pos must be in \[0, 10\)"),
        "pos_past_table": ({"cos": cos[:6], "sin": sin[:6]}, {}, r"pos must be in \[0, 6\) .*cos/sin rows 6"),
        "scale": ({}, {"scale": float("inf")}, "scale must be None or a finite number"),
        "backend": ({}, {"backend": "nope"}, "backend must be one of"),
        "dh_too_big_for_triton": ({"q": torch.randn(b, 4, 1, 258), "k_cache": torch.randn(b, hkv, 10, 258),
                                   "v_cache": torch.randn(b, hkv, 10, 258), "k_new": torch.randn(b, hkv, 1, 258),
                                   "v_new": torch.randn(b, hkv, 1, 258), "cos": torch.randn(12, 129),
                                   "sin": torch.randn(12, 129)}, {"backend": "triton"},
                                  "Dh must be <= 256 for backend='triton'"),
    }, args


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_inputs(case):
    cases, args = _bad_cases()
    given, kwargs, match = cases[case]
    call = {**args, **given}
    kc0, vc0 = call["k_cache"].clone(), call["v_cache"].clone()
    with pytest.raises(ValueError, match=match):
        rope_decode_attention(*call.values(), interleaved=False, **kwargs)
    # Refused before any work: the caches are untouched.
    for c, c0 in ((call["k_cache"], kc0), (call["v_cache"], vc0)):
        assert c.is_meta or torch.equal(bits(c), bits(c0))


def test_validate_false_skips_the_pos_check():
    """validate=False reads no value of pos (no host sync): on the meta device, where values
    cannot be read, only the shapes are checked."""
    meta = {k: v.to("meta") for k, v in _bad_cases()[1].items()}
    out = rope_decode_attention(*meta.values(), interleaved=True, validate=False)
    assert out.device.type == "meta" and out.shape == meta["q"].shape
    with pytest.raises(RuntimeError, match="meta"):
        rope_decode_attention(*meta.values(), interleaved=True)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_float64(dtype, interleaved):
    """The compiled kernel at model sizes: Janus-Pro-7B heads (32 x 128, MHA) and a GQA layout
    (32 q heads on 8 kv heads), a 1100-slot cache, rows across it."""
    for hkv, g in ((32, 1), (8, 4)):
        pos = torch.tensor([0, 1, 63, 64, 577, 1099], device="cuda")
        s, d, b = 1100, 128, pos.shape[0]
        q, k_new, v_new = (t.cuda() for t in fused_qkv(b, hkv * g, hkv, d, dtype))
        k_cache, v_cache = (torch.randn(b, hkv, s, d, device="cuda").to(dtype) for _ in range(2))
        cos, sin = (t.cuda() for t in rope_tables(s, d))
        check_step(q, k_cache, v_cache, pos, k_new, v_new, cos, sin, interleaved, None, "triton",
                   msg=f"{dtype} Hkv={hkv} G={g}")
