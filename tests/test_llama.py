"""The Llama decoder of the public models (vqim.engine.llama), on random weights of the tiny
presets: tiny-janus (the prompt in the sequence, grouped-query attention, 1D RoPE, the aligner
and the MLP head) and tiny-llamagen (one class token, 2D RoPE, a plain table and head).

Against their own definitions: the cached decode step against teacher forcing with rows of
unequal prompt lengths, the fused projections against the separate ones and the checkpoint's
names, speculative decoding's multi-token forward against teacher forcing, the 2D rotary table
against a hand computation, the launch count of a step. Through the engine: same seed same
image in any batch, negative prompts, int8, compile, save and load. The public weights
themselves are checked against transformers in tests/test_public_models.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tests.helpers import assert_close, assert_equal
from tests.test_models import randomize
from vqim.engine import Engine
from vqim.engine.config import ModelConfig
from vqim.engine.llama import LlamaDecoder, rope_tables
from vqim.engine.profiling.launches import LaunchCounter, step_launches
from vqim.engine.quantize import Int8Linear, decoder_step_weight_bytes
from vqim.engine.requests import condition
from vqim.engine.text import JanusTokenizer
from vqim.engine.weights import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red circle", "two blue squares on a white table, seen from above", "x"]


def _model(name: str):
    model = build_model(ModelConfig.from_name(name), "cpu", torch.float32).eval()
    randomize(model, std=0.1)
    return model


def _rows(model, name: str):
    """Prefix ids ``[3, P]`` right-padded and each row's length ``[3]``: three prompts of unequal
    length (tiny-janus) or two classes and the null class (tiny-llamagen)."""
    if name == "tiny-janus":
        tok = JanusTokenizer.load(None, model.cfg.prompt)
        prefix, _, _, lengths = condition(model, tok, PROMPTS)
        assert len(set(lengths.tolist())) == 3, "the prompts must differ in length"
        return prefix, lengths
    prefix = torch.tensor([[0], [9], [10]])
    return prefix, torch.ones(3, dtype=torch.long)


def _teacher_forced(dec: LlamaDecoder, prefix, lengths, tokens) -> list[torch.Tensor]:
    """Each row alone, its prefix unpadded: logits ``[1 + t, V]`` predicting image tokens 0..t."""
    return [dec(prefix[r: r + 1, : int(lengths[r])], tokens[r: r + 1])[0] for r in range(prefix.shape[0])]


def _case(name: str, fused: bool = True):
    """The decoder of ``name`` (random weights), its three rows, random image tokens ``[3, n - 1]``
    and the teacher-forced logits of each row."""
    model = _model(name)
    dec = model.decoder
    if fused:
        dec.fuse()
    prefix, lengths = _rows(model, name)
    tokens = torch.randint(0, dec.cfg.vocab_size, (3, dec.cfg.num_tokens - 1))
    return dec, prefix, lengths, tokens, _teacher_forced(dec, prefix, lengths, tokens)


@pytest.mark.parametrize("name", ["tiny-janus", "tiny-llamagen"])
@pytest.mark.parametrize("fused", [False, True])
@torch.no_grad()
def test_cached_decode_equals_teacher_forcing_with_unequal_prefixes(name, fused):
    dec, prefix, lengths, tokens, want = _case(name, fused)
    state = dec.new_state(3)
    got = [dec.prefill(state, prefix, lengths)]
    pos = lengths.clone()
    for i in range(dec.cfg.num_tokens - 1):
        got.append(dec.decode_step(state, tokens[:, i], pos))
        pos += 1
    got = torch.stack(got, dim=1)  # (3, n, V)
    for r in range(3):
        scale = want[r].abs().max().item()
        assert_close(got[r], want[r], atol=2e-5 * scale, msg=f"{name} row {r}")


@pytest.mark.parametrize("name", ["tiny-janus", "tiny-llamagen"])
@torch.no_grad()
def test_fusing_keeps_the_checkpoint_names_and_loads_them(name):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.decoder.fuse()
    attn, mlp = model.decoder.blocks[0].attn, model.decoder.blocks[0].mlp
    assert hasattr(attn, "wqkv") and not hasattr(attn, "wq") and hasattr(mlp, "w13") and not hasattr(mlp, "w1")
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert_equal(after[k], v, msg=k)
    other = _model(name)
    other.decoder.fuse()
    randomize(other, std=0.2, seed=9)
    other.load_state_dict(before)
    for k, v in other.state_dict().items():
        assert_equal(v, before[k], msg=k)


@pytest.mark.parametrize("name", ["tiny-janus", "tiny-llamagen"])
@torch.no_grad()
def test_forward_tokens_equals_teacher_forcing(name):
    """Speculative decoding's forward of T tokens per row at their positions (here a window of 5
    starting at a different image token in each row) gives the teacher-forced logits."""
    dec, prefix, lengths, tokens, want = _case(name)
    state = dec.new_state(3)
    dec.prefill(state, prefix, lengths)
    starts, t = [0, 7, 20], 5
    # Tokens before each window fed one at a time, then the window in one forward.
    for r, s0 in enumerate(starts):
        one = dec.new_state(1)
        for i, (a, b) in enumerate(zip(state.k + state.v, one.k + one.v)):
            b.copy_(a[r: r + 1])
        for j in range(s0):
            dec.decode_step(one, tokens[r: r + 1, j], lengths[r: r + 1] + j)
        for a, b in zip(state.k + state.v, one.k + one.v):
            a[r] = b[0]
    win = torch.stack([tokens[r, s0: s0 + t] for r, s0 in enumerate(starts)])  # (3, T)
    pos = torch.stack([lengths[r] + s0 + torch.arange(t) for r, s0 in enumerate(starts)])  # (3, T)
    valid = torch.ones(3, t, dtype=torch.bool)
    got = dec.forward_tokens(state, win, pos, valid)  # (3, T, V)
    for r, s0 in enumerate(starts):
        scale = want[r].abs().max().item()
        assert_close(got[r], want[r][s0 + 1: s0 + 1 + t], atol=2e-5 * scale, msg=f"{name} row {r}")


def test_2d_rotary_table_by_hand():
    """LlamaGen's 2D table: a quarter of the head's frequencies for the grid row, a quarter for
    the column, theta^(-4i/Dh); the class token's row all zeros."""
    cfg = ModelConfig.from_name("tiny-llamagen").decoder
    cos, sin = rope_tables(cfg)
    d = cfg.head_dim
    assert cos.shape == (cfg.max_seq, d // 2)
    assert not cos[0].any() and not sin[0].any()
    for r, c in [(0, 0), (2, 5), (7, 6), (3, 0)]:  # the last cell is never fed: no position
        p = cfg.prefix + r * cfg.grid_w + c
        for i in range(d // 4):
            f = cfg.rope_theta ** (-4 * i / d)
            assert math.isclose(cos[p, i].item(), math.cos(r * f), abs_tol=1e-6), (r, c, i)
            assert math.isclose(sin[p, d // 4 + i].item(), math.sin(c * f), abs_tol=1e-6), (r, c, i)


def test_1d_rotary_table_by_hand():
    cfg = ModelConfig.from_name("tiny-janus").decoder
    cos, sin = rope_tables(cfg)
    d = cfg.head_dim
    for p in (0, 1, 17, cfg.max_seq - 1):
        for i in range(d // 2):
            a = p * cfg.rope_theta ** (-2 * i / d)
            assert math.isclose(cos[p, i].item(), math.cos(a), abs_tol=2e-5 * max(1, abs(a)))
            assert math.isclose(sin[p, i].item(), math.sin(a), abs_tol=2e-5 * max(1, abs(a)))


@pytest.mark.parametrize("name", ["tiny-janus", "tiny-llamagen"])
@torch.no_grad()
def test_launch_count_of_a_llama_step(name):
    """Per layer: q/k/v matmul, the rotation + cache write + attention kernel, attention out,
    add+norm, w1/w3 matmul, SiLU, the gate's product, w2, add+norm: 9, under Parti's 12."""
    model = _model(name)
    dec = model.decoder
    dec.fuse()
    prefix, lengths = _rows(model, name)
    state = dec.new_state(3)
    dec.prefill(state, prefix, lengths)
    tok = torch.zeros(3, dtype=torch.long)
    n = step_launches(dec, state, tok, lengths + 2)
    assert n["per_layer"] == 9, n
    x = torch.randn(3, 1, dec.cfg.width)
    with LaunchCounter() as c:
        dec.blocks[0].step(x, dec.blocks[0].attn_norm(x), lengths + 2, state, 0, dec.blocks[1].attn_norm,
                           dec.rope_cos, dec.rope_sin)
    assert c.ops["vqim::rope_decode_attention"] == 1 and c.ops["vqim::add_rms_norm"] == 2, c.ops
    assert c.ops["mm"] == 4, c.ops
    # Once per step on top: the embedding (Janus: and its aligner, 3), the first norm (its torch
    # definition, 6 ops), the head (Janus: its MLP, 3).
    assert n["step"] <= dec.cfg.layers * 9 + 14, n


# ----------------------------------------------------------------------------- the tokenizer


def test_janus_prompt_rows_and_their_unconditional_branch():
    cfg = ModelConfig.from_name("tiny-janus").prompt
    tok = JanusTokenizer.load(None, cfg)
    ids = tok.ids("  a red circle ")
    body = tok.impl.encode("<|User|>: a red circle\n\n<|Assistant|>:")
    assert ids == [cfg.bos_id] + body + [cfg.boi_id]
    row = tok.batch(["a red circle"], torch.device("cpu"), pad_to=cfg.max_len)
    null_ids, null_mask = tok.null_row((row[0][0], row[1][0]))
    n = len(ids)
    assert null_ids[0] == cfg.bos_id and null_ids[n - 1] == cfg.boi_id
    assert (null_ids[1: n - 1] == cfg.pad_id).all() and null_mask.sum() == n
    with pytest.warns(UserWarning, match="truncated"):
        long = tok.ids("word " * 200)
    assert len(long) == cfg.max_len and long[0] == cfg.bos_id and long[-1] == cfg.boi_id


# ----------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def janus():
    return Engine.from_preset("tiny-janus", seed=2, device="cpu")


@pytest.fixture(scope="module")
def llamagen():
    return Engine.from_preset("tiny-llamagen", seed=2, device="cpu")


def test_same_seed_same_image_whatever_the_batch(janus, llamagen):
    """Prompts of unequal length decoded together, each against itself alone (the prefill pads
    to the model's longest prompt, so a row's numbers do not depend on its neighbours)."""
    together = janus.generate_codes(PROMPTS, seed=[10, 20, 30], cfg_scale=[5.0, 2.0, 1.0], temperature=1.0)
    for i, (p, s, g) in enumerate(zip(PROMPTS, (10, 20, 30), (5.0, 2.0, 1.0))):
        assert_equal(together[i], janus.generate_codes([p], seed=s, cfg_scale=g, temperature=1.0)[0], msg=p)
    both = llamagen.generate_codes(class_ids=[3, 7], seed=[4, 5], cfg_scale=4.0)
    assert_equal(both[1], llamagen.generate_codes(class_ids=[7], seed=5, cfg_scale=4.0)[0])


def test_negative_prompt_replaces_the_unconditional_branch(janus):
    plain = janus.generate_codes(["a red circle"], seed=3, cfg_scale=5.0)
    neg = janus.generate_codes(["a red circle"], seed=3, cfg_scale=5.0, negative_prompt="blue")
    assert not torch.equal(plain, neg)
    assert_equal(janus.generate_codes(["a red circle"], seed=3, cfg_scale=5.0, negative_prompt="blue"), neg)
    with pytest.raises(ValueError, match="negative_prompt"):
        Engine.from_preset("tiny-llamagen", device="cpu").generate_codes(class_ids=[1], negative_prompt="x")


@pytest.mark.parametrize("name", ["tiny-janus", "tiny-llamagen"])
@torch.no_grad()
def test_int8_keeps_the_greedy_tokens_and_shrinks_the_step(name):
    """Teacher-forced greedy tokens of int8 against fp32 on >= 97% of steps (random tiny weights
    are less peaked than trained ones), and a step reads at most 60% of bf16's bytes."""
    full = Engine.from_preset(name, seed=4, device="cpu")
    q8 = Engine.from_preset(name, seed=4, device="cpu", quantize="int8")
    assert isinstance(q8.model.decoder.blocks[0].mlp.w13, Int8Linear)
    assert isinstance(q8.model.decoder.blocks[0].attn.wqkv, Int8Linear)
    bf16 = Engine.from_preset(name, seed=4, device="cpu", dtype="bfloat16")
    assert decoder_step_weight_bytes(q8.model.decoder) <= 0.6 * decoder_step_weight_bytes(bf16.model.decoder)
    kw = {"prompts": PROMPTS} if name == "tiny-janus" else {"class_ids": [0, 4, 9]}
    tokens = full.generate_codes(**kw, seed=0, top_k=1, cfg_scale=1.0).view(3, -1)  # (3, n)
    conds = kw.get("prompts") or kw["class_ids"]
    agree = 0
    for r, c in enumerate(conds):
        rows = [condition(e.model, e.tokenizer, [c]) for e in (full, q8)]
        want, got = (e.model.decoder(rw[0], tokens[r: r + 1, :-1]).argmax(-1) for e, rw in zip((full, q8), rows))
        agree += int((got == want).sum())
    assert agree / tokens.numel() >= 0.97, agree / tokens.numel()


def test_compiled_engine_draws_the_eager_tokens(janus):
    compiled = Engine.from_preset("tiny-janus", seed=2, device="cpu", compile=True)
    want = janus.generate_codes(PROMPTS[:2], seed=5, cfg_scale=3.0, temperature=0.9)
    assert_equal(compiled.generate_codes(PROMPTS[:2], seed=5, cfg_scale=3.0, temperature=0.9), want)


def test_save_and_load_keep_weights_tokenizer_and_images(janus, tmp_path):
    out = janus.save_pretrained(tmp_path / "j")
    assert (out / "tokenizer.json").is_file()
    again = Engine.from_pretrained(out, device="cpu")
    assert_equal(again.generate_codes(PROMPTS, seed=1), janus.generate_codes(PROMPTS, seed=1))
    (out / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Engine.from_pretrained(out, device="cpu")


@pytest.mark.parametrize("decoding", ["sjd"])
def test_parallel_decodings_run_on_the_llama_decoders(janus, llamagen, decoding):
    """SJD draws images of the same shape, and the same seed gives the same image in any batch
    (its distribution is checked against raster in test_parallel_decoding)."""
    a = janus.generate_codes(PROMPTS, seed=[1, 2, 3], decoding=decoding, sjd_window=4)
    assert a.shape == (3, 8, 8)
    assert_equal(janus.generate_codes([PROMPTS[1]], seed=2, decoding=decoding, sjd_window=4)[0], a[1])
    b = llamagen.generate_codes(class_ids=[3], seed=1, decoding=decoding, sjd_window=4)
    assert b.shape == (1, 8, 8)


def test_images_encode_and_decode(janus):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imgs = janus.generate(["a red circle"], seed=0)
    assert imgs[0].size == (64, 64)
    codes = janus.encode_images(imgs)
    assert codes.shape == (1, 8, 8) and codes.min() >= 0 and codes.max() < 256
