"""Benchmark of tensor-parallel inference (vqim.engine.tp): ms per image at TP = 1, 2, 4 and the
collectives of one decode step.

    python benchmarks/bench_tp.py [--presets parti-750m parti-3b] [--tp 1 2 4] [--batch 1 4] [--save]
    pytest benchmarks/bench_tp.py        (pytest-benchmark, needs CUDA)

Three tables:

1. Collectives per decode step, from the config (``tp.collectives_per_step``): per rank,
   ``L * (2 or 3) + 1`` all-reduces of ``[rows, W]`` (self-attn ``wo``, cross-attn ``wo``,
   ``fc2``, token embedding) and one all-gather of the ``[rows, V]`` logits; ``link_MB`` is what
   a ring all-reduce moves over each link, ``2 (N-1)/N`` of the payload.
2. The same counted in a real gloo run (2 CPU processes, tiny presets), next to the analytic
   numbers: they must match.
3. ms per image (``generate_codes`` + ``decode_codes``, divided by the batch) and ms per decode
   step at each TP size the machine can run: on CUDA one rank per GPU over NCCL (TP sizes above
   the GPU count are skipped and said so), on CPU the tiny presets over gloo, one thread per
   rank. CPU numbers only show the benchmark runs; they are not the target.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import pytest
import torch

from vqim.engine import Engine, ModelConfig
from vqim.engine.config import dtype_from_name
from vqim.engine import tp as TP
from vqim.engine.profiling.ranks import run_ranks
from vqim.engine.requests import condition
from vqim.engine.profiling.timing import device_name, print_table, timeit

from _common import append_results

CUDA_PRESETS = ("parti-750m", "parti-3b")
CPU_PRESETS = ("tiny-t2i", "tiny-vim")
PROMPT = "a red circle on a blue square"


def analytic_rows(presets, tps, batches) -> list[dict]:
    """In each preset's own dtype (bf16 for the paper's models, fp32 for the tiny ones)."""
    rows = []
    for name in presets:
        cfg = ModelConfig.from_name(name)
        dtype = dtype_from_name(cfg.dtype)
        for tp in tps:
            if tp == 1:
                continue
            try:
                TP.check_tp(cfg, tp)
            except ValueError as e:
                print(f"{name} tp={tp}: {e}", file=sys.stderr)
                continue
            for b in batches:
                r = 2 * b  # CFG: conditional + unconditional rows
                c = TP.collectives_per_step(cfg, r, tp, dtype)
                rows.append({"preset": name, "dtype": cfg.dtype, "tp": tp, "batch": b, "rows": r,
                             "all_reduce": c["all_reduce"],
                             "all_reduce_MB": c["all_reduce_bytes"] / 1e6,
                             "link_MB": c["all_reduce_bytes"] * 2 * (tp - 1) / tp / 1e6,
                             "all_gather": c["all_gather"], "all_gather_MB": c["all_gather_bytes"] / 1e6})
    return rows


# ----------------------------------------------------------------------------- rank workers


def _engine(name: str, rank: int, world: int, device: str) -> Engine:
    if world == 1:
        return Engine.from_preset(name, device=device)
    return Engine.from_preset(name, device=device, tp=world)


def _inputs(eng: Engine, batch: int):
    cfg = eng.cfg
    if cfg.is_text_to_image:
        return {"prompts": [PROMPT] * batch}
    if cfg.decoder.num_classes > 0:
        return {"class_ids": [1] * batch}
    return {}


def _memory(eng: Engine, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Text memory and mask of ``batch`` CFG pairs (``2 * batch`` rows; ``None`` without text)."""
    inp = _inputs(eng, batch)
    conds = inp.get("prompts") or inp.get("class_ids") or [eng.model.decoder.null_prefix] * batch
    null = "" if eng.cfg.is_text_to_image else eng.model.decoder.null_prefix
    _, memory, mask, _ = condition(eng.model, eng.tokenizer, conds + [null] * batch)
    return memory, mask


def _count_worker(rank: int, world: int, presets: list[str], out: str) -> None:
    res = {}
    for name in presets:
        eng = _engine(name, rank, world, "cpu")
        dec = eng.model.decoder
        rows = 2
        with torch.no_grad():
            state = dec.new_state(rows, *_memory(eng, 1))
            with TP.count_collectives() as st:
                dec.decode_step(state, torch.zeros(rows, dtype=torch.long), torch.tensor([dec.cfg.prefix]))
        res[name] = (dict(st.counts), dict(st.bytes))
        eng.close()
    if rank == 0:
        torch.save(res, f"{out}/counts.pt")


def _time_worker(rank: int, world: int, presets: list[str], batches: list[int], device_type: str, out: str) -> None:
    import torch.distributed as dist

    device = f"cuda:{rank}" if device_type == "cuda" else "cpu"
    dev = torch.device(device)
    rows = []
    for name in presets:
        eng = _engine(name, rank, world, device)
        dec = eng.model.decoder
        for b in batches:
            inp = _inputs(eng, b)

            def image():
                codes = eng.generate_codes(num_images=1, cfg_scale=3.0, seed=0, **inp)
                eng.decode_codes(codes, output_type="pt")

            with torch.no_grad():
                state = dec.new_state(2 * b, *_memory(eng, b))
                tok = torch.zeros(2 * b, dtype=torch.long, device=dev)
                pos = torch.tensor([dec.cfg.prefix + dec.cfg.num_tokens // 2], device=dev)
                dist.barrier()
                t_step = timeit(lambda: dec.decode_step(state, tok, pos), device=dev, warmup=3, iters=20)
            dist.barrier()
            t_img = timeit(image, device=dev, warmup=1, iters=3)
            rows.append({"preset": name, "tp": world, "batch": b, "dtype": str(dec.head.weight.dtype)[6:],
                         "step_ms": t_step["ms"], "step_p20": t_step["p20"], "step_p80": t_step["p80"],
                         "image_ms": t_img["ms"] / b, "image_p20": t_img["p20"] / b, "image_p80": t_img["p80"] / b})
        eng.close()
    if rank == 0:
        torch.save(rows, f"{out}/times.pt")


def measured_counts(presets) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_count_worker, 2, list(presets), tmp)
        got = torch.load(f"{tmp}/counts.pt")
    rows = []
    for name in presets:
        want = TP.collectives_per_step(ModelConfig.from_name(name), 2, 2, torch.float32)
        counts, nbytes = got[name]
        match = (counts["all_reduce"] == want["all_reduce"] and nbytes["all_reduce"] == want["all_reduce_bytes"]
                 and counts["all_gather"] == want["all_gather"] and nbytes["all_gather"] == want["all_gather_bytes"])
        rows.append({"preset": name, "tp": 2, "rows": 2, "all_reduce": counts["all_reduce"],
                     "all_reduce_bytes": nbytes["all_reduce"], "all_gather": counts["all_gather"],
                     "all_gather_bytes": nbytes["all_gather"], "analytic_all_reduce": want["all_reduce"],
                     "analytic_bytes": want["all_reduce_bytes"], "match": match})
    return rows


def timings(presets, tps, batches, device_type: str) -> list[dict]:
    rows = []
    for tp in tps:
        if device_type == "cuda" and tp > torch.cuda.device_count():
            print(f"tp={tp}: skipped, this machine has {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
            continue
        runnable = []
        for name in presets:
            try:
                TP.check_tp(ModelConfig.from_name(name), tp)
                runnable.append(name)
            except ValueError as e:
                print(f"tp={tp}: skipped {name}: {e}", file=sys.stderr)
        if not runnable:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run_ranks(_time_worker, tp, runnable, list(batches), device_type, tmp, device_type=device_type,
                         timeout_s=1200.0)
            rows += torch.load(f"{tmp}/times.pt")
    base = {(r["preset"], r["batch"]): r["image_ms"] for r in rows if r["tp"] == 1}
    for r in rows:
        if (r["preset"], r["batch"]) in base:
            r["speedup_vs_tp1"] = base[(r["preset"], r["batch"])] / r["image_ms"]
    return rows


# ----------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.gpu
def test_bench_tp1_decode_step_parti_750m(benchmark):
    eng = Engine.from_preset("parti-750m", device="cuda")
    dec = eng.model.decoder
    with torch.no_grad():
        state = dec.new_state(2, *_memory(eng, 1))
        tok = torch.zeros(2, dtype=torch.long, device=eng.device)
        pos = torch.tensor([dec.cfg.prefix + dec.cfg.num_tokens // 2], device=eng.device)

        def step():
            dec.decode_step(state, tok, pos)
            torch.cuda.synchronize()

        benchmark(step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--tp", type=int, nargs="+", default=None, help="default: 1 2 4 on CUDA, 1 2 on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--save", action="store_true", help="append GPU rows to benchmarks/results/tp.csv")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device_type = "cuda" if cuda else "cpu"
    presets = args.presets or (CUDA_PRESETS if cuda else CPU_PRESETS)

    print("== collectives per decode step, per rank (analytic)")
    print_table(analytic_rows(sorted(set(presets) | set(CUDA_PRESETS)), [2, 4, 8], args.batch),
                ["preset", "dtype", "tp", "batch", "rows", "all_reduce", "all_reduce_MB", "link_MB", "all_gather",
                 "all_gather_MB"])
    print("\n== collectives counted in a gloo run (2 CPU ranks, fp32, one CFG pair)")
    counted = measured_counts(CPU_PRESETS)
    print_table(counted, ["preset", "tp", "rows", "all_reduce", "all_reduce_bytes", "all_gather", "all_gather_bytes",
                          "analytic_all_reduce", "analytic_bytes", "match"])
    print(f"\n== ms per image and per decode step on {device_name(torch.device(device_type))}")
    if not cuda:
        print("   (CPU, gloo, 1 thread per rank: these numbers only show the benchmark runs; the target is GPUs)")
    rows = timings(presets, args.tp or ([1, 2, 4] if cuda else [1, 2]), args.batch, device_type)
    print_table(rows, ["preset", "tp", "batch", "dtype", "image_ms", "image_p20", "image_p80", "speedup_vs_tp1",
                       "step_ms", "step_p20", "step_p80"])
    if args.save:
        if cuda:
            print(append_results("tp", rows, torch.device("cuda")))
        else:
            print("--save: CPU rows are not saved (benchmarks/results holds GPU numbers)", file=sys.stderr)
    return 0 if all(r["match"] for r in counted) else 1


if __name__ == "__main__":
    sys.exit(main())
