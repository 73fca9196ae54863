"""Many callers, one engine: continuous batching against one call at a time.

    python benchmarks/bench_serving.py [--clients 1 4 16] [--device cpu] [--save]

``clients`` threads each ask the bundled model for one image (their own prompt and seed, the
model's default settings: guidance 1.5, so two decoder rows each) at the same moment, through
one :class:`Engine`. Modes:

* ``continuous``: the engine's decode loop admits every waiting image at a step boundary and
  runs them in one batch (``Engine.generate`` submits and waits);
* ``serial`` (the peer: what an engine with one lock per call does): the same requests, one
  ``generate`` call after another (each alone in the loop).

Both draw the same tokens (checked once per client count), so the ratio compares equal work.
Reported: wall time for all clients, ms and images/s per image, the median per-client latency,
and ``x_serial``. ``--save`` appends the rows to ``benchmarks/results/serving.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from vqim.engine import Engine
from vqim.engine.profiling.timing import device_name, print_table
from vqim.train.eval_shapes import GRID_PROMPTS

from _common import append_results

COLUMNS = ["device", "clients", "mode", "wall_ms", "ms_per_image", "images_per_s", "latency_p50_ms", "x_serial"]


def _concurrent(engine: Engine, prompts: list[str]) -> tuple[float, list[float], list[torch.Tensor]]:
    """All clients at once: wall ms, each client's latency ms, each client's codes."""
    latency = [0.0] * len(prompts)
    codes: list[torch.Tensor | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        codes[i] = engine.generate_codes([prompts[i]], seed=i)
        latency[i] = (time.perf_counter() - t0) * 1e3

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) * 1e3, latency, codes


def _serial(engine: Engine, prompts: list[str]) -> tuple[float, list[float], list[torch.Tensor]]:
    """The same requests one after another: client i waits for every earlier one."""
    t0 = time.perf_counter()
    latency, codes = [], []
    for i, p in enumerate(prompts):
        codes.append(engine.generate_codes([p], seed=i))
        latency.append((time.perf_counter() - t0) * 1e3)
    return (time.perf_counter() - t0) * 1e3, latency, codes


def run(device: torch.device, clients: list[int]) -> list[dict]:
    continuous = Engine.from_pretrained(device=device, max_batch_size=max(clients))
    _concurrent(continuous, GRID_PROMPTS[:2])  # warm-up: the loop thread, first allocations
    rows = []
    for n in clients:
        prompts = [GRID_PROMPTS[i % len(GRID_PROMPTS)] for i in range(n)]
        results = {"continuous": _concurrent(continuous, prompts), "serial": _serial(continuous, prompts)}
        for a, b in zip(results["continuous"][2], results["serial"][2]):
            if not torch.equal(a, b):
                raise AssertionError("continuous batching drew other tokens than serial calls: the comparison is void")
        base = results["serial"][0]
        for mode, (wall, latency, _) in results.items():
            rows.append({"device": device_name(device), "clients": n, "mode": mode, "wall_ms": wall,
                         "ms_per_image": wall / n, "images_per_s": 1e3 * n / wall,
                         "latency_p50_ms": statistics.median(latency), "x_serial": base / wall})
    continuous.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/serving.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device_name(device)}, torch threads: {torch.get_num_threads()}")
    rows = run(device, args.clients)
    print_table(rows, COLUMNS)
    if args.save:
        print(f"saved to {append_results('serving', rows, device)}")


if __name__ == "__main__":
    main()
