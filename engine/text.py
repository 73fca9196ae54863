"""Text tokenizers: sentencepiece when a model directory ships ``tokenizer.model``, else a
byte-level fallback so presets with random weights accept any prompt.

Both append EOS; the empty prompt is therefore ``[EOS]``, a one-token sequence that serves as
the unconditional branch of classifier-free guidance (never an all-padding row, whose
cross-attention would have no key to attend to). Prompts past ``max_len`` tokens are truncated
with a warning (EOS kept last).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: pad 0, eos 1, unk 2, byte b -> b + 3."""

    pad_id, eos_id = 0, 1
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


class SentencePieceTokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))


class TextTokenizer:
    """Prompt strings -> padded ids ``[B, L]`` and mask ``[B, L]`` (True on real tokens)."""

    def __init__(self, impl: ByteTokenizer | SentencePieceTokenizer, max_len: int):
        self.impl = impl
        self.max_len = max_len

    @classmethod
    def load(cls, model_dir: str | Path | None, max_len: int) -> TextTokenizer:
        path = Path(model_dir) / "tokenizer.model" if model_dir is not None else None
        if path is not None and path.is_file():
            return cls(SentencePieceTokenizer(path), max_len)
        return cls(ByteTokenizer(), max_len)

    @property
    def vocab_size(self) -> int:
        return self.impl.vocab_size

    def ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
        ids = self.impl.encode(prompt)
        if len(ids) + 1 > self.max_len:
            warnings.warn(f"prompt of {len(ids) + 1} tokens truncated to {self.max_len}: {prompt[:40]!r}...",
                          stacklevel=3)
            ids = ids[: self.max_len - 1]
        return ids + [self.impl.eos_id]

    def batch(self, prompts: list[str], device: torch.device, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.ids(p) for p in prompts]
        length = pad_to or max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.impl.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids.to(device), mask.to(device)
