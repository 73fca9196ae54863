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

``--ray`` adds the ``ray`` rows (needs the ray extra): ``vqim serve --ray``'s deployment
(:func:`vqim.engine.entrypoints.ray_serve.deployment`) on a local Ray cluster with 1, 2, ...
replicas (``--ray-replicas``; by default 1 and 2 on a CPU, 1 to the GPU count on CUDA: one GPU per
replica), ``--ray-clients`` HTTP clients (default 16) each POSTing ``--ray-requests`` images one
after another to ``/v1/images/generations``, so the figure includes HTTP, PNG and Ray's proxy.
On a CPU the replicas share the machine's cores, so expect no gain from a second one there (2
shared cores: 5.2 and 5.3 images/s with one replica in two runs, 6.3 and 4.1 with two, within
the noise of the other jobs on them). The figure that matters is on a machine with one GPU per
replica.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
import urllib.request

import torch

from vqim.engine import Engine
from vqim.engine.profiling.timing import device_name, print_table
from vqim.train.eval_shapes import GRID_PROMPTS

from _common import append_results

COLUMNS = ["device", "clients", "mode", "replicas", "wall_ms", "ms_per_image", "images_per_s", "latency_p50_ms",
           "x_serial"]


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


def _post(url: str, prompt: str, seed: int) -> None:
    body = json.dumps({"prompt": prompt, "seed": seed}).encode()
    req = urllib.request.Request(url + "/v1/images/generations", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        if r.status != 200 or not json.loads(r.read())["data"]:
            raise AssertionError(f"the server answered {r.status}")


def _http_clients(url: str, clients: int, requests: int) -> tuple[float, list[float]]:
    """``clients`` threads at once, each POSTing ``requests`` images one after another: wall ms
    and each request's latency ms."""
    latency: list[float] = []
    start = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def client(i: int) -> None:
        start.wait()
        for j in range(requests):
            t0 = time.perf_counter()
            _post(url, GRID_PROMPTS[(i + j) % len(GRID_PROMPTS)], 1000 * i + j)
            with lock:
                latency.append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) * 1e3, latency


def run_ray(device: torch.device, replicas: list[int], clients: int, requests: int) -> list[dict]:
    """The ``ray`` rows: ``vqim serve --ray``'s deployment with each replica count in turn."""
    # A throwaway local cluster: no usage report, no token written to the home folder.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from vqim.engine.entrypoints.ray_serve import deployment

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for n in replicas:
            app = deployment(replicas=n, device=device.type, max_batch_size=clients)
            serve.run(app, name="vqim-bench", route_prefix="/")
            _http_clients(url, 2 * n, 1)  # warm-up: each replica's loop thread and first allocations
            wall, latency = _http_clients(url, clients, requests)
            images = clients * requests
            rows.append({"device": device_name(device), "clients": clients, "mode": "ray", "replicas": n,
                         "wall_ms": wall, "ms_per_image": wall / images, "images_per_s": 1e3 * images / wall,
                         "latency_p50_ms": statistics.median(latency)})
            serve.delete("vqim-bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/serving.csv")
    ap.add_argument("--ray", action="store_true", help="add the Ray Serve rows (needs the ray extra)")
    ap.add_argument("--ray-replicas", type=int, nargs="+", default=None,
                    help="replica counts of the ray rows (default 1 2 on a CPU, 1 to the GPU count on CUDA)")
    ap.add_argument("--ray-clients", type=int, default=16, help="concurrent HTTP clients of the ray rows")
    ap.add_argument("--ray-requests", type=int, default=4, help="images each HTTP client asks for, one at a time")
    args = ap.parse_args()
    if args.ray:
        try:
            import ray  # noqa: F401
        except ModuleNotFoundError:
            ap.error("--ray needs the ray extra: pip install 'vqim[ray]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device_name(device)}, torch threads: {torch.get_num_threads()}")
    rows = run(device, args.clients)
    if args.ray:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        replicas = args.ray_replicas or sorted({1, gpus} if gpus else {1, 2})
        rows += run_ray(device, replicas, args.ray_clients, args.ray_requests)
    print_table(rows, COLUMNS)
    if args.save:
        print(f"saved to {append_results('serving', rows, device)}")


if __name__ == "__main__":
    main()
