"""Benchmark of add_rms_norm: the Triton kernel against the torch reference (eager) and
torch.compile of it, in the same run.

    python benchmarks/bench_add_rms_norm.py [--save] [--dtype bf16]
    pytest benchmarks/bench_add_rms_norm.py        (pytest-benchmark, needs CUDA)

Shapes: the hidden widths of Janus-Pro 1B / 7B (2048, 4096) at decode batches (2 and 32 rows:
one image with its guidance row, 16 of them) and a prefill of 4096 rows. Bytes that must move:
x and delta read, s and h written, the weight read once. The op is memory-bound; at decode sizes
it is launch-bound, which is why it is one kernel. CPU: tiny sizes, Triton through the
interpreter, only to show it runs; those numbers are not the target.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    # The Triton kernel runs on CPU only through the interpreter, set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vqim.engine.profiling.timing import H100_HBM_BYTES_PER_S, device_name, print_table, timeit  # noqa: E402
from vqim.kernels import add_rms_norm, add_rms_norm_ref  # noqa: E402

from _common import save_gpu_rows  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_SHAPES = [(2, 2048), (32, 2048), (4096, 2048), (2, 4096), (32, 4096), (4096, 4096)]  # (rows, W)
CPU_SHAPES = [(4, 256), (2, 1024)]


def candidates(device: torch.device) -> dict:
    compiled = torch.compile(add_rms_norm_ref)
    return {
        "triton" if device.type == "cuda" else "triton (interpreter)":
            lambda x, d, w: add_rms_norm(x, d, w, backend="triton"),
        "torch": lambda x, d, w: add_rms_norm_ref(x, d, w),
        "torch.compile": lambda x, d, w: compiled(x, d, w),
    }


def run(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]]) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for m, w in shapes:
        x, delta = (torch.randn(m, w, device=device, dtype=dtype) for _ in range(2))
        weight = 1 + 0.1 * torch.randn(w, device=device, dtype=dtype)
        moved = 4 * m * w * x.element_size() + w * weight.element_size()
        base_ms = None
        for name, fn in candidates(device).items():
            t = timeit(lambda: fn(x, delta, weight), device=device, warmup=10 if cuda else 2, iters=100 if cuda else 5)
            base_ms = base_ms or t["ms"]
            gbs = moved / (t["ms"] * 1e-3) / 1e9
            rows.append({"op": "add_rms_norm", "impl": name, "dtype": str(dtype).removeprefix("torch."), "rows": m,
                         "W": w, "us": t["ms"] * 1e3, "p20": t["p20"] * 1e3, "p80": t["p80"] * 1e3,
                         "MB": moved / 1e6, "GB/s": gbs, "%HBM": 100 * gbs * 1e9 / H100_HBM_BYTES_PER_S,
                         "ours_speedup": t["ms"] / base_ms})
    return rows


COLUMNS = ["impl", "dtype", "rows", "W", "us", "p20", "p80", "MB", "GB/s", "%HBM", "ours_speedup"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("m", [2, 32, 4096])
def test_bench_add_rms_norm(benchmark, impl, m):
    x, delta = (torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    fn = candidates(torch.device("cuda"))[impl]
    benchmark(lambda: (fn(x, delta, weight), torch.cuda.synchronize()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--save", action="store_true", help="append GPU rows to benchmarks/results/add_rms_norm.csv")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"add_rms_norm on {device_name(device)}, {args.dtype}")
    if not cuda:
        print("CPU: tiny sizes, Triton through the interpreter; these numbers are NOT the target (GPU is).")
    rows = run(device, DTYPES[args.dtype], GPU_SHAPES if cuda else CPU_SHAPES)
    print_table(rows, COLUMNS)
    print("ours_speedup: time of the row / time of the first row (ours); > 1 means ours is faster.")
    if args.save:
        save_gpu_rows("add_rms_norm", rows, device)


if __name__ == "__main__":
    main()
