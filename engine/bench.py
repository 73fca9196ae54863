"""End-to-end generation benchmark, shared by ``vqim bench`` and ``benchmarks/bench_generate.py``.

For an engine (a preset's random weights or a model directory) and a batch size (images; with
CFG the decoder runs twice as many rows) it measures the decode step (decoder step +
``cfg_sample``) at a fixed mid-grid position in three modes: ``eager`` (our kernels,
Python-launched), ``graph`` (the step :meth:`Generator.capture` records, replayed; CUDA only)
and ``torch`` (eager with every vqim op on its plain-PyTorch reference: the peer); and one whole
image (``generate_codes`` + ``decode_codes``) per batch, divided by the batch. The roofline of
a step is ``(decoder weight bytes + K/V bytes the step reads) / HBM bandwidth`` (DESIGN §6).
Each mode runs on its own :class:`Engine` over the caller's model (graphs on or off), so the
caller's engine is left as it was.
"""

from __future__ import annotations

import torch

from vqim import kernels as K

from .api import Engine
from .generate import Rows, condition
from .quantize import decoder_step_weight_bytes
from .timing import H100_HBM_BYTES_PER_S, timeit


def step_bytes(engine: Engine, rows: int, pos: int, text_len: int) -> int:
    """HBM bytes one decode step must read: decoder weights (:func:`decoder_step_weight_bytes`:
    int8 where quantized) + the self-attention K/V its queries see + the cross-attention K/V."""
    dec = engine.model.decoder
    cfg = dec.cfg
    weight = decoder_step_weight_bytes(dec)
    elt = dec.tok_embed.weight.element_size()
    per_key = rows * cfg.width * 2 * elt  # K and V of one position, all heads, all rows
    conv_keys = int(K.conv_mask_ref((cfg.grid_h, cfg.grid_w), cfg.conv_kernel, cfg.prefix, seq_len=pos + 1)[pos].sum())
    kv = 0
    for layer in range(cfg.layers):
        kv += per_key * (conv_keys if cfg.uses_conv(layer) else pos + 1)
        if cfg.cross_attention:
            kv += per_key * text_len
    return weight + kv


def bench_engine(engine: Engine, batch: int, *, cfg_scale: float = K.SamplingParams.cfg_scale, step_iters: int = 20,
                 image_iters: int = 2, modes: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of the table for one engine and batch size, one per mode (default: torch, eager and
    graph on CUDA, eager elsewhere)."""
    engine.cfg.require_decoder("vqim bench")
    dev = engine.device
    dec = engine.model.decoder
    cfg = dec.cfg
    guided = engine.cfg.is_text_to_image or cfg.num_classes > 0
    rows = 2 * batch if guided else batch
    if modes is None:
        modes = ("torch", "eager", "graph") if dev.type == "cuda" else ("eager",)
    prompts = ["a red circle on a blue square"] * batch if engine.cfg.is_text_to_image else None
    class_ids = [1] * batch if (not engine.cfg.is_text_to_image and cfg.num_classes > 0) else None
    with torch.no_grad():
        pad = engine.cfg.text.max_len if prompts and dev.type == "cuda" else None  # the engine's padding
        cond = condition(engine.model, engine.tokenizer, prompts or class_ids or [dec.null_prefix] * batch,
                         guided=guided, pad_to=pad)
        text_len = 0 if cond.memory is None else cond.memory.shape[1]
        # The other settings at SamplingParams' defaults.
        sampling = dict(cfg_scale=cfg_scale, seed=torch.arange(batch, device=dev), validate=False)
        pos_int = cfg.prefix + cfg.num_tokens // 2  # mid-grid: a full conv window
        pos = torch.full((rows,), pos_int, dtype=torch.long, device=dev)  # (R,)
        tok = torch.zeros(rows, dtype=torch.long, device=dev)
        nbytes = step_bytes(engine, rows, pos_int, text_len)
        out = []
        for mode in modes:
            with K.use_backend("torch" if mode == "torch" else None):
                t_step, t_img = _time_mode(_with_graphs(engine, mode), mode, rows, batch, guided, cond,
                                           sampling, tok, pos, prompts, class_ids, cfg_scale, step_iters, image_iters)
            roof_ms = nbytes / H100_HBM_BYTES_PER_S * 1e3
            out.append({
                "preset": engine.cfg.name, "dtype": str(dec.tok_embed.weight.dtype).replace("torch.", ""),
                "batch": batch, "rows": rows, "mode": mode,
                "step_ms": t_step["ms"], "step_p20": t_step["p20"], "step_p80": t_step["p80"],
                "tok_per_s": batch / t_step["ms"] * 1e3,
                "GB_per_s": nbytes / (t_step["ms"] * 1e-3) / 1e9,
                "roofline_ms": roof_ms, "roofline_share": roof_ms / t_step["ms"],
                "image_ms": t_img["ms"] / batch, "image_p20": t_img["p20"] / batch,
                "image_p80": t_img["p80"] / batch,
            })
    base = next((r["step_ms"] for r in out if r["mode"] == "torch"), None)
    for r in out:
        r["x_torch"] = base / r["step_ms"] if base else float("nan")
    return out


def _with_graphs(engine: Engine, mode: str) -> Engine:
    """``engine``'s model and settings for ``mode`` (CUDA graphs on for ``graph``): timing a mode
    never changes the engine the caller passed (nor its cached graphs). The ``torch`` peer runs
    each call on the caller's thread (no decode-loop thread), where ``use_backend`` applies."""
    return Engine(engine.model, engine.tokenizer, device=engine.device, max_batch_size=engine.max_batch_size,
                  use_cuda_graph=mode == "graph", kv_cache="ring" if engine.generator.ring_cache else "plain",
                  generation=engine.generation, compile=engine.generator.compiled, quantize=engine.quantize,
                  continuous_batching=mode != "torch")


def _time_mode(engine, mode, rows, batch, guided, cond: Rows, sampling, tok, pos, prompts, class_ids, cfg_scale,
               step_iters, image_iters):
    dec = engine.model.decoder
    dev = engine.device
    if mode == "graph":
        # The step the engine's own decode loop replays (and later reuses for the images).
        captured = engine.generator.capture(rows, cond.memory, cond.memory_mask)
        state = captured.state
        run = lambda: captured(tok, pos)  # noqa: E731
    else:
        state = dec.new_state(rows, cond.memory, cond.memory_mask, ring=engine.generator.ring_cache)
        decode = engine.generator.step
        run = lambda: decode(state, tok, pos)  # noqa: E731
    dec.prefill(state, cond.prefix)

    def step():
        logits = run()
        uncond = logits[batch:] if guided else None
        return K.cfg_sample(logits[:batch], uncond, step=7, **sampling)

    def image():
        codes = engine.generate_codes(prompts, 1, cfg_scale=cfg_scale, seed=0, class_ids=class_ids)
        engine.decode_codes(codes, output_type="pt")

    return timeit(step, device=dev, warmup=3, iters=step_iters), timeit(image, device=dev, warmup=1, iters=image_iters)


COLUMNS = ["preset", "dtype", "batch", "rows", "mode", "step_ms", "step_p20", "step_p80", "tok_per_s", "GB_per_s",
           "roofline_ms", "roofline_share", "x_torch", "image_ms", "image_p20", "image_p80"]
