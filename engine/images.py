"""Pixels <-> codes: the image tokenizer's side of the ``Engine`` (DESIGN §5).

Inputs are checked before any work (PIL images of the tokenizer's size read by bit depth, or
``[B, 3, H, W]`` tensors in [0, 1]; codes of any integer type inside the codebook); the
tokenizer runs ``max_batch_size`` images at a time, so the device never holds the pixels or the
activations of more than one chunk; a CUDA out-of-memory error names the batch that failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .config import ModelConfig
from .models import VQIMModel


def chunks(n: int, size: int) -> list[slice]:
    """``[0, n)`` in slices of at most ``size``."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


@contextlib.contextmanager
def oom_names_batch(what: str, batch: int, max_batch_size: int, device: torch.device):
    """A CUDA out-of-memory error re-raised naming the batch size that failed."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise torch.OutOfMemoryError(
            f"out of GPU memory {what} a batch of {batch} images; lower the batch size "
            f"(Engine.max_batch_size is {max_batch_size})") from e


def image_array(i: int, im: Image.Image) -> np.ndarray:
    """One PIL image -> float32 ``[H, W, 3]`` in [0, 1], scaled by its bit depth.

    ``convert("RGB")`` clips 16-bit and float images (everything above 255, or above 0 for
    floats, turns white or black), so those modes are read as they are: ``I;16*`` divided
    by 65535; ``I`` (32-bit) the same when its values fit 16 bits (how PIL opens 16-bit
    PNGs), else rejected; ``F`` taken as is when in [0, 1], else rejected. One channel is
    repeated to RGB. Every other mode goes through ``convert("RGB")`` and is divided by 255.
    """
    if im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float32) / 65535  # (H, W)
    elif im.mode == "I":
        a = np.asarray(im)  # (H, W) int32
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"images[{i}] is a 32-bit integer (mode 'I') image with values in [{lo}, {hi}]; "
                             "only 16-bit values in [0, 65535] are accepted (scaled by 65535)")
        a = a.astype(np.float32) / 65535
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float32)  # (H, W)
        lo, hi = float(a.min()), float(a.max())
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both
            raise ValueError(f"images[{i}] is a float (mode 'F') image with values in [{lo:.3g}, {hi:.3g}]; "
                             "float images must hold values in [0, 1]")
    else:
        try:
            rgb = im.convert("RGB")
        except ValueError as e:
            raise ValueError(f"images[{i}]: PIL cannot convert mode {im.mode!r} to RGB ({e})") from e
        return np.asarray(rgb, dtype=np.float32) / 255  # (H, W, 3)
    return np.repeat(a[:, :, None], 3, axis=2)  # (H, W, 3)


def pixels(images, size: int) -> torch.Tensor:
    """PIL images / uint8 or float ``[B, 3, H, W]`` in [0, 1] -> float pixels (not yet on the
    device: callers move one chunk at a time)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images must be a non-empty list")
        arrs = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise ValueError(f"images[{i}] must be a PIL image, got {type(im).__name__}")
            if im.size != (size, size):
                raise ValueError(f"images[{i}] is {im.size[0]}x{im.size[1]}; this tokenizer takes {size}x{size} "
                                 "(resize or crop before encoding)")
            arrs.append(image_array(i, im))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, 3, H, W) float32 in [0, 1]
    elif isinstance(images, torch.Tensor):
        x = images
    else:
        raise ValueError(f"images must be PIL images or a [B, 3, H, W] tensor, got {type(images).__name__}")
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (size, size) or x.shape[0] == 0:
        raise ValueError(f"images must be [B, 3, {size}, {size}] with B >= 1, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"float images must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    else:
        raise ValueError(f"images must be uint8 or float, got {x.dtype}")
    return x


def codes_tensor(codes, cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """Any integer array or tensor (numpy or torch, any width, signed or not), checked against
    the codebook, as int64 on ``device``."""
    if isinstance(codes, torch.Tensor) and codes.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # torch has almost no ops for these (not even min/max): check them in numpy.
        codes = codes.cpu().numpy()
    if isinstance(codes, np.ndarray):
        integer = codes.dtype.kind in "iu"
    elif isinstance(codes, torch.Tensor):
        integer = not (codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool)
    else:
        raise ValueError(f"codes must be a LongTensor [B, h, w] or an integer numpy array, "
                         f"got {type(codes).__name__}")
    g = cfg.vqgan.grid
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or tuple(codes.shape[1:]) != (g, g) or codes.shape[0] == 0:
        raise ValueError(f"codes must be [B, {g}, {g}] with B >= 1, got {tuple(codes.shape)}")
    if not integer:
        raise ValueError(f"codes must be an integer tensor or array, got {codes.dtype}")
    k = cfg.vqgan.codebook_size
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"codes must be in [0, {k}) (the codebook size), got values in [{lo}, {hi}]")
    if isinstance(codes, np.ndarray):
        # Values fit int64 now; astype also gives native byte order, which torch requires.
        codes = torch.from_numpy(codes.astype(np.int64))
    return codes.to(device, torch.long)


def encode_chunks(model: VQIMModel, x: torch.Tensor, device: torch.device, batch: int,
                  what: str) -> Iterator[torch.Tensor]:
    """Codes ``[b, g, g]`` per ``batch`` images of pixels ``x [B, 3, H, W]``."""
    dtype = model.vqgan.dtype
    for sl in chunks(x.shape[0], batch):
        with oom_names_batch(what, sl.stop - sl.start, batch, device):
            codes = model.vqgan.encode(x[sl].to(device, dtype))  # (b, g, g)
        yield codes


def decode_chunks(model: VQIMModel, c: torch.Tensor, device: torch.device, batch: int) -> Iterator[torch.Tensor]:
    """Pixels ``[b, 3, H, W]`` in [0, 1] per ``batch`` codes of ``c [B, g, g]``."""
    for sl in chunks(c.shape[0], batch):
        with oom_names_batch("decoding", sl.stop - sl.start, batch, device):
            px = model.vqgan.decode(c[sl])  # (b, 3, H, W) float32
        # A clamp would hide inf as 0 or 1 and an 8-bit cast turns NaN into black.
        if not bool(px.isfinite().all()):
            raise FloatingPointError("the image tokenizer's decoder produced non-finite pixels (NaN/inf in its "
                                     "weights or activations)")
        yield px.clamp_(0, 1)


def output(model: VQIMModel, pixel_chunks: Iterable[torch.Tensor], output_type: str, upscale: bool):
    """Pixel chunks ``[b, 3, H, W]`` in [0, 1] -> PIL images (``"pil"``) or one tensor (``"pt"``),
    through the super-resolution module with ``upscale``."""
    out = []
    for px in pixel_chunks:
        if upscale:
            px = model.superres(px)  # (b, 3, sH, sW)
        if output_type == "pt":
            out.append(px)
            continue
        arr = (px * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (b, H, W, 3)
        out += [Image.fromarray(a, mode="RGB") for a in arr]
    return torch.cat(out) if output_type == "pt" else out
