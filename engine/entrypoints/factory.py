"""The one engine factory of the entry points: the model flags every command takes, and the
:class:`~vqim.engine.api.Engine` they make (``vqim generate``, ``vqim serve`` and the rest).

Under ``torchrun --nproc-per-node N`` each rank makes its tensor-parallel shard (``WORLD_SIZE``
is the ``tp``), so every command runs tensor-parallel the same way.
"""

from __future__ import annotations

import argparse
import os

from ..config import PRESETS
from ..quantize import QUANTIZE_CHOICES


def _threads(text: str) -> int | str:
    """``--cpu-threads``: "auto" or an int >= 1."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an int >= 1, got {text!r}")
    return int(text)


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="model directory (config.json, *.safetensors, tokenizer.model)")
    src.add_argument("--preset", metavar="NAME", choices=sorted(PRESETS),
                     help=f"random-weight model of a named shape: {', '.join(sorted(PRESETS))}")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the model's dtype on GPU, float32 on CPU")
    p.add_argument("--model-seed", type=int, default=0, help="weight seed of --preset (default 0)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (Inductor; on CPU it needs a C++ compiler; same tokens)")
    p.add_argument("--quantize", choices=list(QUANTIZE_CHOICES), default=None,
                   help="int8 weight-only decoder linears (half the weight bytes per step of bf16)")
    p.add_argument("--cpu-threads", type=_threads, default="auto", metavar="N|auto",
                   help="torch's intra-op threads on the CPU (default auto: 1 for models under 50M parameters, "
                        "torch's default for larger ones)")


def engine_from_args(args: argparse.Namespace, *, tp: int | None = None, **options):
    """The engine of :func:`add_model_args`' arguments; ``options`` are more ``Engine`` options
    (the server's queue and batch sizes). ``tp=None`` is torchrun's ``WORLD_SIZE`` (1 outside
    torchrun); ``vqim batch``'s data-parallel ranks pass 1, a Ray replica its ``--tp``."""
    from ..api import Engine

    if tp is None:
        tp = int(os.environ.get("WORLD_SIZE", "1"))
    opts = {"compile": args.compile, "quantize": args.quantize, "cpu_threads": args.cpu_threads, **options}
    if args.preset is not None:
        return Engine.from_preset(args.preset, seed=args.model_seed, device=args.device, dtype=args.dtype, tp=tp,
                                  **opts)
    return Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, tp=tp, **opts)
