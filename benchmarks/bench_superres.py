"""The bundled model's super-resolution module against bicubic upsampling, on held-out scenes.

    python benchmarks/bench_superres.py [--save] [-n 100] [--model DIR] [--threads 2] [--image docs/upscaled.png]

Held-out scenes of the shapes grammar (each holds a description training never saw) are rendered
at the tokenizer's size (64) and ``scale`` times larger (256, the ground truth). Rows, each
scored against the ground truth (PSNR in dB and SSIM, means over the scenes):

* ``superres``: the module applied to the tokenizer's reconstruction ``decode(encode(render_64))``,
  what ``generate(..., upscale=True)`` adds to a generated image;
* ``bicubic``: bicubic upsampling of the same reconstruction (the module's baseline);
* ``bicubic_gt``: bicubic upsampling of the 64 px render itself (no tokenizer error: what
  upsampling alone loses).

``ms_b1`` / ``ms_b8``: CPU milliseconds per image of the module (bicubic: of the interpolation),
at batch 1 and batch 8 (median of timed calls). ``--image PNG`` also draws the first few scenes:
the reconstruction (nearest-upsampled for display), bicubic, super-resolution and the truth. SSIM is Wang et al.'s (2004): an 11 x 11 Gaussian
window of sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 1, valid positions only, the map's
mean per channel, then the mean over channels.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vqim.engine.api import BUNDLED_MODEL
from vqim.engine.superres import bicubic
from vqim.engine.profiling.timing import device_name, print_table, timeit
from vqim.engine.weights import atomic_write, load_model
from vqim.train.superres import reconstruct, render_pairs

from _common import append_results

COLUMNS = ["method", "images", "psnr", "ssim", "threads", "ms_b1", "ms_b8"]


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalized ``size x size`` Gaussian ``[size, size]`` (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, *, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of images ``[B, C, H, W]`` in [0, 1] (``H, W >= size``): ``[B]`` float64."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a and b must be [B, C, H, W] of one shape, got {list(a.shape)} and {list(b.shape)}")
    if min(a.shape[-2:]) < size:
        raise ValueError(f"images must be at least {size} pixels a side (the window), got {list(a.shape[-2:])}")
    c = a.shape[1]
    w = gaussian_window(size, sigma).expand(c, 1, size, size)  # (C, 1, k, k): one window per channel
    a, b = a.double(), b.double()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)  # (B, C, H - k + 1, W - k + 1)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return m.mean(dim=(2, 3)).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: ``[B]`` float64."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def load(model_dir: str | None):
    model = load_model(model_dir or BUNDLED_MODEL).float().eval()
    if model.superres is None:
        raise SystemExit(f"{model_dir or 'the bundled model'} has no super-resolution module")
    return model


@torch.no_grad()
def run(model, n: int, *, seed: int = 0, iters: int = 10) -> list[dict]:
    scale = model.cfg.superres.scale
    small, truth, _ = render_pairs(random.Random(f"bench_superres/{seed}"), n, model.cfg.vqgan.image_size, scale,
                                   split="held_out")
    recon = reconstruct(model.vqgan, small)  # (n, 3, size, size)
    methods = {"superres": (model.superres, recon), "bicubic": (lambda x: bicubic(x, scale), recon),
               "bicubic_gt": (lambda x: bicubic(x, scale), small)}
    dev = torch.device("cpu")
    rows = []
    for name, (fn, inputs) in methods.items():
        scores = [(psnr(out, t), ssim(out, t))  # per image, 8 at a time (SSIM's float64 maps are large)
                  for out, t in ((fn(inputs[i: i + 8]), truth[i: i + 8]) for i in range(0, n, 8))]
        row = {"method": name, "images": n, "psnr": torch.cat([p for p, _ in scores]).mean().item(),
               "ssim": torch.cat([s for _, s in scores]).mean().item(), "threads": torch.get_num_threads()}
        for b in (1, 8):
            x = inputs[:b]
            row[f"ms_b{b}"] = timeit(lambda: fn(x), device=dev, warmup=2, iters=iters)["ms"] / b
        rows.append(row)
    return rows


def _pil(x: torch.Tensor) -> Image.Image:
    """One image ``[3, H, W]`` in [0, 1] as a PIL image."""
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())


@torch.no_grad()
def example_image(model, n: int = 4, *, seed: int = 0) -> Image.Image:
    """``n`` held-out scenes, one a row: the tokenizer's reconstruction (nearest-upsampled for
    display), its bicubic upsampling, its super-resolution and the large render, captioned."""
    scale = model.cfg.superres.scale
    small, truth, captions = render_pairs(random.Random(f"bench_superres/example/{seed}"), n,
                                          model.cfg.vqgan.image_size, scale, split="held_out")
    recon = reconstruct(model.vqgan, small)
    panels = [F.interpolate(recon, scale_factor=scale, mode="nearest"), bicubic(recon, scale),
              model.superres(recon), truth]
    titles = [f"tokenizer {recon.shape[-1]} px (nearest)", f"bicubic {truth.shape[-1]} px",
              f"super-res {truth.shape[-1]} px", f"render {truth.shape[-1]} px (truth)"]
    side, pad, head, line = truth.shape[-1], 8, 20, 18
    out = Image.new("RGB", (len(panels) * (side + pad) + pad, head + n * (line + side + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, title in enumerate(titles):
        draw.text((pad + j * (side + pad), 4), title, fill=(0, 0, 0))
    for i in range(n):
        y = head + i * (line + side + pad)
        draw.text((pad, y + 2), captions[i], fill=(0, 0, 0))
        for j, p in enumerate(panels):
            x = pad + j * (side + pad)
            out.paste(_pil(p[i]), (x, y + line))
            draw.rectangle([x - 1, y + line - 1, x + side, y + line + side], outline=(190, 190, 190))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num-images", type=int, default=100, help="held-out scenes")
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iters", type=int, default=10, help="timed calls per batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--save", action="store_true", help="append the rows to benchmarks/results/superres.csv")
    ap.add_argument("--image", metavar="PNG", default=None, help="also draw held-out examples side by side")
    args = ap.parse_args()
    if args.num_images < 8:
        ap.error(f"--num-images must be at least 8 (the batch-8 timing), got {args.num_images}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    print(f"device: {device_name(dev)}, torch threads: {torch.get_num_threads()}")
    model = load(args.model)
    rows = run(model, args.num_images, seed=args.seed, iters=args.iters)
    print_table(rows, COLUMNS)
    if args.save:
        print(f"saved to {append_results('superres', rows, dev)}")
    if args.image:
        img = example_image(model, seed=args.seed)
        print(f"example: {atomic_write(args.image, lambda p: img.save(p, format='PNG'))}")


if __name__ == "__main__":
    main()
