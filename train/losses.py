"""Stage-1 (ViT-VQGAN) losses and the StyleGAN-style discriminator.

The objective is the seed's (§[0093]-[0096]):

    L = L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-laplace + 1.0 L_2
    L_VQ = ||sg[z] - e||^2 + beta ||z - sg[e]||^2,  beta = 0.25

with ``z`` the l2-normalized encoder latent and ``e`` the l2-normalized chosen code (both
``code_dim`` wide, the factorized lookup space). The squared norms are summed over the code dim
and averaged over tokens. The decoder sees ``z + sg[e - z]`` (straight-through estimator).

Choices where the seed is silent:

* Logit-Laplace (DALL-E's, with its ``eps = 0.1`` squashing of pixels into ``(eps, 1 - eps)``)
  with a unit scale ``b = 1``: the engine's decoder predicts the mean only (``output="sigmoid"``),
  so the scale is not learned. The value reported is the full negative log-likelihood per
  sub-pixel, normalizers included, so it is comparable across runs.
* L_2 is the mean squared error of pixels in [0, 1].
* The adversarial term is StyleGAN's non-saturating logistic loss (``softplus(-D(fake))`` for the
  generator, ``softplus(D(fake)) + softplus(-D(real))`` for the discriminator), with an optional
  R1 penalty on real images (``r1_gamma``, off by default).
* The perceptual network is whatever the user provides as a TorchScript file (no VGG weights can
  be downloaded here): it maps images ``[B, 3, H, W]`` in [0, 1] to a tensor or a list of feature
  maps; the loss is LPIPS' unweighted form, the mean squared difference of channel-normalized
  features, averaged over layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS = 0.1


def vq_loss(z: torch.Tensor, codes: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
    """``||sg[z] - e||^2 + beta ||z - sg[e]||^2``: summed over the code dim, mean over tokens.

    z, codes: ``[..., D]``; gradients reach the codebook through ``codes`` and the encoder through ``z``.
    """
    codebook_term = (z.detach().float() - codes.float()).square().sum(-1).mean()
    commitment = (z.float() - codes.detach().float()).square().sum(-1).mean()
    return codebook_term + beta * commitment


def straight_through(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Forward value ``codes``, gradient to ``z`` unchanged."""
    return z + (codes - z).detach()


def logit_laplace_loss(mean: torch.Tensor, target: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Negative log-likelihood per sub-pixel of ``target`` under a logit-Laplace(mean, b=1).

    mean, target: ``[B, 3, H, W]`` in [0, 1] (mean is the decoder's sigmoid output).
    """
    x = target.float() * (1 - 2 * eps) + eps  # (B, 3, H, W) in (eps, 1 - eps)
    mu = mean.float() * (1 - 2 * eps) + eps
    nll = (torch.logit(x) - torch.logit(mu)).abs() + math.log(2.0) + torch.log(x * (1 - x))
    return nll.mean()


def l2_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (recon.float() - target.float()).square().mean()


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: ``[B]``."""
    mse = (recon.float().clamp(0, 1) - target.float()).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- perceptual


class PerceptualLoss(nn.Module):
    """Frozen user-provided feature network (TorchScript) -> LPIPS-style feature distance."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"perceptual_weights: no such file {path}")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise ValueError(f"perceptual_weights: {path} is not a TorchScript feature network "
                             f"(torch.jit.save of a module mapping [B, 3, H, W] images to features): {e}") from e
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        # The feature network stays in eval mode (frozen batch-norm statistics, no dropout).
        super().train(mode)
        self.net.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x)
        feats = list(out) if isinstance(out, (list, tuple)) else [out]
        return [f.float() for f in feats]

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fr, ft = self._features(recon), self._features(target)
        total = recon.new_zeros((), dtype=torch.float32)
        for a, b in zip(fr, ft):
            a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (a - b).square().sum(1).mean()
        return total / len(fr)


# ----------------------------------------------------------------------------- discriminator


class _ResBlock(nn.Module):
    """StyleGAN2 residual downsampling block: two 3x3 convs + 2x average pool, 1x1 skip, / sqrt(2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)  # (B, c_out, H/2, W/2)
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class Discriminator(nn.Module):
    """StyleGAN2-style residual discriminator with a minibatch-stddev layer.

    ``image_size`` must be a power of two >= 8; blocks halve the resolution down to 4 x 4.
    Channels start at ``channels`` and double per block up to ``max_channels``.
    """

    def __init__(self, image_size: int, channels: int = 32, max_channels: int = 256, mbstd_group: int = 4):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"Discriminator: image_size must be a power of two >= 8, got {image_size}")
        self.mbstd_group = mbstd_group
        self.from_rgb = nn.Conv2d(3, channels, 1)
        blocks, c, res = [], channels, image_size
        while res > 4:
            c_out = min(2 * c, max_channels)
            blocks.append(_ResBlock(c, c_out))
            c, res = c_out, res // 2
        self.blocks = nn.ModuleList(blocks)
        self.conv = nn.Conv2d(c + 1, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, c)
        self.out = nn.Linear(c, 1)

    def _mbstd(self, x: torch.Tensor) -> torch.Tensor:
        """Append the (group-wise) standard deviation over the batch as one feature map."""
        b, c, h, w = x.shape
        g = min(self.mbstd_group, b)
        if b % g:
            g = 1
        y = x.float().reshape(g, b // g, c, h, w)
        std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
        std = std.to(x.dtype)[None, :, None, None, None].expand(g, b // g, 1, h, w).reshape(b, 1, h, w)
        return torch.cat([x, std], dim=1)  # (B, C + 1, H, W)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> logits ``[B]`` (float32)."""
        x = F.leaky_relu(self.from_rgb(img * 2 - 1), 0.2)
        for blk in self.blocks:
            x = blk(x)
        x = F.leaky_relu(self.conv(self._mbstd(x)), 0.2)  # (B, C, 4, 4)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
        return self.out(x).float().squeeze(1)


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def r1_penalty(disc: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """``E ||grad_x D(x)||^2`` on real images (StyleGAN's R1)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(real).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()
