"""Fewer forward passes than tokens: raster vs wavefront vs speculative Jacobi decoding, same run.

    python benchmarks/bench_parallel_decoding.py [--models bundled tiny-t2i tiny-vim] [--model-dir DIR ...]
        [--images 8] [--sjd-window 16] [--device cpu] [--save]

Each image is decoded alone (batch 1, so passes are the image's own) through the engine's decode
loop (``Engine.submit(..., decoding=...)``; ``RequestHandle.stats`` counts its passes), with the
model's default
sampling settings (the bundled model's generation.json: guidance 1.5, temperature 0.5; SamplingParams'
defaults for a preset, whose weights are random), prompts from the held-out shapes split (text
models) or class ids. Per model and method:

* ``passes_per_image``: forward passes, prefill included (raster: one per token);
  ``passes_per_token`` and ``tokens_per_pass`` (its inverse);
* ``row_start_accept``: wavefront drafts of a row's first token that the check kept;
  ``draft_accept``: SJD drafts accepted;
* ``same_as_raster``: images whose tokens equal raster decoding's (the wavefront's promise; SJD
  only matches raster's distribution);
* ``ms_per_image`` and ``x_raster`` (raster's ms over the method's: the peer is raster decoding
  in this run, one token per pass on the same engine).

A model with a fully causal decoder layer gets a wavefront row saying so instead of numbers.
``--model-dir`` adds model directories (e.g. an all-conv export of ``train/configs/shapes_stage2_more.json``).
On CUDA the default models are parti-350m with random weights (passes and time). ``--save``
appends the rows to ``benchmarks/results/parallel_decoding.csv``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vqim.engine import Engine
from vqim.engine.config import PRESETS
from vqim.engine.parallel import DecodeStats, wavefront_unsupported
from vqim.engine.profiling.timing import device_name, print_table
from vqim.train.shapes import held_out_prompts

from _common import append_results

COLUMNS = ["device", "model", "method", "images", "passes_per_image", "passes_per_token", "tokens_per_pass",
           "row_start_accept", "draft_accept", "same_as_raster", "ms_per_image", "x_raster", "note"]


def _engine(name: str, device: torch.device) -> Engine:
    """``bundled``, a preset (random weights) or a model directory."""
    if name == "bundled":
        return Engine.from_pretrained(device=device, max_batch_size=1)
    if name in PRESETS:
        return Engine.from_preset(name, device=device, max_batch_size=1)
    return Engine.from_pretrained(name, device=device, max_batch_size=1)


def _requests(eng: Engine, n: int) -> list:
    if eng.cfg.is_text_to_image:
        return held_out_prompts(n, seed=0)
    classes = max(eng.cfg.decoder.num_classes, 1)
    return [i % classes if eng.cfg.decoder.num_classes else eng.model.decoder.null_prefix for i in range(n)]


def _decode(eng: Engine, method: str, request, seed: int, window: int) -> tuple[torch.Tensor, DecodeStats, float]:
    kw = {"prompts": [request]} if eng.cfg.is_text_to_image else {"class_ids": [request]}
    if not eng.cfg.is_text_to_image and not eng.cfg.decoder.num_classes:
        kw = {}
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    handle = eng.submit(**kw, seed=seed, decoding=method, sjd_window=window)
    tokens = handle.result()
    sync()
    return tokens.view(1, -1).cpu(), handle.stats, (time.perf_counter() - t0) * 1e3


def run(models: list[str], images: int, window: int, device: torch.device) -> list[dict]:
    rows = []
    for name in models:
        eng = _engine(name, device)
        label = name if name == "bundled" or name in PRESETS else Path(name).name  # a directory: its name
        requests = _requests(eng, images)
        _decode(eng, "raster", requests[0], 0, window)  # warm-up
        raster_tokens, raster_ms = [], 0.0
        for method in ("raster", "wavefront", "sjd"):
            row = {"device": device_name(device), "model": label, "method": method, "images": images}
            why = wavefront_unsupported(eng.model.decoder) if method == "wavefront" else None
            if why is not None:
                rows.append({**row, "note": why})
                continue
            total, ms, same = DecodeStats(), 0.0, 0
            for i, req in enumerate(requests):
                tokens, stats, t = _decode(eng, method, req, i, window)
                total.add(stats)
                ms += t
                if method == "raster":
                    raster_tokens.append(tokens)
                else:
                    same += int(torch.equal(tokens, raster_tokens[i]))
            if method == "raster":
                raster_ms = ms
            row.update(passes_per_image=total.passes / images, passes_per_token=total.passes_per_token,
                       tokens_per_pass=1 / total.passes_per_token, ms_per_image=ms / images, x_raster=raster_ms / ms,
                       same_as_raster=images if method == "raster" else same)
            if method == "wavefront":
                row["row_start_accept"] = total.row_starts_accepted / max(total.row_starts, 1)
            if method == "sjd":
                row["draft_accept"] = total.drafts_accepted / max(total.drafts, 1)
                row["note"] = f"window {window}"
            rows.append(row)
            print_table(rows[-1:], COLUMNS)
        eng.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help="'bundled', presets or model directories (default: bundled tiny-t2i tiny-vim on CPU, "
                         "parti-350m on CUDA)")
    ap.add_argument("--model-dir", nargs="*", default=[], help="more model directories")
    ap.add_argument("--images", type=int, default=8, help="images per model and method (each alone)")
    ap.add_argument("--sjd-window", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/parallel_decoding.csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device_name(device)}, torch threads: {torch.get_num_threads()}")
    models = args.models or (["parti-350m"] if device.type == "cuda" else ["bundled", "tiny-t2i", "tiny-vim"])
    rows = run(models + args.model_dir, args.images, args.sjd_window, device)
    print()
    print_table(rows, COLUMNS)
    if args.save:
        print(f"saved to {append_results('parallel_decoding', rows, device)}")


if __name__ == "__main__":
    main()
