"""The ``vqim`` command (the console script): the engine's ``generate``, ``encode``, ``decode``
and ``bench`` (:mod:`vqim.engine.entrypoints.cli`), plus ``eval shapes`` and ``train ...``, which need the
training stack and so live above it (imports only go kernels <- engine <- train <- this entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from vqim.engine.entrypoints import cli as engine_cli
from vqim.engine.entrypoints.factory import add_model_args, engine_from_args
from vqim.kernels import SamplingParams
from vqim.engine.weights import atomic_write

from . import eval_shapes
from .cli import main as train_main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vqim", description="Vector-quantized image generation and tokenization.")
    sub = ap.add_subparsers(dest="command", required=True)
    engine_cli.add_commands(sub)

    ev = sub.add_parser("eval", help="alignment benchmarks: `vqim eval shapes` (held-out prompts of the shapes data)")
    ev.add_argument("benchmark", choices=["shapes"])
    ev.add_argument("-n", "--num-prompts", type=int, default=100, help="held-out prompts of each kind (1 and 2 shapes)")
    ev.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to compare")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--split", default="held_out", choices=["held_out", "validation"],
                    help="prompts to score: held_out (report these) or validation (choose settings on these)")
    # --cfg above sweeps the guidance scale; the other settings are fixed for the run.
    SamplingParams.add_arguments(ev, "default: the model's recommendation, else {default}", exclude=("cfg_scale",))
    ev.add_argument("--batch", type=int, default=32)
    ev.add_argument("--candidates", type=int, nargs="+", default=[1],
                    help="reranked draws per prompt to compare (more than 1 needs a model with a scorer)")
    ev.add_argument("--recon-images", type=int, default=256, help="validation images for the tokenizer's PSNR (0: skip it)")
    ev.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ev.add_argument("--grid", metavar="PNG", help="also draw a grid of images for --grid-prompts (or fixed "
                    "prompts of the grammar) at the last --cfg scale and the last --candidates")
    ev.add_argument("--grid-prompts", nargs="+", default=None, metavar="PROMPT")
    add_model_args(ev)
    ev.set_defaults(func=_eval)

    # Listed for --help only: main() hands `vqim train ...` to vqim.train.cli before parsing.
    sub.add_parser("train", help="vqim train tokenizer|stage1|stage2|export ... (see `vqim train -h`)", add_help=False)
    return ap


def _eval(args: argparse.Namespace) -> None:
    eng = engine_from_args(args)
    eng.sampling_defaults.update(SamplingParams.given(args))
    results = eval_shapes.evaluate(eng, num_prompts=args.num_prompts, cfg_scales=args.cfg, seed=args.seed,
                                   batch_size=args.batch, recon_images=args.recon_images, split=args.split,
                                   candidates=args.candidates)
    print(eval_shapes.format_report(results))
    if args.grid:
        grid = eval_shapes.prompt_grid(eng, args.grid_prompts or eval_shapes.GRID_PROMPTS, cfg_scale=args.cfg[-1],
                                       seed=args.seed, candidates=args.candidates[-1])
        # The temporary name ends in .tmp, so the format comes from the real name's suffix.
        fmt = Image.registered_extensions().get(Path(args.grid).suffix.lower(), "PNG")
        print(atomic_write(args.grid, lambda p: grid.save(p, format=fmt)))
    if args.json:
        atomic_write(args.json, lambda p: p.write_text(json.dumps(results, indent=2)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    return engine_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
