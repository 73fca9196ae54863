"""Request checks and conditioning (DESIGN §5): what a generation call asks for, checked before
anything is queued, and the decoder rows its conditions become.

:func:`check_request` turns the arguments of ``Engine.generate_codes`` / ``submit`` into a
:class:`Request`: one condition per prompt (its :func:`tokenize` row) or class id, the
unconditional branch of each (the empty prompt, a negative prompt, the null class; ``None``
where the model has none), one :class:`~vqim.kernels.SamplingParams` and seed per prompt, the
tokens image-conditioned generation keeps, and the decoding. A request is plain data (CPU tensors,
ints, settings), so tensor parallelism can send it from rank 0 to the other ranks as it is, and
its images (:meth:`Request.images`) are made one at a time, as the queue takes them.

:func:`condition` is the one place that turns conditions into decoder rows (prefix ids, text
memory and mask): the scheduler's admissions, ``Engine.image_features``, ``vqim bench`` and the
tests call it.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from vqim import kernels as K

from .config import ModelConfig
from .models import VQIMModel
from .parallel import check_decoding, check_window, wavefront_unsupported
from .text import TextTokenizer, check_text


class Rows(NamedTuple):
    """Decoder rows from :func:`condition`, one per condition."""

    prefix: torch.Tensor  # (R, P) class id, BOS / null class (P = 1), or prompt ids (right-padded)
    memory: torch.Tensor | None  # (R, L, W) text encoder output; None without a text encoder
    memory_mask: torch.Tensor | None  # (R, L) bool, True on real text tokens
    prefix_len: torch.Tensor  # (R,) each row's prefix length (the prompt's; 1 otherwise)


def tokenize(tokenizer: TextTokenizer, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each prompt's ids ``[max_len]`` and mask ``[max_len]`` on the CPU, for :func:`condition`.

    Tokenizing once, when a request arrives, checks it (and warns of a truncation once) before
    any decode work; padding to ``max_len`` lets any prompts share a batch later.
    """
    ids, mask = tokenizer.batch(list(prompts), torch.device("cpu"), pad_to=tokenizer.max_len)  # (N, max_len)
    return list(zip(ids, mask))


@torch.no_grad()
def condition(model: VQIMModel, tokenizer: TextTokenizer | None, conds: Sequence, *,
              pad_to: int | None = None) -> Rows:
    """The decoder rows of ``conds``, one each, on the model's device.

    A condition is a class id (``null_prefix`` for none: BOS or the null class) for a model
    without text, or a prompt for a text model: a string or its :func:`tokenize` row. A text
    encoder's text is padded to ``pad_to`` (at most ``max_len``: the scheduler pads to
    ``max_len``, so any prompts share its static rows), by default to the longest row; a prompt
    in the decoder's own sequence (Janus) becomes the prefix, right-padded the same way (the
    scheduler's ``max_len`` makes every prefill one shape, whatever the other prompts admitted
    with it: a row's numbers do not depend on its batch).
    """
    dec = model.decoder
    dev = dec.device
    if model.cfg.is_text_to_image:
        rows = [tokenize(tokenizer, [c])[0] if isinstance(c, str) else c for c in conds]
        mask = torch.stack([m for _, m in rows])  # (R, max_len)
        lengths = mask.sum(1)  # (R,)
        if model.text is None:  # the prompt is the prefix
            ids = torch.stack([i for i, _ in rows])[:, :pad_to or int(lengths.max())].to(dev)  # (R, P)
            return Rows(ids, None, None, lengths.to(dev))
        length = pad_to or int(lengths.max())
        ids, mask = torch.stack([i for i, _ in rows])[:, :length].to(dev), mask[:, :length].to(dev)  # (R, L)
        prefix = torch.full((len(rows), 1), dec.null_prefix, dtype=torch.long, device=dev)
        return Rows(prefix, model.text(ids, mask), mask, torch.ones(len(rows), dtype=torch.long, device=dev))
    prefix = torch.tensor(list(conds), dtype=torch.long, device=dev)[:, None]  # (R, 1)
    return Rows(prefix, None, None, torch.ones(len(conds), dtype=torch.long, device=dev))


def draw_seed(num_images: int) -> int:
    """A fresh seed for a request left unseeded: image j draws with seed + j, so all of them
    stay within [0, MAX_SEED]."""
    return random.SystemRandom().randrange(0, K.MAX_SEED - num_images + 1)


def per_request(name: str, value, n: int) -> list:
    """A scalar for all requests or one value per request."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be a scalar or a list of {n} values (one per request), got {len(value)}")
        return list(value)
    if isinstance(value, torch.Tensor) or isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a python scalar or list, got {type(value).__name__}")
    return [value] * n


def check_count(name: str, value, most: int | None = None) -> int:
    """An int >= 1 (and <= ``most``), else a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be at most {most}, got {value}")
    return value


@dataclass(frozen=True, eq=False)
class ImageSpec:
    """One image to draw: its condition, its unconditional branch (``None``: unguided), its
    settings, seed, kept tokens and decoding. Plain data: rank 0 sends it to the other ranks."""

    index: int  # the image's place in its request
    cond: object  # a tokenize() row or a class id
    uncond: object | None
    params: K.SamplingParams
    seed: int
    forced: torch.Tensor | None  # (n,) kept tokens where >= 0, drawn where -1
    decoding: str
    sjd_window: int


@dataclass(eq=False)
class Request:
    """A checked request (:func:`check_request`): prompt ``i``'s image ``j`` is image
    ``i * num_images + j`` and draws with seed ``seeds[i] + j``."""

    conds: list  # per prompt / class id: a tokenize() row or the class id
    unconds: list | None  # per prompt: its unconditional condition; None: the model has none
    params: list[K.SamplingParams]
    seeds: list[int]
    num_images: int
    forced: list[torch.Tensor] | None  # per prompt: (n,) kept tokens, -1 where drawn
    decoding: str = "auto"
    sjd_window: int = 16

    @property
    def count(self) -> int:
        return len(self.conds) * self.num_images

    def image(self, k: int) -> ImageSpec:
        i, j = divmod(k, self.num_images)
        # An image with guidance scale 1 needs no unconditional row.
        guided = self.unconds is not None and self.params[i].cfg_scale != 1.0
        return ImageSpec(k, self.conds[i], self.unconds[i] if guided else None, self.params[i], self.seeds[i] + j,
                         None if self.forced is None else self.forced[i], self.decoding, self.sjd_window)

    def images(self) -> Iterator[ImageSpec]:
        """The images, made one at a time (a request of many images holds one spec each only
        while they wait in the queue)."""
        return (self.image(k) for k in range(self.count))


def conditions(cfg: ModelConfig, prompts, class_ids) -> tuple[list, bool]:
    """One condition per request (prompt or class id), and whether the model has a real
    unconditional branch."""
    if cfg.is_text_to_image:
        if class_ids is not None:
            raise ValueError("class_ids is for class-conditional models; this one takes text prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__} at prompts[{i}]")
            check_text(f"prompts[{i}]", p)
        return list(prompts), True
    if prompts is not None:
        raise ValueError(f"{cfg.name} is not a text-to-image model: pass class_ids (or nothing), not prompts")
    nc = cfg.decoder.num_classes
    if class_ids is None:
        return [nc], False  # unconditional: the BOS / null prefix
    if nc == 0:
        raise ValueError(f"{cfg.name} is unconditional: class_ids must be None")
    if isinstance(class_ids, int):
        class_ids = [class_ids]
    if not isinstance(class_ids, (list, tuple)) or len(class_ids) == 0:
        raise ValueError("class_ids must be a non-empty list of ints")
    for c in class_ids:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < nc:
            raise ValueError(f"class_ids must be ints in [0, {nc}), got {c!r}")
    return list(class_ids), True


def check_request(model: VQIMModel, tokenizer: TextTokenizer | None, defaults: K.SamplingParams, prompts,
                  num_images, sampling: dict, seed, class_ids, negative_prompt=None, *, decoding: str = "auto",
                  sjd_window: int = 16, ring_cache: bool = False, most_images: int | None = None,
                  kept: Callable[[int], list[torch.Tensor] | None] | None = None) -> Request:
    """Everything a generation call checks before the first decode step, as a :class:`Request`.

    ``defaults`` fill the settings left out; ``most_images`` bounds the images of the request
    (checked before anything per image is made); ``kept(n)`` gives the kept tokens of ``n``
    prompts (image-conditioned generation), or None.
    """
    cfg = model.cfg
    cfg.require_decoder("generating images")
    check_count("num_images", num_images)
    conds, has_uncond = conditions(cfg, prompts, class_ids)
    n = len(conds)
    if most_images is not None and n * num_images > most_images:
        raise ValueError(f"num_images: {n} prompts x {num_images} images = {n * num_images} images, over the "
                         f"{most_images} one request may ask for")
    if negative_prompt is not None and not cfg.is_text_to_image:
        raise ValueError("negative_prompt is for text-to-image models; this one takes class ids")
    negatives = per_request("negative_prompt", negative_prompt, n)
    for i, neg in enumerate(negatives):
        if neg is None:
            continue
        if not isinstance(neg, str):
            raise ValueError(f"negative_prompt must be a string (or one per prompt), got {type(neg).__name__} "
                             f"at negative_prompt[{i}]")
        check_text("negative_prompt" if n == 1 else f"negative_prompt[{i}]", neg)
    unknown = set(sampling) - set(K.SamplingParams.names())
    if unknown:
        raise TypeError(f"unknown sampling settings {sorted(unknown)}; expected among "
                        f"{list(K.SamplingParams.names())}")
    given = {k: per_request(k, v, n) for k, v in sampling.items()}
    # One SamplingParams per request (validated on construction).
    params = [defaults.updated(**{k: v[i] for k, v in given.items()}) for i in range(n)]
    seeds = per_request("seed", seed, n)
    seeds = [draw_seed(num_images) if s is None else s for s in seeds]
    for i in range(n):
        K.validate_sampling_params(seed=seeds[i])
        if seeds[i] + num_images - 1 > K.MAX_SEED:
            raise ValueError(f"seed must be <= 2**63 - num_images (image j uses seed + j), got {seeds[i]}")
    decoding = resolve_decoding(model, decoding, sjd_window, ring_cache)
    forced = kept(n) if kept is not None else None
    if cfg.is_text_to_image:
        # Every prompt tokenized (and any truncation warned) before the first decode step. The
        # unconditional branch: the negative prompt, else the tokenizer's null row of the prompt
        # (the empty prompt; Janus's prompt with every token but BOS and BOI padded out).
        conds = tokenize(tokenizer, conds)
        unconds = [tokenizer.null_row(c) if neg is None else tokenize(tokenizer, [neg])[0]
                   for c, neg in zip(conds, negatives)]
    else:
        unconds = [model.decoder.null_prefix] * n if has_uncond else None
    return Request(conds, unconds if has_uncond else None, params, seeds, num_images, forced, decoding, sjd_window)


def resolve_decoding(model: VQIMModel, decoding: str, sjd_window: int, ring_cache: bool) -> str:
    """``decoding`` checked (and ``sjd_window`` for ``"sjd"``); a wavefront the model cannot run
    (a fully causal layer) is raster order, with a warning saying why; ``"auto"`` is the
    wavefront where it runs (the same tokens in fewer passes), else raster, silently."""
    check_decoding(decoding)
    if decoding == "auto":
        return "wavefront" if wavefront_unsupported(model.decoder) is None and not ring_cache else "raster"
    if decoding == "sjd":
        check_window("sjd_window", sjd_window, model.cfg.decoder.num_tokens)
    if decoding == "wavefront":
        why = wavefront_unsupported(model.decoder)
        if why is not None:
            warnings.warn(f"{why}: decoding in raster order instead", stacklevel=4)
            return "raster"
    if decoding != "raster" and ring_cache:
        raise ValueError(f"decoding={decoding!r} feeds several tokens per pass and needs the plain KV cache: this "
                         "engine keeps a ring (kv_cache='ring'), whose slots a pass would overwrite while other "
                         "tokens of the pass still read them; use decoding='raster' or an engine with "
                         "kv_cache='plain'")
    return decoding


def kept_tokens(cfg: ModelConfig, image, keep, n: int, encode: Callable) -> list[torch.Tensor] | None:
    """Per request, the tokens ``[grid_h * grid_w]`` image-conditioned generation keeps (-1:
    drawn), from ``image`` and ``keep`` (see ``Engine.generate_codes``); None without an image.
    ``encode(images)`` is the engine's tokenizer (``Engine.encode_images``)."""
    if image is None and keep is None:
        return None
    if image is None or keep is None:
        raise ValueError("image-conditioned generation needs both image and keep (the tokens to keep)")
    dcfg = cfg.decoder
    gh, gw = dcfg.grid_h, dcfg.grid_w
    if cfg.vqgan.grid != gh or gh != gw:
        raise ValueError(f"image: the tokenizer's {cfg.vqgan.grid} x {cfg.vqgan.grid} grid is not the "
                         f"decoder's {gh} x {gw}")
    images = list(image) if isinstance(image, (list, tuple)) else [image] * n
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * n
    for name, got in (("image", images), ("keep", keeps)):
        if len(got) != n:
            raise ValueError(f"{name} must be one value or a list of {n} (one per prompt / class id), got {len(got)}")
    masks = []
    for i, k in enumerate(keeps):
        if isinstance(k, int) and not isinstance(k, bool):
            if not 0 <= k <= gh:
                raise ValueError(f"keep must be a number of top grid rows in [0, {gh}], got {k} at keep[{i}]")
            m = torch.zeros(gh, gw, dtype=torch.bool)
            m[:k] = True
        else:
            m = torch.from_numpy(k) if isinstance(k, np.ndarray) else k
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (gh, gw):
                raise ValueError(f"keep must be an int (top grid rows) or a bool mask [{gh}, {gw}], got "
                                 f"{type(k).__name__} {tuple(getattr(k, 'shape', ()))} at keep[{i}]")
        masks.append(m.cpu())
    codes = []
    for i, im in enumerate(images):
        if isinstance(im, torch.Tensor) and im.dim() == 3:
            im = im[None]
        try:
            codes.append(encode(im).cpu())  # (1, g, g)
        except ValueError as e:
            raise ValueError(f"image[{i}]: {e}") from e
        if codes[-1].shape[0] != 1:
            raise ValueError(f"image must be one image per prompt, got {codes[-1].shape[0]} at image[{i}]")
    return [torch.where(m, c[0], -1).flatten() for m, c in zip(masks, codes)]
