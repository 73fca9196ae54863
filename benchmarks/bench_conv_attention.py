"""conv_attention / conv_decode_attention against dense and block-sparse peers.

Prefill (issue 4): B = 8, H = 16, a 32 x 32 image grid after one prefix token, head dim 64,
11 x 11 kernel: ours (Triton) vs dense causal SDPA (FlashAttention), FlexAttention with the same
mask as a block mask, and the torch reference; forward and forward+backward. Effective TFLOP/s
count only unmasked work (4 * Dh flops per visible (query, key) pair forward, 2.5x that
backward). Decode: ours (Triton and CUDA, plain and ring cache) vs dense attention over the
whole cache; microseconds per step and GB/s of K/V actually needed.

Also prints the work the prefill kernel's tiling visits, counted exactly on the CPU
(`visited_work`): raster query runs (what ships) against spatial query tiles.

CPU decode (``--cpu``; also part of a run without a GPU): the decode step with the cache write
as the engine calls it on a CPU (torch backend, ``validate=False``, one thread) at the bundled
demo model's shapes, read off ``Engine.from_pretrained(device="cpu")``: the torch backend's CPU
path (the window's slots only) against the reference (index write + dense attention over every
slot, what the torch backend ran before) and dense SDPA with a boolean mask over the cache.

Run: ``python benchmarks/bench_conv_attention.py [--save] [--cpu]`` (CPU: tiny sizes through the
Triton interpreter, only to show it runs; those numbers are not the target). As a
pytest-benchmark module the ``test_bench_*`` functions need CUDA.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

if not torch.cuda.is_available():
    # The Triton kernels run on CPU only through the interpreter, set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vqim.engine.profiling.timing import H100_BF16_FLOPS, H100_HBM_BYTES_PER_S, device_name, print_table, timeit  # noqa: E402
from vqim.kernels import (conv_attention, conv_attention_ref, conv_cache_len, conv_decode_attention,  # noqa: E402
                          conv_decode_attention_ref, conv_mask_ref)
from vqim.kernels import _ext  # noqa: E402
from vqim.kernels.conv_attention import (_conv_decode_attention_write_torch, _prefix_block,  # noqa: E402
                                        _write_cache)

from _common import save_gpu_rows  # noqa: E402

GRID, KERNEL, PREFIX = (32, 32), (11, 11), 1


# --------------------------------------------------------------------------- visited work (CPU)

def _tiles_visited(mask: torch.Tensor, q_groups: list[torch.Tensor], k_groups_of) -> tuple[int, int]:
    """(tiles, work): the (query group, key group) tiles with a visible pair, and their summed
    padded size; ``k_groups_of(qg)`` lists the (key indices, padded width) the kernel iterates."""
    tiles = work = 0
    for qg in q_groups:
        for kg, width in k_groups_of(qg):
            kg = kg[kg < mask.shape[1]]
            if kg.numel() and bool(mask[qg][:, kg].any()):
                tiles += 1
                work += width
    return tiles, work


def visited_work(grid=GRID, kernel=KERNEL, prefix=PREFIX, *, tiling="raster", block_m=64, block_n=64,
                 tile=(8, 8), key_tiles="raster") -> dict:
    """(query, key) pairs a tiling computes (visited tiles x their padded sizes) vs pairs the mask keeps.

    ``tiling="raster"`` mirrors the shipped kernel exactly: prefix query blocks, then raster runs
    of block_m image queries, each iterating the prefix in key tiles of BLOCK_P (16 for a short
    prefix), then key blocks of block_n from its first window key to its last query (blocks with
    no visible pair skipped). ``tiling="spatial"``: query tiles of ``tile`` (rows x cols) of the
    grid, with key groups either aligned raster runs of block_n (``key_tiles="raster"``) or
    spatial tiles of the same shape (``key_tiles="spatial"``), the prefix as in raster.
    """
    mask = conv_mask_ref(grid, kernel, prefix)
    s = mask.shape[0]
    gh, gw = grid
    hh, hw = kernel[0] // 2, kernel[1] // 2
    bp = _prefix_block(prefix)
    prefix_groups = [(torch.arange(i, min(prefix, i + bp)), bp) for i in range(0, prefix, bp)]
    if tiling == "raster":
        bm = block_m
        q_groups = [torch.arange(i, min(prefix, i + bm)) for i in range(0, prefix, bm)]
        q_groups += [torch.arange(i, min(s, i + bm)) for i in range(prefix, s, bm)]

        def k_groups_of(qg):
            q0, q1 = int(qg[0]), int(qg[-1]) + 1
            out = [(g[g < q1], w) for g, w in prefix_groups if int(g[0]) < q1]
            if q1 > prefix:
                firsts = []
                for t in (q0 - prefix, (max(q0 - prefix, 0) // gw + 1) * gw):
                    if 0 <= t < q1 - prefix:
                        r, c = divmod(t, gw)
                        firsts.append(max(0, r - hh) * gw + max(0, c - hw))
                lo = prefix + min(firsts)
                out += [(torch.arange(n0, min(q1, n0 + block_n)), block_n) for n0 in range(lo, q1, block_n)]
            return out
    else:
        th, tw = tile
        bm = th * tw
        pos = torch.arange(gh * gw).view(gh, gw) + prefix
        q_groups = [torch.arange(i, min(prefix, i + bm)) for i in range(0, prefix, bm)]
        q_groups += [pos[r:r + th, c:c + tw].flatten() for r in range(0, gh, th) for c in range(0, gw, tw)]
        if key_tiles == "raster":
            img_groups = [(torch.arange(i, min(s, i + block_n)), block_n) for i in range(prefix, s, block_n)]
        else:
            img_groups = [(pos[r:r + th, c:c + tw].flatten(), bm) for r in range(0, gh, th) for c in range(0, gw, tw)]

        def k_groups_of(qg):
            return prefix_groups + img_groups
    tiles, width = _tiles_visited(mask, q_groups, k_groups_of)
    pairs = int(mask.sum())
    work = width * bm
    dense_causal = sum(math.ceil((i + 1) / 64) * 64 * 64 for i in range(0, s, 64))  # 64 x 64 causal tiles
    name = "raster" if tiling == "raster" else f"spatial {tile[0]}x{tile[1]} / keys {key_tiles}"
    return {"tiling": name, "BM": bm, "BN": block_n if tiling == "raster" or key_tiles == "raster" else bm,
            "tiles": tiles, "work_pairs": work, "useful_pairs": pairs, "useful_share": pairs / work,
            "vs_dense_causal": work / dense_causal}


def work_table() -> list[dict]:
    rows = [
        visited_work(tiling="raster", block_m=64, block_n=64),
        visited_work(tiling="raster", block_m=128, block_n=64),
        visited_work(tiling="raster", block_m=64, block_n=32),
        visited_work(tiling="raster", block_m=32, block_n=32),
        visited_work(tiling="spatial", tile=(8, 8), key_tiles="raster", block_n=64),
        visited_work(tiling="spatial", tile=(8, 8), key_tiles="spatial"),
        visited_work(tiling="spatial", tile=(4, 16), key_tiles="spatial"),
        visited_work(tiling="spatial", tile=(16, 8), key_tiles="spatial"),
    ]
    return rows


# --------------------------------------------------------------------------- prefill timing

def _flex_fn(grid, kernel, prefix, s, device):
    """FlexAttention with the conv mask as mask_mod/block mask, compiled (None where unavailable)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    gw, hh, hw = grid[1], kernel[0] // 2, kernel[1] // 2

    def mask_mod(b, h, qi, ki):
        qt = torch.clamp(qi - prefix, min=0)
        kt = torch.clamp(ki - prefix, min=0)
        window = (qt // gw - kt // gw <= hh) & ((qt % gw) - (kt % gw) <= hw) & ((kt % gw) - (qt % gw) <= hw)
        return (ki <= qi) & ((ki < prefix) | window)

    block_mask = create_block_mask(mask_mod, None, None, s, s, device=device)
    fn = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return lambda q, k, v: fn(q, k, v, block_mask=block_mask)


def prefill_rows(b, h, grid, kernel, prefix, d, dtype, device, iters) -> list[dict]:
    s = prefix + grid[0] * grid[1]
    pairs = int(conv_mask_ref(grid, kernel, prefix).sum()) * b * h
    flops_fwd = 4.0 * d * pairs
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    ours = "triton" if device.type == "cuda" else "triton (interpreter)"
    methods = {ours: lambda q, k, v: conv_attention(q, k, v, grid=grid, kernel=kernel, prefix=prefix, backend="triton"),
               "sdpa dense causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "torch reference": lambda q, k, v: conv_attention_ref(q, k, v, grid=grid, kernel=kernel, prefix=prefix)}
    flex = _flex_fn(grid, kernel, prefix, s, device)
    if flex is not None:
        methods["flexattention"] = flex
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        base = None
        for name, fn in methods.items():
            if mode == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        fn(q.detach(), k.detach(), v.detach())
            else:
                def call(fn=fn):
                    torch.autograd.grad(fn(q, k, v), (q, k, v), do)
            try:
                t = timeit(call, device=device, warmup=3 if device.type == "cuda" else 1, iters=iters)
            except Exception as exc:  # a peer that does not run here is reported, not fatal
                print(f"  {name} {mode}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                continue
            flops = flops_fwd * (1.0 if mode == "fwd" else 3.5)
            tflops = flops / (t["ms"] * 1e-3) / 1e12
            base = base or t["ms"]
            rows.append({"op": "prefill", "mode": mode, "method": name, "B": b, "H": h, "S": s, "Dh": d,
                         "dtype": str(dtype).removeprefix("torch."), "ms": t["ms"], "p20": t["p20"], "p80": t["p80"],
                         "eff_TFLOP/s": tflops, "roofline": tflops * 1e12 / H100_BF16_FLOPS,
                         "ours_speedup": t["ms"] / base})
    return rows


# --------------------------------------------------------------------------- decode timing

def window_keys(pos: torch.Tensor, grid, kernel, prefix) -> torch.Tensor:
    """Visible keys per row at its position (prefix + window), the K/V rows a step must read."""
    mask = conv_mask_ref(grid, kernel, prefix)
    return mask[pos.cpu()].sum(dim=1)  # (B,)


def decode_rows(b, h, grid, kernel, prefix, d, dtype, device, iters) -> list[dict]:
    s = prefix + grid[0] * grid[1]
    elt = torch.finfo(dtype).bits // 8
    pos = torch.randint(prefix, s, (b,), device=device)  # rows at different positions mid-image
    q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
    kc, vc = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(2))
    lr = conv_cache_len(grid, kernel, prefix)
    kr, vr = kc[:, :, :lr].clone(), vc[:, :, :lr].clone()  # ring contents (values are irrelevant to timing)
    needed = float(window_keys(pos, grid, kernel, prefix).sum()) * h * d * 2 * elt
    dense_bytes = float(b * h * s * d * 2 * elt)
    backends = ["triton"] + (["cuda"] if device.type == "cuda" and _ext.available() else [])
    methods = {}
    for be in backends:
        for ring in (False, True):
            cache = (kr, vr) if ring else (kc, vc)
            methods[f"{be}{' ring' if ring else ''}"] = (
                lambda be=be, ring=ring, cache=cache: conv_decode_attention(
                    q, *cache, pos, grid=grid, kernel=kernel, prefix=prefix, ring=ring, validate=False, backend=be),
                needed)
    methods["sdpa dense over cache"] = (lambda: F.scaled_dot_product_attention(q, kc, vc), dense_bytes)
    rows, base = [], None
    for name, (fn, nbytes) in methods.items():
        t = timeit(fn, device=device, warmup=5 if device.type == "cuda" else 1, iters=iters)
        base = base or t["ms"]
        gbs = nbytes / (t["ms"] * 1e-3) / 1e9
        rows.append({"op": "decode", "method": name, "B": b, "H": h, "S": s, "Dh": d,
                     "dtype": str(dtype).removeprefix("torch."), "us/step": t["ms"] * 1e3, "p20": t["p20"] * 1e3,
                     "p80": t["p80"] * 1e3, "KV_MB": nbytes / 1e6, "GB/s": gbs,
                     "roofline": gbs * 1e9 / H100_HBM_BYTES_PER_S, "ours_speedup": t["ms"] / base})
    return rows


def bundled_decode_shape() -> dict:
    """The bundled demo model's conv decode attention: batch 1 with guidance (2 rows), its heads,
    head dim, grid, kernel, prefix, cache lengths (plain: max_seq; ring) and dtype."""
    from vqim.engine import Engine

    dec = Engine.from_pretrained(device="cpu").model.decoder
    cfg = dec.cfg
    grid = (cfg.grid_h, cfg.grid_w)
    return {"B": 2, "H": cfg.heads, "Dh": cfg.head_dim, "grid": grid, "kernel": tuple(cfg.conv_kernel),
            "prefix": cfg.prefix, "plain": cfg.max_seq, "ring": conv_cache_len(grid, cfg.conv_kernel, cfg.prefix),
            "dtype": dec.dtype}


def cpu_decode_rows(iters: int = 300) -> list[dict]:
    """Microseconds per decode call with the write on the CPU, one thread, mid-grid (a full window)."""
    shp = bundled_decode_shape()
    b, h, d, grid, kernel, prefix, dtype = (shp[k] for k in ("B", "H", "Dh", "grid", "kernel", "prefix", "dtype"))
    pos = torch.full((b,), prefix + (grid[0] // 2) * grid[1] + grid[1] // 2)
    geo = {"grid": grid, "kernel": kernel, "prefix": prefix}
    full_mask = conv_mask_ref(grid, kernel, prefix)  # (S, S), built once as a cached table would be
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for ring in (False, True):
            s = shp["ring" if ring else "plain"]
            q, k_new, v_new = (torch.randn(b, h, 1, d, dtype=dtype) for _ in range(3))
            kc, vc = (torch.randn(b, h, s, d, dtype=dtype) for _ in range(2))
            methods = cpu_decode_methods(q, kc, vc, pos, k_new, v_new, geo, ring, full_mask)
            base = None
            with torch.no_grad():
                for name, fn in methods.items():
                    t = timeit(fn, device=torch.device("cpu"), warmup=20, iters=iters)
                    base = base or t["ms"]
                    rows.append({"op": "cpu decode", "method": name, "cache": "ring" if ring else "plain",
                                 "B": b, "H": h, "S": s, "Dh": d, "dtype": str(dtype).removeprefix("torch."),
                                 "us": t["ms"] * 1e3, "p20": t["p20"] * 1e3, "p80": t["p80"] * 1e3,
                                 "x_ours": t["ms"] / base})
    finally:
        torch.set_num_threads(threads)
    return rows


def cpu_decode_methods(q, kc, vc, pos, k_new, v_new, geo, ring, full_mask) -> dict:
    """The calls the CPU table times; each writes k_new/v_new into the caches, then attends. The
    first two run the torch backend's CPU path, bare and through the public op as the engine
    calls it; the reference is what that backend ran before; SDPA over the masked cache a peer."""

    grid, kernel, prefix = geo["grid"], geo["kernel"], geo["prefix"]

    def cpu_path():
        return _conv_decode_attention_write_torch(q, kc, vc, pos, k_new, v_new, grid, kernel, prefix, None, ring)

    def op_call():
        return conv_decode_attention(q, kc, vc, pos, k_new=k_new, v_new=v_new, **geo, ring=ring, validate=False,
                                     backend="torch")

    def reference():
        _write_cache(kc, vc, pos, k_new, v_new, grid, kernel, prefix, ring)
        return conv_decode_attention_ref(q, kc, vc, pos, **geo, ring=ring)

    def sdpa_dense():
        _write_cache(kc, vc, pos, k_new, v_new, grid, kernel, prefix, ring)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=full_mask[pos][:, None, None, :kc.shape[2]])

    methods = {"CPU path (torch backend body)": cpu_path, "vqim op call (public, validate=False)": op_call,
               "reference (write + dense; body before)": reference}
    if not ring:  # slot = position: the mask's columns are the cache's slots
        methods["sdpa, bool mask over the cache"] = sdpa_dense
    return methods


CPU_COLUMNS = ["method", "cache", "B", "H", "S", "Dh", "dtype", "us", "p20", "p80", "x_ours"]


def ring_memory(grid=GRID, kernel=KERNEL, prefix=PREFIX, d=64, h=16, layers=1, elt=2) -> dict:
    plain = prefix + grid[0] * grid[1]
    ring = conv_cache_len(grid, kernel, prefix)
    per_slot = 2 * h * d * elt * layers  # K and V
    return {"plain_slots": plain, "ring_slots": ring, "plain_KiB": plain * per_slot / 1024,
            "ring_KiB": ring * per_slot / 1024, "saved": 1 - ring / plain}


# --------------------------------------------------------------------------- pytest-benchmark

@pytest.mark.gpu
@pytest.mark.parametrize("backward", [False, True])
def test_bench_prefill(benchmark, backward):
    q, k, v = (torch.randn(8, 16, 1025, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)

    def run():
        o = conv_attention(q, k, v, grid=GRID, kernel=KERNEL, prefix=PREFIX)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)
        torch.cuda.synchronize()
    benchmark(run)


@pytest.mark.gpu
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bench_decode(benchmark, ring, backend):
    s = PREFIX + GRID[0] * GRID[1]
    n = conv_cache_len(GRID, KERNEL, PREFIX) if ring else s
    q = torch.randn(8, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(8, 16, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.randint(PREFIX, s, (8,), device="cuda")

    def run():
        conv_decode_attention(q, kc, vc, pos, grid=GRID, kernel=KERNEL, prefix=PREFIX, ring=ring, validate=False,
                              backend=backend)
        torch.cuda.synchronize()
    benchmark(run)


# --------------------------------------------------------------------------- script

def print_cpu_decode() -> None:
    print("\nCPU decode step with the cache write, bundled demo model, one thread (x_ours: time / the CPU "
          "path's; the op call adds validation and torch's custom-op dispatch)")
    print_table(cpu_decode_rows(), CPU_COLUMNS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", action="store_true", help="append GPU rows to benchmarks/results/conv_attention.csv")
    ap.add_argument("--no-work", action="store_true", help="skip the visited-work count")
    ap.add_argument("--cpu", action="store_true", help="only the CPU decode table (torch backend, bundled model)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {device_name(device)}")
    if args.cpu:
        print_cpu_decode()
        return

    if not args.no_work:
        print(f"\nvisited (query, key) work of the prefill tiling, grid {GRID}, kernel {KERNEL}, prefix {PREFIX} "
              "(exact count; dense causal = 64x64 causal tiles)")
        print_table(work_table(), ["tiling", "BM", "BN", "tiles", "work_pairs", "useful_pairs", "useful_share",
                                   "vs_dense_causal"])
    mem = ring_memory()
    print(f"\nring KV cache, per sequence per layer (H=16, Dh=64, bf16): plain {mem['plain_slots']} slots "
          f"= {mem['plain_KiB']:.0f} KiB, ring {mem['ring_slots']} slots = {mem['ring_KiB']:.0f} KiB "
          f"({mem['saved']:.1%} saved)")

    if cuda:
        pre = prefill_rows(8, 16, GRID, KERNEL, PREFIX, 64, torch.bfloat16, device, iters=30)
        dec = decode_rows(8, 16, GRID, KERNEL, PREFIX, 64, torch.bfloat16, device, iters=100)
    else:
        print("\nCPU: tiny sizes, Triton through the interpreter; these numbers are NOT the target (GPU is).")
        pre = prefill_rows(1, 2, (8, 8), (5, 5), 1, 32, torch.float32, device, iters=6)
        dec = decode_rows(2, 2, (8, 8), (5, 5), 1, 32, torch.float32, device, iters=6)
    print()
    print_table(pre, ["mode", "method", "B", "H", "S", "Dh", "dtype", "ms", "p20", "p80", "eff_TFLOP/s", "roofline",
                      "ours_speedup"])
    print()
    print_table(dec, ["method", "B", "H", "S", "Dh", "dtype", "us/step", "p20", "p80", "KV_MB", "GB/s", "roofline",
                      "ours_speedup"])
    print("ours_speedup: time of the row / time of the first row (ours); > 1 means ours is faster.")
    if not cuda:
        print_cpu_decode()
    if args.save:
        save_gpu_rows("conv_attention", pre + dec, device)


if __name__ == "__main__":
    main()
