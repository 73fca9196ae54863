"""Public weights into vqim model directories: ``vqim convert janus`` and ``vqim convert llamagen``.

* **Janus-Pro**, from the Hugging Face ``transformers`` format (``config.json`` of
  ``model_type: janus``, ``*.safetensors``, ``tokenizer.json``): the language model, the image
  generation embedding, aligner and head, and the VQ tokenizer. The understanding half (the
  SigLIP vision tower, its aligner, the text head) is not used to draw images and is left out.
* **LlamaGen** class-conditional, from its release checkpoints (``c2i_X.pt`` and
  ``vq_ds16_c2i.pt``: PyTorch pickles, read with ``weights_only=True`` only, so no code in them
  runs): the GPT (its size read off the tensors, one of B, L, XL, XXL, 3B) and the VQ-16.

Every source name is mapped to a vqim name (or named as a part the engine does not use); a name
neither mapped nor known, a vqim tensor no source provides, and a shape that is not the config's
are each an error naming the first such key, found from the headers and shapes before any model
is built. The output directory is written the way ``save_pretrained`` writes one (atomically,
with ``generation.json``: the reference's sampling settings).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from .config import MAX_TEXT_LEN, CNNVQConfig, LlamaDecoderConfig, ModelConfig, PromptConfig, dtype_name
from .weights import (HF_TOKENIZER_NAME, MAX_TOKENIZER_BYTES, build_model, expected_tensors, open_regular, parse_json,
                      read_json, read_regular_file, read_safetensors_header, safetensors_files, save_pretrained)

# ``(shape, read)`` of one source tensor: its shape, and a function that reads it.
Source = tuple[tuple[int, ...], Callable[[], torch.Tensor]]


# ----------------------------------------------------------------------------- the VQ tokenizer

def _vq_key(rest: str, *, levels: str) -> str | None:
    """A VQ tensor's vqim name from the reference's (after its model prefix); ``levels`` is the
    name of the per-resolution lists: ``"down|up"`` (transformers) or ``"conv_blocks"`` (LlamaGen)."""
    rules = [
        (r"^quantize\.embedding\.weight$", "codebook"),
        (r"^(quant_conv|post_quant_conv)\.(weight|bias)$", r"\1.\2"),
        (rf"^(encoder|decoder)\.(?:{levels})\.(\d+)\.(?:block|res)\.(\d+)\.nin_shortcut\.", r"\1.LEVELS.\2.block.\3.shortcut."),
        (rf"^(encoder|decoder)\.(?:{levels})\.(\d+)\.(?:block|res)\.(\d+)\.", r"\1.LEVELS.\2.block.\3."),
        (rf"^(encoder|decoder)\.(?:{levels})\.(\d+)\.attn\.(\d+)\.", r"\1.LEVELS.\2.attn.\3."),
        (rf"^(encoder|decoder)\.(?:{levels})\.(\d+)\.(?:downsample|upsample)\.conv\.", r"\1.LEVELS.\2.resample.conv."),
        (r"^(encoder|decoder)\.mid\.(?:block_1|0)\.nin_shortcut\.", r"\1.mid.block_1.shortcut."),
        (r"^(encoder|decoder)\.mid\.(?:block_1|0)\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid\.(?:attn_1|1)\.", r"\1.mid.attn."),
        (r"^(encoder|decoder)\.mid\.(?:block_2|2)\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.", r"\1.\2."),
    ]
    for pattern, repl in rules:
        if re.match(pattern, rest):
            out = re.sub(pattern, repl, rest)
            return "vqgan." + out.replace("encoder.LEVELS", "encoder.down").replace("decoder.LEVELS", "decoder.up")
    return None


# ----------------------------------------------------------------------------- checks and writing

def _check_and_write(cfg: ModelConfig, sources: dict[str, Source], name_of: Callable[[str], list | None],
                     out: str | Path, *, generation: dict, tokenizer_json: bytes | None = None) -> Path:
    """Map every source tensor (``name_of(name)``: ``[(vqim name, row slice or None)]``, ``[]`` for a
    part the engine does not use, ``None`` for an unknown name), check names and shapes against
    ``cfg``, then build the model from the tensors and write it to ``out``."""
    want = expected_tensors(cfg)
    plan: dict[str, tuple[str, slice | None]] = {}
    for src in sources:
        targets = name_of(src)
        if targets is None:
            raise ValueError(f"unexpected tensor {src!r}: not a part of a {cfg.name} checkpoint this converter knows")
        for dst, rows in targets:
            shape = sources[src][0]
            if rows is not None:
                shape = (rows.stop - rows.start, *shape[1:])
            if dst not in want:
                raise ValueError(f"tensor {src!r} maps to {dst!r}, which a {cfg.name} model does not have")
            if tuple(shape) != want[dst][0]:
                raise ValueError(f"tensor {src!r} has shape {tuple(sources[src][0])}; {dst!r} of the {cfg.name} "
                                 f"config needs {want[dst][0]}")
            plan[dst] = (src, rows)
    missing = sorted(set(want) - set(plan))
    if missing:
        raise ValueError(f"missing tensor(s) for {len(missing)} of {len(want)} {cfg.name} weights, first {missing[:3]}")
    dtype = want[next(iter(want))][1]
    cache: dict[str, torch.Tensor] = {}
    state = {}
    for dst, (src, rows) in plan.items():
        if src not in cache:
            cache[src] = sources[src][1]()
        t = cache[src] if rows is None else cache[src][rows]
        state[dst] = t.to(dtype).contiguous()
    model = build_model(cfg, "meta")
    model.load_state_dict(state, strict=True, assign=True)
    return save_pretrained(model, out, generation=generation, tokenizer_json=tokenizer_json)


def _dtype_of(sources: dict[str, Source], name: str) -> str:
    """The dtype (a config name) of source tensor ``name``: the converted model keeps it."""
    return dtype_name(sources[name][1]().dtype)


# ----------------------------------------------------------------------------- Janus-Pro

# Parts of a transformers Janus checkpoint that image generation does not use.
_JANUS_UNUSED = (r"^model\.vision_model\.", r"^model\.aligner\.", r"^lm_head\.weight$",
                 r"^model\.vqmodel\.quantize\.codebook_used$")
_JANUS_LM = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
             "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3",
             "mlp.down_proj": "mlp.w2", "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}


def _janus_name(name: str) -> list | None:
    if any(re.match(p, name) for p in _JANUS_UNUSED):
        return []
    m = re.match(r"^model\.language_model\.layers\.(\d+)\.(.+)\.weight$", name)
    if m and m.group(2) in _JANUS_LM:
        return [(f"decoder.blocks.{m.group(1)}.{_JANUS_LM[m.group(2)]}.weight", None)]
    fixed = {"model.language_model.embed_tokens.weight": "decoder.text_embed.weight",
             "model.language_model.norm.weight": "decoder.norm.weight",
             "model.generation_embeddings.weight": "decoder.gen_embed.weight"}
    if name in fixed:
        return [(fixed[name], None)]
    m = re.match(r"^model\.generation_aligner\.(fc1|hidden_layers\.(\d+))\.(weight|bias)$", name)
    if m:
        i = 0 if m.group(1) == "fc1" else int(m.group(2)) + 1
        return [(f"decoder.aligner.{i}.{m.group(3)}", None)]
    m = re.match(r"^model\.generation_head\.(proj_out|vision_head)\.(weight|bias)$", name)
    if m:
        return [(f"decoder.{'head_proj' if m.group(1) == 'proj_out' else 'head'}.{m.group(2)}", None)]
    if name.startswith("model.vqmodel."):
        dst = _vq_key(name[len("model.vqmodel."):], levels="down|up")
        return None if dst is None else [(dst, None)]
    return None


def _config_int(d: dict, key: str, where: str, lo: int = 1) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{where}: {key} must be an int >= {lo}, got {v!r}")
    return v


def _special_id(tokenizer_json: bytes, token: str, where: str) -> int:
    """The id of ``token`` among a tokenizer.json's added tokens (or its vocabulary)."""
    data = parse_json(tokenizer_json, where)
    for t in data.get("added_tokens", []) if isinstance(data, dict) else []:
        if isinstance(t, dict) and t.get("content") == token and isinstance(t.get("id"), int):
            return t["id"]
    vocab = data.get("model", {}).get("vocab") if isinstance(data, dict) else None
    if isinstance(vocab, dict) and isinstance(vocab.get(token), int):
        return vocab[token]
    raise ValueError(f"{where}: no {token!r} token (Janus marks where an image begins with it)")


def janus_config(hf_dir: str | Path, *, max_prompt_len: int = 128, dtype: str | None = None) -> ModelConfig:
    """The vqim config of a transformers Janus directory (checked field by field)."""
    path = Path(hf_dir) / "config.json"
    d = read_json(path)
    if not isinstance(d, dict) or d.get("model_type") != "janus":
        raise ValueError(f"{path}: not a transformers Janus config (model_type must be 'janus', got "
                         f"{d.get('model_type') if isinstance(d, dict) else type(d).__name__!r})")
    text, vq = d.get("text_config"), d.get("vq_config")
    if not isinstance(text, dict) or not isinstance(vq, dict):
        raise ValueError(f"{path}: text_config and vq_config must be JSON objects")
    width = _config_int(text, "hidden_size", f"{path} text_config")
    heads = _config_int(text, "num_attention_heads", f"{path} text_config")
    # What DeepSeek's language model is; a checkpoint that differs in any of these is another model.
    plain = {"attention_bias": False, "mlp_bias": False, "rope_scaling": None, "hidden_act": "silu",
             "head_dim": width // heads}
    for key, want in plain.items():
        if text.get(key) is not None and text[key] != want:
            raise ValueError(f"{path}: text_config.{key} = {text[key]!r} is not supported (the Janus language model "
                             f"this converter knows has {want!r})")
    rope = text.get("rope_parameters") or {}
    theta = text.get("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0)
    mult = vq.get("channel_multiplier", [1, 1, 2, 2, 4])
    patches = _config_int(vq, "num_patches", f"{path} vq_config")
    projection = _config_int(vq, "projection_dim", f"{path} vq_config")
    if projection != width:
        raise ValueError(f"{path}: vq_config.projection_dim {projection} must equal text_config.hidden_size {width} "
                         "(the aligner's output is the language model's input)")
    tok = read_regular_file(Path(hf_dir) / HF_TOKENIZER_NAME, MAX_TOKENIZER_BYTES)
    prompt_vocab = _config_int(text, "vocab_size", f"{path} text_config")
    prompt = PromptConfig(vocab_size=prompt_vocab, max_len=max_prompt_len,
                          pad_id=_config_int(text, "pad_token_id", f"{path} text_config", 0),
                          bos_id=_config_int(text, "bos_token_id", f"{path} text_config", 0),
                          boi_id=_special_id(tok, "<begin_of_image>", str(Path(hf_dir) / HF_TOKENIZER_NAME)))
    if not isinstance(mult, list):
        raise ValueError(f"{path}: vq_config.channel_multiplier must be a list of ints, got {mult!r}")
    vqgan = CNNVQConfig(image_size=patches * 2 ** (len(mult) - 1),
                        base_channels=_config_int(vq, "base_channels", f"{path} vq_config"),
                        channel_mult=tuple(mult), num_res_blocks=_config_int(vq, "num_res_blocks", f"{path} vq_config"),
                        z_channels=_config_int(vq, "latent_channels", f"{path} vq_config"),
                        codebook_size=_config_int(vq, "num_embeddings", f"{path} vq_config"),
                        code_dim=_config_int(vq, "embed_dim", f"{path} vq_config"))
    decoder = LlamaDecoderConfig(
        vocab_size=vqgan.codebook_size, grid_h=patches, grid_w=patches, width=width,
        layers=_config_int(text, "num_hidden_layers", f"{path} text_config"), heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        mlp_dim=_config_int(text, "intermediate_size", f"{path} text_config"),
        norm_eps=text.get("rms_norm_eps", 1e-6), rope="1d", rope_theta=theta, prompt_vocab=prompt_vocab,
        max_prompt_len=max_prompt_len, image_embed="aligned", embed_dim=vqgan.code_dim,
        aligner_layers=_config_int(vq, "num_hidden_layers", f"{path} vq_config"), head="mlp",
        head_dim_mlp=projection)
    return ModelConfig(name=Path(hf_dir).resolve().name, vqgan=vqgan, decoder=decoder, prompt=prompt,
                       dtype=dtype or "float32")


def convert_janus(hf_dir: str | Path, out: str | Path, *, max_prompt_len: int = 128) -> Path:
    """``vqim convert janus HF_DIR OUT``: a transformers Janus(-Pro) directory as a vqim model."""
    hf_dir = Path(hf_dir)
    if isinstance(max_prompt_len, bool) or not isinstance(max_prompt_len, int) or not 2 <= max_prompt_len <= MAX_TEXT_LEN:
        raise ValueError(f"--max-prompt-len must be an int in [2, {MAX_TEXT_LEN}] (the prompt's positions, chat "
                         f"template included), got {max_prompt_len!r}")
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory (a transformers Janus model: config.json, *.safetensors, "
                                f"{HF_TOKENIZER_NAME})")
    sources: dict[str, Source] = {}
    for f in safetensors_files(hf_dir):
        for name, (_, shape) in read_safetensors_header(f).items():
            if name in sources:
                raise ValueError(f"tensor {name!r} appears in more than one safetensors file of {hf_dir}")
            sources[name] = (shape, lambda f=f, name=name: _read_safetensors(f, name))
    key = "model.language_model.norm.weight"
    if key not in sources:
        raise ValueError(f"{hf_dir}: no {key!r}: not a transformers Janus checkpoint")
    cfg = janus_config(hf_dir, max_prompt_len=max_prompt_len, dtype=_dtype_of(sources, key))
    tok = read_regular_file(hf_dir / HF_TOKENIZER_NAME, MAX_TOKENIZER_BYTES)
    # Janus-Pro's reference text-to-image settings: guidance 5, temperature 1.
    return _check_and_write(cfg, sources, _janus_name, out, generation={"cfg_scale": 5.0, "temperature": 1.0},
                            tokenizer_json=tok)


def _read_safetensors(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


# ----------------------------------------------------------------------------- LlamaGen

# LlamaGen's class-conditional GPTs by (width, layers): heads (its GPT_models table's shapes).
LLAMAGEN_SHAPES = {(768, 12): ("b", 12), (1024, 24): ("l", 16), (1280, 36): ("xl", 20), (1536, 48): ("xxl", 24),
                   (3200, 24): ("3b", 32)}
_LLAMAGEN_BLOCK = {"attention.wo": "attn.wo", "feed_forward.w1": "mlp.w1", "feed_forward.w2": "mlp.w2",
                   "feed_forward.w3": "mlp.w3", "attention_norm": "attn_norm", "ffn_norm": "mlp_norm"}


def _torch_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A release checkpoint's state dict: ``torch.load(weights_only=True)`` (plain tensors and
    containers only: no code in the file runs), under ``model``/``module``/``state_dict`` or bare."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p}: no such file")
    open_regular(p).close()  # a directory, FIFO or device is named here, not hung on
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (a pickle torch refuses, a zip that is not one, ...: all the file's fault)
        raise ValueError(f"{what} {p}: not a checkpoint torch.load(weights_only=True) can read ({e})") from e
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in ckpt.items()):
        raise ValueError(f"{what} {p}: expected a state dict of tensors (under 'model', 'module' or 'state_dict', or "
                         "bare)")
    return ckpt


def llamagen_config(gpt: dict[str, torch.Tensor], vq: dict[str, torch.Tensor], size: int) -> ModelConfig:
    """The vqim config of a LlamaGen c2i GPT and its VQ-16, at ``size`` pixels (256 or 384)."""
    if size not in (256, 384):
        raise ValueError(f"--size must be 256 or 384 (the resolutions LlamaGen's c2i models are released at), got {size}")
    for key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight"):
        if key not in gpt:
            raise ValueError(f"--gpt: no {key!r}: not a LlamaGen class-conditional GPT checkpoint")
    vocab, width = gpt["tok_embeddings.weight"].shape
    layers = len({k.split(".")[1] for k in gpt if k.startswith("layers.")})
    if (width, layers) not in LLAMAGEN_SHAPES:
        raise ValueError(f"--gpt: width {width} and {layers} layers are none of LlamaGen's c2i models "
                         f"({sorted(LLAMAGEN_SHAPES)})")
    kind, heads = LLAMAGEN_SHAPES[(width, layers)]
    if "quantize.embedding.weight" not in vq:
        raise ValueError("--vq: no 'quantize.embedding.weight': not a LlamaGen VQ checkpoint")
    codes, code_dim = vq["quantize.embedding.weight"].shape
    # The VQ's shape from its tensors: base channels, each level's multiple, blocks per level.
    levels = sorted({int(k.split(".")[2]) for k in vq if k.startswith("encoder.conv_blocks.")})
    for key in ("encoder.conv_in.weight", "quant_conv.weight", "encoder.conv_blocks.0.res.0.conv1.weight"):
        if key not in vq:
            raise ValueError(f"--vq: no {key!r}: not a LlamaGen VQ checkpoint")
    base = vq["encoder.conv_in.weight"].shape[0]
    mult = tuple(vq[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // base for i in levels)
    blocks = len({k.split(".")[4] for k in vq if k.startswith("encoder.conv_blocks.0.res.")})
    vqgan = CNNVQConfig(image_size=size, base_channels=base, channel_mult=mult, num_res_blocks=blocks,
                        z_channels=vq["quant_conv.weight"].shape[1], codebook_size=codes, code_dim=code_dim)
    grid = vqgan.grid
    return ModelConfig(
        name=f"llamagen-c2i-{kind}-{size}",
        vqgan=vqgan,
        decoder=LlamaDecoderConfig(vocab_size=vocab, grid_h=grid, grid_w=grid, width=width, layers=layers, heads=heads,
                                   kv_heads=heads, mlp_dim=gpt["layers.0.feed_forward.w1.weight"].shape[0],
                                   norm_eps=1e-5, rope="2d",
                                   num_classes=gpt["cls_embedding.embedding_table.weight"].shape[0] - 1),
        dtype=dtype_name(gpt["tok_embeddings.weight"].dtype))


def _llamagen_name(cfg: LlamaDecoderConfig) -> Callable[[str], list | None]:
    kv = cfg.kv_heads * cfg.head_dim

    def name_of(name: str) -> list | None:
        if name.startswith("vq."):
            rest = name[3:]
            if rest == "quantize.codebook_used":
                return []
            dst = _vq_key(rest, levels="conv_blocks")
            return None if dst is None else [(dst, None)]
        name = name[4:]  # "gpt."
        m = re.match(r"^layers\.(\d+)\.(.+)\.weight$", name)
        if m and m.group(2) == "attention.wqkv":
            b = f"decoder.blocks.{m.group(1)}.attn"
            w = cfg.width
            return [(f"{b}.wq.weight", slice(0, w)), (f"{b}.wk.weight", slice(w, w + kv)),
                    (f"{b}.wv.weight", slice(w + kv, w + 2 * kv))]
        if m and m.group(2) in _LLAMAGEN_BLOCK:
            return [(f"decoder.blocks.{m.group(1)}.{_LLAMAGEN_BLOCK[m.group(2)]}.weight", None)]
        fixed = {"tok_embeddings.weight": "decoder.tok_embed.weight",
                 "cls_embedding.embedding_table.weight": "decoder.class_embed.weight",
                 "norm.weight": "decoder.norm.weight", "output.weight": "decoder.head.weight"}
        return [(fixed[name], None)] if name in fixed else ([] if name == "freqs_cis" else None)

    return name_of


def convert_llamagen(gpt_path: str | Path, vq_path: str | Path, size: int, out: str | Path) -> Path:
    """``vqim convert llamagen --gpt c2i_X.pt --vq vq_ds16_c2i.pt --size 256|384 OUT``."""
    gpt = _torch_state(gpt_path, "--gpt")
    vq = _torch_state(vq_path, "--vq")
    cfg = llamagen_config(gpt, vq, size)
    sources: dict[str, Source] = {f"gpt.{k}": (tuple(v.shape), lambda v=v: v) for k, v in gpt.items()}
    sources.update({f"vq.{k}": (tuple(v.shape), lambda v=v: v) for k, v in vq.items()})
    # LlamaGen's sampling defaults (sample_c2i.py): guidance 4, top-k 2000, temperature 1.
    return _check_and_write(cfg, sources, _llamagen_name(cfg.decoder), out,
                            generation={"cfg_scale": 4.0, "top_k": 2000, "temperature": 1.0})
