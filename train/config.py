"""Training run configuration: one dataclass, read from a JSON or TOML file.

The model is a preset name (``vqim.engine.ModelConfig.from_name``) or a path to a
``config.json`` / model directory, plus ``model_overrides`` merged into its sections (e.g.
``{"vqgan": {"image_size": 32}}``). Stage 1 trains its ``vqgan``; stage 2 its text encoder and
decoder on the frozen stage-1 tokenizer (``tokenizer_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vqim.engine.config import PRESETS, ModelConfig

STAGES = ("stage1", "stage2")
OPTIMIZERS = ("adamw", "adafactor", "adafactor8")
PRECISIONS = ("auto", "bf16", "fp32")
MODEL_SECTIONS = ("vqgan", "decoder", "text")
# A field's annotation -> the JSON/TOML values it takes (ints count as floats; bools are not numbers).
_FIELD_TYPES = {
    "str": ((str,), "a string"),
    "str | None": ((str, type(None)), "a string or null"),
    "int": ((int,), "an int"),
    "float": ((int, float), "a finite number"),
    "float | None": ((int, float, type(None)), "a finite number or null"),
    "bool": ((bool,), "true or false"),
    "dict": ((dict,), "an object"),
}


def read_mapping(path: str | Path, what: str) -> dict:
    """The object held by a JSON file (TOML when the name ends in ``.toml``); every error names
    ``what`` and the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: no such file {p}")
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {p} is not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise ValueError(f"{what}: cannot read {p}: {e.strerror}") from e
    fmt = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        d = tomllib.loads(text) if fmt == "TOML" else json.loads(text)
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise ValueError(f"{what}: {p} is not valid {fmt}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{what}: {p} must hold a JSON object of fields, got a {type(d).__name__}")
    return d


@dataclass
class TrainConfig:
    data: str
    out_dir: str
    model: str = "tiny-t2i"
    model_overrides: dict = field(default_factory=dict)
    val_data: str | None = None  # default: the first val_images images of data
    val_images: int = 64
    # Optimization. ``optimizer=None``: AdamW for stage 1, Adafactor8bit for stage 2.
    steps: int = 1000
    batch_size: int = 8  # global, split evenly over data-parallel ranks
    lr: float = 3e-4
    warmup_steps: int = 100
    decay_rate: float = 0.5  # after warmup, lr = peak * decay_rate ** ((step - warmup) / decay_steps)
    decay_steps: int = 10000
    min_lr: float = 0.0
    grad_clip: float = 4.0
    optimizer: str | None = None
    weight_decay: float | None = None  # None: the optimizer's default (Adafactor: Parti's 4.5e-2; AdamW: 0)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    device: str | None = None
    backend: str | None = None  # kernel backend for the run (validation against the references)
    # Bookkeeping.
    log_every: int = 10
    ckpt_every: int = 100
    val_every: int = 0  # 0: validate only at the end
    progress: bool = True
    # Stage 1 (seed §[0093]-[0096]).
    beta: float = 0.25
    w_vq: float = 1.0
    w_adv: float = 0.1
    w_perceptual: float = 0.1
    w_logit_laplace: float = 0.1
    w_l2: float = 1.0
    perceptual_weights: str | None = None
    adv_start: int = 0  # step at which the adversarial terms switch on
    disc_lr: float | None = None  # default: lr
    disc_channels: int = 32
    disc_max_channels: int = 256
    r1_gamma: float = 0.0
    # Dead-code restart: every ``code_restart_every`` steps, each code chosen by no token in that
    # window is moved onto a random encoder latent of the current batch. 0: off.
    code_restart_every: int = 0
    # "kmeans": before step 1, the codebook is spherical k-means (k-means++ seeding) of the initial
    # encoder's latents of ``codebook_init_images`` training images; "random": the seeded init.
    codebook_init: str = "random"
    codebook_init_images: int = 2000
    # Learning-rate multiplier of the tokenizer's encoder (``enc_*``). 0 freezes it at its init:
    # with ``codebook_init="kmeans"`` the random encoder's latents then stay the ones the
    # codebook was clustered on (Adam moves every weight at the full rate, however small its
    # gradient, and on the shapes data that merged shape edges within 1000 steps).
    encoder_lr_scale: float = 1.0
    # Decoder fine-tuning (seed §[0106]): a stage-1 checkpoint or model directory whose encoder and
    # codebook are loaded and frozen while the decoder (its own dec_* shape) trains.
    finetune_decoder_from: str | None = None
    # Stage 2.
    tokenizer_checkpoint: str | None = None  # the stage-1 checkpoint (or a model directory) holding the tokenizer
    text_tokenizer: str | None = None  # sentencepiece model; None: the engine's byte-level fallback
    # A model directory whose text encoder and decoder weights stage 2 starts from (instead of the
    # random init): training continues from an exported model, e.g. the bundled one.
    init_from: str | None = None
    cond_dropout: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            types, desc = _FIELD_TYPES[f.type]
            ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{f.name} must be {desc}, got {value!r}")
        for section, over in self.model_overrides.items():
            if section in MODEL_SECTIONS:
                if not isinstance(over, dict):
                    raise ValueError(f"model_overrides.{section} must be an object of that section's fields, "
                                     f"got {over!r}")
            elif section in ("name", "dtype"):
                if not isinstance(over, str):
                    raise ValueError(f"model_overrides.{section} must be a string, got {over!r}")
            else:
                raise ValueError(f"model_overrides: unknown section {section!r} "
                                 f"({', '.join(MODEL_SECTIONS)}, name, dtype)")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "val_images", "decay_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "val_every", "adv_start", "code_restart_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.codebook_init not in ("random", "kmeans"):
            raise ValueError(f"codebook_init must be 'random' or 'kmeans', got {self.codebook_init!r}")
        if not isinstance(self.codebook_init_images, int) or self.codebook_init_images < 1:
            raise ValueError(f"codebook_init_images must be a positive int, got {self.codebook_init_images!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.decay_rate <= 1.0:
            raise ValueError(f"decay_rate must be in (0, 1], got {self.decay_rate}")
        if not self.lr > 0 or not self.grad_clip > 0:
            raise ValueError(f"lr and grad_clip must be > 0, got lr={self.lr}, grad_clip={self.grad_clip}")
        for name in ("encoder_lr_scale", "beta", "w_vq", "w_adv", "w_perceptual", "w_logit_laplace", "w_l2", "r1_gamma", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def model_config(self) -> ModelConfig:
        if self.model in PRESETS:
            d = ModelConfig.from_name(self.model).to_dict()
        else:
            p = Path(self.model)
            p = p / "config.json" if p.is_dir() else p
            if not p.is_file():
                raise ValueError(f"model must be a preset ({', '.join(sorted(PRESETS))}) or a config.json path, "
                                 f"got {self.model!r}")
            d = read_mapping(p, "model")
        for section, over in self.model_overrides.items():
            if section not in MODEL_SECTIONS:  # name, dtype
                d[section] = over
                continue
            if d.get(section) is None:
                raise ValueError(f"model_overrides: the model has no {section!r} section")
            d[section] = {**d[section], **over}
        return ModelConfig.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config key(s) {unknown}; known: {sorted(known)}")
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"missing training config key(s) {missing}; required: {required}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path, **overrides) -> TrainConfig:
        """The config in a JSON or TOML file, with the non-None ``overrides`` (the command line's)
        applied; every error names the file and the field."""
        d = read_mapping(path, "config")
        d.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"config: {path}: {e}") from e
