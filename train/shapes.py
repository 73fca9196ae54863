"""The ``shapes`` dataset: synthetic captioned images, and an analyzer that reads them back.

Images are ``size x size`` RGB (64 by default) with one or two solid shapes (circle, square,
triangle) in one of six colors, two sizes and nine positions (the cells of a 3 x 3 grid) on a
plain white background. Captions come from a small grammar::

    a large red circle in the top left
    a small blue square on the right and a large yellow triangle at the bottom

Everything is deterministic given a seed. The held-out prompt split is a fixed 10% of the
324 single-shape descriptions (shape x color x size x position): train and validation scenes
never contain one, held-out scenes always contain at least one, so the held-out prompts test
composition of attributes that were only ever seen apart.

The analyzer classifies pixels by nearest palette color, finds connected components, and
reads shape from the fill ratio of the bounding box (square ~1, circle ~pi/4, triangle ~1/2),
size from the bounding box extent and position from the centroid. ``score`` matches what it
finds against a prompt (parsed by the same grammar; size and position may be left out).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vqim.engine.weights import atomic_write

BACKGROUND = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# (row, col) of the 3 x 3 grid -> the phrase used in captions.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}
# Side (or diameter) of a shape as a share of one grid cell.
_EXTENT = {"small": 0.45, "large": 0.8}
HELD_OUT_SHARE = 0.10
SPLITS = ("train", "validation", "held_out")


@dataclass(frozen=True)
class ShapeSpec:
    """One shape. In a parsed prompt ``size`` or ``position`` may be ``None`` (= any)."""

    shape: str
    color: str
    size: str | None = None
    position: tuple[int, int] | None = None

    def describe(self) -> str:
        words = ["a"] + ([self.size] if self.size else []) + [self.color, self.shape]
        if self.position is not None:
            words.append(POSITIONS[self.position])
        return " ".join(words)


def _held_out_key(spec: ShapeSpec) -> float:
    digest = hashlib.sha256(f"{spec.shape}|{spec.color}|{spec.size}|{spec.position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def all_descriptions() -> list[ShapeSpec]:
    return [ShapeSpec(s, c, z, p) for s, c, z, p in itertools.product(SHAPES, COLORS, SIZES, POSITIONS)]


HELD_OUT: frozenset[ShapeSpec] = frozenset(
    sorted(all_descriptions(), key=_held_out_key)[: round(HELD_OUT_SHARE * len(all_descriptions()))]
)


def caption(scene: Iterable[ShapeSpec]) -> str:
    return " and ".join(spec.describe() for spec in scene)


def partial_caption(scene: Iterable[ShapeSpec], rng: random.Random) -> str:
    """A caption naming part of each shape: its shape and color always, its size and position
    each with probability one half. Such captions tie a word to one attribute whatever the
    others are (a recipe for composition: held-out prompts combine attributes only ever seen
    apart); the image is the whole scene's, so nothing of a held-out combination is shown."""
    return " and ".join(ShapeSpec(spec.shape, spec.color, spec.size if rng.random() < 0.5 else None,
                                  spec.position if rng.random() < 0.5 else None).describe() for spec in scene)


def sample_scene(rng: random.Random, *, split: str = "train", num_shapes: int | None = None) -> list[ShapeSpec]:
    """A random scene of 1 or 2 shapes at distinct positions, drawn from ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_shapes is not None and num_shapes not in (1, 2):
        raise ValueError(f"num_shapes must be 1 or 2, got {num_shapes}")
    while True:
        n = num_shapes if num_shapes is not None else rng.choice((1, 2))
        cells = rng.sample(sorted(POSITIONS), n)
        scene = [ShapeSpec(rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(SIZES), cell) for cell in cells]
        held = any(spec in HELD_OUT for spec in scene)
        if held == (split == "held_out"):
            return scene


def render(scene: Iterable[ShapeSpec], size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw the scene without anti-aliasing (every pixel is a palette color).

    ``rng`` jitters each shape's center inside its cell, by at most 30% of the margin a large
    shape leaves, so shapes in neighbouring cells never touch (the analyzer would merge them).
    """
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    jitter = 0.3 * (1 - _EXTENT["large"]) / 2 * cell
    for spec in scene:
        if spec.size is None or spec.position is None:
            raise ValueError(f"render needs a size and a position for every shape, got {spec}")
        row, col = spec.position
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        if rng is not None:
            cx += rng.uniform(-jitter, jitter)
            cy += rng.uniform(-jitter, jitter)
        half = _EXTENT[spec.size] * cell / 2
        box = [round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1]
        color = COLORS[spec.color]
        if spec.shape == "circle":
            draw.ellipse(box, fill=color)
        elif spec.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=color)
    return img


def make_dataset(out_dir: str | os.PathLike, n: int, *, seed: int, split: str = "train", size: int = 64,
                 partial: float = 0.0) -> Path:
    """Write ``n`` images to ``out_dir/images/`` and ``out_dir/captions.jsonl``.

    Lines of captions.jsonl: ``{"file": "images/00000.png", "caption": "..."}``. The captions
    file is written to a temporary name and renamed, so it never exists half-written. A share
    ``partial`` of the captions are :func:`partial_caption` s (0: every caption names everything).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if not 0.0 <= partial <= 1.0:
        raise ValueError(f"partial must be in [0, 1] (the share of partial captions), got {partial}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # Seeds of the three splits never collide for the same user seed.
    rng = random.Random(f"shapes/{split}/{seed}")
    # Its own stream: the images are the same whatever the share of partial captions.
    cap_rng = random.Random(f"shapes/{split}/{seed}/partial")
    lines = []
    for i in range(n):
        scene = sample_scene(rng, split=split)
        name = f"images/{i:05d}.png"
        render(scene, size, rng).save(out / name)
        text = partial_caption(scene, cap_rng) if cap_rng.random() < partial else caption(scene)
        lines.append(json.dumps({"file": name, "caption": text}))
    atomic_write(out / "captions.jsonl", lambda p: p.write_text("\n".join(lines) + "\n"))
    return out


def held_out_prompts(n: int, *, seed: int = 0, num_shapes: int | None = None, split: str = "held_out") -> list[str]:
    """``n`` captions of ``split`` (held-out by default; "validation" for choosing settings)."""
    key = f"shapes/prompts/{seed}" if split == "held_out" else f"shapes/prompts/{split}/{seed}"
    rng = random.Random(key)
    return [caption(sample_scene(rng, split=split, num_shapes=num_shapes)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Parsing prompts

_POSITION_BY_PHRASE = {phrase: cell for cell, phrase in POSITIONS.items()}
_CLAUSE = re.compile(
    r"^(?:an?|one)\s+(?:(?P<size>small|large)\s+)?(?P<color>" + "|".join(COLORS) + r")\s+"
    r"(?P<shape>circle|square|triangle)(?:\s+(?P<pos>" + "|".join(re.escape(p) for p in _POSITION_BY_PHRASE) + r"))?$"
)


def parse_caption(text: str) -> list[ShapeSpec]:
    """Prompt -> shapes; size and position are optional. Raises ValueError outside the grammar."""
    clauses = [c.strip() for c in re.split(r"\s+and\s+", text.strip().lower().rstrip("."))]
    if not 1 <= len(clauses) <= 2:
        raise ValueError(f"prompt must describe 1 or 2 shapes, got {len(clauses)}: {text!r}")
    specs = []
    for clause in clauses:
        m = _CLAUSE.match(clause)
        if m is None:
            raise ValueError(f"prompt is outside the shapes grammar: {clause!r} in {text!r}")
        pos = _POSITION_BY_PHRASE[m["pos"]] if m["pos"] else None
        specs.append(ShapeSpec(m["shape"], m["color"], m["size"], pos))
    return specs


# ---------------------------------------------------------------------------------------------
# Analyzer

_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # (7, 3)
_PALETTE_NAMES = ["background", *COLORS]
# Components smaller than this share of the image are noise (a small triangle is ~1.1%).
_MIN_AREA_SHARE = 0.004
# Fill ratio of the bounding box: triangle ~0.5, circle ~0.785, square ~1.
_TRIANGLE_BELOW, _CIRCLE_BELOW = 0.64, 0.89


@dataclass(frozen=True)
class Detection:
    spec: ShapeSpec
    area: int
    fill: float
    centroid: tuple[float, float]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(pixels))
    return comps


def analyze(image: Image.Image) -> list[Detection]:
    """Shapes found in an image, largest first."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    h, w, _ = rgb.shape
    labels = ((rgb[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)  # (H, W)
    cell_h, cell_w = h / 3, w / 3
    out = []
    for ci in range(1, len(_PALETTE_NAMES)):
        for pix in _components(labels == ci):
            if len(pix) < _MIN_AREA_SHARE * h * w:
                continue
            ys, xs = pix[:, 0], pix[:, 1]
            bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            fill = len(pix) / float(bh * bw)
            shape = "triangle" if fill < _TRIANGLE_BELOW else "circle" if fill < _CIRCLE_BELOW else "square"
            extent = max(bh / h, bw / w) * 3  # in cells
            size = "large" if extent > (_EXTENT["small"] + _EXTENT["large"]) / 2 else "small"
            cy, cx = float(ys.mean()) + 0.5, float(xs.mean()) + 0.5
            cell = (min(2, int(cy // cell_h)), min(2, int(cx // cell_w)))
            out.append(Detection(ShapeSpec(shape, _PALETTE_NAMES[ci], size, cell), len(pix), fill, (cy, cx)))
    return sorted(out, key=lambda d: -d.area)


ATTRIBUTES = ("shape", "color", "size", "position")


def _agreement(want: ShapeSpec, got: ShapeSpec) -> dict[str, bool]:
    return {a: getattr(want, a) is None or getattr(want, a) == getattr(got, a) for a in ATTRIBUTES}


def score(prompt: str | list[ShapeSpec], image: Image.Image) -> dict:
    """How well ``image`` shows ``prompt``.

    Returns ``{"exact": bool, "count": bool, "shape": k, "color": k, "size": k, "position": k,
    "num_specs": n, "detected": [...]}`` where ``k`` counts the prompt's shapes whose attribute is
    right under the best one-to-one assignment of detections to the prompt's shapes. ``exact``
    needs the right number of shapes and every attribute of every shape right.
    """
    specs = parse_caption(prompt) if isinstance(prompt, str) else list(prompt)
    found = analyze(image)
    best: dict[str, int] = {a: 0 for a in ATTRIBUTES}
    best_total = -1
    for perm in itertools.permutations(range(len(found)), min(len(found), len(specs))):
        counts = {a: 0 for a in ATTRIBUTES}
        for spec, j in zip(specs, perm):
            for a, ok in _agreement(spec, found[j].spec).items():
                counts[a] += ok
        total = sum(counts.values())
        if total > best_total:
            best, best_total = counts, total
    count_ok = len(found) == len(specs)
    exact = count_ok and all(best[a] == len(specs) for a in ATTRIBUTES)
    return {"exact": exact, "count": count_ok, **best, "num_specs": len(specs), "detected": [d.spec for d in found]}
