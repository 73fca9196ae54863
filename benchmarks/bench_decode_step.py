"""The decode step alone: launches per step, ms per step, GB/s and share of the HBM roofline.

    python benchmarks/bench_decode_step.py [--save] [--models tiny-t2i tiny-vim tiny-janus tiny-llamagen bundled]
    python benchmarks/bench_decode_step.py --presets parti-350m janus-pro-1b llamagen-c2i-xl --batch 1 16   (CUDA)

One step is the decode loop's step (the runner's raster step: ``decode_step``, ``cfg_sample`` and
recording each token; guidance on: 2B decoder rows for B images) from a mid-grid position. Launches are counted as :mod:`vqim.engine.profiling.launches` says: ``eager`` by a
dispatch counter (each ATen or ``vqim::`` op that runs a kernel, views excluded),
``compiled`` from the kernels Inductor generated; on CUDA also ``cuda_kernels``, the kernels
the profiler saw in one step. Per layer: block 0's step alone.

Modes (every row of one table is measured in the same run):

* ``eager``: vqim's kernels, launched from Python; ``compiled``: ``Engine(compile=True)``;
  ``int8``: ``Engine(quantize="int8")``, eager;
* on CUDA, each of those replayed from the CUDA graph the engine's runner captures (``+graph``), and
  the peers: ``torch`` (every vqim op on its plain-PyTorch reference, eager) and
  ``torch-compile`` (``torch.compile`` of that reference).

CPU (the tiny presets and the bundled model; ``bundled`` is the model README's main command
runs): launches and ms per step. CUDA (random weights in bf16 of Parti-350M and of the public
models' shapes, Janus-Pro-1B and LlamaGen-XL; a Janus prompt's K/V counted at its real
length): ms per step, GB/s
and the share of the HBM roofline, ``(decoder weight bytes + K/V read) / 3.0 TB/s`` (one H100:
``vqim.engine.profiling.timing``; an H200's HBM is faster, so its share reads high). ``--budget-s`` stops
starting new cases once spent, so a lent GPU's time bound holds; a skipped case is printed.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from vqim import kernels as K
from vqim.engine import Engine
from vqim.engine.profiling.bench import prepared_runner, step_bytes
from vqim.engine.profiling.launches import step_launches
from vqim.engine.quantize import decoder_step_weight_bytes
from vqim.engine.profiling.timing import H100_HBM_BYTES_PER_S, device_name, print_table, timeit

from _common import append_results

CPU_MODELS = ("tiny-t2i", "tiny-vim", "tiny-janus", "tiny-llamagen", "bundled")
GPU_PRESETS = ("parti-350m", "janus-pro-1b", "llamagen-c2i-xl")
COLUMNS = ["model", "dtype", "batch", "rows", "mode", "launches_step", "launches_layer", "cuda_kernels",
           "weight_MB", "step_ms", "step_p20", "step_p80", "GB_per_s", "roofline_share", "x_torch", "x_eager"]

_MODE_OPTS = {"eager": {}, "compiled": {"compile": True}, "int8": {"quantize": "int8"}}


def make_engine(model: str, device: torch.device, dtype: str | None, **opts) -> Engine:
    if model == "bundled":
        return Engine.from_pretrained(device=device, dtype=dtype, **opts)
    return Engine.from_preset(model, device=device, dtype=dtype, **opts)


class _Case:
    """One engine's loop step from a mid-grid position, on a runner of its own (prefilled rows)."""

    def __init__(self, engine: Engine, batch: int, *, graph: bool, steps: int):
        cfg = engine.model.decoder.cfg
        self.engine, self.batch = engine, batch
        # Mid-grid (a full conv window), with room for every step the case runs after it.
        start = max(1, min(cfg.num_tokens // 2, cfg.num_tokens - steps - 1))
        self.runner, self.rows = prepared_runner(engine, batch, cfg_scale=3.0, step=start, use_cuda_graph=graph)
        self.pos = self.runner.pos[:self.rows].clone()  # (rows,): each row's query position

    def step(self) -> None:
        self.runner.raster_step(self.rows)

    def bare(self) -> tuple:
        """``decode_step``'s arguments over the case's rows (the launch counters run the step alone)."""
        r = self.runner
        return r.view(self.rows), r.feed[:self.rows].clone(), r.pos[:self.rows].clone()

    def text_len(self) -> int:
        cfg = self.engine.cfg
        return 0 if cfg.text is None else cfg.text.max_len


def _cuda_kernels(fn) -> int:
    """Kernels the profiler records in one call of ``fn`` (a graph replay shows as its kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _row(model: str, engine: Engine, case: _Case, mode: str, t: dict, launches: dict | None, cuda_kernels) -> dict:
    dec = engine.model.decoder
    nbytes = step_bytes(engine, case.pos, case.text_len())
    roof_ms = nbytes / H100_HBM_BYTES_PER_S * 1e3
    return {
        "model": model, "dtype": str(dec.dtype).replace("torch.", ""), "batch": case.batch,
        "rows": case.rows, "mode": mode,
        "launches_step": launches["step"] if launches else "", "launches_layer": launches["per_layer"] if launches else "",
        "cuda_kernels": cuda_kernels, "weight_MB": decoder_step_weight_bytes(dec) / 1e6,
        "step_ms": t["ms"], "step_p20": t["p20"], "step_p80": t["p80"],
        "GB_per_s": nbytes / (t["ms"] * 1e-3) / 1e9, "roofline_share": roof_ms / t["ms"],
    }


def _ratios(rows: list[dict]) -> None:
    """``x_torch`` / ``x_eager``: speed-up over the torch peer / vqim eager of the same model and batch."""
    for r in rows:
        same = [o for o in rows if o["model"] == r["model"] and o["batch"] == r["batch"]]
        for col, mode in (("x_torch", "torch"), ("x_eager", "eager")):
            base = next((o["step_ms"] for o in same if o["mode"] == mode), None)
            r[col] = base / r["step_ms"] if base else float("nan")


def _engine_for(base: Engine, device: torch.device, opts: dict, graph: bool) -> Engine:
    """An engine of ``opts`` over ``base``'s weights (drawn or read once per model); ``quantize``
    replaces the model's linears in place, so it gets a copy."""
    model = copy.deepcopy(base.model) if opts.get("quantize") else base.model
    return Engine(model, base.tokenizer, device=device, use_cuda_graph=graph, generation=base.generation, **opts)


@torch.no_grad()
def run_cpu(models, batches, *, iters: int = 20) -> list[dict]:
    dev = torch.device("cpu")
    rows = []
    for model in models:
        base = make_engine(model, dev, None)
        for mode, opts in _MODE_OPTS.items():
            eng = _engine_for(base, dev, opts, False)
            for b in batches:
                case = _Case(eng, b, graph=False, steps=iters + 4)
                launches = step_launches(eng.model.decoder, *case.bare(), compiled=mode == "compiled")
                t = timeit(case.step, device=dev, warmup=3, iters=iters)
                rows.append(_row(model, eng, case, mode, t, launches, ""))
            torch._dynamo.reset()
    _ratios(rows)
    return rows


# (mode, engine options, kernel backend, graph); the compiled modes last: they cost the most
# time before their first step.
CUDA_MODES = [("torch", {}, "torch", False), ("eager", {}, None, False), ("eager+graph", {}, None, True),
              ("int8+graph", {"quantize": "int8"}, None, True), ("torch-compile", {"compile": True}, "torch", False),
              ("compiled+graph", {"compile": True}, None, True)]


@torch.no_grad()
def run_cuda(presets, batches, *, budget_s: float, iters: int = 50) -> list[dict]:
    dev = torch.device("cuda")
    start = time.monotonic()
    rows = []
    for preset in presets:
        base = make_engine(preset, dev, None)
        for mode, opts, backend, graph in CUDA_MODES:
            if time.monotonic() - start > budget_s:
                print(f"skipped {preset} {mode}: --budget-s {budget_s:g} spent")
                continue
            # The backend is read when the step is traced or run: the whole case runs under it.
            with K.use_backend(backend):
                eng = _engine_for(base, dev, opts, graph)
                for b in batches:
                    case = _Case(eng, b, graph=graph, steps=iters + 5)
                    t = timeit(case.step, device=dev, warmup=3, iters=iters)
                    launches = None
                    if mode in ("torch", "eager"):
                        launches = step_launches(eng.model.decoder, *case.bare())
                    rows.append(_row(preset, eng, case, mode, t, launches, _cuda_kernels(case.step)))
            eng.close()
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        del base
    _ratios(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(CPU_MODELS), help="CPU: presets or 'bundled'")
    ap.add_argument("--presets", nargs="+", default=list(GPU_PRESETS), help="CUDA: presets")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="images per step (default: 1 on CPU, 1 4 16 on CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="CUDA: start no new case after this")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/decode_step.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device_name(device)}, torch threads: {torch.get_num_threads()}")
    if device.type == "cuda":
        rows = run_cuda(args.presets, args.batch or [1, 4, 16], budget_s=args.budget_s, iters=args.iters or 50)
    else:
        rows = run_cpu(args.models, args.batch or [1], iters=args.iters or 20)
    print_table(rows, COLUMNS)
    if args.save:
        print(f"saved to {append_results('decode_step', rows, device)}")


if __name__ == "__main__":
    main()
