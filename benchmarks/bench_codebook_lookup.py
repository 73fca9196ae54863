"""Benchmark of codebook_lookup: Triton, CUDA (_C), the torch reference and torch.compile of it.

    python benchmarks/bench_codebook_lookup.py [--save] [--dtype bf16]
    pytest benchmarks/bench_codebook_lookup.py        (pytest-benchmark, needs CUDA)

Shapes: N = 1024 x {1, 8, 64} rows (1, 8, 64 images of 32 x 32 tokens), K = 8192, D = 32.
Bytes that must move: z (N x D) + codebook (K x D) read once, indices (N x 8) written.
FLOPs: 2 N K D for the scores. At D = 32 the op is compute-bound on an H100 (arithmetic intensity
of 2 K D / (D bytes) ~ 8192 FLOP/byte for bf16 z), so both GB/s and TFLOP/s are reported.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from vqim.engine.profiling.timing import H100_BF16_FLOPS, H100_HBM_BYTES_PER_S, device_name, print_table, timeit
from vqim.kernels import _ext, codebook_lookup, codebook_lookup_ref

from _common import append_results

K, D = 8192, 32
IMAGES = (1, 8, 64)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def candidates(device: torch.device) -> dict:
    fns = {"torch": lambda z, cb: codebook_lookup_ref(z, cb)}
    compiled = torch.compile(codebook_lookup_ref)
    fns["torch.compile"] = lambda z, cb: compiled(z, cb)
    if device.type == "cuda":
        fns["triton"] = lambda z, cb: codebook_lookup(z, cb, backend="triton")
        if _ext.available():
            fns["cuda"] = lambda z, cb: codebook_lookup(z, cb, backend="cuda")
    return fns


def run(device: torch.device, dtype: torch.dtype, images: tuple[int, ...], k: int = K, d: int = D) -> list[dict]:
    rows = []
    for b in images:
        n = 1024 * b
        z = torch.randn(n, d, device=device, dtype=dtype)
        cb = torch.randn(k, d, device=device, dtype=dtype)
        moved = (n * d + k * d) * z.element_size() + n * 8
        flops = 2 * n * k * d
        base_ms = None
        for name, fn in candidates(device).items():
            t = timeit(lambda: fn(z, cb), device=device, warmup=3, iters=20 if device.type == "cuda" else 5)
            base_ms = t["ms"] if name == "torch" else base_ms
            gbs = moved / (t["ms"] * 1e-3) / 1e9
            tflops = flops / (t["ms"] * 1e-3) / 1e12
            rows.append({
                "op": "codebook_lookup", "impl": name, "dtype": str(dtype).removeprefix("torch."),
                "N": n, "K": k, "D": d, "ms": t["ms"], "p20": t["p20"], "p80": t["p80"],
                "GB/s": gbs, "TFLOP/s": tflops,
                "%HBM": 100 * gbs * 1e9 / H100_HBM_BYTES_PER_S, "%bf16 peak": 100 * tflops * 1e12 / H100_BF16_FLOPS,
                "x torch": base_ms / t["ms"],
            })
    return rows


COLUMNS = ["impl", "dtype", "N", "K", "D", "ms", "p20", "p80", "GB/s", "TFLOP/s", "%HBM", "%bf16 peak", "x torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("images", IMAGES)
def test_bench_codebook_lookup(benchmark, impl, images):
    z = torch.randn(1024 * images, D, device="cuda", dtype=torch.bfloat16)
    cb = torch.randn(K, D, device="cuda", dtype=torch.bfloat16)
    fn = candidates(torch.device("cuda"))[impl]
    benchmark(lambda: (fn(z, cb), torch.cuda.synchronize()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--save", action="store_true", help="append GPU rows to benchmarks/results/codebook_lookup.csv")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = IMAGES if device.type == "cuda" else (1, 8)
    print(f"codebook_lookup on {device_name(device)}, {args.dtype}")
    if device.type != "cuda":
        print("(no GPU: CPU numbers of the torch paths only; they are not the target)")
    rows = run(device, DTYPES[args.dtype], images)
    print_table(rows, COLUMNS)
    if args.save and device.type == "cuda":
        print("appended to", append_results("codebook_lookup", rows, device))


if __name__ == "__main__":
    main()
