"""The csrc/ CUDA kernels, run on the CPU by the harness (DESIGN §6, tests/cuda_harness.py).

Every kernel runs through its op's real launcher (the registry's ``"cuda"`` implementation,
which fills the params struct) on CPU tensors, against the torch reference on its op's test grid
shrunk to CPU sizes, with the tolerance rules of the Triton tests. Then the params-struct checks
through the same launchers, the harness's own model of CUDA (indices, shared memory, shuffles,
launch errors, conversions) and the misuses it must report instead of hanging. The last test
asserts that every ``__global__`` function in csrc/ ran and was checked.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import cuda_harness
from codebook_checks import (THRESHOLD_CASES, check_contract, check_lookup, check_true_argmax, issue_case,
                             scaled_duplicates, tie_threshold_case)
from helpers import EPS, assert_close, assert_equal, assert_within_torch_error
from vqim.kernels import Adafactor8bit, _ext, _registry, conv_cache_len, conv_cache_slot, conv_mask_ref
from vqim.kernels._registry import dispatch
from vqim.kernels.adafactor_hparams import EPS1
from vqim.kernels.cfg_sample import _row_params

try:
    cuda_harness.toolchain()
except cuda_harness.Unavailable as exc:
    pytest.skip(f"CUDA harness: {exc}", allow_module_level=True)
cuda_harness.check_sanitizer_runtime()

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def host():
    """The harness, standing in for ``_C`` in ``kernels._ext.launch`` for CPU tensors (CUDA
    tensors still launch on the GPU)."""
    harness = cuda_harness.load()
    gpu_launch = _ext.launch

    def launch(t: torch.Tensor):
        return harness.launch(t) if t.device.type == "cpu" else gpu_launch(t)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_ext, "launch", launch)
        yield harness


def cuda(op: str):
    """The op's ``"cuda"`` implementation: the launcher that fills the params struct and calls ``_C``
    (asking the registry for a CUDA device touches no GPU)."""
    return dispatch(op, "cuda", torch.device("cuda"))


def torch_impl(op: str):
    return dispatch(op, "torch", CPU)


# ================================================================================ the harness itself

def check_indices(host) -> None:
    """A 3-D grid of 3-D blocks: every thread runs once, with CUDA's x-fastest numbering."""
    grid, block = (3, 2, 2), (5, 3, 2)
    per_block, n = math.prod(block), math.prod(grid) * math.prod(block)
    out = torch.full((n, 2), -1, dtype=torch.long)
    host.module.probe_indices(out.data_ptr(), *grid, *block)
    g = torch.arange(n)
    assert_equal(out[:, 0], g // per_block, msg="block of each global thread")
    assert_equal(out[:, 1], g % per_block, msg="thread within its block")


def test_thread_and_block_indices(host):
    check_indices(host)


def test_shared_memory_is_per_block_and_starts_poisoned(host):
    """Before its first write a block sees 0xFF bytes, never the last block's values; after a
    barrier every thread sees what the others wrote, in static and dynamic shared memory."""
    blocks, threads = 3, 40
    before = torch.zeros(blocks * threads, 2, dtype=torch.int32)
    neighbour = torch.zeros(blocks * threads, 2, dtype=torch.int32)
    host.module.probe_shared(before.data_ptr(), neighbour.data_ptr(), blocks, threads, threads * 4)
    assert_equal(before, torch.full_like(before, -1))
    b, t = torch.arange(blocks)[:, None], torch.arange(threads)[None, :]  # (blocks, threads)
    assert_equal(neighbour[:, 0], (b * 1000 + (t + 1) % threads).reshape(-1))
    assert_equal(neighbour[:, 1], (b * 1000 + (t - 1) % threads + 500).reshape(-1))


def test_launch_configuration_errors(host):
    """As CUDA: more than 1024 threads, or more than 48 KiB of shared memory (static and dynamic
    together; probe_shared has 256 static bytes), is a launch error."""
    out = torch.zeros(2 * 1025, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"invalid configuration argument .*at most 1024"):
        host.module.probe_indices(out.data_ptr(), 1, 1, 1, 1025, 1, 1)
    with pytest.raises(RuntimeError, match=r"invalid argument .*48900 bytes of dynamic shared memory and 256 of "
                                           r"static: more than the 49152"):
        host.module.probe_shared(out.data_ptr(), out.data_ptr(), 1, 32, 48 * 1024 - 256 + 4)
    host.module.probe_shared(out.data_ptr(), out.data_ptr(), 1, 32, 48 * 1024 - 256)


def shuffle_sources(threads: int, operand: int, width: int) -> tuple[list[int], list[int]]:
    """CUDA's definition: the thread each lane reads for __shfl_xor_sync / __shfl_up_sync."""
    xor, up = [], []
    for t in range(threads):
        warp, lane = divmod(t, 32)
        seg = lane // width * width
        x = lane ^ operand
        xor.append(32 * warp + (x if x < seg + width else lane))
        up.append(32 * warp + (lane - operand if lane - operand >= seg else lane))
    return xor, up


@pytest.mark.parametrize("operand", [1, 3, 8])
@pytest.mark.parametrize("width", [32, 16, 8])
def test_warp_shuffles_follow_cuda(host, operand, width):
    threads = 48  # a full warp and a partial one
    out = torch.full((threads, 2), -1, dtype=torch.int32)
    host.module.probe_shuffle(out.data_ptr(), threads, operand, width)
    xor, up = shuffle_sources(threads, operand, width)
    assert_equal(out[:, 0], torch.tensor(xor, dtype=torch.int32), msg="__shfl_xor_sync")
    assert_equal(out[:, 1], torch.tensor(up, dtype=torch.int32), msg="__shfl_up_sync")


def test_misuse_is_reported_not_waited_on(host):
    """What hangs (or is undefined) on a GPU is an error naming the threads and the call sites;
    the next launch runs normally."""
    with pytest.raises(RuntimeError, match=r"__syncthreads at .*probes\.cu:\d+ reached by 32 of 64 threads.*"
                                           r"0-31 returned"):
        host.module.probe_partial_barrier(64, 32)
    with pytest.raises(RuntimeError, match=r"reached __syncthreads at .*probes\.cu:(\d+) while \d+ threads wait at "
                                           r"__syncthreads at .*probes\.cu:(?!\1)\d+"):
        host.module.probe_divergent_barrier(64)
    out = torch.zeros(48 * 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"warp shuffle waits for lanes that never arrive.*; 5 returned"):
        host.module.probe_partial_shuffle(5, out.data_ptr())
    with pytest.raises(RuntimeError, match=r"lane \d+ of warp 1 reads lane \d+, which is not in the mask 0xffff"):
        host.module.probe_shuffle(out.data_ptr(), 48, 16, 32)
    check_indices(host)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_conversions_are_exact(host, dtype):
    """The toolkit's host conversions (to_float / from_float of csrc/common.h) round as torch does:
    every 16-bit pattern to float32, and float32 to 16 bits (round to nearest even) on random bit
    patterns and on every halfway point between neighbouring 16-bit values."""
    code = _ext.DTYPE_CODES[dtype]
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # every pattern
    wide = torch.empty(bits.numel(), dtype=torch.float32)
    host.module.from_storage(code, bits.data_ptr(), wide.data_ptr(), bits.numel())
    want = bits.view(dtype).float()
    assert_equal(wide.isnan(), want.isnan())
    assert_equal(wide[~want.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))

    finite = want[want.isfinite()].double().unique()  # sorted
    halfway = ((finite[1:] + finite[:-1]) / 2).float()  # exact in float32
    x = torch.cat([torch.randint(-(2**31), 2**31 - 1, (20000,), dtype=torch.int32).view(torch.float32), halfway,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, 3.4e38])])
    x = x[~x.isnan()]
    narrow = torch.empty(x.numel(), dtype=torch.int16)
    host.module.to_storage(code, x.data_ptr(), narrow.data_ptr(), x.numel())
    assert_equal(narrow, x.to(dtype).view(torch.int16))


# ================================================================================ codebook_lookup

# Every DMAX instantiation (8 ... 256), N not a multiple of the 32 rows of a block, K past a
# codebook tile (8192 / DMAX codes), odd D, every dtype; "t" = non-contiguous operands.
LOOKUP_CASES = [
    (1, 1, 8, torch.float32, ""),
    (33, 1030, 8, torch.bfloat16, "t"),
    (97, 300, 16, torch.float16, ""),
    (70, 257, 31, torch.float32, "t"),
    (40, 130, 64, torch.bfloat16, ""),
    (33, 70, 100, torch.float16, "t"),
    (17, 40, 256, torch.float32, ""),
    (5, 33, 129, torch.bfloat16, "t"),
]


@pytest.mark.parametrize("n,k,d,dtype,layout", LOOKUP_CASES)
def test_codebook_lookup(host, n, k, d, dtype, layout):
    if layout == "t":
        z = torch.randn(2 * n, 3 * d).to(dtype)[::2, ::3]  # (N, D), strides (6D, 3)
        cb = torch.randn(d, k).to(dtype).T  # (K, D), column-major
    else:
        z, cb = torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)
    with host.checking():
        check_lookup(cuda("codebook_lookup")(z, cb, False), z, cb)


@pytest.mark.parametrize("z_dtype,cb_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_codebook_lookup_mixed_dtypes(host, z_dtype, cb_dtype):
    """Two dtypes: the launcher runs the fp32 kernel on exact upcasts, so the index is the float64
    argmax up to fp32 error, never a score rounded to the lower dtype."""
    z, cb = torch.randn(70, 32).to(z_dtype), torch.randn(300, 32).to(cb_dtype)
    with host.checking():
        check_contract(cuda("codebook_lookup")(z, cb, False), z, cb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codebook_lookup_ties_zeros_and_normalized(host, dtype):
    d = 32
    cb = torch.randn(600, d).to(dtype)
    # Identical codes tie exactly: in one tile (5, 9), across tiles (256 codes each at D = 32)
    # and across the warps that score every 8th code (300, 599).
    cb[[9, 300, 599]] = cb[5].clone()
    cb[[0, 64]] = 0  # zero codes score 0
    z = torch.cat([cb[[5, 300, 599]].repeat(10, 1), torch.randn(20, d).to(dtype), torch.zeros(3, d).to(dtype)])
    with host.checking():
        idx = cuda("codebook_lookup")(z, cb, False)
        assert (idx[:30] == 5).all(), f"ties must go to the lowest index, got {idx[:30].unique().tolist()}"
        assert idx[-3:].tolist() == [0, 0, 0], "zero rows of z give index 0"
        check_lookup(idx, z, cb)
        unit = torch.nn.functional.normalize(torch.randn(500, d), dim=1).to(dtype)
        check_lookup(cuda("codebook_lookup")(z, unit, True), z, unit, normalized=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(97, 600, 31), (40, 1030, 8), (17, 30, 100), (33, 300, 256)])
def test_codebook_lookup_scaled_duplicates(host, n, k, d, dtype):
    """Copies of a code at other scales tie exactly in cosine: the group's lowest index, whether the
    copies share a tile or not (8192 / DMAX codes a tile) and a warp or not (every 8th code)."""
    z, cb, expected = scaled_duplicates(n, k, d, dtype)
    with host.checking():
        assert_equal(cuda("codebook_lookup")(z, cb, False), expected)


def test_codebook_lookup_tie_rule(host):
    """The issue's case (e[40] = 2.5 e[7] -> 7), the threshold best - TIE_TOL on either side
    (kTieTol is TIE_TOL), the true argmax wherever nothing else comes within 2 TIE_TOL, and an
    index in range for NaN rows and codes."""
    with host.checking():
        z, cb = issue_case()
        assert cuda("codebook_lookup")(z, cb, False).tolist() == [7] * z.shape[0]
        for step, normalized in THRESHOLD_CASES:
            z, cb, expected = tie_threshold_case(step)
            assert cuda("codebook_lookup")(z, cb, normalized).tolist() == [expected] * 3, (step, normalized)
        z, cb = torch.randn(300, 32), torch.randn(1000, 32)
        idx = cuda("codebook_lookup")(z, cb, False)
        check_true_argmax(idx, z, cb)
        check_lookup(idx, z, cb)
        z[2, 5] = float("nan")
        cb[3, 0] = float("nan")
        idx = cuda("codebook_lookup")(z, cb, False)
        assert ((idx >= 0) & (idx < 1000)).all()


# ================================================================================ conv_decode_attention

def naive_attention(q, k, v, mask):
    """Plain attention in the inputs' dtype."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


def decode_caches(k: torch.Tensor, pos: torch.Tensor, grid, kernel, prefix: int, ring: bool, transposed: bool):
    """[B, H, S, Dh] caches of one sequence's keys ``k [1, H, S, Dh]``: row b after writing positions
    0..pos[b] in order, NaN in every slot it must not read (plain: later positions; ring: slots
    not written yet). ``transposed``: a [B, S, H, Dh] buffer viewed as [B, H, S, Dh]."""
    b, h, s, d = pos.shape[0], k.shape[1], k.shape[2], k.shape[3]
    n = conv_cache_len(grid, kernel, prefix) if ring else s
    cache = torch.full((b, n, h, d), float("nan"), dtype=k.dtype)  # (B, S_max, H, Dh)
    for j in range(s):
        slot = conv_cache_slot(j, grid, kernel, prefix) if ring else j
        cache[pos >= j, slot] = k[0, :, j]
    cache = cache.transpose(1, 2)
    return cache if transposed else cache.contiguous()


# (grid, kernel, prefix, Dh, dtype): Dh = 1, below 128 (thread groups split the keys), 130 (two
# passes over Dh), 256 (the largest); a kernel wider than the grid; every dtype.
DECODE_CASES = [
    ((5, 7), (3, 3), 1, 32, torch.float32),
    ((6, 9), (5, 7), 0, 24, torch.float16),
    ((4, 6), (11, 11), 3, 130, torch.bfloat16),
    ((3, 4), (3, 5), 2, 1, torch.float32),
    ((5, 5), (5, 5), 0, 256, torch.float16),
    ((2, 3), (11, 11), 4, 64, torch.bfloat16),
]


@pytest.mark.parametrize("grid,kernel,prefix,d,dtype", DECODE_CASES)
@pytest.mark.parametrize("ring", [False, True])
def test_conv_decode_attention(host, grid, kernel, prefix, d, dtype, ring):
    """One row per position (shuffled), against dense float64 attention under the §4 mask."""
    h, s = 2, prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(1, h, s, d).to(dtype) for _ in range(3))
    pos = torch.randperm(s)  # (B = S,)
    qkv = torch.randn(s, 3, h, d).to(dtype)  # queries as strided views of a fused projection
    qkv[:, 0] = q[0, :, pos].transpose(0, 1)
    q_dec = qkv[:, 0, :, None]  # (B, H, 1, Dh)
    transposed = d % 2 == 0
    kc = decode_caches(k, pos, grid, kernel, prefix, ring, transposed)
    vc = decode_caches(v, pos, grid, kernel, prefix, ring, transposed)
    rows = conv_mask_ref(grid, kernel, prefix)[pos][:, None, None, :]  # (B, 1, 1, S)
    with host.checking():
        out = cuda("conv_decode_attention")(q_dec, kc, vc, pos, grid, kernel, prefix, None, ring)
        ref = naive_attention(q_dec.double(), k.double(), v.double(), rows)
        assert_within_torch_error(out, ref, naive_attention(q_dec, k, v, rows), msg=f"ring={ring}")


def test_conv_decode_attention_shared_memory_limit(host):
    """4052 candidate keys (prefix + window) fill a block's 48 KiB of shared memory exactly, with
    the kernel's static scratch; 4053 are refused by name (they passed the check, which forgot
    the static bytes, and failed the launch)."""
    d, grid, kernel = 4, (2, 2000), (3, 4001)  # window: 2 rows x 2000 columns
    for prefix, runs in ((52, True), (53, False)):
        s = prefix + grid[0] * grid[1]
        q, k, v = (torch.randn(1, 1, s, d) for _ in range(3))
        pos = torch.tensor([s - 1])
        args = (q[:, :, -1:], k, v, pos, grid, kernel, prefix, None, False)
        if not runs:
            with pytest.raises(ValueError, match=r"prefix \+ window keys \(4053\) need more than 48 KiB"):
                cuda("conv_decode_attention")(*args)
            continue
        rows = conv_mask_ref(grid, kernel, prefix)[pos][:, None, None, :]  # (1, 1, 1, S)
        with host.checking():
            out = cuda("conv_decode_attention")(*args)
            ref = naive_attention(q[:, :, -1:].double(), k.double(), v.double(), rows)
            assert_within_torch_error(out, ref, naive_attention(q[:, :, -1:], k, v, rows))


@pytest.mark.parametrize("ring", [False, True])
def test_conv_decode_attention_write(host, ring):
    """With k_new / v_new: the caches written as the torch backend writes them, and the output of
    the csrc kernel on them."""
    grid, kernel, prefix, h, d = (4, 5), (3, 3), 2, 2, 16
    pos = torch.tensor([0, 2, 6, 13, 21])
    n = conv_cache_len(grid, kernel, prefix) if ring else prefix + grid[0] * grid[1]
    caches = [torch.randn(5, h, n, d) for _ in range(2)]
    q, k_new, v_new = (torch.randn(5, h, 1, d) for _ in range(3))
    want_k, want_v = (c.clone() for c in caches)
    geo = (grid, kernel, prefix, None, ring)
    want = torch_impl("conv_decode_attention_write")(q, want_k, want_v, pos, k_new, v_new, *geo)
    with host.checking():
        out = cuda("conv_decode_attention_write")(q, caches[0], caches[1], pos, k_new, v_new, *geo)
        assert torch.equal(caches[0], want_k) and torch.equal(caches[1], want_v)
        assert_close(out, want, atol=1e-6, rtol=1e-5)


# ================================================================================ cfg_sample

def tied_rows(b: int, v: int) -> torch.Tensor:
    """Rows with heavy exact ties: small integers, halves, and bf16-rounded normals."""
    ints = torch.randint(-3, 4, (b // 3, v)).float()
    halves = torch.randint(-6, 7, (b // 3, v)).float() / 2
    bf16 = (torch.randn(b - 2 * (b // 3), v) * 2).bfloat16().float()
    return torch.cat([ints, halves, bf16])


def check_same_draws(cond, uncond, prm) -> None:
    """Token for token the torch reference's draws, log-probabilities to fp32 rounding."""
    want_tok, want_lp = torch_impl("cfg_sample")(cond, uncond, **prm)
    got_tok, got_lp = cuda("cfg_sample")(cond, uncond, **prm)
    assert_equal(got_tok, want_tok)
    assert_close(got_lp, want_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cfg_sample_mixed_settings(host, dtype):
    """Every setting mixed per row (greedy, top-k, top-p, min-p, guidance), masked entries, a tied
    row, non-contiguous logits; V not a multiple of the 512 threads."""
    b, v = 24, 611
    cond = (torch.randn(b, 2 * v) * 2).to(dtype)[:, ::2]  # non-contiguous
    uncond = (torch.randn(v, b) * 2).to(dtype).T  # column-major
    cond[3, :50] = float("-inf")
    uncond[4, 7::3] = float("-inf")
    cond[5] = torch.where(torch.arange(v) % 2 == 0, 1.0, -1.0).to(dtype)  # heavy ties
    prm = _row_params(
        b, CPU,
        cfg_scale=torch.tensor([0.0, 1.0, 3.0, 10.0] * 6),
        temperature=torch.tensor([1.0, 0.7, 2.0, 0.0, 1.0, 1.3] * 4),
        top_k=torch.tensor([0, 1, 5, 0, 200, 40, 3, 0] * 3),
        top_p=torch.tensor([1.0, 0.9, 1e-6, 0.5, 1.0, 0.3] * 4),
        min_p=torch.tensor([0.0, 0.0, 0.05, 0.3, 0.0, 1e-3, 0.6, 1.0] * 3),
        seed=torch.randint(0, 2**62, (b,)), step=torch.randint(0, 2**40, (b,)),
    )
    with host.checking():
        check_same_draws(cond, uncond, prm)


# 12224: the largest row the kernel caches in shared memory (48 KiB with its static scratch);
# 12288: the uncached kernel (it was cached, and a GPU refuses 48 KiB of dynamic shared memory
# plus the static scratch).
@pytest.mark.parametrize("v", [37, 12224, 12288])
def test_cfg_sample_tie_groups_and_min_p(host, v):
    """Rows of exact ties: top-k keeps a tie group whole, top-p's cut keeps only the lowest indices
    it needs, min-p on what is left; without guidance."""
    b = 9 if v > 1000 else 48
    z = tied_rows(b, v)
    z[5::6, 1::4] = float("-inf")
    k = torch.randint(0, v + 3, (b,))
    k[::2] = 0
    p = torch.rand(b).clamp_min(1e-3)
    p[1::3] = 1.0
    mp = torch.rand(b)
    mp[::4] = 1.0
    mp[2::4] = 0.0
    prm = _row_params(b, CPU, cfg_scale=1.0, temperature=1.0, top_k=k, top_p=p, min_p=mp,
                      seed=torch.randint(0, 2**62, (b,)), step=torch.arange(b))
    with host.checking():
        check_same_draws(z, None, prm)


def test_cfg_sample_top_p_cut_inside_a_tie_group(host):
    """Hugging Face's example: the top token, then six equal tokens, p reached by the third of
    them: only tokens {0, 1, 2, 3} may be drawn, at the probabilities of that set."""
    z = torch.full((12,), -3.0)
    z[3] = 1.0
    z[[0, 1, 2, 4, 5, 6]] = 0.0
    w = torch.exp(z.double() - 1)
    p = float((w[3] + 2.5 * w[0]) / w.sum())
    n = 64
    prm = _row_params(n, CPU, cfg_scale=1.0, top_p=p, seed=5, step=torch.arange(n))
    with host.checking():
        tok, lp = cuda("cfg_sample")(z.expand(n, -1), None, **prm)
        assert set(tok.tolist()) <= {0, 1, 2, 3} and 3 in tok.tolist()
        p_top = 1 / (1 + 3 * math.exp(-1))
        assert_close(lp, torch.where(tok == 3, math.log(p_top), math.log(p_top) - 1.0).float(), atol=1e-5)
        check_same_draws(z.expand(n, -1), None, prm)


def test_cfg_sample_all_masked_row_and_greedy_ties(host):
    b, v = 4, 50
    cond = torch.randn(b, v)
    cond[2] = float("-inf")
    cond[3] = 0.0  # greedy over a row of equal values: the lowest index
    prm = _row_params(b, CPU, cfg_scale=5.0, temperature=torch.tensor([1.0, 0.5, 1.0, 0.0]), top_k=4, seed=3,
                      step=1)
    with host.checking():
        tok, lp = cuda("cfg_sample")(cond, None, **prm)
        assert int(tok[2]) == -1 and math.isnan(float(lp[2]))
        assert int(tok[3]) == 0 and float(lp[3]) == 0.0
        assert_equal(tok, torch_impl("cfg_sample")(cond, None, **prm)[0])


# ================================================================================ adafactor8

ADAFACTOR_OPS = ["adafactor8_row_col_sums", "adafactor8_factors", "adafactor8_full_factors", "adafactor8_sumsq",
                 "adafactor8_step"]


def grad3(shape, dtype, kind):
    """An (L, R, C) gradient: contiguous, transposed (last two axes swapped) or strided."""
    if kind == "transposed":
        return torch.randn(shape[0], shape[2], shape[1]).to(dtype).transpose(1, 2)
    if kind == "strided":
        return torch.randn(shape[0], shape[1], 2 * shape[2]).to(dtype)[:, :, ::2]
    return torch.randn(shape).to(dtype)


# (L, R, C): general layout, C > 256 (column tiles), C % 256 == 0 (the per-block index path),
# more than 64 row tiles (row groups), more than one sumsq CTA (N > 32 * 256).
FACTORED = [
    ((1, 97, 111), torch.float32, "contiguous"),
    ((2, 5, 600), torch.bfloat16, "strided"),
    ((2, 3, 512), torch.float16, "transposed"),
    ((1, 2100, 3), torch.float32, "transposed"),
    ((3, 40, 90), torch.bfloat16, "contiguous"),
]


@pytest.mark.parametrize("shape,dtype,kind", FACTORED)
def test_adafactor8_factored_pieces(host, shape, dtype, kind):
    """Row/column sums of g^2, the factors, the sum of u^2 and the fused step, each from the same
    inputs as the torch path: statistics within twice torch's own fp32 error of float64, the step
    as the torch path computes it (the kernels' semantics exactly)."""
    L, R, C = shape
    g3 = grad3(shape, dtype, kind)
    g64 = g3.double().square()
    with host.checking():
        rowpart, colpart = cuda("adafactor8_row_col_sums")(g3)
        t_row, t_col = torch_impl("adafactor8_row_col_sums")(g3)
        assert_within_torch_error(rowpart.sum(0), g64.sum(2), t_row.sum(0), msg="row sums")
        assert_within_torch_error(colpart.sum(0), g64.sum(1), t_col.sum(0), msg="column sums")

        r0, c0 = torch.rand(L, R) + 0.5, torch.rand(L, C) + 0.5
        args = (0.9, EPS1)
        r, c = r0.clone(), c0.clone()
        a, b = cuda("adafactor8_factors")(rowpart, colpart, r, c, *args)
        r_t, c_t = r0.clone(), c0.clone()
        a_t, b_t = torch_impl("adafactor8_factors")(rowpart, colpart, r_t, c_t, *args)
        r_hi, c_hi = r0.double(), c0.double()
        a_hi, b_hi = torch_impl("adafactor8_factors")(rowpart.double(), colpart.double(), r_hi, c_hi, *args)
        for got, hi, low, name in ((r, r_hi, r_t, "r"), (c, c_hi, c_t, "c"), (a, a_hi, a_t, "a"), (b, b_hi, b_t, "b")):
            assert_within_torch_error(got, hi, low, msg=name)

        check_sumsq_and_step(g3, a, b, dtype)


@pytest.mark.parametrize("n,dtype,kind", [(1025, torch.bfloat16, "strided"), (5, torch.float32, "contiguous"),
                                          (1, torch.float16, "contiguous"), (9000, torch.float32, "strided")])
def test_adafactor8_unfactored_pieces(host, n, dtype, kind):
    """Rank < 2: the full second moment, then the same sum of u^2 and step on a (1, 1, N) view."""
    g3 = grad3((1, 1, n), dtype, kind)
    v0 = torch.rand(n) + 0.5
    with host.checking():
        v = v0.clone()
        b = cuda("adafactor8_full_factors")(g3, v, 0.9, EPS1)
        v_t = v0.clone()
        b_t = torch_impl("adafactor8_full_factors")(g3, v_t, 0.9, EPS1)
        v_hi = 0.9 * v0.double() + 0.1 * (g3.double().reshape(-1).square() + EPS1)
        assert_within_torch_error(v, v_hi, v_t, msg="v")
        assert_within_torch_error(b, v_hi.rsqrt(), b_t, msg="b")
        check_sumsq_and_step(g3, torch.ones(1), b, dtype)


def check_sumsq_and_step(g3: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    L, R, C = g3.shape
    n = g3.numel()
    parts = cuda("adafactor8_sumsq")(g3, a, b)
    u64 = g3.double() * a.double().view(L, R, 1) * b.double().view(L, 1, C)  # (L, R, C)
    assert_within_torch_error(parts.sum().reshape(1), u64.square().sum().reshape(1),
                              torch_impl("adafactor8_sumsq")(g3, a, b), msg="sum of u^2")
    nb = -(-n // 256)
    q0 = torch.randint(-127, 128, (n,), dtype=torch.int8)
    scale0 = torch.rand(nb) * 1e-2
    p0 = (torch.randn(L, R, C) * 2).to(dtype)
    state = {}
    for name, impl in (("cuda", cuda("adafactor8_step")), ("torch", torch_impl("adafactor8_step"))):
        p3, q, scale = p0.clone(), q0.clone(), scale0.clone()
        # Strong clipping (threshold 0.1) so the clip factor takes part.
        impl(g3, p3, q, scale, a, b, parts, 3e-2, 1 - 3e-2 * 4.5e-2, 0.9, 0.1, "nearest", None)
        state[name] = (p3, q, scale)
    (p3, q, scale), (p_t, q_t, scale_t) = state["cuda"], state["torch"]
    # A value exactly on a rounding boundary of m * 127 / absmax may round either way: one step.
    assert (q.int() - q_t.int()).abs().max() <= 1
    assert_close(scale, scale_t, atol=0, rtol=1e-6, msg="scales")
    assert_close(p3.float(), p_t.float(), atol=0, rtol=EPS[dtype], msg="params")


def test_adafactor8_three_steps_equal_torch_path(host, monkeypatch):
    """Adafactor8bit itself, its pieces served by the CUDA launchers (the registry's torch entries
    rebound for this test: the "cuda" backend refuses CPU tensors), against its torch path: as
    the Triton test, the same int8 state after three steps, one shape per index layout."""
    shapes = [(97, 111), (2, 3, 40), (3, 512), (1025,), (5,), ()]
    params = {name: [torch.randn(s, requires_grad=True) for s in shapes] for name in ("cuda", "torch")}
    for a, b in zip(*params.values()):
        b.data.copy_(a.data)
    opts = {name: Adafactor8bit(ps, lr=3e-2, backend="torch") for name, ps in params.items()}
    with host.checking():
        for _ in range(3):
            for i, s in enumerate(shapes):
                g = torch.randn(s)
                params["cuda"][i].grad, params["torch"][i].grad = g.clone(), g.clone()
            with monkeypatch.context() as mp:
                for op in ADAFACTOR_OPS:
                    mp.setitem(_registry._IMPLS[op], "torch", cuda(op))
                opts["cuda"].step()
            opts["torch"].step()
        for pc, pt in zip(params["cuda"], params["torch"]):
            sc, st = opts["cuda"].state[pc], opts["torch"].state[pt]
            assert (sc["exp_avg_q"].int() - st["exp_avg_q"].int()).abs().max() <= 1
            assert_close(sc["exp_avg_scale"], st["exp_avg_scale"], atol=0, rtol=1e-5)
            assert_close(pc.detach(), pt.detach(), atol=1e-6, rtol=1e-5)


# ================================================================================ params-struct checks

def entry_points(module) -> set[str]:
    """The functions of ``_C`` that take a params struct: every kernel's launch entry."""
    return {n for n in dir(module) if not n[0].isupper() and "Params" in (getattr(module, n).__doc__ or "")}


# Operands of one element (extent 1 covers them): the sum of u^2, which the step reads.
_ONE_ELEMENT = {("adafactor8_sumsq", "out"), ("adafactor8_step", "sumsq_parts")}


def spoilt_fields(name: str, p) -> list[tuple[str, int, str]]:
    """(field, bad value, the error it must raise) for every check a struct's fields allow: a null
    pointer, an extent its operand outruns, a negative stride, an unknown dtype code."""
    fields = [f for f in dir(p) if not f.startswith("_")]
    out = []
    for f in fields:
        if f + "_extent" in fields:
            out.append((f, 0, rf"{f} is a null pointer"))
            if (name, f) not in _ONE_ELEMENT:
                out.append((f + "_extent", 1, rf"{f} with sizes and strides .* but {f}_extent is 1"))
        elif "stride" in f:
            out.append((f, -1, rf"{f} must be >= 0"))
        elif f == "dtype":
            out.append((f, 3, r"dtype must be a known dtype code"))
    return out


class Spoiler:
    """Stands in for ``_C`` in a launch. Each entry point is first called with each spoilt field of
    the struct the launcher filled (while the launcher's tensors are alive), then as filled."""

    def __init__(self, host):
        self.host, self.module, self.entries, self.spoilt = host, host.module, entry_points(host.module), {}

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if name not in self.entries:
            return attr

        def call(params):
            launches = self.host.launches()
            cases = spoilt_fields(name, params)
            for field, bad, match in cases:
                good = getattr(params, field)
                setattr(params, field, bad)
                try:
                    with pytest.raises(ValueError, match=match):
                        attr(params)
                        pytest.fail(f"{name} launched with {field} = {bad}")
                finally:
                    setattr(params, field, good)
            assert self.host.launches() == launches, f"{name}: a spoilt struct launched a kernel"
            self.spoilt[name] = [field for field, _, _ in cases]
            return attr(params)

        return call


def test_params_struct_checks_through_the_launchers(host):
    """Every entry point once through its launcher on small valid inputs (every operand of two
    elements or more but the one-element sums), each field spoilt in turn first: every check
    raises a ValueError naming the field before anything is launched."""
    spoiler = Spoiler(host)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(host, "module", spoiler)
        cuda("codebook_lookup")(torch.randn(5, 8), torch.randn(4, 8), False)
        kc, vc = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
        cuda("conv_decode_attention")(torch.randn(2, 2, 1, 8), kc, vc, torch.tensor([3, 5]), (2, 3), (3, 3), 0,
                                      None, False)
        cuda("cfg_sample")(torch.randn(2, 16), torch.randn(2, 16), **_row_params(2, CPU, seed=0, step=0))
        g3 = torch.randn(2, 3, 1400)  # 33 blocks of 256 values: two sumsq CTAs
        rowpart, colpart = cuda("adafactor8_row_col_sums")(g3)
        a, b = cuda("adafactor8_factors")(rowpart, colpart, torch.ones(2, 3), torch.ones(2, 1400), 0.9, EPS1)
        cuda("adafactor8_full_factors")(g3[:1, :1], torch.ones(1400), 0.9, EPS1)
        parts = cuda("adafactor8_sumsq")(g3, a, b)
        cuda("adafactor8_step")(g3, g3.clone(), torch.zeros(8400, dtype=torch.int8), torch.zeros(33), a, b, parts,
                                1e-2, 0.99, 0.9, 1.0, "nearest", None)
    assert set(spoiler.spoilt) == spoiler.entries
    for name, fields in spoiler.spoilt.items():
        assert any(f.endswith("_extent") for f in fields), (name, fields)


# ================================================================================ on a GPU

@pytest.mark.gpu
def test_gpu_shared_memory_limits():
    """The harness's findings where a GPU decides: rows of 12224 logits (cached in shared memory)
    and 12288 (not) launch; 4052 decode candidates launch and 4053 are refused by name."""
    dev = torch.device("cuda")
    for v in (12224, 12288):
        z = tied_rows(6, v).to(dev)
        # Greedy rows (exact on any machine: argmax, ties to the lowest index) and sampled ones.
        prm = _row_params(6, dev, cfg_scale=1.0, temperature=torch.tensor([0.0, 1.0] * 3, device=dev), top_p=0.9,
                          seed=torch.arange(6, device=dev), step=torch.arange(6, device=dev))
        tok, _ = cuda("cfg_sample")(z, None, **prm)
        want, _ = dispatch("cfg_sample", "torch", dev)(z, None, **prm)
        assert_equal(tok[::2], want[::2])
        assert ((tok >= 0) & (tok < v)).all()
    d, grid, kernel = 4, (2, 2000), (3, 4001)
    for prefix in (52, 53):
        s = prefix + grid[0] * grid[1]
        q, k, v = (torch.randn(1, 1, s, d, device=dev) for _ in range(3))
        args = (q[:, :, -1:], k, v, torch.tensor([s - 1], device=dev), grid, kernel, prefix, None, False)
        if prefix == 53:
            with pytest.raises(ValueError, match=r"prefix \+ window keys \(4053\) need more than 48 KiB"):
                cuda("conv_decode_attention")(*args)
        else:
            out = cuda("conv_decode_attention")(*args)
            assert_close(out, dispatch("conv_decode_attention", "torch", dev)(*args), atol=1e-5, rtol=1e-5)


# ================================================================================ coverage

def test_every_csrc_kernel_ran_and_was_checked(host):
    """The kernels the tests above launched inside a passing check, against every __global__
    function in csrc/ (run the whole file: a check that failed or did not run leaves its kernels
    out)."""
    kernels = cuda_harness.global_kernels()
    code = "".join(cuda_harness._strip_comments(p.read_text()) for p in cuda_harness.CSRC.glob("*.cu"))
    assert len(kernels) == len(re.findall(r"\b__global__\b", code)), "a __global__ declaration the parser missed"
    assert set(kernels) <= set(host.functions.values()), "a parsed name that is no function of the build"
    unchecked = sorted(set(kernels) - host.checked)
    assert not unchecked, f"csrc kernels never launched in a passing check: {unchecked}"
    assert len(set(kernels) & host.checked) == len(kernels)
