"""Timing, roofline and result-file helpers shared by the benchmark scripts.

Timings are medians with p20/p80 over repeated calls after warm-up; on CUDA they use events
on the current stream. GPU results are appended to benchmarks/results/<name>.csv with the
device, date and commit so tables from different runs stay comparable.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vqim.engine.weights import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
# Measured on one H100 SXM (DESIGN §6); used for the share-of-roofline columns.
H100_HBM_BYTES_PER_S = 3.0e12
H100_BF16_FLOPS = 790e12


def timeit(fn: Callable[[], object], *, device: torch.device, warmup: int = 5, iters: int = 30,
           min_time_s: float = 0.0) -> dict[str, float]:
    """Median, p20 and p80 of one call of ``fn`` in milliseconds, warm-up excluded."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    cuda = device.type == "cuda"
    start_all = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start_all) < min_time_s:
        if cuda:
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
        if len(times) >= 10 * iters:
            break
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"ms": statistics.median(times), "p20": q[1], "p80": q[7], "n": len(times)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).rjust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def append_results(name: str, rows: list[dict], device: torch.device) -> Path:
    """Append rows to benchmarks/results/<name>.csv (written to a temp file, then renamed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    stamp = {"device": device_name(device), "date": _dt.date.today().isoformat(), "commit": git_commit()}
    full = [{**stamp, **r} for r in rows]
    existing: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            existing = list(csv.DictReader(f))
    fields: list[str] = []
    for r in existing + full:
        fields += [k for k in r if k not in fields]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in existing + full:
                w.writerow({k: _fmt(v) if isinstance(v, float) else v for k, v in r.items()})

    return atomic_write(path, write)
