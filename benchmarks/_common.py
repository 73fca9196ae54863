"""Result files of the benchmark scripts; timing, roofline and tables are ``vqim.engine.profiling.timing``.

GPU results are appended to benchmarks/results/<name>.csv with the device, date and commit so
tables from different runs stay comparable. The scripts import this as ``_common``: Python puts
a script's own folder first on ``sys.path`` (and pytest does the same for benchmarks/).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import subprocess
from pathlib import Path

import torch

from vqim.engine.profiling.timing import device_name, format_value
from vqim.engine.weights import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The ``commit`` column: ``$VQIM_COMMIT`` when set (a copy of the scripts without .git, e.g.
    under gpu_suite.sh), else the short HEAD of the checkout these scripts are in, else ``unknown``."""
    given = os.environ.get("VQIM_COMMIT", "").strip()
    if given:
        return given
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
                w.writerow({k: format_value(v) if isinstance(v, float) else v for k, v in r.items()})

    return atomic_write(path, write)


def save_gpu_rows(name: str, rows: list[dict], device: torch.device) -> None:
    """``--save`` of a kernel benchmark: GPU rows appended to results/<name>.csv; a CPU run's
    numbers (tiny sizes, Triton through its interpreter) are not results and are not saved."""
    if device.type != "cuda":
        print("--save: no GPU, nothing saved (CPU numbers are not results)")
    else:
        print(f"saved to {append_results(name, rows, device)}")
