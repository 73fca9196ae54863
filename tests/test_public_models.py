"""The public-model converters (``vqim convert janus`` / ``vqim convert llamagen``) against the
reference implementation in ``transformers`` (a test dependency, installed from the registry).

Janus: a tiny ``JanusForConditionalGeneration`` with random weights is saved the way the Hub's
Janus-Pro checkpoints are (``config.json``, ``model.safetensors``, ``tokenizer.json``) and
converted; then, against transformers itself: the VQ decoder's pixels, the encoder's latents,
the conditional and unconditional logits of prompt + image tokens, greedy guided generation
(``generate(generation_mode="image")``, token for token), the guided sampled tokens (each
vqim token equal to ``cfg_sample_ref`` over transformers' logits at that step) and the prompt's
ids (``JanusProcessor`` with Janus-Pro's chat template).

Code assignment differs on purpose: transformers' Janus quantizer takes the nearest
*unnormalized* codebook row, while DeepSeek's Janus and LlamaGen (``codebook_l2_norm=True``) take
the nearest after l2-normalizing both, and decode normalized rows (as transformers also does).
vqim follows the originals, so codes are checked as the cosine argmax over transformers' latents.

LlamaGen (no registry package): its VQ-16 is the architecture transformers' ``JanusVQVAE``
implements, so a random ``JanusVQVAE`` saved under LlamaGen's key names is the VQ checkpoint and
transformers decodes the reference pixels. Its GPT is a Llama with 2D rotary positions on
interleaved pairs: transformers' ``LlamaModel`` with q/k rows permuted (pairs -> halves) and the
2D cos/sin table (computed here from LlamaGen's definition) injected is the reference. The
release sizes are far too large for a CPU test, so the GPT is tiny (its shape added to the
converter's table for the test) and the release shapes are checked header-only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusImageProcessor,
                          JanusProcessor, JanusVQVAE, JanusVQVAEConfig, LlamaConfig, LlamaModel, LlamaTokenizerFast)

from tests.helpers import assert_close, assert_equal
from vqim import kernels as K
from vqim.engine import Engine, ModelConfig
from vqim.engine import convert as C

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
SPECIALS = [BOS, EOS, PAD, "<image_placeholder>", "<begin_of_image>", "<end_of_image>"]
# The chat template of the Hub's Janus-Pro checkpoints (chat_template.json): configuration data.
CHAT_TEMPLATE = (
    "{%set seps=['\\n\\n','<｜end▁of▁sentence｜>']%}{%set i=0%}{%for message in messages%}"
    "{%if message['role']!='system'%}{%if message['role']=='user'%}<|User|>: {%else%}<|Assistant|>: {%endif%}{%endif%}"
    "{%for content in message['content']%}{%if content['type']=='image'%}{%if not loop.first%}{{'\\n'}}{%endif%}"
    "<image_placeholder>{%if not loop.last%}{{'\\n'}}{%endif%}{%elif content['type']=='text'%}"
    "{%set text=content['text']%}{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}{%endif%}"
    "{%endif%}{%endfor%}{%if not loop.last or add_generation_prompt%}{%if message['role']=='system'%}{{seps[0]}}"
    "{%elif message['role']=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}{%endif%}{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}")
PROMPTS = ["a red circle", "  two blue squares on a wooden table, seen from above "]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that move the outputs visibly (norm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if ("norm" in name and p.dim() == 1 and "bias" not in name) else noise)


def _tokenizer() -> Tokenizer:
    """A byte-level tokenizer with Janus's special tokens (and BOS added like Llama's)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def _vq_config(**kw) -> dict:
    return dict(embed_dim=8, num_embeddings=256, latent_channels=32, base_channels=32, num_res_blocks=1, **kw)


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    """(transformers model, its tokenizer, the vqim engine of its conversion, directories)."""
    root = tmp_path_factory.mktemp("janus")
    tok = _tokenizer()
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    cfg = JanusConfig(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(ids) + 256, rms_norm_eps=1e-6,
                         pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                         max_position_embeddings=512),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8,
                           projection_dim=64, num_image_tokens=64),
        vq_config=_vq_config(channel_multiplier=[1, 1, 2, 2], projection_dim=64, image_token_embed_dim=64,
                             num_hidden_layers=2),
        image_token_id=ids["<image_placeholder>"])
    hf = JanusForConditionalGeneration(cfg).eval()
    _randomize(hf, seed=0)
    src = root / "hf"
    hf.save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    out = C.convert_janus(src, root / "vqim")
    eng = Engine.from_pretrained(out, device="cpu")
    return hf, tok, eng, src, root


def _hf_logits(hf, ids: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits ``[1 + t, V]`` of prompt ``ids`` then image ``tokens [t]`` (position
    ``j`` predicting image token ``j``)."""
    emb = torch.cat([hf.get_input_embeddings()(torch.tensor([ids])),
                     hf.prepare_embeddings_for_image_generation(tokens[None])], dim=1)  # (1, P + t, W)
    h = hf.model.language_model(inputs_embeds=emb).last_hidden_state
    return hf.model.generation_head(h[0, len(ids) - 1:]).float()


@torch.no_grad()
def test_janus_vq_decodes_transformers_pixels(janus):
    hf, _, eng, _, _ = janus
    codes = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(1))
    want = (hf.decode_image_tokens(codes.view(3, -1)).permute(0, 3, 1, 2) + 1) / 2  # (3, 3, 64, 64) in [0, 1]
    got = eng.model.vqgan.decode(codes)
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), msg="VQ decode")
    pil = eng.decode_codes(codes, output_type="pt")
    assert_close(pil, want.clamp(0, 1), atol=1e-5 * want.abs().max().item(), msg="decode_codes")


@torch.no_grad()
def test_janus_vq_encodes_transformers_latents_and_their_cosine_nearest_codes(janus):
    hf, _, eng, _, _ = janus
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    vq = hf.model.vqmodel
    want = vq.quant_conv(vq.encoder(x * 2 - 1)).flatten(2).transpose(1, 2)  # (3, 64, 8)
    got = eng.model.vqgan.encode_latents(x)
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), msg="latents")
    book = torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1)  # (256, 8)
    cos = torch.nn.functional.normalize(want, dim=-1) @ book.T  # (3, 64, 256)
    codes = eng.encode_images(x)  # (3, 8, 8)
    best = cos.max(-1).values
    picked = cos.gather(-1, codes.view(3, 64, 1))[..., 0]
    # The lookup's code is the cosine argmax, up to fp32 ties.
    assert (picked >= best - 1e-5).all()
    assert (codes.view(3, 64) == cos.argmax(-1)).float().mean() > 0.95


def test_janus_prompt_ids_are_the_processors(janus):
    _, tok, eng, _, _ = janus
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                              extra_special_tokens={"image_token": "<image_placeholder>",
                                                    "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"})
    proc = JanusProcessor(JanusImageProcessor(size={"height": 64, "width": 64}), fast, chat_template=CHAT_TEMPLATE)
    for p in PROMPTS + ["émoji 🎨 and\ttabs"]:
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                        add_generation_prompt=True)
        want = proc(text=text, generation_mode="image", return_tensors="pt").input_ids[0].tolist()
        assert eng.tokenizer.ids(p) == want, p


@torch.no_grad()
def test_janus_logits_conditional_and_unconditional_equal_transformers(janus):
    hf, _, eng, _, _ = janus
    dec = eng.model.decoder
    tokens = torch.randint(0, 256, (63,), generator=torch.Generator().manual_seed(3))
    for p in PROMPTS:
        ids = eng.tokenizer.ids(p)
        row = eng.tokenizer.batch([p], torch.device("cpu"))
        null = eng.tokenizer.null_row((row[0][0], row[1][0]))[0][: len(ids)].tolist()
        # transformers' generate builds the unconditional row the same way: all but BOS and BOI padded.
        assert null[0] == ids[0] and null[-1] == ids[-1] and set(null[1:-1]) == {hf.config.text_config.pad_token_id}
        for row_ids in (ids, null):
            want = _hf_logits(hf, row_ids, tokens)  # (64, V)
            got = dec(torch.tensor([row_ids]), tokens[None])[0]
            assert_close(got, want, atol=1e-5 * want.abs().max().item(), msg=p)


@torch.no_grad()
def test_janus_greedy_guided_generation_equals_transformers_generate(janus):
    hf, tok, eng, _, _ = janus
    for p in PROMPTS:
        ids = torch.tensor([eng.tokenizer.ids(p)])
        gc = GenerationConfig(do_sample=False, guidance_scale=5.0, bos_token_id=tok.token_to_id(BOS),
                              pad_token_id=tok.token_to_id(PAD), eos_token_id=tok.token_to_id(EOS),
                              generation_kwargs={"boi_token_id": tok.token_to_id("<begin_of_image>")},
                              max_new_tokens=64)
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=gc)
        got = eng.generate_codes([p], top_k=1, cfg_scale=5.0, seed=0).view(1, -1)
        assert_equal(got, want, msg=p)


@torch.no_grad()
def test_janus_sampled_tokens_are_cfg_sample_over_transformers_logits(janus):
    """Every token vqim draws (guidance 5, temperature 1, top-k 16) is ``cfg_sample_ref`` of
    transformers' conditional and unconditional logits at that step, with the image's seed."""
    hf, _, eng, _, _ = janus
    settings = dict(cfg_scale=5.0, temperature=1.0, top_k=16)
    for p, seed in zip(PROMPTS, (11, 12)):
        got = eng.generate_codes([p], seed=seed, **settings).view(-1)  # (64,)
        ids = eng.tokenizer.ids(p)
        row = eng.tokenizer.batch([p], torch.device("cpu"))
        null = eng.tokenizer.null_row((row[0][0], row[1][0]))[0][: len(ids)].tolist()
        cond, uncond = _hf_logits(hf, ids, got[:-1]), _hf_logits(hf, null, got[:-1])  # (64, V) each
        want = K.cfg_sample_ref(cond, uncond, seed=torch.full((64,), seed), step=torch.arange(64), **settings)
        assert_equal(got, want, msg=p)


def test_janus_conversion_refuses_what_it_does_not_know(janus, tmp_path):
    _, _, _, src, _ = janus
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["attention_bias"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="attention_bias"):
        C.convert_janus(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="max-prompt-len"):
        C.convert_janus(src, tmp_path / "out", max_prompt_len=1)


def test_janus_converted_model_serves_engine_features(janus):
    """What the engine adds runs on the converted model: same seed same image in any batch,
    int8, SJD, save and reload."""
    _, _, eng, _, root = janus
    both = eng.generate_codes(PROMPTS, seed=[5, 6], cfg_scale=5.0)
    assert_equal(both[1], eng.generate_codes([PROMPTS[1]], seed=6, cfg_scale=5.0)[0])
    q8 = Engine.from_pretrained(root / "vqim", device="cpu", quantize="int8")
    assert q8.generate_codes(PROMPTS, seed=5).shape == (2, 8, 8)
    sjd = eng.generate_codes(PROMPTS, seed=[5, 6], decoding="sjd", sjd_window=4)
    assert sjd.shape == (2, 8, 8)
    again = Engine.from_pretrained(eng.save_pretrained(root / "resaved"), device="cpu")
    assert_equal(again.generate_codes(PROMPTS, seed=[5, 6], cfg_scale=5.0), both)


# ----------------------------------------------------------------------------- LlamaGen


def _llamagen_vq_name(hf_name: str) -> str:
    """transformers' JanusVQVAE name -> LlamaGen's VQModel name (the same modules)."""
    name = hf_name
    for a, b in ((".down.", ".conv_blocks."), (".up.", ".conv_blocks."), (".block.", ".res."),
                 (".mid.block_1.", ".mid.0."), (".mid.attn_1.", ".mid.1."), (".mid.block_2.", ".mid.2.")):
        name = name.replace(a, b)
    return name


def _llamagen_vq(vq_cfg: JanusVQVAEConfig, seed: int, device: str = "cpu") -> tuple[JanusVQVAE, dict]:
    with torch.device(device):
        vq = JanusVQVAE(vq_cfg).eval()
    if device == "cpu":
        _randomize(vq, seed)
    return vq, {_llamagen_vq_name(k): v for k, v in vq.state_dict().items()}


def _llamagen_gpt(width: int, layers: int, heads: int, mlp: int, vocab: int, classes: int, seed: int,
                  device: str = "cpu") -> dict:
    """A LlamaGen c2i GPT state dict (its key names and shapes), random."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * 0.1

    sd = {"tok_embeddings.weight": t(vocab, width), "cls_embedding.embedding_table.weight": t(classes + 1, width),
          "norm.weight": t(width) + 1, "output.weight": t(vocab, width)}
    for i in range(layers):
        p = f"layers.{i}."
        sd |= {p + "attention.wqkv.weight": t(3 * width, width), p + "attention.wo.weight": t(width, width),
               p + "feed_forward.w1.weight": t(mlp, width), p + "feed_forward.w3.weight": t(mlp, width),
               p + "feed_forward.w2.weight": t(width, mlp), p + "attention_norm.weight": t(width) + 1,
               p + "ffn_norm.weight": t(width) + 1}
    return sd


def _llamagen_cos_sin(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen's 2D table ``[1 + grid^2, head_dim / 2]`` by its definition: pair ``i < Dh/4``
    turns with the grid row at ``theta^(-4i/Dh)``, pair ``Dh/4 + i`` with the column; the class
    token's row all zeros."""
    q = head_dim // 4
    cos = torch.zeros(1 + grid * grid, head_dim // 2, dtype=torch.float64)
    sin = torch.zeros_like(cos)
    for r in range(grid):
        for c in range(grid):
            for i in range(q):
                f = theta ** (-4 * i / head_dim)
                cos[1 + r * grid + c, i], sin[1 + r * grid + c, i] = math.cos(r * f), math.sin(r * f)
                cos[1 + r * grid + c, q + i], sin[1 + r * grid + c, q + i] = math.cos(c * f), math.sin(c * f)
    return cos.float(), sin.float()


TINY = dict(width=64, layers=2, heads=4, mlp=256, vocab=256, classes=10)


@pytest.fixture(scope="module")
def llamagen(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamagen")
    vq_cfg = JanusVQVAEConfig(**_vq_config(channel_multiplier=[1, 1, 2, 2, 4]), num_patches=16)
    vq, vq_sd = _llamagen_vq(vq_cfg, seed=1)
    gpt = _llamagen_gpt(**TINY, seed=2)
    # Release checkpoints are dicts with the weights under "model".
    torch.save({"model": vq_sd}, root / "vq.pt")
    torch.save({"model": gpt, "steps": 10}, root / "gpt.pt")
    shapes = {**C.LLAMAGEN_SHAPES, (TINY["width"], TINY["layers"]): ("tiny", TINY["heads"])}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(C, "LLAMAGEN_SHAPES", shapes)
        out = C.convert_llamagen(root / "gpt.pt", root / "vq.pt", 256, root / "vqim")
    return vq, gpt, Engine.from_pretrained(out, device="cpu"), root, shapes


@torch.no_grad()
def test_llamagen_vq_decodes_the_reference_pixels(llamagen):
    vq, _, eng, _, _ = llamagen
    codes = torch.randint(0, 256, (2, 16, 16), generator=torch.Generator().manual_seed(4))
    want = (vq.decode(codes.view(2, -1)) + 1) / 2  # (2, 3, 256, 256)
    got = eng.model.vqgan.decode(codes)
    assert_close(got, want, atol=1e-5 * want.abs().max().item())


def _halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows of each head reordered from interleaved pairs to halves."""
    d = w.shape[0] // heads
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return w.view(heads, d, -1)[:, order].reshape(w.shape)


@torch.no_grad()
def test_llamagen_gpt_logits_equal_transformers_llama_with_2d_rope(llamagen):
    _, gpt, eng, _, _ = llamagen
    w, heads, n = TINY["width"], TINY["heads"], 256
    ref = LlamaModel(LlamaConfig(hidden_size=w, intermediate_size=TINY["mlp"], num_hidden_layers=TINY["layers"],
                                 num_attention_heads=heads, num_key_value_heads=heads, vocab_size=TINY["vocab"],
                                 rms_norm_eps=1e-5, max_position_embeddings=n + 1)).eval()
    state = {"norm.weight": gpt["norm.weight"], "embed_tokens.weight": gpt["tok_embeddings.weight"]}
    for i in range(TINY["layers"]):
        p, q = f"layers.{i}.", f"layers.{i}."
        wq, wk, wv = gpt[p + "attention.wqkv.weight"].split(w)
        state |= {q + "self_attn.q_proj.weight": _halves(wq, heads), q + "self_attn.k_proj.weight": _halves(wk, heads),
                  q + "self_attn.v_proj.weight": wv, q + "self_attn.o_proj.weight": gpt[p + "attention.wo.weight"],
                  q + "mlp.gate_proj.weight": gpt[p + "feed_forward.w1.weight"],
                  q + "mlp.up_proj.weight": gpt[p + "feed_forward.w3.weight"],
                  q + "mlp.down_proj.weight": gpt[p + "feed_forward.w2.weight"],
                  q + "input_layernorm.weight": gpt[p + "attention_norm.weight"],
                  q + "post_attention_layernorm.weight": gpt[p + "ffn_norm.weight"]}
    ref.load_state_dict(state, strict=True)
    cos, sin = _llamagen_cos_sin(w // heads, 16)  # (257, Dh/2)
    s = n  # the class token and 255 image tokens
    ref.rotary_emb.forward = lambda x, position_ids: (torch.cat([cos, cos], -1)[None, :s].to(x.dtype),
                                                      torch.cat([sin, sin], -1)[None, :s].to(x.dtype))
    classes = torch.tensor([[0], [7], [TINY["classes"]]])  # two classes and the null class
    tokens = torch.randint(0, 256, (3, n - 1), generator=torch.Generator().manual_seed(5))
    emb = torch.cat([gpt["cls_embedding.embedding_table.weight"][classes], gpt["tok_embeddings.weight"][tokens]], 1)
    want = ref(inputs_embeds=emb).last_hidden_state @ gpt["output.weight"].T  # (3, 256, V)
    got = eng.model.decoder(classes, tokens)
    assert_close(got, want, atol=1e-5 * want.abs().max().item())
    # And the cached decode step the engine runs, greedy, against the reference's argmax chain.
    codes = eng.generate_codes(class_ids=[7], top_k=1, cfg_scale=1.0, seed=0).view(1, -1)
    emb = torch.cat([gpt["cls_embedding.embedding_table.weight"][torch.tensor([[7]])], gpt["tok_embeddings.weight"][codes[:, :-1]]], 1)
    chain = (ref(inputs_embeds=emb).last_hidden_state @ gpt["output.weight"].T).argmax(-1)
    assert_equal(codes, chain)


def test_llamagen_release_shapes_give_the_presets(monkeypatch):
    """Header-only (meta tensors): each release GPT and the VQ-16 map onto the preset's config."""
    vq_cfg = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, latent_channels=256, base_channels=128,
                              channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, num_patches=16)
    _, vq_sd = _llamagen_vq(vq_cfg, seed=0, device="meta")
    for name, (width, layers, heads) in {"b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1280, 36, 20),
                                         "xxl": (1536, 48, 24), "3b": (3200, 24, 32)}.items():
        mlp = -(-int(8 * width / 3) // 256) * 256
        gpt = _llamagen_gpt(width, layers, heads, mlp, 16384, 1000, seed=0, device="meta")
        cfg = C.llamagen_config(gpt, vq_sd, 256)
        preset = ModelConfig.from_name(f"llamagen-c2i-{name}")
        assert dataclasses.asdict(cfg.decoder) == dataclasses.asdict(preset.decoder), name
        assert dataclasses.asdict(cfg.vqgan) == dataclasses.asdict(preset.vqgan), name


def test_llamagen_key_map_errors_name_the_key(llamagen, tmp_path):
    vq, gpt, _, root, shapes = llamagen
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(C, "LLAMAGEN_SHAPES", shapes)
    try:
        cases = {
            "missing": ({k: v for k, v in gpt.items() if k != "layers.1.ffn_norm.weight"}, "missing.*ffn_norm|mlp_norm"),
            "unexpected": ({**gpt, "layers.0.attention.extra.weight": torch.zeros(2)}, "layers.0.attention.extra"),
            "shape": ({**gpt, "layers.0.feed_forward.w2.weight": torch.zeros(64, 255)}, "feed_forward.w2.*shape"),
        }
        for what, (sd, match) in cases.items():
            torch.save({"model": sd}, tmp_path / f"{what}.pt")
            with pytest.raises(ValueError, match=match):
                C.convert_llamagen(tmp_path / f"{what}.pt", root / "vq.pt", 256, tmp_path / f"out-{what}")
            assert not (tmp_path / f"out-{what}").exists(), what
        with pytest.raises(ValueError, match="--size must be 256 or 384"):
            C.convert_llamagen(root / "gpt.pt", root / "vq.pt", 512, tmp_path / "o")
    finally:
        monkeypatch.undo()


class _NotATensor:
    pass


def test_llamagen_checkpoints_are_read_without_running_their_code(tmp_path):
    """A pickle holding anything but tensors and containers is refused by ``weights_only``."""
    torch.save({"model": {"x": _NotATensor()}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        C.convert_llamagen(tmp_path / "evil.pt", tmp_path / "evil.pt", 256, tmp_path / "o")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="--gpt"):
        C.convert_llamagen(tmp_path / "text.pt", tmp_path / "text.pt", 256, tmp_path / "o")


def test_cli_convert_is_one_line_on_bad_input(tmp_path):
    for argv in (["convert", "janus", str(tmp_path / "none"), str(tmp_path / "o")],
                 ["convert", "llamagen", str(tmp_path / "o"), "--gpt", str(tmp_path / "g.pt"), "--vq",
                  str(tmp_path / "v.pt"), "--size", "256"]):
        r = subprocess.run([sys.executable, "-m", "vqim.engine.entrypoints.cli", *argv], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("vqim: error:"), r.stderr


def test_cli_convert_janus_writes_a_loadable_model(janus, tmp_path):
    _, _, eng, src, _ = janus
    r = subprocess.run([sys.executable, "-m", "vqim.engine.entrypoints.cli", "convert", "janus", str(src),
                        str(tmp_path / "m"), "--max-prompt-len", "64"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = Engine.from_pretrained(tmp_path / "m", device="cpu")
    assert m.cfg.prompt.max_len == 64
    assert_equal(m.generate_codes(PROMPTS[:1], seed=3), eng.generate_codes(PROMPTS[:1], seed=3))


def test_llamagen_converted_model_serves_engine_features(llamagen):
    """The converted class-conditional model under the engine: same seed same image in any
    batch (guided, LlamaGen's top-k), int8 and SJD draw images, save and reload keep them."""
    _, _, eng, root, _ = llamagen
    both = eng.generate_codes(class_ids=[1, 7], seed=[5, 6], cfg_scale=4.0, top_k=100)
    assert_equal(both[1], eng.generate_codes(class_ids=[7], seed=6, cfg_scale=4.0, top_k=100)[0])
    q8 = Engine.from_pretrained(root / "vqim", device="cpu", quantize="int8")
    assert q8.generate_codes(class_ids=[1, 7], seed=5).shape == (2, 16, 16)
    assert eng.generate_codes(class_ids=[1], seed=5, decoding="sjd", sjd_window=8).shape == (1, 16, 16)
    again = Engine.from_pretrained(eng.save_pretrained(root / "resaved"), device="cpu")
    assert_equal(again.generate_codes(class_ids=[1, 7], seed=[5, 6], cfg_scale=4.0, top_k=100), both)
