"""The CNN VQ tokenizer of LlamaGen (VQ-16) and Janus-Pro (its image generation tokenizer).

Encoder: a 3x3 conv in, then per resolution ``num_res_blocks`` GroupNorm ResNet blocks (swish),
self-attention blocks at the lowest resolution, a strided 3x3 conv (padded on the right and
bottom only) between resolutions, a mid block (ResNet, attention, ResNet), GroupNorm, swish and a
3x3 conv out to ``z_channels``; a 1x1 conv to ``code_dim``. The codes are l2-normalized and
looked up by cosine similarity (``vqim.kernels.codebook_lookup``: the argmin of the Euclidean
distance between normalized vectors that the reference tokenizers compute). Decoder: the code
vectors, l2-normalized, through a 1x1 conv, a 3x3 conv, the mid block, per resolution
``num_res_blocks + 1`` ResNet blocks (attention at the lowest), nearest 2x upsampling and a 3x3
conv between resolutions, GroupNorm, swish, a 3x3 conv to RGB. Pixels are in [-1, 1] inside the
model; ``encode`` takes and ``decode`` gives the engine's [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqim import kernels as K

from .config import CNNVQConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 conv projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))  # (B, 1, HW, C)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C): scale 1 / sqrt(C)
        return x + self.proj_out(a.transpose(2, 3).reshape(b, c, hh, ww))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels)
        self.attn = AttnBlock(channels)
        self.block_2 = ResBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the reference's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResNet blocks, attention after each where ``attn`` (the lowest), and the
    resampling to the next (``None``: the last level)."""

    def __init__(self, blocks: list[ResBlock], attn: bool, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(AttnBlock(b.conv2.out_channels) for b in blocks) if attn else nn.ModuleList()
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x if self.resample is None else self.resample(x)


class CNNEncoder(nn.Module):
    def __init__(self, cfg: CNNVQConfig):
        super().__init__()
        ch, mult, n = cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, cin = [], ch
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            blocks = [ResBlock(cin if j == 0 else ch * m, ch * m) for j in range(n)]
            cin = ch * m
            levels.append(Level(blocks, last, None if last else Downsample(cin)))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class CNNDecoder(nn.Module):
    def __init__(self, cfg: CNNVQConfig):
        super().__init__()
        ch, mult, n = cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = MidBlock(cin)
        levels = []
        for i in reversed(range(len(mult))):  # lowest resolution first
            blocks = [ResBlock(cin if j == 0 else ch * mult[i], ch * mult[i]) for j in range(n + 1)]
            cin = ch * mult[i]
            levels.append(Level(blocks, i == len(mult) - 1, Upsample(cin) if i else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CNNVQ(nn.Module):
    """Pixels <-> codes with the CNN VQ (module docstring), the engine's tokenizer interface."""

    def __init__(self, cfg: CNNVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = CNNEncoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.codebook = nn.Parameter(torch.zeros(cfg.codebook_size, cfg.code_dim))
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.decoder = CNNDecoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] -> latents ``[B, g * g, code_dim]`` before the lookup."""
        z = self.quant_conv(self.encoder(pixels * 2 - 1))  # (B, D, g, g)
        return z.flatten(2).transpose(1, 2)  # (B, g * g, D)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] -> code ids ``[B, g, g]``."""
        z = self.encode_latents(pixels)  # (B, N, D)
        b, n, d = z.shape
        idx = K.codebook_lookup(z.reshape(b * n, d), self.codebook)  # (B*N,)
        return idx.view(b, self.cfg.grid, self.cfg.grid)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, g, g]`` -> pixels ``[B, 3, H, W]`` (float32, [0, 1] up to the decoder's reach)."""
        b, g = ids.shape[0], self.cfg.grid
        codes = F.normalize(self.codebook[ids.reshape(b, -1)], dim=-1, eps=1e-12)  # (B, N, D)
        z = codes.transpose(1, 2).reshape(b, -1, g, g)  # (B, D, g, g)
        x = self.decoder(self.post_quant_conv(z.to(self.dtype)))  # (B, 3, H, W) in [-1, 1]
        return (x.float() + 1) / 2
