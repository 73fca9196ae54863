"""The inference commands of ``vqim``: ``generate``, ``edit``, ``encode``, ``decode``, ``bench``, ``convert``,
``serve``, ``batch``.

The engine knows nothing of training: :mod:`vqim.train.main` is the installed ``vqim`` command,
built on :func:`add_commands`, :func:`add_model_args`, :func:`engine_from_args` and :func:`run`
from here, and adds ``eval shapes`` and ``train ...``. ``python -m vqim.engine.entrypoints.cli`` runs these
commands alone (``torchrun --nproc-per-node N -m vqim.engine.entrypoints.cli generate ...``).

Every command takes the model as ``--model DIR`` (a model directory) or ``--preset NAME``
(random weights of a named shape); with neither, the bundled demo model. Bad input exits with
status 2 and one ``vqim: error: ...`` line, found before any model is built where it can be
(input files, output names). A model fault (NaN/inf, ``FloatingPointError``), a failed write
(disk full, read-only) or running out of GPU memory is not a usage error: status 1, still one
line. Outputs are written to a temporary name and renamed, so a failed write leaves the
previous file whole.
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import warnings
from collections.abc import Callable
from typing import BinaryIO
from pathlib import Path

import numpy as np
from PIL import Image

from vqim.kernels import SamplingParams

from ..parallel import DECODINGS
from ..weights import atomic_write, open_regular
from .factory import add_model_args, engine_from_args


def _outputs(path: str, n: int) -> list[Path]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for several."""
    p = Path(path)
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


@functools.cache
def _writes_rgb(fmt: str) -> bool:
    """Whether PIL saves an RGB image as ``fmt`` here (some registered formats only write other
    modes, or need a plugin that is not installed)."""
    if fmt not in Image.SAVE:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a probe: deprecation notices are not for the user here
            Image.new("RGB", (16, 16)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError):
        return False
    return True


def _image_format(path: Path) -> str:
    """The PIL format of an output image, from its name (the temporary name atomic_write
    saves to ends in .tmp, so the format is passed explicitly)."""
    Image.init()
    formats = Image.registered_extensions()  # extension -> format
    fmt = formats.get(path.suffix.lower())
    if fmt is None or not _writes_rgb(fmt):
        exts = ", ".join(sorted((e for e, f in formats.items() if _writes_rgb(f)), key=lambda e: (e != ".png", e)))
        raise ValueError(f"-o/--output must end in an image extension PIL can write ({exts}), got {str(path)!r}")
    return fmt


def _check_outputs(paths: list[Path]) -> None:
    """Each output can be written as a file: not a directory, and its folder is a directory
    (or will be one: missing folders are created at write time)."""
    for p in paths:
        if p.is_dir():
            raise ValueError(f"-o/--output: {p} is a directory; give a file name")
    folder = paths[0].parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"-o/--output: {folder} is not a directory, so {paths[0]} cannot be written there")


def _write(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary name beside ``path``, then rename; an OSError names ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _save_npy(path: Path, arr: np.ndarray) -> None:
    # Through a file object: np.save given a name not ending in .npy appends .npy to it.
    with open(path, "wb") as f:
        np.save(f, arr)


def _open_input(path: str) -> BinaryIO:
    """An input file, opened: the loader's regular-file check (a FIFO or a device would block
    the read; /dev/zero never ends), with the directory case said plainly."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not a file")
    return open_regular(p)


def _load_codes(path: str) -> np.ndarray:
    p = Path(path)
    with _open_input(path) as f:
        try:
            codes = np.load(f, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise ValueError(f"{p} is not a .npy array of codes ({e})") from e
        if not isinstance(codes, np.ndarray):
            codes.close()
            raise ValueError(f"{p} is a .npz archive; vqim decode takes one .npy array of codes [B, h, w]")
    if codes.size == 0:
        raise ValueError(f"{p} holds no codes (shape {codes.shape}); vqim decode takes [B, h, w] with B >= 1")
    return codes


def _load_image(path: str) -> Image.Image:
    p = Path(path)
    with _open_input(path) as f:
        try:
            with Image.open(f) as im:
                im.load()  # decode now: a truncated file fails here, not inside the engine
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{p} is not an image PIL can read ({e})") from e
    return im


# A prompts file: at most this many bytes (a prompt per line).
MAX_PROMPTS_FILE_BYTES = 16 * 1024 * 1024


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``vqim generate``: the words given without a flag are one prompt (the shell
    splits an unquoted prompt into words, and each word as a prompt of its own was never what was
    meant), then each ``-p/--prompt``, then each non-blank line of ``--prompts-file``."""
    prompts = [" ".join(args.words)] if args.words else []
    prompts += args.prompt or []
    if args.prompts_file is not None:
        with _open_input(args.prompts_file) as f:
            raw = f.read(MAX_PROMPTS_FILE_BYTES + 1)
        if len(raw) > MAX_PROMPTS_FILE_BYTES:
            raise ValueError(f"--prompts-file {args.prompts_file}: over {MAX_PROMPTS_FILE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: not UTF-8 text (byte {e.start})") from None
        lines = [ln.strip() for ln in text.splitlines()]
        if not any(lines):
            raise ValueError(f"--prompts-file {args.prompts_file}: no prompt in it (one prompt per line)")
        prompts += [ln for ln in lines if ln]
    return prompts


def _generate(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ValueError(f"-n must be >= 1 (images per prompt), got {args.n}")
    args.prompt = _prompts(args)
    requests = len(args.prompt) or len(args.class_id or [None])
    paths = _outputs(args.output, requests * args.n)
    fmt = _image_format(paths[0])
    _check_outputs(paths)
    eng = engine_from_args(args)
    eng.cfg.require_decoder("vqim generate")
    text = eng.cfg.is_text_to_image
    if text and not args.prompt:
        raise ValueError(f"{eng.cfg.name} is a text-to-image model: give a PROMPT")
    if not text and args.prompt:
        raise ValueError(f"{eng.cfg.name} takes no text prompt (use --class-id for a class-conditional model)")
    imgs = eng.generate(args.prompt if text else None, num_images=args.n, seed=args.seed, class_ids=args.class_id,
                        progress=not args.quiet, candidates=args.candidates, decoding=args.decoding,
                        sjd_window=args.sjd_window, upscale=args.upscale, **SamplingParams.given(args))
    if not eng.is_main:
        return  # tensor parallel: every rank holds the same images, rank 0 writes them
    for img, path in zip(imgs, paths):
        _write(path, lambda p, img=img: img.save(p, format=fmt))
        print(path)


def _edit_mask(path: str, grid: int, size: int):
    """``--mask``: a PNG of the token grid (``grid`` x ``grid``) or of the image (``size`` x
    ``size``; a token is kept when the mean of its patch is over half white); nonzero keeps."""
    import torch

    im = _load_image(path).convert("L")
    if im.size not in ((grid, grid), (size, size)):
        raise ValueError(f"--mask {path} is {im.size[0]}x{im.size[1]}; it must be the token grid ({grid}x{grid}) "
                         f"or the image ({size}x{size})")
    a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)  # (h, w) in [0, 1]
    if im.size == (size, size):
        p = size // grid
        a = a.view(grid, p, grid, p).mean(dim=(1, 3))  # (grid, grid)
        return a > 0.5
    return a > 0


def _edit(args: argparse.Namespace) -> None:
    if (args.keep_rows is None) == (args.mask is None):
        raise ValueError("give exactly one of --keep-rows N (raster completion) and --mask PNG")
    paths = _outputs(args.output, args.n)
    fmt = _image_format(paths[0])
    _check_outputs(paths)
    image = _load_image(args.image)
    eng = engine_from_args(args)
    eng.cfg.require_decoder("vqim edit")
    if not eng.cfg.is_text_to_image:
        raise ValueError(f"vqim edit takes a text-to-image model; {eng.cfg.name} is not one")
    v = eng.cfg.vqgan
    keep = args.keep_rows if args.mask is None else _edit_mask(args.mask, v.grid, v.image_size)
    imgs = eng.generate([args.prompt], num_images=args.n, seed=args.seed, image=image, keep=keep,
                        progress=not args.quiet, upscale=args.upscale, **SamplingParams.given(args))
    for img, path in zip(imgs, paths):
        _write(path, lambda p, img=img: img.save(p, format=fmt))
        print(path)


def _encode(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if out.suffix.lower() != ".npy":
        raise ValueError(f"-o/--output must end in .npy (codes are saved as a numpy array), got {args.output!r}")
    _check_outputs([out])
    imgs = [_load_image(p) for p in args.images]
    eng = engine_from_args(args)
    codes = eng.encode_images(imgs).cpu().numpy()
    _write(out, lambda p: _save_npy(p, codes))
    print(f"{out}: codes {codes.shape} in [0, {eng.cfg.vqgan.codebook_size})")


def _decode(args: argparse.Namespace) -> None:
    codes = _load_codes(args.codes)
    # [h, w] is one image; a wrong rank is the engine's error to name.
    paths = _outputs(args.output, codes.shape[0] if codes.ndim == 3 else 1)
    fmt = _image_format(paths[0])
    _check_outputs(paths)
    eng = engine_from_args(args)
    imgs = eng.decode_codes(codes, upscale=args.upscale)
    for img, path in zip(imgs, paths):
        _write(path, lambda p, img=img: img.save(p, format=fmt))
        print(path)


def _bench(args: argparse.Namespace) -> None:
    from ..api import Engine
    from ..profiling.bench import COLUMNS, bench_engine
    from ..profiling.timing import print_table

    # Every PRESET named, and the --model or --preset engine; with none of these, the tiny presets.
    own = args.model is not None or args.preset is not None
    presets = args.bench_presets or ([] if own else ["tiny-t2i", "tiny-vim"])
    builds = [functools.partial(Engine.from_preset, name, seed=args.model_seed, device=args.device, dtype=args.dtype,
                                compile=args.compile, quantize=args.quantize) for name in presets]
    if own:
        builds.append(functools.partial(engine_from_args, args))
    rows = []
    for build in builds:
        eng = build()
        if eng.device.type != "cuda":
            print(f"{eng.cfg.name}: CPU timings (the target is a GPU; CPU numbers only show the benchmark runs)",
                  file=sys.stderr)
        for b in args.batch:
            rows += bench_engine(eng, b, cfg_scale=args.cfg)
        del eng  # one model in memory at a time: this one goes before the next is built
    print_table(rows, COLUMNS)


SERVE_EXTRA = "vqim serve needs the serve extra: pip install 'vqim[serve]'"
# The serve extra's packages: a missing one of these is the user's install, not a bug.
_SERVE_PACKAGES = {"fastapi", "uvicorn", "starlette", "pydantic"}


def _convert(args: argparse.Namespace) -> None:
    from ..convert import convert_janus, convert_llamagen

    if args.family == "janus":
        out = convert_janus(args.source, args.output, max_prompt_len=args.max_prompt_len)
    else:
        out = convert_llamagen(args.gpt, args.vq, args.size, args.output)
    print(f"wrote {out}")


def _import_serve():
    """:mod:`.serve`, or ValueError(SERVE_EXTRA) where its packages are not installed (imported
    here, not at the top, so the other commands need neither fastapi nor uvicorn)."""
    try:
        from . import serve
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in _SERVE_PACKAGES:
            raise ValueError(SERVE_EXTRA) from e
        raise
    return serve


def _serve(args: argparse.Namespace) -> None:
    if args.ray:
        _import_ray("serve --ray", "ray_serve").main(args)
        return
    _import_serve().main(args)


# ---- Ray (vqim serve --ray, vqim batch): the ray extra, imported only when asked for.
RAY_EXTRA = "vqim {} needs the ray extra: pip install 'vqim[ray]'"


def _import_ray(command: str, module: str):
    """``engine/entrypoints/<module>.py``, or ValueError(RAY_EXTRA) where ray (or the serve
    extra's packages) are not installed."""
    import importlib

    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in {"ray", *_SERVE_PACKAGES}:
            raise ValueError(RAY_EXTRA.format(command)) from e
        raise


def _replicas(text: str) -> int | tuple[int, int]:
    """``--replicas``: N (fixed) or MIN:MAX (autoscaling), each an int >= 1 (MIN may be 0)."""
    lo, sep, hi = text.partition(":")
    if not sep:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be N >= 1 or MIN:MAX, got {text!r}")
        return int(text)
    if not (lo.isdigit() and hi.isdigit()) or int(hi) < max(1, int(lo)):
        raise argparse.ArgumentTypeError(f"MIN:MAX needs ints with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(lo), int(hi)


def _add_ray_args(p: argparse.ArgumentParser, what: str) -> None:
    """The Ray flags both commands take (``what``: a replica or an actor)."""
    p.add_argument("--num-gpus", type=float, default=None,
                   help=f"GPUs per {what} (default 1; 0 with --device cpu)")
    p.add_argument("--num-cpus", type=float, default=1.0, help=f"CPUs per {what} (default 1)")
    p.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else a local cluster started and stopped "
                        "by this command)")


def _add_ray_serve_args(p: argparse.ArgumentParser) -> None:
    """``vqim serve --ray``'s flags."""
    p.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve deployment of replicas of this app (needs the ray extra: "
                        "pip install 'vqim[ray]')")
    p.add_argument("--replicas", type=_replicas, default=1, metavar="N|MIN:MAX",
                   help="with --ray: N replicas, or MIN:MAX for Ray Serve's autoscaling (default 1)")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="with --replicas MIN:MAX: requests per replica the autoscaler aims at (default "
                        "--max-batch-size: a replica's images decoded together)")
    p.add_argument("--tp", type=int, default=1,
                   help="with --ray: tensor-parallel ranks per replica, a placement group of that many bundles on "
                        "one node (default 1)")
    _add_ray_args(p, "replica (per rank with --tp)")


def _batch(args: argparse.Namespace) -> None:
    from . import batch

    batch.main(args)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    """``vqim serve``'s flags; they are listed here so that ``vqim serve -h`` works without the extra."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (printed)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $VQIM_API_KEY; "
                        "none: no key, and a warning when --host is not loopback)")
    p.add_argument("--max-queue", type=int, default=1024, help="images waiting at most; past it: 429 (default 1024)")
    p.add_argument("--max-batch-size", type=int, default=16, help="images per decode step at most (default 16)")
    p.add_argument("--max-prompt-chars", type=int, default=1000,
                   help="longest prompt (and negative_prompt) in characters (default 1000)")
    p.add_argument("--max-n", type=int, default=10, help="most images per request (default 10, OpenAI's)")
    p.add_argument("--max-candidates", type=int, default=8,
                   help="most reranked candidates per image of a request (default 8)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="largest JSON request body (default 65536)")
    p.add_argument("--max-upload-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest edit request body, its image and mask included (default 16777216)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="largest uploaded image, width x height, checked before it is decoded (default 16777216)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME", default=None,
                   help="the model names requests may give (e.g. gpt-image-1, so OpenAI clients need no change), "
                        "listed by /v1/models; another is a 404 (default: the model's own name)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may take before it fails with 504 (default 300)")


UPSCALE_HELP = "pass the images through the model's super-resolution module (64 -> 256 px for the bundled model)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vqim", description="Vector-quantized image generation and tokenization.")
    add_commands(ap.add_subparsers(dest="command", required=True))
    return ap


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``edit``, ``encode``, ``decode``, ``bench``, ``convert``, ``serve`` and ``batch`` to ``sub`` (each
    sets ``func``, run by :func:`run`)."""
    g = sub.add_parser("generate", help="text (or class) -> image(s)",
                       description="The words given without a flag are ONE prompt, quoted or not (vqim generate a "
                       "red circle == vqim generate \"a red circle\"); give several prompts with -p/--prompt, once "
                       "per prompt, or --prompts-file.")
    g.add_argument("words", nargs="*", metavar="PROMPT",
                   help="the prompt (all words together are one prompt); none for class-conditional models")
    g.add_argument("-p", "--prompt", action="append", default=None,
                   help="a prompt; repeat for several (each its own image(s), out-0.png, out-1.png ...)")
    g.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="UTF-8 text file, one prompt per line (blank lines skipped)")
    g.add_argument("-o", "--output", default="out.png", help="output PNG (out-0.png, out-1.png ... for several)")
    g.add_argument("-n", type=int, default=1, help="images per prompt")
    SamplingParams.add_arguments(g, "default: the model's recommendation (generation.json), else {default}")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--class-id", type=int, nargs="+", default=None, help="class id(s) of a class-conditional model")
    g.add_argument("--candidates", type=int, default=1,
                   help="draw N images per image and keep the one the model's scorer rates best (needs a scorer)")
    g.add_argument("--decoding", choices=list(DECODINGS), default="auto",
                   help="raster: a token per pass; wavefront: the same tokens in fewer passes (models whose every "
                        "decoder layer is conv-masked); sjd: speculative Jacobi decoding (same distribution); auto "
                        "(default): the wavefront where the model runs it, else raster")
    g.add_argument("--sjd-window", type=int, default=16, help="draft tokens per image for --decoding sjd (default 16)")
    g.add_argument("--upscale", action="store_true", help=UPSCALE_HELP)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_args(g)
    g.set_defaults(func=_generate)

    ed = sub.add_parser("edit", help="image + prompt -> image(s): keep some of the image's tokens, draw the rest",
                        description="Raster completion (--keep-rows N: the top N token rows kept; exact) or a mask "
                        "(--mask PNG; approximate in a raster model: a drawn token sees only kept tokens before it).")
    ed.add_argument("image", help="input image of the model's size")
    ed.add_argument("prompt", help="text prompt")
    ed.add_argument("--keep-rows", type=int, default=None, help="keep the top N rows of tokens")
    ed.add_argument("--mask", default=None, help="PNG, grid- or image-sized: nonzero (over half white) keeps")
    ed.add_argument("-o", "--output", default="out.png", help="output PNG (out-0.png, ... for several)")
    ed.add_argument("-n", type=int, default=1, help="images")
    SamplingParams.add_arguments(ed, "default: the model's recommendation (generation.json), else {default}")
    ed.add_argument("--seed", type=int, default=None)
    ed.add_argument("--upscale", action="store_true", help=UPSCALE_HELP)
    ed.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_args(ed)
    ed.set_defaults(func=_edit)

    e = sub.add_parser("encode", help="images -> codes (.npy, [B, h, w] int64)")
    e.add_argument("images", nargs="+")
    e.add_argument("-o", "--output", default="codes.npy")
    add_model_args(e)
    e.set_defaults(func=_encode)

    d = sub.add_parser("decode", help="codes (.npy) -> images")
    d.add_argument("codes")
    d.add_argument("-o", "--output", default="out.png")
    d.add_argument("--upscale", action="store_true", help=UPSCALE_HELP)
    add_model_args(d)
    d.set_defaults(func=_decode)

    b = sub.add_parser("bench", help="ms per decode step and per image, against the HBM roofline",
                       description="Benchmarks every PRESET given and the --model or --preset model; with none of "
                       "these, the tiny presets.")
    b.add_argument("bench_presets", nargs="*", metavar="PRESET",
                   help="presets to run, random weights (default: tiny-t2i and tiny-vim, unless --model or --preset)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    b.add_argument("--cfg", type=float, default=SamplingParams.cfg_scale, help="guidance scale of the timed steps")
    add_model_args(b)
    b.set_defaults(func=_bench)

    c = sub.add_parser("convert", help="public weights (Janus-Pro, LlamaGen) -> a vqim model directory",
                       description="Converts a public checkpoint into a model directory that --model loads.")
    fam = c.add_subparsers(dest="family", required=True)
    cj = fam.add_parser("janus", help="a transformers Janus(-Pro) directory (config.json, *.safetensors, tokenizer.json)")
    cj.add_argument("source", help="the Hugging Face directory, e.g. a download of deepseek-community/Janus-Pro-1B")
    cj.add_argument("output", help="the vqim model directory to write")
    cj.add_argument("--max-prompt-len", type=int, default=128,
                    help="longest prompt in tokens, chat template included (longer prompts are cut, with a warning)")
    cj.set_defaults(func=_convert)
    cl = fam.add_parser("llamagen", help="a LlamaGen class-conditional GPT and its VQ-16 (release .pt files)")
    cl.add_argument("output", help="the vqim model directory to write")
    cl.add_argument("--gpt", required=True, help="the GPT checkpoint, e.g. c2i_XL_384.pt")
    cl.add_argument("--vq", required=True, help="the VQ checkpoint, vq_ds16_c2i.pt")
    cl.add_argument("--size", type=int, required=True, help="image size the GPT was trained at: 256 or 384")
    cl.set_defaults(func=_convert)

    s = sub.add_parser("serve", help="HTTP server: OpenAI's images API (POST /v1/images/generations and /edits)",
                       description="Serves the model over HTTP (needs the serve extra: pip install 'vqim[serve]').")
    _add_serve_args(s)
    _add_ray_serve_args(s)
    add_model_args(s)
    s.set_defaults(func=_serve)

    bt = sub.add_parser("batch", help="offline generation: a JSONL file of rows -> image shards (resumable)",
                        description="Draws one image per row of PROMPTS (JSONL: {\"prompt\": ..., \"seed\": ..., "
                        "settings}) into OUTDIR/shard-NNNNNN/ folders of PNGs and metadata.jsonl; a re-run skips "
                        "the shards already written. With --ray on Ray Data (a pool of engine actors); without, in "
                        "this process, or data parallel under torchrun (rank r draws shards r, r + N, ...).")
    bt.add_argument("prompts", metavar="PROMPTS",
                    help="JSONL, one row per line: prompt (or class_id), seed, negative_prompt, settings by name "
                         "(cfg_scale, temperature, top_k, top_p, min_p)")
    bt.add_argument("outdir", metavar="OUTDIR", help="folder of the shards (created; a re-run resumes it)")
    bt.add_argument("--shard-size", type=int, default=64, help="rows per shard (default 64)")
    bt.add_argument("--seed", type=int, default=0, help="a row without a seed draws with SEED + its row index "
                    "(default 0)")
    SamplingParams.add_arguments(bt, "for rows that leave it out; default: the model's recommendation "
                                 "(generation.json), else {default}")
    bt.add_argument("--ray", action="store_true", help="draw on Ray Data (needs the ray extra: pip install "
                    "'vqim[ray]')")
    bt.add_argument("--actors", type=int, default=1, help="with --ray: engine actors in the pool (default 1)")
    _add_ray_args(bt, "actor")
    bt.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_model_args(bt)
    bt.set_defaults(func=_batch)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.func``): 0, or 2 after a usage error, 1 after any other failure,
    each failure one ``vqim: error:`` line."""
    import torch

    try:
        with warnings.catch_warnings():
            # The engine's warnings (a fallback, a truncated prompt) as one line each, no source.
            warnings.showwarning = lambda message, *_: print(f"vqim: warning: {message}", file=sys.stderr)
            args.func(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail(e, 2)
    except (FloatingPointError, OSError, torch.OutOfMemoryError) as e:
        # Not a usage error: the model's numbers (NaN/inf), the disk, or the GPU's memory.
        return _fail(e, 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def _fail(e: BaseException, status: int) -> int:
    """One ``vqim: error:`` line, even for a multi-line message."""
    print("vqim: error: " + " ".join(str(e).split("\n")), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
