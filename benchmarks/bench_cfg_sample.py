"""Benchmark of cfg_sample: Triton, CUDA (_C) vs the eager PyTorch chain and its torch.compile.

    python benchmarks/bench_cfg_sample.py [--save] [--dtype bf16] [--no-compile]
    pytest benchmarks/bench_cfg_sample.py        (pytest-benchmark, needs CUDA)

Shapes: B = 1..256 rows (one per image being generated), V = 8192 (the image vocabulary), with
CFG scale 3, temperature 1, top-k 100 and top-p 0.9 on (every stage works).
The peer is what a plain PyTorch sampler does: combine, temperature, top-k, softmax, sort,
cumsum, top-p mask, scatter back, softmax, multinomial (a dozen launches and a full sort).
Bytes that must move: cond + uncond logits read once (2 B V elements), tokens written; the
op is memory- and latency-bound, so GB/s of logits read and share of HBM bandwidth are reported.

CPU (``--cpu``; also part of a run without a GPU): the torch backend's CPU path, what a CPU
engine samples with, against the reference it matches token for token, one thread, at the
bundled demo model's vocabulary (2048), batch 1 and 16, per-row setting tensors and
``validate=False`` as the engine passes them: the demo's settings, top-k, greedy, and top-p
(which the CPU path hands to the reference).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from vqim.engine.profiling.timing import H100_HBM_BYTES_PER_S, device_name, print_table, timeit
from vqim.kernels import SamplingParams, _ext, cfg_sample, cfg_sample_ref
from vqim.kernels.cfg_sample import _cfg_sample_cpu, _row_params

from _common import append_results

V = 8192
BATCHES = (1, 8, 32, 64, 128, 256)
SETTINGS = dict(cfg_scale=3.0, temperature=1.0, top_k=100, top_p=0.9)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def eager_chain(cond, uncond, cfg_scale: float, temperature: float, top_k: int, top_p: float):
    """The plain-PyTorch sampler (Hugging Face warpers + multinomial)."""
    x = uncond.float() + cfg_scale * (cond.float() - uncond.float())  # (B, V)
    x = x / temperature
    kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
    x = x.masked_fill(x < kth, float("-inf"))
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(-1)
    remove = probs.cumsum(-1) - probs >= top_p
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)
    return torch.multinomial(x.softmax(-1), 1)[:, 0]


def candidates(device: torch.device, compile_peer: bool = True) -> dict:
    step = [0]

    def ours(backend):
        def fn(c, u):
            step[0] += 1
            return cfg_sample(c, u, seed=0, step=step[0], backend=backend, validate=False, **SETTINGS)
        return fn

    fns = {"eager chain": lambda c, u: eager_chain(c, u, **SETTINGS)}
    if compile_peer:
        compiled = torch.compile(eager_chain)
        fns["torch.compile"] = lambda c, u: compiled(c, u, **SETTINGS)
    if device.type == "cuda":
        fns["triton"] = ours("triton")
        if _ext.available() and "cfg_sample" in _ext.load().ops:
            fns["cuda"] = ours("cuda")
    else:
        fns["torch ref"] = ours("torch")
    return fns


def run(device: torch.device, dtype: torch.dtype, batches: tuple[int, ...], compile_peer: bool = True) -> list[dict]:
    rows = []
    fns = candidates(device, compile_peer)
    for b in batches:
        cond = torch.randn(b, V, device=device, dtype=dtype) * 3
        uncond = torch.randn(b, V, device=device, dtype=dtype) * 3
        read = 2 * b * V * cond.element_size()
        base_ms = None
        for name, fn in fns.items():
            t = timeit(lambda: fn(cond, uncond), device=device, warmup=3, iters=50 if device.type == "cuda" else 5)
            base_ms = t["ms"] if name == "eager chain" else base_ms
            gbs = read / (t["ms"] * 1e-3) / 1e9
            rows.append({
                "op": "cfg_sample", "impl": name, "dtype": str(dtype).removeprefix("torch."), "B": b, "V": V,
                "us": t["ms"] * 1e3, "p20 us": t["p20"] * 1e3, "p80 us": t["p80"] * 1e3, "GB/s": gbs,
                "%HBM": 100 * gbs * 1e9 / H100_HBM_BYTES_PER_S, "x eager": base_ms / t["ms"],
            })
    return rows


COLUMNS = ["impl", "dtype", "B", "V", "us", "p20 us", "p80 us", "GB/s", "%HBM", "x eager"]

CPU_V = 2048  # the bundled demo model's vocabulary
CPU_BATCHES = (1, 16)
CPU_SETTINGS = {"demo": {}, "top-k 100": {"top_k": 100}, "greedy": {"temperature": 0.0}, "top-p 0.9": {"top_p": 0.9}}
CPU_DEMO = {"cfg_scale": 1.5, "temperature": 0.5}  # the bundled model's generation.json


def cpu_rows(iters: int = 200) -> list[dict]:
    """Microseconds per call on the CPU, one thread, fp32 logits."""
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for label, kw in CPU_SETTINGS.items():
            for b in CPU_BATCHES:
                g = torch.Generator().manual_seed(b)
                cond, uncond = (torch.randn(b, CPU_V, generator=g) * 3 for _ in range(2))
                settings = SamplingParams.rows([SamplingParams(**{**CPU_DEMO, **kw})] * b, cpu)
                seed, step = torch.arange(b), torch.full((b,), 7)
                prm = _row_params(b, cpu, **settings, seed=seed, step=step)
                fns = {"CPU path (torch backend body)": lambda: _cfg_sample_cpu(cond, uncond, **prm),
                       "cfg_sample (public, validate=False)": lambda: cfg_sample(
                           cond, uncond, seed=seed, step=step, backend="torch", validate=False, **settings),
                       "reference (cfg_sample_ref)": lambda: cfg_sample_ref(
                           cond, uncond, seed=seed, step=step, validate=False, **settings)}
                base = None
                for name, fn in fns.items():
                    t = timeit(fn, device=cpu, warmup=20, iters=iters)
                    base = base or t["ms"]
                    rows.append({"settings": label, "impl": name, "B": b, "V": CPU_V, "us": t["ms"] * 1e3,
                                 "p20 us": t["p20"] * 1e3, "p80 us": t["p80"] * 1e3, "x path": t["ms"] / base})
    finally:
        torch.set_num_threads(threads)
    return rows


def print_cpu_rows() -> None:
    print(f"\ncfg_sample on the CPU, torch backend, one thread, fp32, V = {CPU_V} (x path: time / the CPU "
          "path's; the public call adds validation and torch's custom-op dispatch)")
    print_table(cpu_rows(), ["settings", "impl", "B", "V", "us", "p20 us", "p80 us", "x path"])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda", "eager chain", "torch.compile"])
@pytest.mark.parametrize("b", BATCHES)
def test_bench_cfg_sample(benchmark, impl, b):
    dev = torch.device("cuda")
    cond = torch.randn(b, V, device=dev, dtype=torch.bfloat16) * 3
    uncond = torch.randn(b, V, device=dev, dtype=torch.bfloat16) * 3
    fns = candidates(dev)
    if impl not in fns:
        pytest.skip(f"{impl} is not available here")
    fn = fns[impl]
    benchmark(lambda: (fn(cond, uncond), torch.cuda.synchronize()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--save", action="store_true", help="append GPU rows to benchmarks/results/cfg_sample.csv")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (slow to compile on CPU)")
    ap.add_argument("--cpu", action="store_true", help="only the CPU table (torch backend at the bundled model's V)")
    args = ap.parse_args()
    if args.cpu:
        print_cpu_rows()
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = BATCHES if device.type == "cuda" else (1, 8)
    print(f"cfg_sample on {device_name(device)}, {args.dtype}, V = {V}, {SETTINGS}")
    if device.type != "cuda":
        print("(no GPU: CPU numbers of the torch paths only; they are not the target)")
    rows = run(device, DTYPES[args.dtype], batches, compile_peer=not args.no_compile)
    print_table(rows, COLUMNS)
    if device.type != "cuda":
        print_cpu_rows()
    if args.save and device.type == "cuda":
        print("appended to", append_results("cfg_sample", rows, device))


if __name__ == "__main__":
    main()
