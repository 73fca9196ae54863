"""Host work per step: the decode loop's step against the bare decode step over the same rows.

    python benchmarks/bench_scheduler.py [--models bundled tiny-t2i] [--batch 1 16] [--threads 1] [--save]

For each model and batch (images, guided: two decoder rows each) three times per step, each the
median of ``--rounds`` interleaved rounds (of ``--iters`` steps' medians):

* ``bare_ms``: ``ARDecoder.decode_step`` alone over the rows at a quarter of the image (the
  peer: the least a step can cost);
* ``unit_ms``: the runner's raster step (decode, ``cfg_sample``, recording and advancing every
  image; on a GPU replayed from its CUDA graph, as the loop does), over the same rows;
* ``loop_ms``: an iteration of the engine's decode loop with ``batch`` images in it (one request
  of ``batch`` images through ``Engine.submit``, cancelled once measured; ``Scheduler.stats.recent``),
  everything included: the plan, the step, the events; its steps around the same position.

``overhead`` is ``loop_ms / bare_ms - 1``: the sampling and bookkeeping a step adds (target on
a CPU: <= 0.15); ``python_ms`` is ``loop_ms - unit_ms``, the loop's own Python per step, which
does not grow with the batch (and the unit's cost cold, as the loop runs it, against warm). ``steps``
counts the loop iterations measured, all rounds. ``--save`` appends the rows to ``benchmarks/results/scheduler.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vqim.engine import Engine
from vqim.engine.profiling.bench import prepared_runner
from vqim.engine.profiling.timing import device_name, print_table, timeit
from vqim.engine.scheduler import RequestCancelled

from _common import append_results

COLUMNS = ["device", "model", "batch", "rows", "bare_ms", "unit_ms", "loop_ms", "python_ms", "overhead", "steps"]


def _engine(name: str, batch: int, device: torch.device) -> Engine:
    if name == "bundled":
        return Engine.from_pretrained(device=device, max_batch_size=batch)
    return Engine.from_preset(name, device=device, max_batch_size=batch)


def _steps(eng: Engine, prompts, images: int, steps: int, skip: int = 0) -> list[float]:
    """Seconds of ``steps`` loop iterations with ``images`` images in them, after the first
    ``skip`` (a request of that many, cancelled once measured: a whole image of a large model
    takes far longer)."""
    stats = eng.scheduler.stats
    stats.recent.clear()
    # Raster: the step the bare decode_step is the peer of (the default, "auto", may pick the
    # wavefront, whose passes carry several tokens per image).
    handle = eng.submit(prompts, images, seed=1, decoding="raster")
    # Polled by the request's progress (a token per image per step), not by reading the stats:
    # copying their 4096 entries under the GIL every poll stalled the loop being measured.
    while handle.progress[0] < images * (skip + steps + 2) and not handle.done():
        time.sleep(0.01)
    handle.cancel()
    try:
        handle.result()
    except RequestCancelled:
        pass
    return [s for active, s in list(stats.recent) if active == images][skip:skip + steps]


# Inference mode, as the engine's loop runs (under no_grad a step's op dispatch costs more).
@torch.inference_mode()
def run(models: list[str], batches: list[int], device: torch.device, iters: int, rounds: int) -> list[dict]:
    rows = []
    for name in models:
        for b in batches:
            eng = _engine(name, b, device)
            n = eng.cfg.decoder.num_tokens
            cfg_scale = eng.sampling_defaults["cfg_scale"]
            # The unit as the loop runs it: replayed from its CUDA graph on a GPU.
            runner, r = prepared_runner(eng, b, cfg_scale=cfg_scale, step=n // 4,
                                        use_cuda_graph=device.type == "cuda")
            args = (runner.view(r), runner.feed[:r].clone(), runner.pos[:r].clone())
            pos, step = runner.pos.clone(), runner.slot_step.clone()
            prompts = ["a large red circle in the center"] if eng.cfg.is_text_to_image else None
            _steps(eng, prompts, 1, 3)  # warm-up: the loop's thread, its graphs, its rows
            bare, unit, loop, steps = [], [], [], 0
            # Rounds of the three, interleaved: a shared machine's slow spells hit all three alike.
            for _ in range(rounds):
                bare.append(timeit(lambda: eng.model.decoder.decode_step(*args), device=device, warmup=3,
                                   iters=iters)["ms"])
                runner.pos.copy_(pos)
                runner.slot_step.copy_(step)
                unit.append(timeit(lambda: runner.raster_step(r), device=device, warmup=2,
                                   iters=min(iters, n // 2 - 3))["ms"])
                # The loop's steps around the bare step's position (causal layers' cost grows with it).
                full = _steps(eng, prompts, b, iters, skip=max(0, n // 4 - iters // 2))
                loop.append(statistics.median(full) * 1e3)
                steps += len(full)
            bare_ms, unit_ms, loop_ms = (statistics.median(x) for x in (bare, unit, loop))
            rows.append({"device": device_name(device), "model": name, "batch": b, "rows": r,
                         "bare_ms": bare_ms, "unit_ms": unit_ms, "loop_ms": loop_ms,
                         "python_ms": loop_ms - unit_ms, "overhead": loop_ms / bare_ms - 1, "steps": steps})
            print_table(rows[-1:], COLUMNS)
            eng.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bundled", "tiny-t2i"], help="'bundled' or presets")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the three timings (medians)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/scheduler.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device_name(device)}, torch threads: {torch.get_num_threads()}")
    rows = run(args.models, args.batch, device, args.iters, args.rounds)
    print()
    print_table(rows, COLUMNS)
    if args.save:
        print(f"saved to {append_results('scheduler', rows, device)}")


if __name__ == "__main__":
    main()
