"""Timing, roofline and table helpers: the one copy that ``vqim bench`` and ``benchmarks/*.py`` use.

Timings are medians with p20/p80 over repeated calls after warm-up; on CUDA they use events on
the current stream, so only the GPU's time between them counts. The roofline constants are one
H100 SXM's (DESIGN §6): every benchmark reports its GB/s (or TFLOP/s) and its share of these,
whichever machine it ran on, so tables from different runs stay comparable.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

H100_HBM_BYTES_PER_S = 3.0e12  # device-to-device copy, measured
H100_BF16_FLOPS = 790e12  # dense bf16 tensor-core peak


def timeit(fn: Callable[[], object], *, device: torch.device, warmup: int = 5, iters: int = 30) -> dict[str, float]:
    """Median, p20 and p80 of one call of ``fn`` in milliseconds (keys ``ms``, ``p20``, ``p80``),
    after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"ms": statistics.median(times), "p20": q[1], "p80": q[7]}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and its core count: the ``device`` column of result files."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def format_value(v: object) -> str:
    """A table or CSV cell: floats to 4 significant digits, anything else as ``str``."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """``rows`` as right-aligned columns under a header; a row without a column shows it blank."""
    widths = {c: max([len(c)] + [len(format_value(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(format_value(r.get(c, "")).rjust(widths[c]) for c in columns))
