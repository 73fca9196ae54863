"""Super-resolution of decoded images (seed §[0108]): stacked convolutional layers with residual
connections, learned with the tokenizer's losses, that map the tokenizer's reconstructions to a
higher resolution.

The output is the bicubic upsampling of the input plus a learned residual. The residual's
convolutions run at the input's resolution (a head, residual blocks, a body convolution around a
long skip) and one pixel shuffle turns ``3 * scale**2`` channels into the ``scale`` times larger
residual image, so the cost per output pixel stays that of one small convolution. The last
convolution starts at zero: an untrained module is bicubic upsampling, and training only has to
learn what bicubic gets wrong (sharp edges, flat colors where the tokenizer left ripples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SuperResConfig


def bicubic(pixels: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsampling of ``pixels`` ``[B, 3, h, w]`` by ``scale``, clamped to [0, 1] (float32):
    the module's base image, and the baseline it is measured against."""
    return F.interpolate(pixels.float(), scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


class _ResBlock(nn.Module):
    """conv 3x3 -> ReLU -> conv 3x3, added to its input (EDSR's block, no batch norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class SuperResolution(nn.Module):
    """Pixels ``[B, 3, h, w]`` -> pixels ``[B, 3, h * scale, w * scale]``, both in [0, 1]."""

    def __init__(self, cfg: SuperResConfig):
        super().__init__()
        self.cfg = cfg
        c, s = cfg.channels, cfg.scale
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(c) for _ in range(cfg.blocks))
        self.body = nn.Conv2d(c, c, 3, padding=1)
        self.tail = nn.Conv2d(c, 3 * s * s, 3, padding=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's default init for the trunk, zeros for the tail: the module starts as bicubic."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        self.tail.weight.zero_()
        self.tail.bias.zero_()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Upsample ``pixels`` ``[B, 3, h, w]`` in [0, 1] by ``cfg.scale``: ``[B, 3, h * scale,
        w * scale]`` float32 in [0, 1], the bicubic upsampling plus the learned residual, clamped.

        ``pixels`` are the tokenizer's decoded images, e.g. ``Engine.decode_codes(codes,
        output_type="pt")`` (64 x 64 for the bundled model, trained on exactly those), on the
        module's device; any size works, as the module is convolutional. Gradients are the
        caller's to switch off (``torch.no_grad()``)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, h, w], got shape {list(pixels.shape)}")
        x = pixels.to(self.head.weight.dtype)
        up = bicubic(pixels, self.cfg.scale)  # (B, 3, sh, sw)
        h = self.head(x * 2 - 1)  # (B, C, h, w)
        y = h
        for blk in self.blocks:
            y = blk(y)
        y = self.body(y) + h  # (B, C, h, w)
        residual = F.pixel_shuffle(self.tail(y), self.cfg.scale)  # (B, 3, sh, sw)
        return (up + residual.float()).clamp(0, 1)
