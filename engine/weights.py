"""Model directories: ``config.json`` + ``*.safetensors`` (+ ``tokenizer.model``, ``generation.json``).

A model directory is user input, so loading trusts none of it. Files must be regular files
(a FIFO named ``model.safetensors`` would block, ``/dev/zero`` never ends) of bounded size;
JSON must be UTF-8 and parse into what it should; each safetensors header is parsed and checked
here (lengths, dtypes, offsets, shapes, regions) before the library maps the file; and every
tensor's name, shape and dtype is checked against the config before any tensor is read or the
model is built. Every fault is a ValueError naming the file (FileNotFoundError for a missing
one). Nothing is unpickled.

Saving writes each file to a temporary name in the same directory, fsyncs it and renames it, so
a crash never leaves a half-written file behind, then removes files an earlier save left that
this one does not have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from vqim.kernels import SamplingParams

from .config import CNNVQConfig, DecoderConfig, ModelConfig, dtype_from_name
from .config import short_repr as _short
from .models import VQIMModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
# A prompt in the decoder's sequence (Janus-Pro): Hugging Face's fast tokenizer file.
HF_TOKENIZER_NAME = "tokenizer.json"
# Size limits of what is read whole. A config.json is ~1 KB; a safetensors header ~100 bytes a
# tensor (parti-20b's is ~60 KB); a sentencepiece model of 2**20 pieces is ~20 MB.
MAX_JSON_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 64 << 20

# safetensors dtype names -> (bytes per element, torch dtype where torch has one).
_ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (1, torch.bool), "U8": (1, torch.uint8), "I8": (1, torch.int8),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)), "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "I16": (2, torch.int16), "U16": (2, getattr(torch, "uint16", None)), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I32": (4, torch.int32), "U32": (4, getattr(torch, "uint32", None)),
    "F32": (4, torch.float32), "I64": (8, torch.int64), "U64": (8, getattr(torch, "uint64", None)),
    "F64": (8, torch.float64),
}
_FILE_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file (symlinks followed).

    Opened non-blocking, so that a FIFO is refused at once instead of waiting for a writer; a
    device, directory or socket is refused too. ValueError naming the file, FileNotFoundError
    when there is none.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path} must be a regular file that can be read: {e.strerror}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
        raise ValueError(f"{path} must be a regular file, got a {kind}")
    return os.fdopen(fd, "rb")


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """All of regular file ``path``, refused (ValueError naming it) past ``max_bytes``."""
    with open_regular(path) as f:
        data = f.read(max_bytes + 1)  # one past the limit, in case the file grew since it was opened
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than the {max_bytes}-byte limit for this file")
    return data


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {_short(k)}")
        d[k] = v
    return d


def parse_json(data: bytes, where: str) -> object:
    """JSON of UTF-8 ``data``; ValueError naming ``where`` and the fault (never a
    UnicodeDecodeError, RecursionError or a JSONDecodeError that names no file)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, a duplicate key, an int past the digit limit
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def read_json(path: str | Path) -> object:
    return parse_json(read_regular_file(path, MAX_JSON_BYTES), str(path))


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape) of every tensor in ``path``, after checking the header
    the way the format defines it: an 8-byte little-endian length (within the file and
    :data:`MAX_HEADER_BYTES`), a UTF-8 JSON object, entries of known dtype whose
    ``data_offsets`` lie in the data section and span exactly shape x element size, and regions
    that tile the data section without overlap or gap. Reads the header only.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes; the format starts with an "
                             "8-byte header length)")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {n} bytes is past the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (the header is {n} bytes, the file has "
                             f"{size - 8} after the length)")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"{path}: truncated safetensors file (shrank while being read)")
    header = parse_json(raw, f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    data_len = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    regions = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ValueError(f"{path}: safetensors __metadata__ must map strings to strings, got {_short(entry)}")
            continue
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where}: the header entry must be an object with exactly dtype, shape and "
                             f"data_offsets, got {_short(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise ValueError(f"{where} has dtype {_short(dtype)}, not one of {sorted(_ST_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ValueError(f"{where}: shape must be a list of ints >= 0, got {_short(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                             f"got {_short(offsets)}")
        if offsets[1] > data_len:
            raise ValueError(f"{where}: data_offsets {offsets} end past the {data_len}-byte data section "
                             "(the file is truncated or its header is wrong)")
        begin, end = offsets
        need = _nbytes(shape, _ST_DTYPES[dtype][0], data_len)
        if end - begin != need:
            raise ValueError(f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {_short(shape)} "
                             f"of {dtype} needs {need if need <= data_len else 'more than the file holds'}")
        tensors[name] = (dtype, tuple(shape))
        regions.append((begin, end, name))
    pos, prev = 0, None
    for begin, end, name in sorted(regions):
        if begin < pos:
            raise ValueError(f"{path}: tensors {_short(prev)} and {_short(name)} overlap (data_offsets)")
        if begin > pos:
            raise ValueError(f"{path}: bytes [{pos}, {begin}) of the data section belong to no tensor "
                             "(data_offsets must cover it exactly)")
        pos, prev = end, name
    if pos != data_len:
        raise ValueError(f"{path}: the last {data_len - pos} bytes of the data section belong to no tensor "
                         "(data_offsets must cover it exactly)")
    return tensors


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """Bytes of a tensor of ``shape``; stops multiplying once past ``limit``, so that a header
    of many huge dims costs no big-integer arithmetic."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            break
    return n


def safetensors_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors file")
    return files


# ----------------------------------------------------------------------------- loading


class _SkipInit(TorchFunctionMode):
    """Parameter initializers do nothing: for modules built on the meta device, which have no
    values to initialize. Initializing a meta tensor runs torch's Python meta kernels, whose
    first use imports torch._dynamo: ~1 s of every program that loads a model, compiling or not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> VQIMModel:
    """The model of ``cfg`` on ``device``, randomly initialized (on ``"meta"``: shapes only, the
    initializers skipped; load weights with ``load_state_dict(..., assign=True)``)."""
    dtype = dtype or dtype_from_name(cfg.dtype)
    if torch.device(device).type == "meta":
        with torch.device(device), _SkipInit():
            return VQIMModel(cfg).to(dtype)
    with torch.device(device):
        return VQIMModel(cfg).to(dtype)


# The per-layer block lists of VQIMModel, and the config section whose ``layers`` sizes each.
_LAYER_LISTS = {"vqgan.enc_blocks": "vqgan", "vqgan.dec_blocks": "vqgan", "text.blocks": "text",
                "decoder.blocks": "decoder"}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a model directory must hold.

    Read off a meta model with one layer per stack, its layer-0 tensors repeated for every
    layer (a block holds the same tensors at every depth). Building the full meta model takes
    ~4 ms a block, so a config.json asking for 1024-layer stacks would cost tens of seconds
    before its first check against the weights; this costs milliseconds.
    """
    def one_layer(c):
        if c is None or isinstance(c, CNNVQConfig):  # the CNN VQ's depth is its channel_mult: no stack
            return c
        return dataclasses.replace(c, layers=1, **({"conv_layers": None} if isinstance(c, DecoderConfig) else {}))

    one = dataclasses.replace(cfg, vqgan=one_layer(cfg.vqgan), text=one_layer(cfg.text),
                              decoder=one_layer(cfg.decoder))
    out = {}
    for name, t in build_model(one, "meta").state_dict().items():
        spec = (tuple(t.shape), t.dtype)
        stack = next((p for p in _LAYER_LISTS if name.startswith(p + ".0.")), None)
        if stack is None:
            out[name] = spec
            continue
        rest = name[len(stack) + 3:]
        for i in range(getattr(cfg, _LAYER_LISTS[stack]).layers):
            out[f"{stack}.{i}.{rest}"] = spec
    return out


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG_NAME
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{model_dir} is not a vqim model directory: no config.json")
    d = read_json(path)
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def check_weights(model_dir: str | Path, cfg: ModelConfig) -> dict[Path, dict[str, tuple[str, tuple[int, ...]]]]:
    """The header of every ``*.safetensors`` of ``model_dir``, checked against ``cfg``: each
    tensor's name, shape and dtype, none twice, none missing. Reads headers only and builds
    nothing, so a config that does not match its weights fails in milliseconds."""
    want = expected_tensors(cfg)
    headers = {f: read_safetensors_header(f) for f in safetensors_files(model_dir)}
    seen: dict[str, Path] = {}
    for f, header in headers.items():
        for name, (st_dtype, got_shape) in header.items():
            if name in seen:
                raise ValueError(f"tensor {_short(name)} appears in more than one safetensors file ({seen[name]}, {f})")
            seen[name] = f
            if name not in want:
                raise ValueError(f"{f}: unexpected tensor {_short(name)} (not in a {cfg.name} model)")
            shape, dtype = want[name]
            if got_shape != shape:
                raise ValueError(f"{f}: tensor {name!r} has shape {got_shape}, the config needs {shape}")
            got_dtype = _ST_DTYPES[st_dtype][1] or st_dtype
            if got_dtype != dtype:
                raise ValueError(f"{f}: tensor {name!r} has dtype {got_dtype}, the config needs {dtype}")
    missing = sorted(set(want) - set(seen))
    if missing:
        files = ", ".join(str(f) for f in headers)
        raise ValueError(f"{files}: missing {len(missing)} tensor(s), first {missing[:5]} (the {cfg.name} model "
                         f"config.json describes has {len(want)})")
    return headers


def load_state_dict(model_dir: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu", *,
                    read: Callable[[str, object, tuple[int, ...]], torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Read all ``*.safetensors`` of ``model_dir``, once :func:`check_weights` has passed.

    ``read(name, slice, shape)`` reads one tensor from its safetensors slice (default: all of it);
    the tensor-parallel loader passes one that reads only this rank's part.
    """
    headers = check_weights(model_dir, cfg)
    state: dict[str, torch.Tensor] = {}
    for f, header in headers.items():
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                for name, (_, shape) in header.items():
                    state[name] = st.get_tensor(name) if read is None else read(name, st.get_slice(name), shape)
        except SafetensorError as e:  # the file changed after its header was checked
            raise ValueError(f"{f}: {e}") from e
    return state


def load_model(model_dir: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, *, cfg: ModelConfig | None = None) -> VQIMModel:
    """The model of ``model_dir`` (``cfg``: its config, when already loaded)."""
    cfg = cfg or load_config(model_dir)
    state = load_state_dict(model_dir, cfg, device)
    model = build_model(cfg, "meta")
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model


def atomic_write(dst: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then rename ``tmp`` over ``dst``: readers see the old file or the whole new
    one, never a half-written one, and a failed write leaves nothing behind.

    ``tmp`` is a hidden name beside ``dst``, unique per process and thread; ``write`` creates it
    with a plain open, so it gets the umask's mode like any other file (mkstemp's is 0600).
    ``tmp`` is fsynced before the rename (else a crash could leave ``dst`` renamed but empty)
    and the directory after it (else the rename itself could be lost).
    """
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        # write() may have written by path and closed it, so open it again to flush it.
        _fsync(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync(dst.parent)
    return dst


GENERATION_NAME = "generation.json"


def check_generation_defaults(d: object, where: str) -> dict:
    """A ``generation.json`` mapping (any subset of :class:`~vqim.kernels.SamplingParams`'
    fields), validated; kept as the subset so that a save writes back only what was set."""
    SamplingParams.from_dict(d, where)
    return dict(d)


def load_generation_defaults(model_dir: str | Path) -> dict:
    """The sampling settings a model directory recommends (``generation.json``), or ``{}``."""
    path = Path(model_dir) / GENERATION_NAME
    if not os.path.lexists(path):
        return {}
    return check_generation_defaults(read_json(path), str(path))


def save_pretrained(model: VQIMModel, model_dir: str | Path, tokenizer_model: str | Path | bytes | None = None,
                    generation: dict | None = None, tokenizer_json: bytes | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (if given) ``tokenizer.model`` (a path,
    or the model's bytes), ``tokenizer.json`` (a prompt model's: required for one) and the
    recommended sampling settings ``generation.json``.

    The config's dtype is set to the weights' dtype so the directory loads as saved; with a
    ``tokenizer_model`` the text config records ``tokenizer: sentencepiece`` so a directory that
    loses the file fails to load instead of silently tokenizing by bytes. A ``tokenizer.model``
    or ``generation.json`` an earlier save left in ``model_dir`` is removed when this save has
    none, once the new files are in place: the directory then holds this model only.
    """
    out = Path(model_dir)
    cfg = model.cfg.to_dict()
    proto = None
    if tokenizer_model is not None:
        if cfg["text"] is None:
            raise ValueError(f"tokenizer_model: {model.cfg.name} has no text encoder, so no text tokenizer to save")
        cfg["text"]["tokenizer"] = "sentencepiece"
        proto = (tokenizer_model if isinstance(tokenizer_model, bytes)
                 else read_regular_file(tokenizer_model, MAX_TOKENIZER_BYTES))
    elif cfg["text"] is not None and cfg["text"]["tokenizer"] == "sentencepiece":
        raise ValueError(f"tokenizer_model: {model.cfg.name}'s text encoder reads sentencepiece ids "
                         "(text.tokenizer); pass the tokenizer.model it was trained with")
    if (tokenizer_json is None) != (model.cfg.prompt is None):
        raise ValueError(f"tokenizer_json: {model.cfg.name} {'needs' if model.cfg.prompt else 'has no use for'} the "
                         f"{HF_TOKENIZER_NAME} its prompt is tokenized with")
    gen = check_generation_defaults(generation, "generation") if generation else None
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"save_pretrained expects one dtype for all tensors, got {sorted(map(str, dtypes))}")
    cfg["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtypes.pop()]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    if proto is not None:
        atomic_write(out / TOKENIZER_NAME, lambda p: Path(p).write_bytes(proto))
    if tokenizer_json is not None:
        atomic_write(out / HF_TOKENIZER_NAME, lambda p: Path(p).write_bytes(tokenizer_json))
    if gen is not None:
        atomic_write(out / GENERATION_NAME, lambda p: Path(p).write_text(json.dumps(gen, indent=2) + "\n"))
    for name, new in ((TOKENIZER_NAME, proto), (HF_TOKENIZER_NAME, tokenizer_json), (GENERATION_NAME, gen)):
        if new is None and os.path.lexists(out / name):
            os.unlink(out / name)
            _fsync(out)
    return out
