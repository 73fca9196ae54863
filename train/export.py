"""Export a training checkpoint to the engine's model directory.

A stage-2 checkpoint holds the whole model (its frozen tokenizer included); a stage-1 checkpoint
holds the tokenizer only, and is exported with the text encoder and decoder at their seeded
random init (enough for ``vqim encode``/``decode`` and as the start of stage 2). The directory is
written by the engine's own ``save_pretrained`` (``config.json``, ``model.safetensors``,
``tokenizer.model``), so ``Engine.from_pretrained(out_dir)`` loads it.
"""

from __future__ import annotations

from pathlib import Path

from vqim.engine.config import ModelConfig, dtype_from_name
from vqim.engine.models import VQIMModel, init_weights
from vqim.engine.weights import TOKENIZER_NAME, save_pretrained

from .checkpoint import blame, read_checkpoint


def model_from_checkpoint(checkpoint: str | Path) -> tuple[VQIMModel, dict]:
    """The engine model (fp32, eval mode) held by a training checkpoint, and the checkpoint."""
    p = Path(checkpoint)
    ckpt = read_checkpoint(p, "checkpoint")
    with blame("checkpoint", p):
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        model = VQIMModel(cfg)
        if ckpt["stage"] in ("stage2", "scorer", "superres"):  # the whole model
            model.load_state_dict(ckpt["model"])
        else:
            init_weights(model, int(ckpt["train_config"]["seed"]))
            model.vqgan.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def export(checkpoint: str | Path, out_dir: str | Path, *, text_tokenizer: str | Path | None = None,
           dtype: str | None = None, generation: dict | None = None) -> Path:
    """Write ``out_dir`` for the engine. ``text_tokenizer`` defaults to the run's sentencepiece
    model (``train_config.text_tokenizer``, else ``init_from``'s ``tokenizer.model``); ``dtype`` to the model config's dtype;
    ``generation`` (any :class:`~vqim.kernels.SamplingParams` settings) becomes the directory's
    ``generation.json``, the settings ``Engine.generate`` uses when the caller gives none."""
    model, ckpt = model_from_checkpoint(checkpoint)
    tok = text_tokenizer or ckpt["train_config"].get("text_tokenizer")
    init_from = ckpt["train_config"].get("init_from")
    if tok is None and isinstance(init_from, str) and (Path(init_from) / TOKENIZER_NAME).is_file():
        tok = Path(init_from) / TOKENIZER_NAME  # a run that joined a model directory: its tokenizer
    if tok is not None and not isinstance(tok, str | Path):
        raise ValueError(f"checkpoint: {checkpoint}: train_config.text_tokenizer must be a path, got {tok!r}")
    if tok is not None and not Path(tok).is_file():
        raise ValueError(f"text_tokenizer: no such file {tok}")
    if model.cfg.text is not None and tok is None:
        print("vqim train export: no sentencepiece model given; the engine will use its byte-level tokenizer",
              flush=True)
    model = model.to(dtype_from_name(dtype or model.cfg.dtype))
    return save_pretrained(model, out_dir, tokenizer_model=tok, generation=generation)
