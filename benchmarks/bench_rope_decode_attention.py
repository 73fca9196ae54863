"""Benchmark of rope_decode_attention (one decode step: RoPE of q and k_new, the K/V cache write,
causal attention over the row's slots) against the torch reference and SDPA, in the same run.

    python benchmarks/bench_rope_decode_attention.py [--save] [--dtype bf16]
    pytest benchmarks/bench_rope_decode_attention.py        (pytest-benchmark, needs CUDA)

Shapes: Janus-Pro-7B's attention (32 heads of 128, MHA) and a grouped-query layout (32 q heads on
8 kv heads), batch 2 (one image and its guidance row) and 16, every row at position 1100 of a
1200-slot cache (576 image tokens after a long prompt). Bytes: the K/V the step must move, slots
0..pos read and slot pos written, K and V; every method is rated on those bytes (effective GB/s).

Peers: ``torch`` is the reference (the index write, then dense masked attention in fp32 over the
whole cache); ``sdpa`` is ``F.scaled_dot_product_attention`` on inputs already rotated and
written, over slots 0..pos (``enable_gqa`` for grouped heads): attention alone, a lower bound for
the fused step. CPU: tiny sizes, Triton through the interpreter, only to show it runs.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    # The Triton kernel runs on CPU only through the interpreter, set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vqim.engine.profiling.timing import H100_HBM_BYTES_PER_S, device_name, print_table, timeit  # noqa: E402
from vqim.kernels import apply_rope_ref, rope_decode_attention, rope_decode_attention_ref  # noqa: E402

from _common import save_gpu_rows  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (B, Hq, Hkv, Dh, S, pos)
GPU_CASES = [(2, 32, 32, 128, 1200, 1100), (16, 32, 32, 128, 1200, 1100), (2, 32, 8, 128, 1200, 1100),
             (16, 32, 8, 128, 1200, 1100)]
CPU_CASES = [(2, 4, 2, 32, 80, 70)]


def rope_tables(p: int, d: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's 1D RoPE tables [P, Dh/2] in float32."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # (Dh/2,)
    ang = torch.arange(p, dtype=torch.float64, device=device)[:, None] * inv[None, :]  # (P, Dh/2)
    return ang.cos().float(), ang.sin().float()


def run(device: torch.device, dtype: torch.dtype, cases: list[tuple]) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for b, hq, hkv, d, s, p in cases:
        q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
        k_new, v_new = (torch.randn(b, hkv, 1, d, device=device, dtype=dtype) for _ in range(2))
        kc, vc = (torch.randn(b, hkv, s, d, device=device, dtype=dtype) for _ in range(2))
        cos, sin = rope_tables(s, d, device=device)
        pos = torch.full((b,), p, device=device)
        # SDPA's inputs: q rotated, the caches already holding the step's K/V, slots 0..pos.
        qr = apply_rope_ref(q, cos[pos][:, None, None], sin[pos][:, None, None], interleaved=False)
        k_seen, v_seen = kc[:, :, :p + 1], vc[:, :, :p + 1]
        gqa = {"enable_gqa": True} if hq != hkv else {}
        methods = {
            "triton" if cuda else "triton (interpreter)": lambda: rope_decode_attention(
                q, kc, vc, pos, k_new, v_new, cos, sin, interleaved=False, validate=False, backend="triton"),
            "torch": lambda: rope_decode_attention_ref(q, kc, vc, pos, k_new, v_new, cos, sin, interleaved=False),
            "sdpa": lambda: F.scaled_dot_product_attention(qr, k_seen, v_seen, **gqa),
        }
        kv_bytes = b * (p + 1) * hkv * d * 2 * kc.element_size()
        base_ms = None
        for name, fn in methods.items():
            t = timeit(fn, device=device, warmup=10 if cuda else 1, iters=100 if cuda else 5)
            base_ms = base_ms or t["ms"]
            gbs = kv_bytes / (t["ms"] * 1e-3) / 1e9
            rows.append({"op": "rope_decode_attention", "impl": name, "dtype": str(dtype).removeprefix("torch."),
                         "B": b, "Hq": hq, "Hkv": hkv, "Dh": d, "S": s, "pos": p, "us": t["ms"] * 1e3,
                         "p20": t["p20"] * 1e3, "p80": t["p80"] * 1e3, "KV_MB": kv_bytes / 1e6, "GB/s": gbs,
                         "%HBM": 100 * gbs * 1e9 / H100_HBM_BYTES_PER_S, "ours_speedup": t["ms"] / base_ms})
    return rows


COLUMNS = ["impl", "dtype", "B", "Hq", "Hkv", "Dh", "S", "pos", "us", "p20", "p80", "KV_MB", "GB/s", "%HBM",
           "ours_speedup"]


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [32, 8])
@pytest.mark.parametrize("b", [2, 16])
def test_bench_rope_decode_attention(benchmark, b, hkv):
    q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(b, hkv, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (torch.randn(b, hkv, 1200, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cos, sin = rope_tables(1200, 128, device="cuda")
    pos = torch.full((b,), 1100, device="cuda")

    def step():
        rope_decode_attention(q, kc, vc, pos, k_new, v_new, cos, sin, interleaved=False, validate=False)
        torch.cuda.synchronize()
    benchmark(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--save", action="store_true",
                    help="append GPU rows to benchmarks/results/rope_decode_attention.csv")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"rope_decode_attention on {device_name(device)}, {args.dtype}")
    if not cuda:
        print("CPU: tiny sizes, Triton through the interpreter; these numbers are NOT the target (GPU is).")
    rows = run(device, DTYPES[args.dtype], GPU_CASES if cuda else CPU_CASES)
    print_table(rows, COLUMNS)
    print("ours_speedup: time of the row / time of the first row (ours); > 1 means ours is faster.")
    if args.save:
        save_gpu_rows("rope_decode_attention", rows, device)


if __name__ == "__main__":
    main()
