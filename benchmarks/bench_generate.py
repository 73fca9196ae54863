"""End-to-end generation benchmark: ms per decode step and ms per image, against the roofline.

    python benchmarks/bench_generate.py [--save] [--presets parti-350m parti-750m] [--batch 1 4 16]
    pytest benchmarks/bench_generate.py          (pytest-benchmark, needs CUDA)
    vqim bench parti-350m --batch 1 4 16         (the same measurement from the CLI)

Random weights in the preset's dtype (bf16 for parti-*), CFG on (2B decoder rows per B images).
Modes: ``torch`` (every vqim op on its plain-PyTorch reference, eager: the peer), ``eager``
(our kernels, launched from Python) and ``graph`` (the loop's step replayed from a CUDA graph).
The roofline of a step is (decoder weight bytes + K/V bytes the step reads) / 3.0 TB/s; a
conv-masked layer reads the prefix and at most 61 keys per row, cross-attention reads the text.
On CPU the tiny presets run so the script is known to work; those numbers are not the target.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from vqim.engine import Engine
from vqim.engine.profiling.bench import COLUMNS, bench_engine, prepared_runner
from vqim.engine.profiling.timing import device_name, print_table

from _common import append_results

GPU_PRESETS = ("parti-350m", "parti-750m")
CPU_PRESETS = ("tiny-t2i", "tiny-vim")
BATCHES = (1, 4, 16)


def run(device: torch.device, presets, batches, *, cfg_scale: float = 3.0) -> list[dict]:
    rows = []
    for name in presets:
        eng = Engine.from_preset(name, device=device)
        for b in batches:
            rows += bench_engine(eng, b, cfg_scale=cfg_scale, image_iters=2 if device.type == "cuda" else 1)
        eng.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    """benchmarks/ has no conftest: honour the gpu marker here, when a benchmark is about to run."""
    if request.node.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("batch", BATCHES)
def test_bench_generate_step(benchmark, batch, graph):
    """One step of the decode loop on parti-350m (decoder step + cfg_sample + record) from a mid-grid position."""
    eng = Engine.from_preset("parti-350m", device="cuda")
    with torch.no_grad():
        runner, rows = prepared_runner(eng, batch, cfg_scale=3.0, step=400, use_cuda_graph=graph)

        def step():
            runner.raster_step(rows)
            torch.cuda.synchronize()

        benchmark.pedantic(step, rounds=100, warmup_rounds=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--save", action="store_true", help="append GPU rows to benchmarks/results/generate.csv")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    presets = args.presets or (GPU_PRESETS if device.type == "cuda" else CPU_PRESETS)
    print(f"device: {device_name(device)}")
    if device.type != "cuda":
        print("CPU run: tiny presets only, to show the benchmark works; CPU numbers are not the target "
              "(roofline columns assume an H100's 3.0 TB/s).")
    rows = run(device, presets, args.batch, cfg_scale=args.cfg)
    print_table(rows, COLUMNS)
    if args.save:
        if device.type != "cuda":
            print("--save: CPU rows are not saved (results/ holds GPU tables)")
        else:
            print(f"saved to {append_results('generate', rows, device)}")


if __name__ == "__main__":
    main()
