"""End-to-end generation benchmark, shared by ``vqim bench`` and ``benchmarks/bench_generate.py``.

For an engine (a preset's random weights or a model directory) and a batch size (images; with
CFG the decoder runs twice as many rows) it measures the decode loop's step (decode step +
``cfg_sample`` + recording the tokens: the runner's raster step, the unit the engine's loop
runs every step) at a mid-grid position in three modes: ``eager`` (our kernels,
Python-launched), ``graph`` (the same unit captured in a CUDA graph and replayed, as the engine's
loop does; CUDA only) and ``torch`` (eager with every vqim op on its plain-PyTorch reference: the
peer); and one whole image (``generate_codes`` + ``decode_codes``) per batch, divided by the
batch. The roofline of a step is ``(decoder weight bytes + K/V bytes the step reads) / HBM
bandwidth`` (DESIGN §6). Each mode runs on its own :class:`Engine` over the caller's model
(graphs on or off, its kernel backend), so the caller's engine is left as it was.
"""

from __future__ import annotations

import torch

from vqim import kernels as K

from ..api import Engine
from ..quantize import decoder_step_weight_bytes
from ..requests import condition
from ..runner import ModelRunner, Slot
from .timing import H100_HBM_BYTES_PER_S, timeit


def step_bytes(engine: Engine, pos: torch.Tensor, text_len: int) -> int:
    """HBM bytes one decode step must read: decoder weights (:func:`decoder_step_weight_bytes`:
    int8 where quantized) + the self-attention K/V each row's query sees (``pos [rows]``: each
    row's query position; a conv-masked layer reads its window, a causal one every earlier
    position; grouped-query attention's K/V heads only) + the cross-attention K/V."""
    dec = engine.model.decoder
    cfg = dec.cfg
    weight = decoder_step_weight_bytes(dec)
    elt = torch.empty((), dtype=dec.dtype).element_size()
    per_key = getattr(cfg, "kv_heads", cfg.heads) * cfg.head_dim * 2 * elt  # K and V of one position, one row
    kv = 0
    for p in pos.tolist():
        conv_keys = 0
        if any(cfg.uses_conv(layer) for layer in range(cfg.layers)):
            grid = (cfg.grid_h, cfg.grid_w)
            conv_keys = int(K.conv_mask_ref(grid, cfg.conv_kernel, cfg.prefix, seq_len=p + 1)[p].sum())
        for layer in range(cfg.layers):
            kv += per_key * (conv_keys if cfg.uses_conv(layer) else p + 1)
            if cfg.cross_attention:
                kv += cfg.width * 2 * elt * text_len
    return weight + kv


def prepared_runner(engine: Engine, batch: int, *, cfg_scale: float, step: int,
                    use_cuda_graph: bool) -> tuple[ModelRunner, int]:
    """A :class:`ModelRunner` over ``engine``'s decoder holding ``batch`` images (two rows each
    when guided; text padded to ``max_len`` as the engine's loop pads it), prefilled, every image
    about to draw token ``step``; returns it and its row count. Its :meth:`ModelRunner.raster_step`
    is the engine's step; ``decoder.decode_step(runner.view(rows), runner.feed[:rows],
    runner.pos[:rows])`` the bare decode step over the same rows."""
    cfg = engine.cfg
    dec = engine.model.decoder
    guided = cfg.is_text_to_image or dec.cfg.num_classes > 0
    rows = 2 * batch if guided else batch
    if cfg.is_text_to_image:
        conds = ["a red circle on a blue square"] * batch + ([""] * batch if guided else [])
    else:
        conds = [1 if dec.cfg.num_classes else dec.null_prefix] * batch + ([dec.null_prefix] * batch if guided else [])
    text = None if cfg.text is None else (cfg.text.max_len, cfg.text.width)
    runner = ModelRunner(dec, max_rows=rows, device=engine.device, text=text, ring=engine.kv_cache == "ring",
                         compile=engine.compiled, use_cuda_graph=use_cuda_graph)
    with torch.no_grad():
        pad = cfg.text.max_len if cfg.text is not None else (cfg.prompt.max_len if cfg.prompt is not None else None)
        runner.prefill(list(range(rows)), *condition(engine.model, engine.tokenizer, conds, pad_to=pad))
    params = K.SamplingParams(cfg_scale=cfg_scale)
    slots = [Slot(i, i + batch if guided else i, i, step, params) for i in range(batch)]
    runner.set_slots(slots, list(range(rows)))
    runner.pos[:rows] = runner.prefix_len[:rows] + step - 1
    return runner, rows


def bench_engine(engine: Engine, batch: int, *, cfg_scale: float = K.SamplingParams.cfg_scale, step_iters: int = 20,
                 image_iters: int = 2, modes: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of the table for one engine and batch size, one per mode (default: torch, eager and
    graph on CUDA, eager elsewhere)."""
    engine.cfg.require_decoder("vqim bench")
    dev = engine.device
    dec = engine.model.decoder
    cfg = dec.cfg
    if modes is None:
        modes = ("torch", "eager", "graph") if dev.type == "cuda" else ("eager",)
    prompts = ["a red circle on a blue square"] * batch if engine.cfg.is_text_to_image else None
    class_ids = [1] * batch if (not engine.cfg.is_text_to_image and cfg.num_classes > 0) else None
    text_len = 0 if engine.cfg.text is None else engine.cfg.text.max_len
    # Mid-grid (a full conv window), with room for the warm-up and the timed steps after it.
    step = max(1, min(cfg.num_tokens // 2, cfg.num_tokens - step_iters - 4))
    out = []
    for mode in modes:
        eng = _engine_for(engine, mode)
        with K.use_backend(eng.backend):
            runner, rows = prepared_runner(eng, batch, cfg_scale=cfg_scale, step=step,
                                           use_cuda_graph=mode == "graph")
            nbytes = step_bytes(engine, runner.pos[:rows], text_len)
            t_step = timeit(lambda: runner.raster_step(rows), device=dev, warmup=3, iters=step_iters)

        def image():
            codes = eng.generate_codes(prompts, 1, cfg_scale=cfg_scale, seed=0, class_ids=class_ids)
            eng.decode_codes(codes, output_type="pt")

        t_img = timeit(image, device=dev, warmup=1, iters=image_iters)
        eng.close()
        roof_ms = nbytes / H100_HBM_BYTES_PER_S * 1e3
        out.append({
            "preset": engine.cfg.name, "dtype": str(dec.dtype).replace("torch.", ""),
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


def _engine_for(engine: Engine, mode: str) -> Engine:
    """``engine``'s model and settings for ``mode`` (CUDA graphs on for ``graph``; every kernel on
    its torch reference for ``torch``): timing a mode never changes the engine the caller passed."""
    return Engine(engine.model, engine.tokenizer, device=engine.device, max_batch_size=engine.max_batch_size,
                  use_cuda_graph=mode == "graph", kv_cache=engine.kv_cache, generation=engine.generation,
                  compile=engine.compiled, quantize=engine.quantize, backend="torch" if mode == "torch" else None)


COLUMNS = ["preset", "dtype", "batch", "rows", "mode", "step_ms", "step_p20", "step_p80", "tok_per_s", "GB_per_s",
           "roofline_ms", "roofline_share", "x_torch", "image_ms", "image_p20", "image_p80"]
