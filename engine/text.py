"""Text tokenizers: sentencepiece (a model directory's ``tokenizer.model``) or a byte-level
fallback so presets with random weights accept any prompt, for a text encoder; Janus-Pro's
(:class:`JanusTokenizer`: the directory's ``tokenizer.json`` through the ``tokenizers`` package,
and Janus's generation template) for a prompt in the decoder's sequence. The model's config
(``text.tokenizer``, ``prompt.tokenizer``) says which; the files present never do.

A text encoder's tokenizers append EOS; the empty prompt is therefore ``[EOS]``, a one-token
sequence that serves as the unconditional branch of classifier-free guidance (never an
all-padding row, whose cross-attention would have no key to attend to). Prompts past
``max_len`` tokens are truncated with a warning (EOS kept last).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .config import PromptConfig
from .weights import HF_TOKENIZER_NAME, MAX_TOKENIZER_BYTES, TOKENIZER_NAME, read_regular_file


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

    def null_row(self, row: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional branch of guidance for a prompt's row ``(ids, mask)``: the empty prompt."""
        ids, mask = self.batch([""], torch.device("cpu"), pad_to=self.max_len)  # (1, max_len) each
        return ids[0], mask[0]

    def batch(self, prompts: list[str], device: torch.device, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.ids(p) for p in prompts]
        length = pad_to or max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.impl.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids.to(device), mask.to(device)


def byte_tokenizer_json() -> bytes:
    """A ``tokenizer.json`` of one token per UTF-8 byte (ids 4 to 259, below every special id of
    the presets): what a random-weight preset with a prompt in its sequence tokenizes with, and
    saves, so any prompt is accepted and a saved preset loads like a converted model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Ids 0-3 are named placeholders (no merges reach a multi-character entry, so no text
    # encodes to them); a vocabulary with holes makes tokenizers warn on every save.
    vocab = {f"<|special_{i}|>": i for i in range(4)} | {ch: 4 + i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str().encode("utf-8")


class _HFTokenizer:
    """A ``tokenizers`` tokenizer of a ``tokenizer.json`` (its bytes kept, so that saving writes
    the tokenizer in use)."""

    def __init__(self, data: bytes, pad_id: int, where: str):
        from tokenizers import Tokenizer

        self.json = data
        try:
            self.tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 (the tokenizers package raises its own exception types)
            raise ValueError(f"{where}: not a tokenizers tokenizer.json ({e})") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = pad_id
        self.model_proto = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


class JanusTokenizer(TextTokenizer):
    """Janus-Pro's prompts, as its reference formats them for image generation: the prompt in the
    chat template of one user turn and the assistant's start (``"<|User|>: {prompt}\\n\\n<|Assistant|>:"``,
    the prompt stripped), tokenized, BOS first, the begin-of-image token last. The unconditional
    branch (:meth:`null_row`) is the same row with every id but BOS and BOI replaced by padding, as
    Janus's generate builds it. No EOS."""

    def __init__(self, impl: _HFTokenizer, cfg: PromptConfig):
        super().__init__(impl, cfg.max_len)
        self.cfg = cfg

    @classmethod
    def load(cls, model_dir: str | Path | None, cfg: PromptConfig) -> JanusTokenizer:
        """The ``tokenizer.json`` of ``model_dir`` (which must hold one); with no directory (a
        random-weight preset), :func:`byte_tokenizer_json`'s."""
        if model_dir is None:
            return cls(_HFTokenizer(byte_tokenizer_json(), cfg.pad_id, "the byte tokenizer"), cfg)
        path = Path(model_dir) / HF_TOKENIZER_NAME
        if not os.path.lexists(path):
            raise FileNotFoundError(f"the prompt is tokenized by {HF_TOKENIZER_NAME} (config prompt.tokenizer) but "
                                    f"{model_dir} has none")
        return cls(_HFTokenizer(read_regular_file(path, MAX_TOKENIZER_BYTES), cfg.pad_id, str(path)), cfg)

    def ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings, got {type(prompt).__name__}")
        text = f"<|User|>: {check_text('a prompt', prompt).strip()}\n\n<|Assistant|>:"
        ids = self.impl.encode(text)
        if len(ids) + 2 > self.max_len:
            warnings.warn(f"prompt of {len(ids) + 2} tokens truncated to {self.max_len}: {prompt[:40]!r}...",
                          stacklevel=3)
            ids = ids[: self.max_len - 2]
        return [self.cfg.bos_id] + ids + [self.cfg.boi_id]

    def null_row(self, row: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = row
        keep = (ids == self.cfg.bos_id) | (ids == self.cfg.boi_id) | ~mask
        return torch.where(keep, ids, self.cfg.pad_id), mask
