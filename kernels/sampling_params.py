"""The sampling settings of :func:`vqim.kernels.cfg_sample`, defined once.

:class:`SamplingParams` is the single place a setting is named: its default, its help text,
its allowed range, the ``generation.json`` mapping, the CLI flags and the per-row tensors the
op takes all come from its fields, so the op, the engine, the CLIs and the benchmarks read them
from here and a new setting touches only this class and the op's kernels. ``seed`` and ``step``
are not settings (they key each draw) but share the checks below.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Seeds are int64 tensors on every backend: the largest one, for every layer that checks seeds.
MAX_SEED = 2**63 - 1
_MAX_TOP_K = 2**31 - 1
# The sampling math is fp32: a cfg_scale or temperature past these would overflow (or, for a
# subnormal temperature, make x / t overflow) and mask every token.
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class _Rule:
    """One parameter's type (``int``: int64 rows, ``float``: fp32 rows) and range.

    ``ok`` is elementwise on a python number or a float64/int64 tensor (``&``/``|``, no ``and``),
    so scalars and per-row tensors are checked by the same expression; ``range`` is the
    ``ValueError`` text, which names the parameter and its allowed values."""

    kind: type
    ok: Callable
    range: str


def _setting(default, help_: str, rule: _Rule, *flags: str):
    """A :class:`SamplingParams` field; ``flags`` are extra CLI spellings of ``--field-name``."""
    return field(default=default, metadata={"help": help_, "rule": rule, "flags": flags})


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, validated on construction (``ValueError`` naming the
    setting and its range). The defaults are what a model without ``generation.json`` uses."""

    cfg_scale: float = _setting(
        3.0, "classifier-free guidance scale (1 = off)",
        _Rule(float, lambda v: abs(v) <= _F32_MAX,
              f"cfg_scale must be finite as float32 (|cfg_scale| <= {_F32_MAX!r})"),
        "--cfg")
    temperature: float = _setting(
        1.0, "softmax temperature (0 = greedy)",
        _Rule(float, lambda v: (v == 0) | ((v >= _F32_TINY) & (v <= _F32_MAX)),
              f"temperature must be 0 (greedy) or a normal float32 in [{_F32_TINY!r}, {_F32_MAX!r}]"))
    top_k: int = _setting(
        0, "keep the k most likely tokens (0 = off)",
        _Rule(int, lambda v: (v >= 0) & (v <= _MAX_TOP_K), f"top_k must be in [0, {_MAX_TOP_K}]"))
    top_p: float = _setting(
        1.0, "keep the smallest set of tokens whose probability reaches p (1 = off)",
        _Rule(float, lambda v: (v > 0) & (v <= 1), "top_p must be in (0, 1]"))
    min_p: float = _setting(
        0.0, "keep the tokens at least min_p times as probable as the most probable one (0 = off)",
        _Rule(float, lambda v: (v >= 0) & (v <= 1), "min_p must be in [0, 1]"))

    def __post_init__(self):
        for name in self.names():
            check_value(name, getattr(self, name))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return _NAMES

    @classmethod
    def from_dict(cls, d: object, where: str) -> SamplingParams:
        """The settings of a ``generation.json`` mapping (any subset of :meth:`names`, the rest
        defaults); errors start with ``where`` (the file)."""
        if not isinstance(d, Mapping) or set(d) - set(cls.names()):
            raise ValueError(f"{where}: must be a JSON object with keys among {list(cls.names())}, got {d!r}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def updated(self, **given) -> SamplingParams:
        """These settings with the ``given`` ones that are not ``None`` (unknown names: TypeError)."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    @classmethod
    def rows(cls, params: Sequence[SamplingParams], device: torch.device) -> dict[str, torch.Tensor]:
        """One ``[B]`` tensor per setting, row ``i`` from ``params[i]``: what ``cfg_sample`` takes."""
        return {n: torch.tensor([getattr(p, n) for p in params], dtype=_dtype(n), device=device) for n in cls.names()}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, default_help: str, exclude: Sequence[str] = ()) -> None:
        """A ``--field-name`` flag per setting not in ``exclude`` (``dest`` the field's name,
        default ``None``: not given); ``default_help`` ends each help text, with ``{default}``
        the class's default."""
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            parser.add_argument("--" + f.name.replace("_", "-"), *f.metadata["flags"], dest=f.name,
                                type=f.metadata["rule"].kind, default=None,
                                help=f"{f.metadata['help']}; {default_help.format(default=f.default)}")

    @classmethod
    def given(cls, args: argparse.Namespace) -> dict:
        """The settings :meth:`add_arguments`' flags were given on a command line."""
        return {n: getattr(args, n) for n in cls.names() if getattr(args, n, None) is not None}


_DRAW_RULES = {
    "seed": _Rule(int, lambda v: (v >= 0) & (v <= MAX_SEED), f"seed must be in [0, {MAX_SEED}]"),
    "step": _Rule(int, lambda v: (v >= 0) & (v <= MAX_SEED), f"step must be in [0, {MAX_SEED}]"),
}


# Read from the dataclass once: Dynamo cannot trace dataclasses.fields, and cfg_sample's
# checks run inside torch.compile'd decode steps.
_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))
_RULES = {**{f.name: f.metadata["rule"] for f in dataclasses.fields(SamplingParams)}, **_DRAW_RULES}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def _rule(name: str) -> _Rule:
    return _RULES[name]


def _dtype(name: str) -> torch.dtype:
    return torch.int64 if _rule(name).kind is int else torch.float32


def check_value(name: str, v) -> None:
    """Range checks of one python-scalar parameter."""
    rule = _rule(name)
    if rule.kind is int:
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int (or an integer tensor), got {v!r}")
    elif not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise ValueError(f"{name} must be a float (or a float tensor), got {v!r}")
    elif v != v:  # NaN (math.isnan would overflow on a huge int)
        raise ValueError(f"{name} must not be NaN")
    if not rule.ok(v):
        raise ValueError(f"{rule.range}, got {v}")


def check_tensor(name: str, t: torch.Tensor, batch: int | None, device: torch.device | None) -> None:
    """Shape/dtype/device checks of a parameter tensor: free, no sync."""
    if t.dim() > 1 or (t.dim() == 1 and batch is not None and t.shape[0] != batch):
        raise ValueError(f"{name} must be a scalar, a 0-d tensor or a tensor of shape [B] = [{batch}], "
                         f"got shape {tuple(t.shape)}")
    if _rule(name).kind is int:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    elif not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {t.device}")


def check_tensor_values(name: str, t: torch.Tensor) -> None:
    """The range checks on a parameter tensor; syncs with the device (once per request)."""
    rule = _rule(name)
    t = t.long() if rule.kind is int else t.double()
    if rule.kind is float and bool(t.isnan().any()):
        raise ValueError(f"{name} must not be NaN (a row of the {name} tensor is NaN)")
    ok = rule.ok(t)
    if not bool(ok.all()):
        raise ValueError(f"{rule.range}, got {t[~ok].flatten()[0].item()} at some row")


def row_tensor(name: str, v, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or 0-d/``[B]`` tensor parameter as a ``[B]`` tensor (fp32 or int64); no sync."""
    dtype = _dtype(name)
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=dtype).expand(batch).contiguous()
    return torch.full((batch,), v, dtype=dtype, device=device)


def validate_sampling_params(*, batch: int | None = None, **params) -> None:
    """Check settings (any of :meth:`SamplingParams.names`, ``seed``, ``step``) once per request.

    Each may be a python scalar or a tensor (0-d or ``[batch]``). Tensor values are read back to
    the host here (one sync), which the per-step ``cfg_sample(validate=False)`` avoids. Raises
    ``ValueError`` naming the argument and its allowed range.
    """
    for name, v in params.items():
        if name not in _DRAW_RULES and name not in SamplingParams.names():
            raise TypeError(f"unknown sampling parameter {name!r}; expected one of "
                            f"{list(SamplingParams.names()) + list(_DRAW_RULES)}")
        if isinstance(v, torch.Tensor):
            check_tensor(name, v, batch, None)
            check_tensor_values(name, v)
        else:
            check_value(name, v)
