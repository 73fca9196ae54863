"""The bundled demo model end to end: ms per image for README's main job, CPU or GPU.

    python benchmarks/bench_demo.py [--batch 1 4 16] [--device cpu] [--save]

One call is ``Engine.generate`` of ``batch`` prompts at the model's default settings
(``generation.json``: guidance 1.5, so 2 x batch decoder rows, temperature 0.5):
text encoding, 256 decode steps over the KV cache, pixel decoding. Modes:

* ``kv-plain``: the engine's default static KV cache;
* ``kv-ring``: ``kv_cache="ring"`` (conv-masked layers keep only the rows their window reaches);
* ``no-cache`` (the peer): what a plain PyTorch loop without a KV cache does, one full forward
  over the growing sequence per token, sampled by the same ``cfg_sample``. It draws the same
  tokens as the engine (checked once per batch size), so the ratio compares equal work.

* ``main-command`` (with ``--main-command``): the wall time of README's main command itself,
  ``vqim generate PROMPT -o out.png`` in a fresh process (the install excluded; import, model
  load, one image, the PNG write), one row per run.

On the CPU, ``--load idle busy`` times every row also while one busy-looping process per core
keeps the cores busy (a laptop or a shared VM), and ``--cpu-threads auto 2`` compares the
engine's thread settings (``Engine(cpu_threads=...)``: ``auto`` is one thread for this model).
On a GPU the engine replays its decode step from a CUDA graph. ``--save`` appends the rows to
``benchmarks/results/demo.csv`` with device, date and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import torch

from vqim import kernels as K
from vqim.engine import Engine
from vqim.engine.requests import condition
from vqim.engine.profiling.timing import device_name, print_table, timeit
from vqim.train.eval_shapes import GRID_PROMPTS

from _common import append_results

COLUMNS = ["device", "load", "threads", "batch", "mode", "ms_per_image", "p20", "p80", "images_per_s", "tokens_per_s",
           "x_no_cache"]
MAIN_PROMPT = "a large red circle in the center"


@torch.no_grad()
def generate_without_cache(engine: Engine, prompts: list[str], *, seed: int) -> torch.Tensor:
    """Image tokens ``[B, n]`` by full-sequence forwards (no KV cache), guided and sampled with
    the engine's default settings (the model's generation.json)."""
    model, dec = engine.model, engine.model.decoder
    b = len(prompts)
    prefix, memory, mask, _ = condition(model, engine.tokenizer, prompts + [""] * b)  # (2B, 1), (2B, L, W), (2B, L)
    tokens = torch.empty(2 * b, 0, dtype=torch.long, device=engine.device)
    seeds = torch.arange(seed, seed + b, device=engine.device)
    for step in range(dec.cfg.num_tokens):
        h = dec(prefix, tokens, memory, mask, hidden_layer=dec.cfg.layers - 1)  # (2B, 1 + t, W)
        logits = dec.head(dec.norm(h[:, -1]))  # (2B, V)
        tok = K.cfg_sample(logits[:b], logits[b:], seed=seeds, step=step, validate=False, **engine.sampling_defaults)
        tokens = torch.cat([tokens, torch.cat([tok, tok])[:, None]], dim=1)
    return tokens[:b]


@contextlib.contextmanager
def cpu_load(load: str):
    """``"busy"``: one busy-looping process per core for the duration (stopped by their pids)."""
    procs = []
    if load == "busy":
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
        time.sleep(0.5)  # let them take the cores
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main_command_ms(threads: str, runs: int) -> list[float]:
    """Wall ms of README's main command in a fresh process, ``runs`` times."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vqim.train.main", "generate", MAIN_PROMPT, "-o", f"{d}/out.png",
                            "-q", "--device", "cpu", "--cpu-threads", threads], check=True)
            out.append((time.perf_counter() - t) * 1e3)
    return out


def run(device: torch.device, batches: list[int], *, peer: bool = True, threads: str = "auto",
        load: str = "idle", iters: int | None = None) -> list[dict]:
    opts = {"cpu_threads": threads if threads == "auto" else int(threads)} if device.type == "cpu" else {}
    engines = {"kv-plain": Engine.from_pretrained(device=device, **opts),
               "kv-ring": Engine.from_pretrained(device=device, kv_cache="ring", **opts)}
    eng = engines["kv-plain"]
    n_tok = eng.cfg.decoder.num_tokens
    cuda = device.type == "cuda"
    rows = []
    for b in batches:
        prompts = [GRID_PROMPTS[i % len(GRID_PROMPTS)] for i in range(b)]
        timed = {}
        for mode, e in engines.items():
            timed[mode] = timeit(lambda e=e: e.generate(prompts, seed=0), device=device,
                                 warmup=2 if cuda else 1, iters=iters or (10 if cuda else 3))
        if peer:
            # One image per request, seed + 0: the engine's draw for request i uses seed 0 + 0 too,
            # so pass per-request seeds 0..b-1 to both and compare tokens.
            want = eng.generate_codes(prompts, seed=list(range(b))).view(b, -1)
            got = generate_without_cache(eng, prompts, seed=0)
            if not torch.equal(want, got):
                raise AssertionError("the no-cache peer drew other tokens than the engine: the comparison is void")
            timed["no-cache"] = timeit(lambda: eng.decode_codes(generate_without_cache(
                eng, prompts, seed=0).view(b, 16, 16)), device=device, warmup=1 if cuda else 0,
                iters=3 if cuda else 1)
        base = timed.get("no-cache", {}).get("ms")
        for mode, t in timed.items():
            rows.append({"device": device_name(device), "load": load, "threads": torch.get_num_threads(),
                         "batch": b, "mode": mode, "ms_per_image": t["ms"] / b,
                         "p20": t["p20"] / b, "p80": t["p80"] / b, "images_per_s": 1e3 * b / t["ms"],
                         "tokens_per_s": 1e3 * b * n_tok / t["ms"],
                         "x_no_cache": base / t["ms"] if base else float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--device", default=None)
    ap.add_argument("--cpu-threads", nargs="+", default=["auto"], metavar="N|auto",
                    help="CPU: the engine's cpu_threads settings to compare (default: auto)")
    ap.add_argument("--load", nargs="+", choices=["idle", "busy"], default=["idle"],
                    help="CPU: time idle and/or with every core kept busy by another process")
    ap.add_argument("--main-command", type=int, default=0, metavar="RUNS",
                    help="CPU: also time README's main command in a fresh process, RUNS times")
    ap.add_argument("--no-peer", action="store_true", help="skip the slow no-cache peer")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed calls per mode, the median reported (default: 3 on a CPU, 10 on a GPU)")
    ap.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/demo.csv")
    args = ap.parse_args()
    if args.iters is not None and args.iters < 1:
        ap.error(f"--iters must be >= 1, got {args.iters}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device_name(device)}")
    rows = []
    for load in args.load if device.type == "cpu" else ["idle"]:
        for threads in args.cpu_threads if device.type == "cpu" else ["auto"]:
            with cpu_load(load):
                rows += run(device, args.batch, peer=not args.no_peer, threads=threads, load=load, iters=args.iters)
                if args.main_command and device.type == "cpu":
                    ms = main_command_ms(threads, args.main_command)
                    med = sorted(ms)[len(ms) // 2]
                    rows.append({"device": device_name(device), "load": load, "threads": threads, "batch": 1,
                                 "mode": "main-command", "ms_per_image": med, "p20": min(ms), "p80": max(ms),
                                 "images_per_s": 1e3 / med, "tokens_per_s": float("nan"),
                                 "x_no_cache": float("nan")})
    print_table(rows, COLUMNS)
    if args.save:
        print(f"saved to {append_results('demo', rows, device)}")


if __name__ == "__main__":
    main()
