"""``vqim train tokenizer|stage1|stage2|scorer|export``.

    vqim train shapes OUT_DIR [-n 20000] [--split train] [--seed 0]
    vqim train tokenizer DATA -o tokenizer.model [--vocab-size 1000] [--model-type unigram]
    vqim train stage1 CONFIG [--resume] [--steps N] [--out-dir DIR] [--device D]
    vqim train stage2 CONFIG [--resume] ...
    vqim train scorer CONFIG [--resume] ...     (init_from: the model directory the reranker joins)
    vqim train superres CONFIG [--export MODEL_DIR] [--resume] [--steps N] ...   (init_from: the model it joins)
    vqim train export CHECKPOINT -o MODEL_DIR [--text-tokenizer FILE] [--dtype bfloat16] [--temperature T ...]

CONFIG is a JSON or TOML file of :class:`vqim.train.config.TrainConfig` fields. For several
GPUs (or CPU processes) launch with ``torchrun --nproc-per-node N -m vqim.train.cli stage1 CONFIG``.
Bad input exits with status 2 and one ``vqim train: error: ...`` line; a diverged run (NaN/inf
loss) exits with status 1 naming the last good checkpoint.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from vqim.kernels import SamplingParams

    ap = argparse.ArgumentParser(prog="vqim train", description="Train the tokenizer and the image-token predictor.")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("shapes", help="write a split of the synthetic shapes dataset (images + captions.jsonl)")
    d.add_argument("out_dir")
    d.add_argument("-n", "--num-images", type=int, default=20000)
    d.add_argument("--split", default="train", help="train, validation or held_out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--partial", type=float, default=0.0,
                   help="share of captions naming only part of each shape (shape and color, size and position "
                        "each kept with probability 1/2); default 0")

    t = sub.add_parser("tokenizer", help="train a sentencepiece model on a dataset's captions")
    t.add_argument("data", help="dataset folder with captions.jsonl")
    t.add_argument("-o", "--output", default="tokenizer.model")
    t.add_argument("--vocab-size", type=int, default=1000, help="upper bound on the number of pieces")
    t.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "word", "char"],
                   help="sentencepiece algorithm (bpe keeps whole words of a small caption grammar)")

    for name, help_ in (("stage1", "train the ViT-VQGAN image tokenizer"),
                        ("stage2", "train the text encoder + image-token decoder on the frozen tokenizer"),
                        ("scorer", "train the reranker (contrastive image-text encoders) beside a trained model")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="training config (.json or .toml)")
        s.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
        s.add_argument("--steps", type=int, default=None, help="override the config's steps")
        s.add_argument("--out-dir", default=None, help="override the config's out_dir")
        s.add_argument("--device", default=None, help="override the config's device")

    r = sub.add_parser("superres", help="train the super-resolution module beside a trained model, on shapes "
                                        "rendered on the fly")
    r.add_argument("config", help="training config (.json or .toml)")
    r.add_argument("--export", metavar="MODEL_DIR", default=None,
                   help="then write init_from's model with the trained module to MODEL_DIR")
    r.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    r.add_argument("--steps", type=int, default=None, help="override the config's steps")
    r.add_argument("--out-dir", default=None, help="override the config's out_dir")
    r.add_argument("--device", default=None, help="override the config's device")

    e = sub.add_parser("export", help="checkpoint -> engine model directory")
    e.add_argument("checkpoint")
    e.add_argument("-o", "--output", required=True, help="model directory to write")
    e.add_argument("--text-tokenizer", default=None, help="sentencepiece model (default: the run's)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    SamplingParams.add_arguments(e, "the model's recommendation, written to generation.json (default: none, "
                                    "so {default})")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .run import TrainingDiverged

    try:
        if args.command == "shapes":
            from .shapes import make_dataset

            print(make_dataset(args.out_dir, args.num_images, seed=args.seed, split=args.split, size=args.image_size,
                               partial=args.partial))
        elif args.command == "tokenizer":
            from .data import ImageDataset, train_sentencepiece

            caps = ImageDataset(args.data, 1).captions
            out = train_sentencepiece(caps, args.output, args.vocab_size, model_type=args.model_type)
            print(out)
        elif args.command in ("stage1", "stage2", "scorer"):
            from .config import TrainConfig
            from . import train

            cfg = TrainConfig.load(args.config, steps=args.steps, out_dir=args.out_dir, device=args.device)
            run = train(cfg, args.command, resume=args.resume)
            if run.dist.main:
                print(run.ckpt_path)
        elif args.command == "superres":
            from .config import TrainConfig
            from .superres import train_superres

            cfg = TrainConfig.load(args.config, steps=args.steps, out_dir=args.out_dir, device=args.device)
            run = train_superres(cfg, export_to=args.export, resume=args.resume)
            if run.dist.main:
                print(args.export or run.ckpt_path)
        else:
            from vqim.kernels import SamplingParams

            from .export import export

            print(export(args.checkpoint, args.output, text_tokenizer=args.text_tokenizer, dtype=args.dtype,
                         generation=SamplingParams.given(args)))
    except TrainingDiverged as e:
        print(f"vqim train: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"vqim train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
