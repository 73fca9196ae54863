"""Text tokenizers: sentencepiece (a model directory's ``tokenizer.model``) or a byte-level
fallback so presets with random weights accept any prompt. The model's config
(``text.tokenizer``) says which; the files present never do.

Both append EOS; the empty prompt is therefore ``[EOS]``, a one-token sequence that serves as
the unconditional branch of classifier-free guidance (never an all-padding row, whose
cross-attention would have no key to attend to). Prompts past ``max_len`` tokens are truncated
with a warning (EOS kept last).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .weights import MAX_TOKENIZER_BYTES, TOKENIZER_NAME, read_regular_file


def check_text(name: str, text: str) -> str:
    """``text`` as the tokenizer can take it: valid Unicode (a lone surrogate, what Python makes
    of command-line bytes that are not UTF-8, cannot be encoded and would fail inside the
    tokenizer with a message that names nothing)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text (a lone surrogate at index {e.start}, e.g. bytes that "
                         f"were not UTF-8): {text!r}") from e
    return text


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: pad 0, eos 1, unk 2, byte b -> b + 3."""

    pad_id, eos_id = 0, 1
    vocab_size = 259
    model_proto = None  # no file: a model directory saved with it holds no tokenizer.model

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


class SentencePieceTokenizer:
    """A sentencepiece model file, read once: ``model_proto`` holds its bytes, so that saving
    writes the tokenizer in use even if the file has changed since."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.model_proto = read_regular_file(path, MAX_TOKENIZER_BYTES)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except RuntimeError as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
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
    def load(cls, model_dir: str | Path | None, max_len: int, *, kind: str) -> TextTokenizer:
        """The tokenizer of kind ``kind`` (a config's ``text.tokenizer``): ``"bytes"`` ignores any
        tokenizer.model in ``model_dir``, ``"sentencepiece"`` requires one."""
        if kind == "bytes":
            return cls(ByteTokenizer(), max_len)
        if kind != "sentencepiece":
            raise ValueError(f"kind must be 'bytes' or 'sentencepiece', got {kind!r}")
        path = Path(model_dir) / TOKENIZER_NAME if model_dir is not None else None
        if path is None or not os.path.lexists(path):
            raise FileNotFoundError(f"the text encoder reads sentencepiece ids (config text.tokenizer) but "
                                    f"{model_dir if model_dir is not None else 'the model'} has no {TOKENIZER_NAME}")
        return cls(SentencePieceTokenizer(path), max_len)

    @property
    def vocab_size(self) -> int:
        return self.impl.vocab_size

    def ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
        # Every text reaches the tokenizer through here: callers name the argument first, this
        # is the backstop (sentencepiece would raise an error that names nothing).
        ids = self.impl.encode(check_text("a prompt", prompt))
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
