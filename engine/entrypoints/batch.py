"""``vqim batch PROMPTS OUTDIR``: offline generation of a JSONL file of rows into image shards.

A row is one image: ``{"prompt": ..., "seed": ..., <settings>}`` (``class_id`` instead of
``prompt`` for a class-conditional model, neither for an unconditional one; ``negative_prompt``;
the settings by :class:`~vqim.kernels.SamplingParams` field name: ``cfg_scale``, ``temperature``,
``top_k``, ``top_p``, ``min_p``). A row without ``seed`` takes ``--seed`` plus its row index, a
setting left out takes the command's flag, else the model's ``generation.json``. Seeds are per
image, so an image does not depend on which shard, process or retry drew it: row ``i`` is the
image ``vqim generate PROMPT --seed S`` draws, byte for byte (both save PNG the same way).

Rows ``k * S .. (k + 1) * S - 1`` (``S = --shard-size``) form shard ``k``, written as the folder
``OUTDIR/shard-%06d`` holding ``<row index>.png`` per row and ``metadata.jsonl`` (per image: its
row, file, prompt or class, seed and the settings it was drawn with). A shard is drawn into a
hidden folder and renamed into place whole, so a shard folder that exists is finished: a re-run
skips it (resumable), and a shard that failed, or whose process died, is drawn again with the
same images. ``OUTDIR/batch.json`` records what the shards were drawn from (the prompts file's
SHA-256, the shard size, the model and the flags that change images); a re-run with any of
them changed is refused instead of mixing two batches in one folder.

Where the shards are drawn:

- ``--ray``: Ray Data, ``map_batches`` over a pool of engine actors (``ActorPoolStrategy``,
  ``--actors N``, ``--num-gpus`` per actor: one by default, none with ``--device cpu``), one shard
  per call. Ray restarts an actor that dies and retries the shard it held.
- without ``--ray``: this process; under ``torchrun --nproc-per-node N`` (or ``--nnodes``) plain
  data parallelism, rank ``r`` drawing shards ``r, r + N, ...``, each rank a whole engine
  (tp = 1; ``cuda:LOCAL_RANK`` on GPUs).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from vqim.kernels import MAX_SEED, SamplingParams

from ..weights import atomic_write, load_config, open_regular
from .factory import engine_from_args

RAY_EXTRA = "vqim batch --ray needs the ray extra: pip install 'vqim[ray]'"
# The keys a row may have besides the sampling settings.
ROW_KEYS = ("prompt", "class_id", "seed", "negative_prompt")
# The longest line of a prompts file (a row is one prompt and a few settings).
MAX_LINE_BYTES = 1 << 20
MANIFEST = "batch.json"
METADATA = "metadata.jsonl"
# The model flags that change the images drawn (the device and --compile do not).
_MODEL_KEYS = ("model", "preset", "model_seed", "dtype", "quantize")


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def image_name(index: int) -> str:
    return f"{index:08d}.png"


# ---------------------------------------------------------------------------------- rows


def _model_config(args: argparse.Namespace):
    """The model's config, read without building it (the rows are checked against it)."""
    from ..api import BUNDLED_MODEL
    from ..config import ModelConfig

    if args.preset is not None:
        return ModelConfig.from_name(args.preset)
    return load_config(args.model if args.model is not None else BUNDLED_MODEL)


def _check_row(row: object, where: str, cfg, base_seed: int, index: int) -> dict:
    """One row, checked and normalized: ``{"index", "prompt", "class_id", "seed",
    "negative_prompt", "settings"}`` (ValueError naming the line and key)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(ROW_KEYS) - set(SamplingParams.names()))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; a row's keys are {', '.join(ROW_KEYS)} and the "
                         f"settings {', '.join(SamplingParams.names())}")
    out = {"index": index, "prompt": row.get("prompt"), "class_id": row.get("class_id"),
           "seed": row.get("seed", base_seed + index), "negative_prompt": row.get("negative_prompt")}
    for key in ("prompt", "negative_prompt"):
        v = out[key]
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}: {key} must be a string, got {v!r}")
    seed, class_id = out["seed"], out["class_id"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{where}: seed must be an int in [0, 2**63 - 1], got {seed!r}")
    if class_id is not None and (not isinstance(class_id, int) or isinstance(class_id, bool)):
        raise ValueError(f"{where}: class_id must be an int, got {class_id!r}")
    if cfg.is_text_to_image:
        if out["prompt"] is None or out["class_id"] is not None:
            raise ValueError(f"{where}: {cfg.name} is a text-to-image model: a row needs a \"prompt\" (and no "
                             "\"class_id\")")
    else:
        if out["prompt"] is not None or out["negative_prompt"] is not None:
            raise ValueError(f"{where}: {cfg.name} takes no text: give \"class_id\" (or nothing), not \"prompt\"")
        classes = cfg.decoder.num_classes
        if class_id is not None and not 0 <= class_id < classes:
            raise ValueError(f"{where}: class_id must be in [0, {classes}), got {class_id}")
    settings = {k: row[k] for k in SamplingParams.names() if row.get(k) is not None}
    try:
        SamplingParams(**settings)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    out["settings"] = settings
    return out


def read_rows(path: str, cfg, base_seed: int = 0) -> tuple[list[dict], str]:
    """The rows of a JSONL prompts file (blank lines skipped), each checked against the model's
    config, and the file's SHA-256."""
    if Path(path).is_dir():
        raise ValueError(f"PROMPTS {path} is a directory, not a JSONL file")
    cfg.require_decoder("vqim batch")
    digest = hashlib.sha256()
    rows = []
    with open_regular(path) as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            digest.update(raw)
            where = f"{path} line {number}"
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{where}: over {MAX_LINE_BYTES} bytes (one row per line)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            rows.append(_check_row(row, where, cfg, base_seed, len(rows)))
    if not rows:
        raise ValueError(f"PROMPTS {path}: no rows in it (one JSON object per line, e.g. "
                         '{"prompt": "a red circle", "seed": 0})')
    return rows, digest.hexdigest()


def shards(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


# ---------------------------------------------------------------------------------- shards


def draw_shard(engine, rows: list[dict], flags: dict) -> list:
    """The images of ``rows`` (``flags``: the command's sampling settings, under each row's own).
    Every row is its own request, so each is drawn with its own seed and settings, all sharing
    the decode loop's steps; the codes are decoded together."""
    import torch

    handles = [engine.submit(row["prompt"], 1, seed=row["seed"], negative_prompt=row["negative_prompt"],
                             class_ids=None if row["class_id"] is None else [row["class_id"]],
                             **{**flags, **row["settings"]}) for row in rows]
    codes = torch.cat([h.result() for h in handles])  # (len(rows), h, w)
    return engine.decode_codes(codes)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_shard(engine, out: Path, k: int, rows: list[dict], flags: dict) -> bool:
    """Draw shard ``k`` and put it in place whole; False when it is already there (finished by
    an earlier run or try). The hidden folder it is drawn in names this process
    (``.shard-K.tmp-PID-...``); an earlier try's leftovers are removed first."""
    final = out / shard_name(k)
    if final.is_dir():
        return False
    for stale in out.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        images = draw_shard(engine, rows, flags)
        defaults = SamplingParams(**engine.sampling_defaults)
        lines = []
        for row, image in zip(rows, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")  # as vqim generate saves: the same bytes for the same pixels
            _fsync_write(tmp / image_name(row["index"]), buf.getvalue())
            meta = {"index": row["index"], "file": image_name(row["index"])}
            meta.update({key: row[key] for key in ("prompt", "class_id", "negative_prompt") if row[key] is not None})
            meta["seed"] = row["seed"]
            meta["settings"] = defaults.updated(**{**flags, **row["settings"]}).to_dict()
            lines.append(json.dumps(meta) + "\n")
        _fsync_write(tmp / METADATA, "".join(lines).encode())
        try:
            os.rename(tmp, final)
        except OSError:
            if final.is_dir():  # another try of this shard finished first: the same images
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _check_manifest(out: Path, manifest: dict) -> None:
    """``OUTDIR/batch.json``: written on the first run; a re-run must match it."""
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != manifest:
            diff = sorted(k for k in manifest if not isinstance(old, dict) or old.get(k) != manifest[k])
            raise ValueError(f"OUTDIR {out} holds the shards of another batch ({path} differs in "
                             f"{', '.join(diff) or 'its form'}): give a new OUTDIR, or the same prompts and flags")
        return
    atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))


# ---------------------------------------------------------------------------------- runners


def _engine(options: dict, shard_size: int, device=None):
    """A whole engine (tp = 1 even under torchrun, whose ranks are data-parallel here); its
    queue holds a shard."""
    args = argparse.Namespace(**options)
    if device is not None:
        args.device = device
    return engine_from_args(args, tp=1, max_queue=max(1024, shard_size))


def _rank_device(device: str | None) -> str | None:
    """Under torchrun on GPUs, rank ``LOCAL_RANK``'s own GPU."""
    import torch

    if device in (None, "cuda") and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _run_local(options: dict, out: Path, todo: list[int], parts: list[list[dict]], flags: dict, quiet: bool) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    mine = [k for k in todo if k % world == rank]
    tag = f"rank {rank}: " if world > 1 else ""
    if not mine:
        return 0
    engine = _engine(options, len(parts[0]), _rank_device(options["device"]))
    written = 0
    try:
        for k in mine:
            t0 = time.perf_counter()
            if write_shard(engine, out, k, parts[k], flags):
                written += 1
                if not quiet:
                    print(f"{tag}{out / shard_name(k)}: {len(parts[k])} images in {time.perf_counter() - t0:.1f} s",
                          flush=True)
    finally:
        engine.close()
    return written


class ShardWriter:
    """Ray Data's actor: one engine, one shard drawn and written per call (``map_batches`` with
    ``batch_size=1`` over the rows ``{"shard": k, "rows": <JSON of its rows>}``)."""

    def __init__(self, options: dict, out: str, flags: dict, shard_size: int):
        self.engine = _engine(options, shard_size)
        self.out, self.flags = Path(out), flags

    def __call__(self, batch: dict) -> dict:
        written, pids = [], []
        for k, rows in zip(batch["shard"], batch["rows"]):
            written.append(write_shard(self.engine, self.out, int(k), json.loads(rows), self.flags))
            pids.append(os.getpid())
        return {"shard": list(batch["shard"]), "written": written, "pid": pids}


def _import_ray():
    """``ray`` with Ray Data, or ValueError(RAY_EXTRA) where the extra is not installed."""
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "ray":
            raise ValueError(RAY_EXTRA) from e
        raise
    return ray


def _run_ray(args: argparse.Namespace, options: dict, out: Path, todo: list[int], parts: list[list[dict]],
             flags: dict) -> int:
    ray = _import_ray()
    from ray.data import ActorPoolStrategy

    gpus = args.num_gpus if args.num_gpus is not None else (0 if (args.device or "").startswith("cpu") else 1)
    ray.init(address=args.ray_address, logging_level="WARNING")
    try:
        if gpus and not ray.cluster_resources().get("GPU", 0):
            raise ValueError(f"the Ray cluster has no GPU for --num-gpus {gpus} per actor: give --device cpu "
                             "(or --num-gpus 0) to draw on CPUs")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not args.quiet
        items = [{"shard": k, "rows": json.dumps(parts[k])} for k in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWriter, batch_size=1, compute=ActorPoolStrategy(size=args.actors), num_gpus=gpus,
            num_cpus=args.num_cpus, fn_constructor_kwargs={"options": options, "out": str(out), "flags": flags,
                                                           "shard_size": args.shard_size})
        written = 0
        for row in ds.iter_rows():
            if row["written"]:
                written += 1
                if not args.quiet:
                    print(f"{out / shard_name(int(row['shard']))}: {len(parts[int(row['shard'])])} images", flush=True)
        return written
    finally:
        ray.shutdown()


def main(args: argparse.Namespace) -> None:
    """``vqim batch``: check everything, then draw the shards not yet written."""
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if args.ray:
        if args.actors < 1:
            raise ValueError(f"--actors must be >= 1, got {args.actors}")
        if "RANK" in os.environ:
            raise ValueError("vqim batch --ray runs its own actors: start it once, not under torchrun")
        _import_ray()
    elif args.ray_address is not None:
        raise ValueError("--ray-address needs --ray")
    flags = SamplingParams.given(args)
    SamplingParams(**flags)  # the flags' own ranges, before any row is read
    cfg = _model_config(args)
    rows, digest = read_rows(args.prompts, cfg, args.seed)
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUTDIR {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    options = {k: getattr(args, k) for k in ("model", "preset", "device", "dtype", "model_seed", "compile",
                                             "quantize", "cpu_threads")}
    manifest = {"prompts_sha256": digest, "rows": len(rows), "shard_size": args.shard_size, "seed": args.seed,
                "sampling": flags, **{k: options[k] for k in _MODEL_KEYS}}
    if options["model"] is not None:
        manifest["model"] = str(Path(options["model"]).resolve())
    _check_manifest(out, manifest)
    parts = shards(rows, args.shard_size)
    todo = [k for k in range(len(parts)) if not (out / shard_name(k)).is_dir()]
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not args.quiet:
        print(f"vqim batch: {len(rows)} rows in {len(parts)} shards of {args.shard_size}; "
              f"{len(parts) - len(todo)} already written, {len(todo)} to draw", file=sys.stderr, flush=True)
    if not todo:
        return
    if args.ray:
        written = _run_ray(args, options, out, todo, parts, flags)
    else:
        written = _run_local(options, out, todo, parts, flags, args.quiet)
    if not args.quiet:
        tag = f"rank {rank}: " if "RANK" in os.environ and not args.ray else ""
        print(f"vqim batch: {tag}wrote {written} shards to {out}", file=sys.stderr, flush=True)
