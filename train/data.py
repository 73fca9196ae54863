"""Training data: an image folder with captions or class labels, a deterministic batch order,
and the sentencepiece model trained on the captions (``vqim train tokenizer``).

A dataset folder is either

* ``captions.jsonl`` beside the images, one JSON object per line with ``"file"`` (path relative
  to the folder) and ``"caption"`` and/or ``"label"`` (an int class id), as written by
  ``vqim.train.shapes.make_dataset``; or
* class sub-folders ``root/<class name>/*.png|jpg|...`` (labels are the sorted class names'
  ranks); or
* loose images in ``root`` (unconditional).

Images are decoded with Pillow, converted to RGB, center-cropped to a square and resized
(bicubic) to the model's resolution; pixels are float32 in [0, 1].
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqim.engine.weights import atomic_write

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "captions.jsonl"


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """One image -> uint8 ``[3, size, size]`` (center square crop, bicubic resize)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        if (w, h) != (s, s):
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if s != size:
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W)


def to_pixels(images) -> torch.Tensor:
    """PIL RGB images of one size -> ``[N, 3, H, W]`` float32 in [0, 1]."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]))  # (N, H, W, 3)
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class Example:
    file: Path
    caption: str | None = None
    label: int | None = None


def _scan(root: Path) -> list[Example]:
    meta = root / METADATA
    if meta.is_file():
        out = []
        with meta.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    file = root / rec["file"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{meta}:{n}: each line must be a JSON object with a \"file\" key: {e}") from e
                label = rec.get("label")
                if label is not None and (not isinstance(label, int) or label < 0):
                    raise ValueError(f"{meta}:{n}: \"label\" must be a non-negative int, got {label!r}")
                out.append(Example(file, rec.get("caption"), label))
        return out
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if classes:
        return [Example(f, None, i) for i, d in enumerate(classes) for f in sorted(d.iterdir())
                if f.suffix.lower() in IMAGE_EXTS]
    return [Example(f) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_EXTS]


class ImageDataset:
    """Images of one folder at ``image_size``; decoded images are kept in memory after first use."""

    def __init__(self, root: str | Path, image_size: int, *, limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data: {self.root} is not a directory")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.examples = _scan(self.root)[:limit]
        if not self.examples:
            raise ValueError(f"data: no images found in {self.root} (expected {METADATA}, class folders or "
                             f"{'/'.join(IMAGE_EXTS)} files)")
        self.image_size = image_size
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def captions(self) -> list[str]:
        caps = [e.caption for e in self.examples]
        if any(c is None for c in caps):
            raise ValueError(f"data: {self.root} has images without a caption (a text-to-image model needs "
                             f"\"caption\" on every line of {METADATA})")
        return caps  # type: ignore[return-value]

    @property
    def labels(self) -> list[int]:
        labels = [e.label for e in self.examples]
        if any(x is None for x in labels):
            raise ValueError(f"data: {self.root} has images without a class label")
        return labels  # type: ignore[return-value]

    def image(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            self._cache[i] = load_image(self.examples[i].file, self.image_size)
        return self._cache[i]

    def pixels(self, indices: Iterable[int]) -> torch.Tensor:
        """float32 ``[B, 3, S, S]`` in [0, 1]."""
        return torch.stack([self.image(int(i)) for i in indices]).float().div_(255.0)


def batch_indices(n: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of 0-based ``step``.

    The stream is one seeded permutation per epoch, concatenated; a batch may straddle two
    epochs. Stateless (a function of ``step``), so a resumed run reads the same batches.
    """
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        out.extend(perm[offset: offset + global_batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


def train_sentencepiece(captions: Iterable[str], out_file: str | Path, vocab_size: int = 1000, *,
                        model_type: str = "unigram") -> Path:
    """Train a sentencepiece model on ``captions`` and write it to ``out_file`` (``tokenizer.model``).

    Ids follow the engine's byte fallback: pad 0, eos 1, unk 2, no bos. ``vocab_size`` is an upper
    bound (a small caption set may support fewer pieces).
    """
    import sentencepiece as spm

    caps = [c for c in captions if c]
    if not caps:
        raise ValueError("train_sentencepiece: no non-empty captions")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (3 special ids + one piece), got {vocab_size}")
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caps), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        minloglevel=2,
    )
    return atomic_write(out, lambda p: p.write_bytes(buf.getvalue()))
