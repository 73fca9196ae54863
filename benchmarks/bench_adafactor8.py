"""Benchmark of Adafactor8bit: one optimizer step over what stage 2 trains in parti-350m.

    python benchmarks/bench_adafactor8.py [--save] [--dtype fp32|bf16] [--rounding-study]
    pytest benchmarks/bench_adafactor8.py        (pytest-benchmark, needs CUDA)

Peers, measured in the same run: the fp32 reference ``vqim.train.Adafactor`` (a plain per-param
loop), ``torch.optim.Adafactor`` where the installed torch has it (note: it keeps no first
moment and uses a ``1 - t^-0.8`` second-moment decay, so it does less work and holds less state),
and ``torch.optim.AdamW(fused=True)``. State bytes per parameter are measured from each
optimizer's state tensors after the timed steps. The parameters are those stage 2 trains (text
encoder and decoder; the image tokenizer is frozen), their shapes read off the preset's model
built on the meta device, so they follow the real config.

Bytes that must move per parameter (the roofline): ours reads g and p, writes p, reads and
writes the int8 moment (+ a scale per 256 values); AdamW reads g, p, m, v and writes p, m, v.
The GB/s column is that minimum divided by the time (our kernels read g three times, so 100% of
the roofline is out of reach by construction; see kernels/adafactor8.py).

On a CPU the script runs on tiny-t2i's shapes so it is known to work: those numbers are not the
target. ``--rounding-study`` reruns the nearest-vs-stochastic measurement behind the choice of
nearest rounding (CPU, about a minute).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

from vqim.engine import ModelConfig
from vqim.engine.profiling.timing import H100_HBM_BYTES_PER_S, device_name, print_table, timeit
from vqim.engine.weights import build_model
from vqim.kernels import _ext
from vqim.kernels.adafactor8 import QBLOCK, Adafactor8bit, dequantize_blockwise
from vqim.train import Adafactor

from _common import append_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR = 1e-4


def stage2_shapes(preset: str) -> list[torch.Size]:
    """Shapes of the parameters stage 2 trains in ``preset`` (all but the image tokenizer's), from
    its model built on the meta device: no memory, and the same list as the real config."""
    model = build_model(ModelConfig.from_name(preset), "meta")
    return [p.shape for n, p in model.named_parameters() if not n.startswith("vqgan.")]


def make_params(device: torch.device, dtype: torch.dtype, tiny: bool) -> list[torch.Tensor]:
    shapes = stage2_shapes("tiny-t2i" if tiny else "parti-350m")
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = (0.02 * torch.randn(s, device=device, generator=g)).to(dtype).requires_grad_()
        p.grad = (1e-3 * torch.randn(s, device=device, generator=g)).to(dtype)
        params.append(p)
    return params


def candidates(device: torch.device) -> dict:
    opts = {}
    if device.type == "cuda":
        opts["ours (triton)"] = lambda ps: Adafactor8bit(ps, lr=LR, backend="triton")
        if _ext.available():
            opts["ours (cuda)"] = lambda ps: Adafactor8bit(ps, lr=LR, backend="cuda")
    else:
        opts["ours (torch path)"] = lambda ps: Adafactor8bit(ps, lr=LR, backend="torch")
    opts["fp32 reference"] = lambda ps: Adafactor(ps, lr=LR)
    if hasattr(torch.optim, "Adafactor"):
        opts["torch.optim.Adafactor"] = lambda ps: torch.optim.Adafactor(ps, lr=LR, weight_decay=4.5e-2)
    opts["AdamW(fused=True)"] = lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=4.5e-2, fused=True)
    return opts


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def min_bytes(name: str, n: int, dtype: torch.dtype) -> float:
    e = torch.tensor([], dtype=dtype).element_size()
    if name.startswith("ours"):
        return n * (3 * e + 2 + 2 * 4 / QBLOCK)  # g, p read + p write, int8 m read + write, scales
    if name.startswith("AdamW"):
        return n * (3 * e + 4 * 4)  # g, p read + p write, fp32 m and v read + write
    return float("nan")


def run(device: torch.device, dtype: torch.dtype, tiny: bool) -> list[dict]:
    rows = []
    base_ms = None
    for name, make in candidates(device).items():
        params = make_params(device, dtype, tiny)
        n = sum(p.numel() for p in params)
        try:
            opt = make(params)
            opt.step()
        except (RuntimeError, ValueError) as exc:  # e.g. a fused AdamW with no kernel for this device/dtype
            print(f"{name}: skipped ({str(exc).splitlines()[0]})")
            continue
        t = timeit(opt.step, device=device, warmup=2, iters=20 if device.type == "cuda" else 5)
        base_ms = t["ms"] if name.startswith("ours") and base_ms is None else base_ms
        mb = min_bytes(name, n, dtype)
        gbs = mb / (t["ms"] * 1e-3) / 1e9
        rows.append({
            "op": "adafactor8_step", "impl": name, "dtype": str(dtype).removeprefix("torch."), "params": n,
            "ms": t["ms"], "p20": t["p20"], "p80": t["p80"], "GB/s": gbs,
            "%HBM": 100 * gbs * 1e9 / H100_HBM_BYTES_PER_S,
            "time / ours": t["ms"] / base_ms if base_ms else float("nan"),
            "state B/param": state_bytes(opt) / n,
        })
        del opt, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- rounding study

def rounding_study() -> list[dict]:
    """Nearest vs stochastic rounding of the int8 moment, measured against fp32 on CPU.

    1. Replay: the fp32 reference trains the MLP task; each step's gradients are also fed to two
       Adafactor8bit copies (nearest, stochastic) of the same params, and the relative error of
       their dequantized moment against the fp32 moment is averaged over the 300 steps.
    2. Free runs: each optimizer trains the MLP and the transformer task on its own; the final
       loss and the parameter distance to the fp32 run (relative to how far fp32 moved).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_adafactor8 import _mlp_task, _transformer_task, train

    torch.set_num_threads(1)
    rows = []
    model, x, y = _mlp_task()
    p32 = list(model.parameters())
    copies = {r: [p.detach().clone().requires_grad_() for p in p32] for r in ("nearest", "stochastic")}
    ref = Adafactor(p32, lr=1e-2)
    opts = {r: Adafactor8bit(ps, lr=1e-2, backend="torch", rounding=r) for r, ps in copies.items()}
    err = {r: 0.0 for r in opts}
    g = torch.Generator().manual_seed(1)
    steps = 300
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        ref.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        ref.step()
        for r, ps in copies.items():
            for p, q in zip(ps, p32):
                p.grad = q.grad.clone()
            opts[r].step()
            num = den = 0.0
            for p, q in zip(ps, p32):
                st = opts[r].state[p]
                m8 = dequantize_blockwise(st["exp_avg_q"], st["exp_avg_scale"])
                m = ref.state[q]["exp_avg"].reshape(-1)
                num += (m8 - m).square().sum().item()
                den += m.square().sum().item()
            err[r] += math.sqrt(num / den) / steps
    for r in opts:
        rows.append({"study": "replayed grads, MLP", "rounding": r, "mean rel moment err": err[r]})

    for name, task in (("mlp", _mlp_task), ("transformer", _transformer_task)):
        p0 = torch.cat([p.detach().flatten() for p in task()[0].parameters()])
        loss32, m32 = train(task, lambda ps: Adafactor(ps, lr=1e-2))
        w32 = torch.cat([p.detach().flatten() for p in m32.parameters()])
        for r in ("nearest", "stochastic"):
            loss8, m8 = train(task, lambda ps: Adafactor8bit(ps, lr=1e-2, backend="torch", rounding=r))
            w8 = torch.cat([p.detach().flatten() for p in m8.parameters()])
            rows.append({"study": f"free run, {name}", "rounding": r, "loss fp32": loss32, "loss int8": loss8,
                         "rel loss diff": abs(loss8 - loss32) / loss32,
                         "param dist / fp32 move": ((w8 - w32).norm() / (w32 - p0).norm()).item()})
    return rows


# ----------------------------------------------------------------------------- entry points

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")  # benchmarks/ has no conftest hook
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bench_adafactor8_step(benchmark, backend):
    if backend == "cuda" and not _ext.available():
        pytest.skip("vqim.kernels._C is not built")
    device = torch.device("cuda")
    params = make_params(device, torch.float32, tiny=False)
    opt = Adafactor8bit(params, lr=LR, backend=backend)
    opt.step()

    def step():
        opt.step()
        torch.cuda.synchronize()

    benchmark(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="param and grad dtype")
    ap.add_argument("--save", action="store_true", help="append GPU rows to benchmarks/results/adafactor8.csv")
    ap.add_argument("--rounding-study", action="store_true", help="nearest vs stochastic rounding (CPU)")
    args = ap.parse_args()
    if args.rounding_study:
        rows = rounding_study()
        print_table(rows, ["study", "rounding", "mean rel moment err", "loss fp32", "loss int8", "rel loss diff",
                           "param dist / fp32 move"])
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device.type != "cuda"
    if tiny:
        torch.set_num_threads(1)  # small CPU ops: thread-pool wake-ups would dominate on a shared machine
    what = "tiny-t2i shapes: CPU numbers are not the target" if tiny else "parti-350m shapes"
    print(f"device: {device_name(device)}; {what}")
    rows = run(device, DTYPES[args.dtype], tiny)
    print_table(rows, ["impl", "dtype", "params", "ms", "p20", "p80", "GB/s", "%HBM", "time / ours", "state B/param"])
    if args.save:
        if device.type != "cuda":
            print("--save ignored: only GPU rows are recorded")
        else:
            print(f"appended to {append_results('adafactor8', rows, device)}")


if __name__ == "__main__":
    main()
