"""The ``shapes`` alignment benchmark: how often a model draws what the prompt asks for.

Generates images for held-out prompts (one-shape and two-shape) at each guidance scale, reads
them back with :func:`vqim.train.shapes.analyze`, and reports exact-match rates and
per-attribute accuracy; then measures the tokenizer's reconstruction PSNR and codebook usage on
validation images. Works with anything that has the ``Engine`` methods it calls
(``generate``, ``encode_images``, ``decode_codes``, ``cfg``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from vqim.kernels import SamplingParams

from . import shapes as S
from .data import to_pixels

DEFAULT_CFG_SCALES = (1.0, 3.0)
# README's grid: held-out prompts only (no scene the model trained on), four of each kind.
GRID_PROMPTS = S.held_out_prompts(4, seed=7, num_shapes=1) + S.held_out_prompts(4, seed=8, num_shapes=2)


def _alignment(engine, prompts: list[str], *, cfg_scale: float, seed: int, batch_size: int,
               candidates: int = 1) -> dict:
    tally = {a: 0 for a in S.ATTRIBUTES}
    exact = {1: [0, 0], 2: [0, 0]}  # shapes in the prompt -> [exact matches, prompts]
    count_ok = specs = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        extra = {"candidates": candidates} if candidates != 1 else {}
        images = engine.generate(chunk, num_images=1, cfg_scale=cfg_scale, seed=seed + start, **extra)
        for prompt, img in zip(chunk, images):
            r = S.score(prompt, img)
            exact[r["num_specs"]][0] += r["exact"]
            exact[r["num_specs"]][1] += 1
            count_ok += r["count"]
            specs += r["num_specs"]
            for a in S.ATTRIBUTES:
                tally[a] += r[a]
    return {
        "cfg_scale": cfg_scale,
        "candidates": candidates,
        "exact_one_shape": exact[1][0] / max(1, exact[1][1]),
        "exact_two_shapes": exact[2][0] / max(1, exact[2][1]),
        "prompts_one_shape": exact[1][1],
        "prompts_two_shapes": exact[2][1],
        "count_accuracy": count_ok / len(prompts),
        **{f"{a}_accuracy": tally[a] / specs for a in S.ATTRIBUTES},
    }


@torch.no_grad()
def _tokenizer_quality(engine, *, num_images: int, seed: int, batch_size: int) -> dict:
    size = engine.cfg.vqgan.image_size
    rng = random.Random(f"eval/recon/{seed}")
    scenes = [S.sample_scene(rng, split="validation") for _ in range(num_images)]
    used: set[int] = set()
    sq_err = 0.0
    pixels = 0
    for start in range(0, num_images, batch_size):
        imgs = [S.render(sc, size, rng) for sc in scenes[start:start + batch_size]]
        codes = engine.encode_images(imgs)  # (B, g, g)
        used.update(codes.unique().tolist())
        recon = engine.decode_codes(codes, output_type="pt").float().cpu()  # (B, 3, H, W) in [0, 1]
        target = to_pixels(imgs)  # (B, 3, H, W)
        sq_err += float(((recon - target) ** 2).sum())
        pixels += target.numel()
    mse = sq_err / pixels
    return {
        "recon_mse": mse,
        "recon_psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
        "codebook_usage": len(used) / engine.cfg.vqgan.codebook_size,
        "codes_used": len(used),
        "recon_images": num_images,
    }


def evaluate(engine, *, num_prompts: int = 100, cfg_scales: Sequence[float] = DEFAULT_CFG_SCALES, seed: int = 0,
             batch_size: int = 32, recon_images: int = 256, split: str = "held_out",
             candidates: Sequence[int] = (1,)) -> dict:
    """Alignment on ``num_prompts`` held-out one-shape and ``num_prompts`` two-shape prompts at
    each scale (and each number of reranked ``candidates``; more than 1 needs a model with a
    scorer, whose own retrieval accuracy on held-out scenes is then reported too), plus the
    tokenizer's reconstruction quality on ``recon_images`` validation scenes (0: not measured,
    ``"tokenizer": None``). Deterministic given ``seed``. ``split="validation"``
    scores validation prompts instead: choose settings there, report held-out."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not cfg_scales:
        raise ValueError("cfg_scales must name at least one scale")
    if isinstance(recon_images, bool) or not isinstance(recon_images, int) or recon_images < 0:
        raise ValueError(f"recon_images must be an int >= 0 (0: not measured), got {recon_images!r}")
    prompts = S.held_out_prompts(num_prompts, seed=seed, num_shapes=1, split=split) + S.held_out_prompts(
        num_prompts, seed=seed + 1, num_shapes=2, split=split)
    out = {
        "alignment": [_alignment(engine, prompts, cfg_scale=float(s), seed=seed, batch_size=batch_size, candidates=n)
                      for s in cfg_scales for n in candidates],
        "tokenizer": (_tokenizer_quality(engine, num_images=recon_images, seed=seed, batch_size=batch_size)
                      if recon_images else None),
    }
    if getattr(getattr(engine, "model", None), "scorer", None) is not None:
        from .scorer import held_out_retrieval

        out["scorer"] = held_out_retrieval(engine, seed=seed)
    return out


def prompt_grid(engine, prompts: Sequence[str], *, cfg_scale: float = SamplingParams.cfg_scale, seed: int = 0,
                cols: int = 4, scale: int = 3, candidates: int = 1) -> "Image.Image":
    """One image per prompt, upscaled ``scale`` times (nearest), each over its prompt and a
    check mark or cross from :func:`vqim.train.shapes.score`: the README's picture. With
    ``candidates > 1`` each image is the reranker's best of that many draws."""
    from PIL import Image, ImageDraw, ImageFont

    if not prompts:
        raise ValueError("prompts must be a non-empty list")
    if cols < 1 or scale < 1:
        raise ValueError(f"cols and scale must be >= 1, got cols={cols}, scale={scale}")
    extra = {"candidates": candidates} if candidates != 1 else {}
    images = engine.generate(list(prompts), num_images=1, cfg_scale=cfg_scale, seed=seed, **extra)
    font = ImageFont.load_default()
    side = images[0].size[0] * scale
    chars = max(8, side // 6)  # the default bitmap font is ~6 px a character
    captions = []
    for prompt, img in zip(prompts, images):
        mark = "ok" if S.score(prompt, img)["exact"] else "MISS"
        words, lines = f"[{mark}] {prompt}".split(), [""]
        for w in words:
            if len(lines[-1]) + len(w) + 1 > chars:
                lines.append(w)
            else:
                lines[-1] = f"{lines[-1]} {w}".strip()
        captions.append(lines)
    text_h = 12 * max(len(c) for c in captions) + 6
    rows = (len(images) + cols - 1) // cols
    pad = 8
    grid = Image.new("RGB", (cols * (side + pad) + pad, rows * (side + text_h + pad) + pad), (240, 240, 240))
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, captions)):
        x = pad + (i % cols) * (side + pad)
        y = pad + (i // cols) * (side + text_h + pad)
        grid.paste(img.resize((side, side), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + side + 3 + 12 * j), line, fill=(0, 0, 0), font=font)
    return grid


def format_report(results: dict) -> str:
    cols = ["cfg_scale", "candidates", "exact_one_shape", "exact_two_shapes", "count_accuracy",
            *(f"{a}_accuracy" for a in S.ATTRIBUTES)]
    lines = ["  ".join(f"{c:>16}" for c in cols)]
    for row in results["alignment"]:
        lines.append("  ".join(f"{row[c]:>16.3f}" for c in cols))
    t = results["tokenizer"]
    if t is not None:
        lines.append(f"tokenizer: PSNR {t['recon_psnr_db']:.2f} dB over {t['recon_images']} validation images, "
                     f"codebook usage {t['codebook_usage']:.1%} ({t['codes_used']} codes)")
    if "scorer" in results:
        r = results["scorer"]
        lines.append(f"scorer on held-out scenes: caption retrieval top-1 {r['retrieval_top1']:.3f} (among 100), "
                     f"beats a one-attribute hard negative {r['beats_hard_negative']:.3f}")
    return "\n".join(lines)
