"""The Engine API (DESIGN §5) on the tiny random-weight presets: determinism, CFG batching,
per-request settings, the tokenizer round trip, linear-probe features, bad inputs, thread
safety, out-of-memory handling and model directories."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_close, assert_equal, raster_reference, sharpen
from vqim.engine import Engine
from vqim.engine.requests import condition
from vqim.kernels import SamplingParams


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def t2i() -> Engine:
    return sharpen(Engine.from_preset("tiny-t2i", device="cpu"))


@pytest.fixture(scope="module")
def vim() -> Engine:
    return sharpen(Engine.from_preset("tiny-vim", device="cpu"))


def test_generate_returns_images_and_same_seed_same_image(t2i):
    imgs = t2i.generate(["a red circle"], num_images=1, seed=5)
    assert len(imgs) == 1 and imgs[0].size == (64, 64) and imgs[0].mode == "RGB"
    again = t2i.generate(["a red circle"], num_images=1, seed=5)
    assert np.array_equal(np.asarray(imgs[0]), np.asarray(again[0]))
    other = t2i.generate_codes(["a red circle"], seed=6)
    assert not torch.equal(other, t2i.generate_codes(["a red circle"], seed=5))


def test_tokens_do_not_depend_on_the_batch_they_share(t2i):
    """Image j of a request uses seed + j; per-request settings mixed in one batch give each
    request what it gets alone."""
    together = t2i.generate_codes(["a red circle", "a blue square"], num_images=2, seed=[10, 20],
                                  cfg_scale=[2.0, 4.0], temperature=[1.0, 0.7], top_k=[0, 50], top_p=[1.0, 0.9])
    assert together.shape == (4, 8, 8)
    a1 = t2i.generate_codes(["a red circle"], num_images=1, seed=11, cfg_scale=2.0)
    b0 = t2i.generate_codes(["a blue square"], num_images=1, seed=20, cfg_scale=4.0, temperature=0.7, top_k=50,
                            top_p=0.9)
    assert_equal(together[1], a1[0])
    assert_equal(together[2], b0[0])
    t2i.max_batch_size = 3  # chunking must not change tokens either
    try:
        chunked = t2i.generate_codes(["a red circle", "a blue square"], num_images=2, seed=[10, 20],
                                     cfg_scale=[2.0, 4.0], temperature=[1.0, 0.7], top_k=[0, 50], top_p=[1.0, 0.9])
    finally:
        t2i.max_batch_size = 16
    assert_equal(chunked, together)


def test_guidance_changes_tokens_and_scale_one_is_conditional_only(t2i):
    cond_only = t2i.generate_codes(["a red circle"], seed=3, cfg_scale=1.0)
    guided = t2i.generate_codes(["a red circle"], seed=3, cfg_scale=5.0)
    assert not torch.equal(cond_only, guided)
    # A scale-1 request decoded inside a CFG batch (its own unconditional row present)
    # draws the tokens of conditional-only decoding.
    mixed = t2i.generate_codes(["a red circle", "a blue square"], seed=[3, 4], cfg_scale=[1.0, 5.0])
    assert_equal(mixed[0], cond_only[0])


def test_cfg_batch_layout_scale_one_equals_unguided_loop(vim):
    """2B rows with scale 1 == B rows without the unconditional half (a plain reference loop), and
    the engine's loop, where a scale-1 image holds one row, draws those tokens."""
    dec = vim.model.decoder
    seeds = torch.tensor([0, 1])
    plain = raster_reference(dec, condition(vim.model, None, [2, 7]), False, seeds, cfg_scale=1.0)
    null = dec.null_prefix
    paired = raster_reference(dec, condition(vim.model, None, [2, 7, null, null]), True, seeds, cfg_scale=1.0)
    assert_equal(paired, plain)
    assert_equal(vim.generate_codes(class_ids=[2, 7], seed=[0, 1], cfg_scale=1.0).view(2, -1), plain)


def test_class_conditional_and_unconditional(vim):
    a = vim.generate_codes(class_ids=[1, 2], num_images=1, seed=0, cfg_scale=3.0)
    assert a.shape == (2, 8, 8) and 0 <= a.min() and a.max() < 256
    assert not torch.equal(a[0], a[1])  # same seed, different class
    u = vim.generate_codes(num_images=2, seed=0)  # null class prefix, no guidance
    assert u.shape == (2, 8, 8)


def test_greedy_is_seed_independent(vim):
    a = vim.generate_codes(class_ids=[4], seed=1, temperature=0.0)
    b = vim.generate_codes(class_ids=[4], seed=2, temperature=0.0)
    assert_equal(a, b)


def test_encode_then_decode_round_trips_shapes_and_ranges(t2i):
    codes = t2i.generate_codes(["x"], num_images=2, seed=0)
    imgs = t2i.decode_codes(codes)
    assert [im.size for im in imgs] == [(64, 64)] * 2
    again = t2i.encode_images(imgs)
    assert again.shape == (2, 8, 8) and again.dtype == torch.long
    assert 0 <= again.min() and again.max() < t2i.cfg.vqgan.codebook_size
    px = t2i.decode_codes(again, output_type="pt")
    assert px.shape == (2, 3, 64, 64) and 0 <= px.min() and px.max() <= 1
    # Tensors and PIL images are the same input.
    t = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2)
    assert_equal(t2i.encode_images(t), again)
    assert_equal(t2i.encode_images(t.float() / 255), again)


def test_image_features_average_one_blocks_image_tokens(vim):
    imgs = [Image.fromarray(np.random.randint(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    seen = {}
    dec = vim.model.decoder
    hook = dec.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        with torch.no_grad():
            codes = vim.encode_images(imgs)
            prefix = torch.full((2, 1), vim.cfg.decoder.num_classes)
            dec(prefix, codes.view(2, -1))
    finally:
        hook.remove()
    f1 = vim.image_features(imgs, 1)
    assert f1.shape == (2, 64) and f1.dtype == torch.float32
    assert_close(f1, seen["out"][:, 1:].mean(1), atol=1e-6)  # prefix excluded
    assert not torch.allclose(vim.image_features(imgs, 0), f1)


def test_text_model_features_use_the_empty_prompt(t2i):
    img = t2i.decode_codes(torch.zeros(1, 8, 8, dtype=torch.long))
    assert t2i.image_features(img, 0).shape == (1, 64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[3]), "prompts must be strings"),
    (dict(prompts=["a"], top_p=0.0), "top_p"),
    (dict(prompts=["a"], top_p=1.5), "top_p"),
    (dict(prompts=["a"], temperature=-1.0), "temperature"),
    (dict(prompts=["a"], top_k=-2), "top_k"),
    (dict(prompts=["a"], seed=-1), "seed"),
    (dict(prompts=["a"], num_images=0), "num_images"),
    (dict(prompts=["a", "b"], cfg_scale=[1.0]), "cfg_scale must be a scalar or a list of 2"),
    (dict(prompts=["a"], class_ids=[1]), "class_ids"),
])
def test_bad_generate_inputs_are_named(t2i, kwargs, match):
    with pytest.raises(ValueError, match=match):
        t2i.generate_codes(**kwargs)


def test_bad_class_inputs_are_named(vim):
    with pytest.raises(ValueError, match=r"class_ids must be ints in \[0, 10\)"):
        vim.generate_codes(class_ids=[10])
    with pytest.raises(ValueError, match="not a text-to-image model"):
        vim.generate_codes(["a red circle"])
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        vim.image_features(torch.rand(1, 3, 64, 64), 2)


def test_long_prompt_is_truncated_with_a_warning(t2i):
    with pytest.warns(UserWarning, match="truncated to 128"):
        codes = t2i.generate_codes(["red " * 100], seed=0, cfg_scale=1.0)
    assert codes.shape == (1, 8, 8)


def test_bad_codes_and_images_are_named(t2i):
    with pytest.raises(ValueError, match=r"codes must be in \[0, 256\)"):
        t2i.decode_codes(torch.full((1, 8, 8), 256))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 256\)"):
        t2i.decode_codes(torch.full((1, 8, 8), -1))
    with pytest.raises(ValueError, match=r"codes must be \[B, 8, 8\]"):
        t2i.decode_codes(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        t2i.decode_codes(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"images\[1\] is 32x32; this tokenizer takes 64x64"):
        t2i.encode_images([Image.new("RGB", (64, 64)), Image.new("RGB", (32, 32))])
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 64, 64\]"):
        t2i.encode_images(torch.rand(1, 3, 64, 32))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        t2i.encode_images(torch.rand(1, 3, 64, 64) * 2)


def test_threads_share_an_engine_and_a_failure_stays_in_its_caller(vim):
    expected = {s: vim.generate_codes(class_ids=[s % 10], seed=s) for s in range(3)}
    results, errors = {}, {}

    def work(s):
        try:
            if s == 99:
                vim.generate_codes(class_ids=[1], top_p=2.0)
            else:
                results[s] = vim.generate_codes(class_ids=[s % 10], seed=s)
        except Exception as e:  # noqa: BLE001 (the test records what each thread got)
            errors[s] = e

    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1, 99, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert list(errors) == [99] and isinstance(errors[99], ValueError), errors
    for s in range(3):
        assert_equal(results[s], expected[s], msg=f"thread {s}")


def test_out_of_memory_names_the_batch_size_and_the_engine_survives(vim, monkeypatch):
    """In the decode loop: the error names the row budget and the option that sets it, and the
    loop goes on. In the tokenizer: it names the batch that failed."""
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(vim.model.decoder, "decode_step", oom)
        with pytest.raises(torch.OutOfMemoryError, match=r"32 decoder rows.*max_batch_size \(now 16\)"):
            vim.generate_codes(class_ids=[1, 2, 3], num_images=2, seed=0)
    assert vim.generate_codes(class_ids=[1], seed=0).shape == (1, 8, 8)
    codes = torch.zeros(6, 8, 8, dtype=torch.long)
    with monkeypatch.context() as m:
        m.setattr(vim.model.vqgan, "decode", oom)
        with pytest.raises(torch.OutOfMemoryError, match=r"decoding a batch of 6 images.*max_batch_size is 16"):
            vim.decode_codes(codes)
    assert len(vim.decode_codes(codes)) == 6


def test_from_pretrained_without_a_bundled_model_points_to_from_preset(monkeypatch, tmp_path):
    from vqim.engine import api

    monkeypatch.setattr(api, "BUNDLED_MODEL", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match=r"from_preset\('tiny-t2i'\)"):
        Engine.from_pretrained()


def test_save_then_from_pretrained_generates_the_same_images(t2i, tmp_path):
    t2i.save_pretrained(tmp_path)
    loaded = Engine.from_pretrained(tmp_path, device="cpu")
    assert loaded.cfg == t2i.cfg
    assert_equal(loaded.generate_codes(["a red circle"], seed=9), t2i.generate_codes(["a red circle"], seed=9))


def test_vit_vqgan_preset_is_a_tokenizer_only_engine():
    eng = Engine.from_preset("vit-vqgan-small", device="cpu")
    assert eng.cfg.is_tokenizer_only and eng.model.decoder is None and eng.model.text is None
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    codes = eng.encode_images([img, img])
    assert codes.shape == (2, 32, 32) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 8192
    assert_equal(codes[0], codes[1])
    out = eng.decode_codes(codes)
    assert [o.size for o in out] == [(256, 256)] * 2
    for call in (lambda: eng.generate(["a red circle"]), lambda: eng.generate_codes(class_ids=[1]),
                 lambda: eng.image_features([img], 0)):
        with pytest.raises(ValueError, match="tokenizer-only"):
            call()


def test_tokenizer_only_model_directory_round_trip(tmp_path):
    from vqim.engine.config import ModelConfig, VQGANConfig
    from vqim.engine.models import init_weights
    from vqim.engine.weights import build_model, expected_tensors

    cfg = ModelConfig(name="tok", vqgan=VQGANConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2,
                                                    mlp_dim=64, codebook_size=16, code_dim=4), decoder=None)
    assert all(k.startswith("vqgan.") for k in expected_tensors(cfg))
    model = build_model(cfg)
    init_weights(model, 5)
    eng = Engine(model, None, device=torch.device("cpu"))
    eng.save_pretrained(tmp_path)
    back = Engine.from_pretrained(tmp_path, device="cpu")
    assert back.cfg == cfg and back.model.decoder is None
    x = torch.rand(3, 3, 32, 32)
    assert_equal(back.encode_images(x), eng.encode_images(x))
    assert_equal(back.decode_codes(eng.encode_images(x), output_type="pt"), eng.decode_codes(eng.encode_images(x), output_type="pt"))
    with pytest.raises(ValueError, match="text encoder needs a decoder"):
        ModelConfig(name="bad", vqgan=cfg.vqgan, decoder=None, text=ModelConfig.from_name("tiny-t2i").text)


def test_generation_json_sets_the_sampling_defaults(t2i, tmp_path):
    import json

    eng = Engine(t2i.model, t2i.tokenizer, device=torch.device("cpu"), generation={"temperature": 0.5, "top_k": 3})
    eng.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation.json").read_text()) == {"temperature": 0.5, "top_k": 3}
    loaded = Engine.from_pretrained(tmp_path, device="cpu")
    assert loaded.sampling_defaults == {**SamplingParams().to_dict(), "temperature": 0.5, "top_k": 3}
    p = ["a red circle", "a blue square"]
    assert_equal(loaded.generate_codes(p, seed=4), t2i.generate_codes(p, seed=4, temperature=0.5, top_k=3))
    assert_equal(loaded.generate_codes(p, seed=4, temperature=1.0, top_k=0), t2i.generate_codes(p, seed=4))
    (tmp_path / "generation.json").write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(ValueError, match="generation.json.*top_p"):
        Engine.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "generation.json").write_text(json.dumps({"topk": 2}))
    with pytest.raises(ValueError, match="generation.json.*keys"):
        Engine.from_pretrained(tmp_path, device="cpu")


def test_presets_are_seeded():
    a = Engine.from_preset("tiny-vim", seed=3, device="cpu").model.decoder.head.weight
    b = Engine.from_preset("tiny-vim", seed=3, device="cpu").model.decoder.head.weight
    c = Engine.from_preset("tiny-vim", seed=4, device="cpu").model.decoder.head.weight
    assert_equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_decoding():
    eng = sharpen(Engine.from_preset("tiny-t2i", device="cuda", dtype=torch.float32))
    prompts = ["a red circle", "a much longer prompt about a blue square"]
    graph = [eng.generate_codes(prompts, num_images=2, seed=s) for s in (0, 1)]  # the second call reuses the graph
    no_graphs = Engine(eng.model, eng.tokenizer, device="cuda", use_cuda_graph=False)
    eager = [no_graphs.generate_codes(prompts, num_images=2, seed=s) for s in (0, 1)]
    for g, e in zip(graph, eager):
        assert_equal(g, e)


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_decode_loop_never_syncs_with_the_host(graph):
    """The decode loop's step (decode, sampling, recording, advancing: the runner's raster step)
    runs with no host sync, eager or replayed."""
    from vqim.engine.profiling.bench import prepared_runner

    eng = Engine.from_preset("tiny-t2i", device="cuda")
    runner, rows = prepared_runner(eng, 2, cfg_scale=3.0, step=8, use_cuda_graph=graph)
    runner.raster_step(rows)  # warm-up (kernel compilation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            runner.raster_step(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(runner.slot_step[0]) == 13


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-t2i", "tiny-vim"])
@torch.no_grad()
def test_kv_cache_decode_on_gpu_kernels_matches_teacher_forcing(name):
    from tests.test_models import _decoder_inputs, randomize
    from vqim.engine.config import ModelConfig
    from vqim.engine.weights import build_model

    cfg = ModelConfig.from_name(name)
    model = build_model(cfg, "cpu", torch.float32).eval()
    randomize(model)
    inputs = _decoder_inputs(cfg, model)  # text memory computed on CPU
    model.cuda()
    prefix, tokens, memory, mask = (None if t is None else t.cuda() for t in inputs)
    dec = model.decoder
    n = cfg.decoder.num_tokens
    full = dec(prefix, tokens[:, : n - 1], memory, mask)
    state = dec.new_state(prefix.shape[0], memory, mask)
    steps = [dec.prefill(state, prefix)]
    pos = torch.tensor([1], device="cuda")
    for i in range(n - 1):
        steps.append(dec.decode_step(state, tokens[:, i], pos))
        pos += 1
    scale = full.abs().max().item()
    assert_close(torch.stack(steps, 1), full, atol=1e-3 * scale)


@pytest.mark.gpu
def test_parti_350m_generates_in_bf16():
    eng = Engine.from_preset("parti-350m", device="cuda")
    assert eng.model.decoder.head.weight.dtype == torch.bfloat16
    imgs = eng.generate(["a red circle"], num_images=2, seed=0, cfg_scale=3.0)
    assert [im.size for im in imgs] == [(256, 256)] * 2


@pytest.mark.parametrize("preset", ["tiny-t2i", "tiny-vim"])
def test_ring_kv_cache_matches_plain_and_is_smaller(preset):
    """kv_cache='ring' keeps only the rows a conv layer's window can reach: same tokens, fewer bytes."""
    from vqim.kernels import conv_cache_len

    plain = Engine.from_preset(preset, device="cpu")
    ring = Engine.from_preset(preset, device="cpu", kv_cache="ring")
    kwargs = dict(num_images=2, cfg_scale=3.0, seed=7)
    if plain.cfg.is_text_to_image:
        kwargs["prompts"] = ["a red circle", "a small blue square on the right"]
    else:
        kwargs["class_ids"] = [1, 2]
    assert torch.equal(plain.generate_codes(**kwargs), ring.generate_codes(**kwargs))
    dec = ring.model.decoder
    cfg = dec.cfg
    memory = mask = None
    if cfg.cross_attention:
        memory, mask = torch.zeros(2, 3, cfg.memory_dim), torch.ones(2, 3, dtype=torch.bool)
    state_plain, state_ring = dec.new_state(2, memory, mask), dec.new_state(2, memory, mask, ring=True)
    ring_len = conv_cache_len((cfg.grid_h, cfg.grid_w), cfg.conv_kernel, cfg.prefix)
    for blk, kp, kr in zip(dec.blocks, state_plain.k, state_ring.k):
        assert kr.shape[2] == (ring_len if blk.conv else cfg.max_seq) and kp.shape[2] == cfg.max_seq
    assert sum(t.numel() for t in state_ring.k) < sum(t.numel() for t in state_plain.k)
    with pytest.raises(ValueError, match="kv_cache must be"):
        Engine.from_preset(preset, device="cpu", kv_cache="paged")


def test_cpu_threads_policy():
    """A CPU engine sets torch's intra-op threads: one for a small model ("auto"), what it is
    told for an int, nothing for None; a model over the threshold keeps torch's count."""
    from vqim.engine.api import CPU_ONE_THREAD_PARAMS, cpu_threads_for
    from vqim.engine.config import ModelConfig
    from vqim.engine.weights import build_model

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Engine.from_preset("tiny-t2i", device="cpu").close()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        Engine.from_preset("tiny-t2i", device="cpu", cpu_threads=None).close()
        assert torch.get_num_threads() == 2
        Engine.from_preset("tiny-t2i", device="cpu", cpu_threads=3).close()
        assert torch.get_num_threads() == 3
        big = build_model(ModelConfig.from_name("parti-350m"), "meta")
        assert sum(p.numel() for p in big.parameters()) > CPU_ONE_THREAD_PARAMS
        assert cpu_threads_for(big, "auto") is None and cpu_threads_for(big, 4) == 4
        for bad in (0, -1, "two", True, 1.5):
            with pytest.raises(ValueError, match="cpu_threads"):
                Engine.from_preset("tiny-t2i", device="cpu", cpu_threads=bad)
    finally:
        torch.set_num_threads(before)
