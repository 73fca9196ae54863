"""The decode step built for speed: fused q/k/v (checkpoint names unchanged), the launch count,
``Engine(compile=True)`` (Inductor on CPU: same tokens as eager, no graph break) and
``Engine(quantize="int8")`` (token agreement with full precision, half the weight bytes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import assert_close, assert_equal
from tests.test_models import randomize
from vqim import kernels as K
from vqim.engine import Engine
from vqim.engine.config import ModelConfig
from vqim.engine.requests import condition
from vqim.engine.profiling.launches import LaunchCounter, step_launches
from vqim.engine.quantize import Int8Linear, decoder_step_weight_bytes
from vqim.engine.weights import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, dtype=torch.float32):
    cfg = ModelConfig.from_name(name)
    model = build_model(cfg, "cpu", dtype).eval()
    randomize(model, std=0.1)
    return model


def _parti_shaped() -> ModelConfig:
    """parti-350m's block structure (cross-attention, every layer conv-masked) at a tiny width:
    a launch count depends on the structure only."""
    cfg = ModelConfig.from_name("parti-350m")
    dec = dataclasses.replace(cfg.decoder, width=64, heads=4, mlp_dim=128, memory_dim=64, layers=2)
    text = dataclasses.replace(cfg.text, width=64, heads=4, mlp_dim=128, layers=1)
    return dataclasses.replace(cfg, decoder=dec, text=text, dtype="float32")


def _state(model, rows: int = 2, ring: bool = False):
    dec = model.decoder
    if model.text is not None:
        ids = torch.randint(3, model.cfg.text.vocab_size, (rows, 5))
        mask = torch.ones(rows, 5, dtype=torch.bool)
        memory = model.text(ids, mask)
    else:
        memory = mask = None
    state = dec.new_state(rows, memory, mask, ring=ring)
    prefix = torch.full((rows, 1), dec.null_prefix)
    return state, prefix


# ----------------------------------------------------------------------------- fused projections


@pytest.mark.parametrize("name", ["tiny-t2i", "tiny-vim"])
@torch.no_grad()
def test_fused_projections_keep_the_checkpoint_and_the_logits(name, tmp_path):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, prefix = _state(model)
    tokens = torch.randint(0, model.cfg.decoder.vocab_size, (2, 6))

    def run():
        st, _ = _state(model)
        out = [model.decoder.prefill(st, prefix)]
        pos = torch.tensor([model.cfg.decoder.prefix])
        for i in range(tokens.shape[1]):
            out.append(model.decoder.decode_step(st, tokens[:, i], pos))
            pos += 1
        return torch.stack(out, 1)  # (2, 7, V)

    torch.manual_seed(1)
    unfused = run()
    model.decoder.fuse()
    assert hasattr(model.decoder.blocks[0].attn, "wqkv") and not hasattr(model.decoder.blocks[0].attn, "wq")
    after = model.state_dict()
    assert list(after) == list(before) or set(after) == set(before)
    for k, v in before.items():
        assert_equal(after[k], v, msg=k)
    torch.manual_seed(1)
    fused = run()
    scale = unfused.abs().max().item()
    assert_close(fused, unfused, atol=1e-5 * scale, msg="fused vs separate q/k/v")
    # Loading a checkpoint (separate names) into a fused model fills the fused weight.
    other = _model(name)
    other.decoder.fuse()
    other.load_state_dict(before)
    for k, v in other.state_dict().items():
        assert_equal(v, before[k], msg=k)


@torch.no_grad()
def test_engine_saves_the_unfused_names(tmp_path):
    eng = Engine.from_preset("tiny-t2i", device="cpu")
    assert eng.model.decoder.blocks[0].attn.fused
    eng.save_pretrained(tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "decoder.blocks.0.attn.wq.weight" in keys and not any("wqkv" in k or "wkv" in k for k in keys)
    again = Engine.from_pretrained(tmp_path / "m", device="cpu")
    assert_equal(again.generate_codes("a red circle", seed=3), eng.generate_codes("a red circle", seed=3))


@pytest.mark.parametrize("name", ["tiny-t2i", "tiny-vim"])
@torch.no_grad()
def test_rows_at_different_positions_match_teacher_forcing(name):
    """One decode step over rows at different positions (``pos [B]``): row r starts ``offset[r]``
    steps late (until then it idles at its first position, rewriting one slot it will overwrite),
    and every row's logits equal the teacher-forced ones at its own position. tiny-vim's second
    layer is fully causal (per-row cache write and mask), tiny-t2i's are conv-masked."""
    from tests.test_models import _decoder_inputs

    model = _model(name)
    dec = model.decoder
    dec.fuse()
    cfg = dec.cfg
    prefix, tokens, memory, mask = _decoder_inputs(model.cfg, model, b=3)
    n = cfg.num_tokens
    full = dec(prefix, tokens[:, : n - 1], memory, mask)  # (3, n, V)
    state = dec.new_state(3, memory, mask)
    dec.prefill(state, prefix)
    offsets = torch.tensor([0, 2, 5])
    steps = 12
    for t in range(steps):
        j = (t - offsets).clamp_min(0)  # (3,) each row's image-token index
        logits = dec.decode_step(state, tokens[torch.arange(3), j], cfg.prefix + j)  # (3, V)
        for r in range(3):
            if t >= offsets[r]:
                want = full[r, j[r] + 1]
                assert_close(logits[r], want, atol=2e-5 * full.abs().max().item(), msg=f"{name} row {r} step {t}")


# ----------------------------------------------------------------------------- launches


@torch.no_grad()
def test_launch_count_of_a_parti_shaped_step():
    """Per layer with cross-attention and the conv mask: q/k/v matmul, the attention that also
    writes the cache, attention out, add+norm, cross query, cross attention, cross out, add+norm,
    MLP in, GELU, MLP out, add+norm: 12, the issue's eager target."""
    cfg = _parti_shaped()
    model = build_model(cfg, "cpu", torch.float32).eval()
    randomize(model, std=0.1)
    model.decoder.fuse()
    state, prefix = _state(model)
    model.decoder.prefill(state, prefix)
    tok = torch.zeros(2, dtype=torch.long)
    pos = torch.tensor([cfg.decoder.prefix + 3])
    n = step_launches(model.decoder, state, tok, pos)
    assert n["per_layer"] <= 12, n
    args = _block_args(model, state, pos)
    with LaunchCounter() as c:
        model.decoder.blocks[0].step(*args)
    assert c.total == n["per_layer"] == 12, c.ops
    assert c.ops["vqim::conv_decode_attention_write"] == 1 and c.ops["vqim::add_layer_norm"] == 3, c.ops
    assert c.ops["mm"] == 6 and c.ops["gelu"] == 1, c.ops  # q/k/v, out, cross q, cross out, MLP in and out
    # Whole step: the layers plus embedding, the final head and the logits' cast.
    assert n["step"] <= cfg.decoder.layers * n["per_layer"] + 12, n


def _block_args(model, state, pos):
    dec = model.decoder
    x = torch.randn(2, 1, dec.cfg.width)
    return x, dec.blocks[0].ln1(x), pos.repeat(2), state, 0, dec.blocks[1].ln1


def test_launch_counter_skips_views_and_counts_each_op():
    x, w = torch.randn(4, 6), torch.ones(6)
    with LaunchCounter() as c:
        y = x.view(6, 4).t()  # views: nothing
        z = (y + 1).relu()  # two kernels
        K.add_layer_norm(z, z, w, None)  # one vqim op
    assert c.total == 3, c.ops


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("name", ["tiny-t2i", "tiny-vim"])
def test_compiled_engine_draws_the_eager_tokens(name):
    eager = Engine.from_preset(name, device="cpu")
    compiled = Engine.from_preset(name, device="cpu", compile=True)
    kw = {"prompts": ["a red circle", "two blue squares"]} if eager.cfg.is_text_to_image else {"class_ids": [1, 3]}
    want = eager.generate_codes(num_images=2, seed=5, cfg_scale=2.0, temperature=0.9, **kw)
    got = compiled.generate_codes(num_images=2, seed=5, cfg_scale=2.0, temperature=0.9, **kw)
    assert_equal(got, want, msg=f"{name} compiled vs eager tokens")


def test_compiled_bundled_model_draws_the_eager_tokens():
    prompts = ["a large red circle in the center", "a small blue square left of a green triangle"]
    eager = Engine.from_pretrained(device="cpu")
    compiled = Engine.from_pretrained(device="cpu", compile=True)
    assert_equal(compiled.generate_codes(prompts, seed=0), eager.generate_codes(prompts, seed=0),
                 msg="bundled model compiled vs eager tokens")


@torch.no_grad()
def test_prefill_and_step_compile_with_no_graph_break():
    """fullgraph=True raises on a graph break: both halves of decoding trace whole, with the
    vqim ops inside the graph, and match eager."""
    torch._dynamo.reset()
    model = _model("tiny-t2i")
    model.decoder.fuse()
    dec = model.decoder
    torch.manual_seed(0)
    state_e, prefix = _state(model)
    torch.manual_seed(0)  # the same text memory
    state_c, _ = _state(model)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    prefill = torch.compile(dec.prefill, fullgraph=True, backend=backend)
    step = torch.compile(dec.decode_step, fullgraph=True, backend=backend)
    assert_equal(prefill(state_c, prefix), dec.prefill(state_e, prefix))
    tok, pos = torch.tensor([3, 4]), torch.tensor([dec.cfg.prefix])
    assert_equal(step(state_c, tok, pos), dec.decode_step(state_e, tok, pos))
    for a, b in zip(state_c.k + state_c.v, state_e.k + state_e.v):
        assert_equal(a, b)
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("vqim.conv_decode_attention_write" in o for o in ops), ops
    assert any("vqim.add_layer_norm" in o for o in ops), ops


def test_bad_engine_options_are_named():
    with pytest.raises(ValueError, match="compile"):
        Engine.from_preset("tiny-vim", device="cpu", compile="yes")
    with pytest.raises(ValueError, match="quantize"):
        Engine.from_preset("tiny-vim", device="cpu", quantize="int4")


# ----------------------------------------------------------------------------- int8


@torch.no_grad()
def test_int8_engine_halves_the_weight_bytes_and_keeps_the_tokens():
    """The bundled model: greedy int8 tokens against fp32, step by step (teacher-forced on the
    fp32 tokens, so one disagreement does not change every later step), on >= 99% of steps."""
    full = Engine.from_pretrained(device="cpu")
    q8 = Engine.from_pretrained(device="cpu", quantize="int8")
    assert q8.quantize == "int8" and isinstance(q8.model.decoder.blocks[0].mlp.fc1, Int8Linear)
    bf16 = Engine.from_pretrained(device="cpu", dtype="bfloat16")
    assert decoder_step_weight_bytes(q8.model.decoder) <= 0.6 * decoder_step_weight_bytes(bf16.model.decoder)

    prompts = ["a large red circle in the center", "a small blue square in the top left",
               "a large green triangle at the bottom", "a small yellow circle on the right",
               "a red square above a blue circle", "a small purple triangle left of a large orange circle",
               "a large blue circle in the bottom right", "a small green square at the top"]
    tokens = full.generate_codes(prompts, seed=0, top_k=1, cfg_scale=1.0).view(len(prompts), -1)  # (8, n)
    agree = total = 0
    for eng_q, eng_f in ((q8, full),):
        prefix, memory, mask, _ = condition(eng_f.model, eng_f.tokenizer, prompts)
        want = eng_f.model.decoder(prefix, tokens[:, :-1], memory, mask).argmax(-1)  # (8, n)
        prefix, memory, mask, _ = condition(eng_q.model, eng_q.tokenizer, prompts)
        got = eng_q.model.decoder(prefix, tokens[:, :-1], memory, mask).argmax(-1)
        agree += int((got == want).sum())
        total += want.numel()
    assert agree / total >= 0.99, f"int8 greedy agreement {agree / total:.4f} < 0.99"
    with pytest.raises(ValueError, match="quantized"):
        q8.save_pretrained("/nonexistent-never-written")


@torch.no_grad()
def test_tp_shard_plan_follows_the_fused_projections():
    """Sharding a fused model gives each rank the fusion of its own q/k/v shards."""
    from vqim.engine.tp import param_shard_dims, tensor_parallel

    for rank in range(2):
        fused_first, sharded_first = _model("tiny-t2i"), _model("tiny-t2i")
        fused_first.decoder.fuse()
        assert "decoder.blocks.0.attn.wqkv.weight" in param_shard_dims(fused_first)
        tensor_parallel(fused_first, rank, 2)
        tensor_parallel(sharded_first, rank, 2)
        sharded_first.decoder.fuse()
        for blk_a, blk_b in zip(fused_first.decoder.blocks, sharded_first.decoder.blocks):
            assert_equal(blk_a.attn.wqkv.weight, blk_b.attn.wqkv.weight)
            assert_equal(blk_a.cross.wkv.weight, blk_b.cross.wkv.weight)


def test_cli_compile_and_quantize_flags(tmp_path, capsys):
    """``--compile`` and ``--quantize int8`` reach the engine: each draws what the Engine option
    draws; a bad choice exits 2 with one line."""
    from PIL import Image

    from vqim.train.main import main

    eng = Engine.from_preset("tiny-t2i", device="cpu", quantize="int8", compile=True)
    want = eng.decode_codes(eng.generate_codes("a red circle", seed=4))[0]
    out = tmp_path / "q.png"
    assert main(["generate", "a red circle", "--preset", "tiny-t2i", "--device", "cpu", "--seed", "4", "-q",
                 "--quantize", "int8", "--compile", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert list(im.getdata()) == list(want.getdata())
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--preset", "tiny-t2i", "--quantize", "int4"])
    assert e.value.code == 2 and "--quantize" in capsys.readouterr().err
