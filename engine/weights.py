"""Model directories: ``config.json`` + ``*.safetensors`` (+ ``tokenizer.model``).

Loading checks every tensor's name, shape and dtype against a model built from the config on
the meta device (no memory), and names the offending tensor. Saving writes each file to a
temporary name in the same directory and renames it, so a crash never leaves a half-written
model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, dtype_from_name
from .models import VQIMModel

WEIGHTS_NAME = "model.safetensors"


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> VQIMModel:
    dtype = dtype or dtype_from_name(cfg.dtype)
    with torch.device(device):
        return VQIMModel(cfg).to(dtype)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a model directory must hold."""
    model = build_model(cfg, "meta")
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a vqim model directory: no config.json")
    with path.open() as f:
        return ModelConfig.from_dict(json.load(f))


def load_state_dict(model_dir: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu", *,
                    read: Callable[[str, object, tuple[int, ...]], torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Read and validate all ``*.safetensors`` of ``model_dir`` against ``cfg``.

    Every tensor's name and full shape are checked before it is read, and its dtype after.
    ``read(name, slice, shape)`` reads one tensor from its safetensors slice (default: all of it);
    the tensor-parallel loader passes one that reads only this rank's part.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors file")
    want = expected_tensors(cfg)
    state: dict[str, torch.Tensor] = {}
    dev = str(device)
    for f in files:
        with safe_open(str(f), framework="pt", device=dev) as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name in state:
                    raise ValueError(f"tensor {name!r} appears in more than one safetensors file ({f.name})")
                if name not in want:
                    raise ValueError(f"{f.name}: unexpected tensor {name!r} (not in a {cfg.name} model)")
                shape, dtype = want[name]
                sl = st.get_slice(name)
                got_shape = tuple(sl.get_shape())
                if got_shape != shape:
                    raise ValueError(f"{f.name}: tensor {name!r} has shape {got_shape}, the config needs {shape}")
                tensor = st.get_tensor(name) if read is None else read(name, sl, shape)
                if tensor.dtype != dtype:
                    raise ValueError(f"{f.name}: tensor {name!r} has dtype {tensor.dtype}, the config needs {dtype}")
                state[name] = tensor
    missing = sorted(set(want) - set(state))
    if missing:
        raise ValueError(f"{model_dir}: missing {len(missing)} tensor(s), first {missing[:5]}")
    return state


def load_model(model_dir: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> VQIMModel:
    cfg = load_config(model_dir)
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
    """
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dst


GENERATION_NAME = "generation.json"
SAMPLING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p")


def check_generation_defaults(d: object, where: str) -> dict:
    """A ``generation.json`` mapping (any subset of :data:`SAMPLING_KEYS`), validated."""
    from vqim import kernels as K

    if not isinstance(d, dict) or set(d) - set(SAMPLING_KEYS):
        raise ValueError(f"{where}: must be a JSON object with keys among {list(SAMPLING_KEYS)}, got {d!r}")
    full = {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **d}
    try:
        K.validate_sampling_params(seed=0, **full)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return dict(d)


def load_generation_defaults(model_dir: str | Path) -> dict:
    """The sampling settings a model directory recommends (``generation.json``), or ``{}``."""
    path = Path(model_dir) / GENERATION_NAME
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return check_generation_defaults(d, str(path))


def save_pretrained(model: VQIMModel, model_dir: str | Path, tokenizer_model: str | Path | None = None,
                    generation: dict | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (if given) ``tokenizer.model`` and the
    recommended sampling settings ``generation.json``.

    The config's dtype is set to the weights' dtype so the directory loads as saved; with a
    ``tokenizer_model`` the text config records ``tokenizer: sentencepiece`` so a directory that
    loses the file fails to load instead of silently tokenizing by bytes.
    """
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    dtypes = {v.dtype for v in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"save_pretrained expects one dtype for all tensors, got {sorted(map(str, dtypes))}")
    cfg = model.cfg.to_dict()
    cfg["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtypes.pop()]
    if tokenizer_model is not None and cfg["text"] is not None:
        cfg["text"]["tokenizer"] = "sentencepiece"
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    if tokenizer_model is not None:
        atomic_write(out / "tokenizer.model", lambda p: shutil.copyfile(tokenizer_model, p))
    if generation:
        gen = check_generation_defaults(generation, "generation")
        atomic_write(out / GENERATION_NAME, lambda p: Path(p).write_text(json.dumps(gen, indent=2) + "\n"))
    return out
