"""Configs and presets, model definitions, the KV-cached decode path, text tokenizers, and
model directories (safetensors round trip and per-tensor checks).

The paper-size presets are checked by config math on the meta device only (no allocation).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import assert_close, assert_equal, assert_within_torch_error
from vqim.engine.config import PRESETS, DecoderConfig, ModelConfig, VQGANConfig, vqgan_config
from vqim.engine.models import ViTVQGAN
from vqim.engine.text import TextTokenizer
from vqim.engine.weights import build_model, load_model, save_pretrained
from vqim import kernels as K
from vqim.kernels import codebook_lookup


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Weights large enough that a wrong mask or a stale cache slot moves the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,enc,dec,width,heads,nominal", [
    ("parti-350m", 12, 12, 1024, 16, 350e6),
    ("parti-750m", 12, 36, 1024, 16, 750e6),
    ("parti-3b", 12, 36, 2048, 32, 3e9),
    ("parti-20b", 16, 64, 4096, 64, 20e9),
])
def test_parti_presets_shapes_and_size(name, enc, dec, width, heads, nominal):
    cfg = ModelConfig.from_name(name)
    assert (cfg.text.layers, cfg.decoder.layers, cfg.decoder.width, cfg.decoder.heads) == (enc, dec, width, heads)
    assert cfg.decoder.mlp_dim == 4 * width and cfg.text.max_len == 128
    assert cfg.decoder.vocab_size == 8192 and (cfg.decoder.grid_h, cfg.decoder.grid_w) == (32, 32)
    model = build_model(cfg, "meta")  # no memory
    ar = n_params(model.text) + n_params(model.decoder)
    # Text encoder + image decoder is the size the name counts; within 15% of it.
    assert abs(ar - nominal) / nominal < 0.15, f"{name}: {ar / 1e6:.0f}M parameters"


@pytest.mark.parametrize("name,layers,width,nominal", [("vim-base", 24, 1536, 650e6), ("vim-large", 36, 2048, 1697e6)])
def test_vim_presets_match_table_2(name, layers, width, nominal):
    cfg = ModelConfig.from_name(name)
    assert cfg.text is None and not cfg.decoder.cross_attention and cfg.decoder.num_classes == 1000
    assert (cfg.decoder.layers, cfg.decoder.width, cfg.decoder.mlp_dim) == (layers, width, 4 * width)
    got = n_params(build_model(cfg, "meta").decoder)
    # 12 * width^2 per block alone is 679M / 1812M: Table 2 rounds down by ~7%.
    assert abs(got - nominal) / nominal < 0.1, f"{name}: {got / 1e6:.0f}M parameters"


@pytest.mark.parametrize("name,layers,width,nominal", [
    ("vit-vqgan-small", 8, 512, 32e6), ("vit-vqgan-base", 12, 768, 91e6), ("vit-vqgan-large", 32, 1280, 599e6)])
def test_vqgan_presets_match_table_2(name, layers, width, nominal):
    cfg = vqgan_config(name)
    assert (cfg.layers, cfg.width, cfg.grid, cfg.codebook_size, cfg.code_dim) == (layers, width, 32, 8192, 32)
    with torch.device("meta"):
        m = ViTVQGAN(cfg)
    # Table 2 counts one half (encoder or decoder); its rounding is loose (12 * width^2 per
    # block gives 25M / 85M / 629M), so 20%.
    one = sum(p.numel() for n, p in m.named_parameters() if n.startswith("enc_"))
    assert abs(one - nominal) / nominal < 0.2, f"{name}: {one / 1e6:.1f}M per transformer"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = ModelConfig.from_name(name)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_parti_presets_pair_a_small_encoder_with_a_large_decoder():
    """The method's tokenizer (seed §[0106]): ViT-VQGAN-Small's encoder and codebook, a 32-block
    1280-wide decoder (16 heads, MLP 5120)."""
    v = ModelConfig.from_name("parti-350m").vqgan
    assert (v.width, v.layers, v.heads, v.mlp_dim, v.codebook_size) == (512, 8, 8, 2048, 8192)
    assert (v.dec_width, v.dec_layers, v.dec_heads, v.dec_mlp_dim) == (1280, 32, 16, 5120)
    with torch.device("meta"):
        m = ViTVQGAN(v)
    enc = sum(p.numel() for n, p in m.named_parameters() if n.startswith("enc_"))
    dec = sum(p.numel() for n, p in m.named_parameters() if n.startswith("dec_"))
    assert 25e6 < enc < 40e6 and 600e6 < dec < 700e6, (enc, dec)


@torch.no_grad()
def test_a_tokenizer_decoder_of_its_own_shape_round_trips():
    cfg = VQGANConfig(image_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_dim=64, codebook_size=64,
                      code_dim=8, dec_width=48, dec_layers=2, dec_heads=3, dec_mlp_dim=96)
    same = VQGANConfig(image_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_dim=64, codebook_size=64,
                       code_dim=8)
    assert (same.dec_width, same.dec_layers, same.dec_heads, same.dec_mlp_dim) == (32, 1, 2, 64)  # null: the encoder's
    m = ViTVQGAN(cfg)
    randomize(m)
    assert m.dec_proj.out_features == 48 and len(m.dec_blocks) == 2 and m.enc_patch.out_features == 32
    x = torch.rand(3, 3, 16, 16)
    ids = m.encode(x)  # (3, 4, 4)
    assert m.decode(ids).shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="dec_heads"):
        VQGANConfig(dec_width=100, dec_heads=3)
    with pytest.raises(ValueError, match="dec_layers"):
        VQGANConfig(dec_layers=0)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="heads"):
        VQGANConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="conv_kernel"):
        DecoderConfig(conv_kernel=(4, 5))
    with pytest.raises(ValueError, match="conv_layers"):
        DecoderConfig(layers=2, conv_layers=(0, 2))
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_name("parti-1b")
    with pytest.raises(ValueError, match="grid"):
        ModelConfig(name="x", vqgan=VQGANConfig(image_size=64), decoder=DecoderConfig(vocab_size=8192))


# ----------------------------------------------------------------------------- decoder


def _decoder_inputs(cfg: ModelConfig, model, b: int = 3):
    d = cfg.decoder
    tokens = torch.randint(0, d.vocab_size, (b, d.num_tokens))
    if cfg.text is not None:
        prefix = torch.full((b, 1), d.num_classes)
        lengths = torch.tensor([5, 1, 7])[:b]
        mask = torch.arange(7)[None, :] < lengths[:, None]  # (B, L) ragged prompts
        ids = torch.randint(3, cfg.text.vocab_size, (b, 7)) * mask
        memory = model.text(ids, mask)
    else:
        prefix = torch.tensor([[0], [d.num_classes - 1], [d.num_classes]])[:b]  # two classes and the null one
        memory = mask = None
    return prefix, tokens, memory, mask


def _cached_logits(dec, prefix, tokens, memory, mask) -> torch.Tensor:
    """Prefill + one decode step per image token (teacher-forced inputs): ``[B, n, V]``."""
    n = dec.cfg.num_tokens
    state = dec.new_state(prefix.shape[0], memory, mask)
    steps = [dec.prefill(state, prefix)]
    pos = torch.tensor([dec.cfg.prefix])
    for i in range(n - 1):
        steps.append(dec.decode_step(state, tokens[:, i], pos))
        pos += 1
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("name", ["tiny-t2i", "tiny-vim"])
@torch.no_grad()
def test_kv_cache_decode_equals_teacher_forcing_at_every_step(name):
    cfg = ModelConfig.from_name(name)
    model = build_model(cfg, "cpu", torch.float32).eval()
    randomize(model)
    dec = model.decoder
    prefix, tokens, memory, mask = _decoder_inputs(cfg, model)
    n = cfg.decoder.num_tokens
    full = dec(prefix, tokens[:, : n - 1], memory, mask)  # (B, n, V): position j predicts token j
    cached = _cached_logits(dec, prefix, tokens, memory, mask)  # (B, n, V)
    scale = full.abs().max().item()
    assert scale > 1.0  # the weights make a mask or cache error visible
    assert_close(cached, full, atol=2e-5 * scale, msg=f"{name} cached vs teacher-forced logits")

    # bf16 weights and cache: the cached path's error against fp32 is within 2x the
    # teacher-forced bf16 forward's own error (DESIGN §6 tolerance rule).
    low = build_model(cfg, "cpu", torch.bfloat16).eval()
    low.load_state_dict(model.state_dict())
    mem16 = memory.bfloat16() if memory is not None else None
    full16 = low.decoder(prefix, tokens[:, : n - 1], mem16, mask)
    cached16 = _cached_logits(low.decoder, prefix, tokens, mem16, mask)
    assert_within_torch_error(cached16, full, full16, msg=f"{name} bf16 cached logits")


@torch.no_grad()
def test_decoder_through_the_triton_kernels_in_the_interpreter():
    """The same model code on the real Triton kernels (CPU interpreter): conv_attention for the
    teacher-forced pass, conv_decode_attention on the static cache for the first 10 steps (past
    the end of the first grid row), cfg_sample for a draw. Few steps: the interpreter is slow."""
    cfg = ModelConfig.from_name("tiny-t2i")
    model = build_model(cfg, "cpu", torch.float32).eval()
    randomize(model)
    dec = model.decoder
    prefix, tokens, memory, mask = _decoder_inputs(cfg, model, b=2)
    n = cfg.decoder.num_tokens
    ref = dec(prefix, tokens[:, : n - 1], memory, mask)  # torch references
    scale = ref.abs().max().item()
    with K.use_backend("triton"):
        full = dec(prefix, tokens[:, : n - 1], memory, mask)
        state = dec.new_state(2, memory, mask)
        steps = [dec.prefill(state, prefix)]
        pos = torch.tensor([cfg.decoder.prefix])
        for i in range(10):
            steps.append(dec.decode_step(state, tokens[:, i], pos))
            pos += 1
        tok = K.cfg_sample(steps[-1][:1], steps[-1][1:], cfg_scale=3.0, seed=0, step=1)
    assert_close(full, ref, atol=2e-5 * scale, msg="triton conv_attention")
    assert_close(torch.stack(steps, 1), ref[:, :11], atol=2e-5 * scale, msg="triton conv_decode_attention")
    assert_equal(tok, K.cfg_sample(steps[-1][:1], steps[-1][1:], cfg_scale=3.0, seed=0, step=1, backend="torch"))


@torch.no_grad()
def test_conv_mask_bounds_the_receptive_field():
    """tiny-t2i: every layer conv 5x5 (2 rows up), 2 layers: token 0 reaches at most 4 rows down.
    tiny-vim's second layer is fully causal, so there it reaches the end of the grid."""
    for name, far_changes in (("tiny-t2i", False), ("tiny-vim", True)):
        cfg = ModelConfig.from_name(name)
        model = build_model(cfg, "cpu", torch.float32).eval()
        randomize(model)
        prefix, tokens, memory, mask = _decoder_inputs(cfg, model)
        other = tokens.clone()
        other[:, 0] = (tokens[:, 0] + 1) % cfg.decoder.vocab_size
        a = model.decoder(prefix, tokens, memory, mask)  # (B, 1 + n, V)
        b = model.decoder(prefix, other, memory, mask)
        gw = cfg.decoder.grid_w
        near = 1 + 1 * gw  # input position of image token (1, 0): inside the window of token 0
        far = 1 + 5 * gw  # image token (5, 0): 5 rows down
        assert (a[:, near] - b[:, near]).abs().max() > 1e-3, name
        moved = (a[:, far:] - b[:, far:]).abs().max().item()
        assert (moved > 1e-3) == far_changes, f"{name}: far logits moved by {moved}"


@torch.no_grad()
def test_image_tokenizer_round_trip_shapes_and_ranges():
    cfg = ModelConfig.from_name("tiny-t2i").vqgan
    vq = ViTVQGAN(cfg).eval()
    randomize(vq, std=0.1)
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    codes = vq.encode(x)
    assert codes.shape == (2, cfg.grid, cfg.grid) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < cfg.codebook_size
    z = vq.encode_latents(x)
    assert_close(z.norm(dim=-1), torch.ones(2, cfg.grid * cfg.grid), atol=1e-5)
    assert_equal(codes.view(-1), codebook_lookup(z.reshape(-1, cfg.code_dim), vq.codebook))
    px = vq.decode(codes)
    assert px.shape == x.shape and px.dtype == torch.float32
    assert 0 <= px.min() and px.max() <= 1  # sigmoid output
    vq.cfg.output = "raw"
    raw = vq.decode(codes)
    assert_close(torch.sigmoid(raw), px, atol=1e-6)


# ----------------------------------------------------------------------------- text tokenizer


def test_byte_tokenizer_pads_masks_and_truncates_with_warning():
    tok = TextTokenizer.load(None, max_len=128, kind="bytes")
    ids, mask = tok.batch(["ab", ""], torch.device("cpu"))
    assert ids.tolist() == [[ord("a") + 3, ord("b") + 3, 1], [1, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    with pytest.warns(UserWarning, match="truncated to 128"):
        ids, mask = tok.batch(["x" * 300], torch.device("cpu"))
    assert ids.shape == (1, 128) and ids[0, -1] == 1


def test_sentencepiece_tokenizer_is_used_when_the_directory_has_one(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"a red circle on a blue square number {i}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "tokenizer"), vocab_size=40,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    tok = TextTokenizer.load(tmp_path, max_len=16, kind="sentencepiece")
    assert tok.vocab_size == 40
    row = tok.ids("a red circle")
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).encode("a red circle")
    assert row == ref + [1]
    assert row != TextTokenizer.load(None, max_len=16, kind="bytes").ids("a red circle")


# ----------------------------------------------------------------------------- model directories


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_round_trip_is_exact(tmp_path, dtype):
    cfg = ModelConfig.from_name("tiny-t2i")
    model = build_model(cfg, "cpu", dtype)
    randomize(model)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    back = load_model(tmp_path)
    assert back.cfg.dtype == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == dtype
        assert_equal(b[k], a[k], msg=k)


@pytest.fixture
def saved(tmp_path):
    model = build_model(ModelConfig.from_name("tiny-vim"), "cpu", torch.float32)
    save_pretrained(model, tmp_path)
    return tmp_path, load_file(str(tmp_path / "model.safetensors"))


def test_load_names_a_tensor_of_the_wrong_shape(saved):
    path, state = saved
    state["decoder.head.weight"] = state["decoder.head.weight"][:-1].clone()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'decoder.head.weight' has shape \(255, 64\), the config needs \(256, 64\)"):
        load_model(path)


def test_load_names_a_tensor_of_the_wrong_dtype(saved):
    path, state = saved
    state["vqgan.codebook"] = state["vqgan.codebook"].half()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'vqgan.codebook' has dtype torch.float16"):
        load_model(path)


def test_load_names_missing_and_unexpected_tensors(saved):
    path, state = saved
    extra = dict(state, **{"decoder.blocks.9.mlp.fc1.weight": torch.zeros(2)})
    save_file(extra, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'decoder.blocks.9.mlp.fc1.weight'"):
        load_model(path)
    del state["decoder.norm.bias"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\), first \['decoder.norm.bias'\]"):
        load_model(path)


def test_load_rejects_a_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not a vqim model config"):
        load_model(tmp_path)


def test_a_sentencepiece_model_directory_needs_its_tokenizer(tmp_path):
    import sentencepiece as spm

    from vqim.engine import Engine
    from vqim.engine.text import SentencePieceTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a red circle on a blue square number {i}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    model_dir = tmp_path / "model"
    save_pretrained(build_model(ModelConfig.from_name("tiny-t2i"), "cpu"), model_dir,
                    tokenizer_model=tmp_path / "sp.model")
    assert json.loads((model_dir / "config.json").read_text())["text"]["tokenizer"] == "sentencepiece"
    eng = Engine.from_pretrained(model_dir, device="cpu")
    assert isinstance(eng.tokenizer.impl, SentencePieceTokenizer)
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        Engine.from_pretrained(model_dir, device="cpu")


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    import os

    from vqim.engine.weights import atomic_write

    dst = tmp_path / "f.txt"
    assert atomic_write(dst, lambda p: p.write_text("old")) == dst

    def fail(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(dst, fail)
    assert dst.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask  # a plain open's mode, not mkstemp's 0600
