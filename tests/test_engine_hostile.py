"""The Engine API against hostile input: settings that overflow the sampler, NaN weights,
arguments that used to fail late (or not at all), unbounded decode batches, image modes and
code dtypes that used to give silent garbage."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_equal, sharpen
from vqim.engine import Engine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def t2i() -> Engine:
    return sharpen(Engine.from_preset("tiny-t2i", device="cpu"))


def _record(monkeypatch, module, name: str) -> list[torch.Tensor]:
    """Wrap ``module.name`` so every call's first argument is recorded."""
    real = getattr(module, name)
    seen = []

    def wrapper(x, *a, **k):
        seen.append(x.detach().clone())
        return real(x, *a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return seen


# ----------------------------------------------------------------------------- decode loop


@pytest.mark.parametrize("preset, kwargs", [("tiny-t2i", dict(prompts=["a red circle"])),
                                            ("tiny-vim", dict(class_ids=[3]))])
def test_nan_decoder_weights_raise_floating_point_error(preset, kwargs):
    eng = Engine.from_preset(preset, device="cpu")
    with torch.no_grad():
        eng.model.decoder.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="no finite logit"):
        eng.generate_codes(seed=0, **kwargs)


def test_a_marked_row_never_feeds_a_negative_token_to_the_decoder(monkeypatch):
    """The -1 'no token' marker stays in the output for check_tokens; the decoder gets a
    valid placeholder (an embedding index, never -1)."""
    eng = Engine.from_preset("tiny-vim", device="cpu")
    with torch.no_grad():
        eng.model.decoder.head.weight.fill_(float("nan"))
    real = eng.model.decoder.decode_step
    tokens = []

    def decode_step(state, token, pos):
        tokens.append(token.clone())
        return real(state, token, pos)

    monkeypatch.setattr(eng.model.decoder, "decode_step", decode_step)

    handle = eng.submit(class_ids=[1, 2], seed=0, cfg_scale=3.0)
    with pytest.raises(FloatingPointError, match="no finite logit"):
        handle.result(timeout=60)
    assert len(tokens) == eng.cfg.decoder.num_tokens - 1
    assert all(int(t.min()) >= 0 for t in tokens)


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-38), dict(cfg_scale=1e20, temperature=1e-20),
                                    dict(cfg_scale=3e38), dict(cfg_scale=1e39), dict(cfg_scale=1e300),
                                    dict(temperature=1e-39)])
def test_overflowing_sampling_settings_never_index_out_of_range(t2i, kwargs):
    """Finite settings that overflow the fp32 guided logits: either validation rejects them
    (ValueError), the loop reports the masked rows (FloatingPointError), or every token is valid."""
    try:
        codes = t2i.generate_codes(["a red circle"], seed=0, **kwargs)
    except (FloatingPointError, ValueError) as e:
        assert "cfg_scale" in str(e) or "temperature" in str(e) or "no finite logit" in str(e)
    else:
        assert 0 <= int(codes.min()) and int(codes.max()) < t2i.cfg.decoder.vocab_size


def test_a_setting_reaches_generate_and_generation_json_from_sampling_params_alone(t2i):
    """min_p was added to the op and SamplingParams only: generate takes it (min_p = 1 keeps
    only the top token, i.e. greedy), and a generation.json may recommend it."""
    greedy = t2i.generate_codes(["a red circle"], seed=1, temperature=0.0)
    assert torch.equal(t2i.generate_codes(["a red circle"], seed=2, min_p=1.0), greedy)
    eng = Engine(t2i.model, t2i.tokenizer, device=t2i.device, use_cuda_graph=False, generation={"min_p": 1.0})
    assert eng.sampling_defaults["min_p"] == 1.0
    assert torch.equal(eng.generate_codes(["a red circle"], seed=3), greedy)
    with pytest.raises(ValueError, match="generation: min_p must be in"):
        Engine(t2i.model, t2i.tokenizer, device=t2i.device, generation={"min_p": 2.0})


def test_unknown_sampling_setting_is_a_type_error(t2i):
    with pytest.raises(TypeError, match="unknown sampling settings \\['topk'\\]"):
        t2i.generate_codes(["a red circle"], seed=0, topk=3)


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="meta"), r"device must be 'cpu' or 'cuda"),
    (dict(device="tpu"), r"device must be 'cpu' or 'cuda"),
    (dict(device="cuda:x"), r"device must be 'cpu' or 'cuda"),
    (dict(device=1.5), r"device must be 'cpu' or 'cuda"),
    (dict(dtype=torch.float64), r"dtype must be one of \['bfloat16', 'float16', 'float32'\]"),
    (dict(dtype=torch.complex64), r"dtype must be one of"),
    (dict(dtype="float64"), r"dtype must be one of"),
    (dict(dtype=32), r"dtype must be one of"),
    (dict(max_batch_size=1.5), r"max_batch_size must be an int >= 1, got 1.5"),
    (dict(max_batch_size=True), r"max_batch_size must be an int >= 1, got True"),
    (dict(max_batch_size=0), r"max_batch_size must be an int >= 1, got 0"),
    (dict(seed=1.5), r"seed must be an int in \[0, 2\*\*63 - 1\], got 1.5"),
    (dict(seed=True), r"seed must be an int"),
    (dict(seed=-1), r"seed must be an int"),
    (dict(seed=2**70), r"seed must be an int"),
])
def test_bad_construction_arguments_are_named_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine.from_preset("tiny-vim", **{"device": "cpu", **kwargs})


def test_cuda_without_a_gpu_is_a_value_error_at_construction(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for dev in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match="needs a CUDA GPU; none is available"):
            Engine.from_preset("tiny-vim", device=dev)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        Engine.from_pretrained(device="cuda")


def test_from_pretrained_and_init_check_device_and_dtype():
    with pytest.raises(ValueError, match="device must be"):
        Engine.from_pretrained(device="meta")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine.from_pretrained(device="cpu", dtype=torch.float64)
    model = Engine.from_preset("tiny-vim", device="cpu").model
    with pytest.raises(ValueError, match="device must be"):
        Engine(model, None, device=torch.device("meta"))
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, None, device=torch.device("cpu"), max_batch_size=2.0)


# ----------------------------------------------------------------------------- generate arguments


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=2**70), r"seed must be in \[0, 9223372036854775807\]"),
    (dict(seed=[2**70]), r"seed"),
    (dict(seed=True), r"seed must be an int"),
    (dict(seed=[True]), r"seed must be an int"),
    (dict(top_k=True), r"top_k must be an int"),
    (dict(num_images=True), r"num_images must be an int"),
    (dict(class_ids=[True]), r"class_ids must be ints in \[0, 10\), got True"),
    (dict(class_ids=True), r"class_ids must be ints in \[0, 10\), got True"),
    (dict(class_ids=[1, False]), r"class_ids must be ints in \[0, 10\), got False"),
])
def test_bools_and_huge_seeds_are_named(kwargs, match):
    vim = Engine.from_preset("tiny-vim", device="cpu")
    with pytest.raises(ValueError, match=match):
        vim.generate_codes(**{"class_ids": [1], **kwargs})


def test_every_prompt_is_checked_before_any_decode_step(monkeypatch):
    eng = Engine.from_preset("tiny-t2i", device="cpu", max_batch_size=1)
    calls = []
    monkeypatch.setattr(eng.model.decoder, "prefill", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"prompts\[2\] is not valid Unicode"):
        eng.generate_codes(["a red circle", "a blue square", "bad \udcff"], seed=0)
    assert calls == []
    with pytest.raises(ValueError, match=r"prompts\[0\] is not valid Unicode"):
        eng.generate_codes("\ud800", seed=0)
    assert calls == []


def test_prompts_are_tokenized_once_and_warn_once(t2i):
    with pytest.warns(UserWarning, match="truncated to 128") as rec:
        codes = t2i.generate_codes(["red " * 100], num_images=1, seed=0)
    assert len([w for w in rec if "truncated" in str(w.message)]) == 1
    assert codes.shape == (1, 8, 8)


# ----------------------------------------------------------------------------- decode memory


def test_pixel_decode_and_encode_are_chunked_by_max_batch_size(monkeypatch):
    eng = Engine.from_preset("tiny-vim", device="cpu", max_batch_size=2)
    decoded = _record(monkeypatch, eng.model.vqgan, "decode")
    imgs = eng.generate(class_ids=[1], num_images=5, seed=0, cfg_scale=1.0)
    assert len(imgs) == 5 and [d.shape[0] for d in decoded] == [2, 2, 1]
    decoded.clear()
    codes = torch.randint(0, 256, (6, 8, 8))
    px = eng.decode_codes(codes, output_type="pt")
    assert px.shape == (6, 3, 64, 64) and [d.shape[0] for d in decoded] == [2, 2, 2]
    whole = Engine(eng.model, None, device=torch.device("cpu"), max_batch_size=16)
    assert torch.allclose(px, whole.decode_codes(codes, output_type="pt"), atol=1e-5)

    encoded = _record(monkeypatch, eng.model.vqgan, "encode")
    x = torch.rand(5, 3, 64, 64)
    got = eng.encode_images(x)
    assert got.shape == (5, 8, 8) and [e.shape[0] for e in encoded] == [2, 2, 1]
    encoded.clear()
    feats = eng.image_features(x, 0)
    assert feats.shape == (5, eng.cfg.decoder.width) and [e.shape[0] for e in encoded] == [2, 2, 1]


# ----------------------------------------------------------------------------- silent garbage


def test_nan_tokenizer_decoder_weights_raise_floating_point_error():
    eng = Engine.from_preset("tiny-t2i", device="cpu")
    with torch.no_grad():
        eng.model.vqgan.dec_patch.weight.fill_(float("nan"))
    codes = torch.zeros(1, 8, 8, dtype=torch.long)
    for output_type in ("pt", "pil"):
        with pytest.raises(FloatingPointError, match="non-finite pixels"):
            eng.decode_codes(codes, output_type=output_type)


@pytest.fixture(scope="module")
def vim() -> Engine:
    return Engine.from_preset("tiny-vim", device="cpu")


def _pixels_seen(eng: Engine, monkeypatch, images) -> torch.Tensor:
    seen = _record(monkeypatch, eng.model.vqgan, "encode")
    eng.encode_images(images)
    return torch.cat(seen)


def test_high_bit_depth_and_float_images_are_scaled_not_clipped(vim, monkeypatch):
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (64, 64), dtype=np.uint16)
    f = rng.random((64, 64), dtype=np.float32)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    imgs = [Image.fromarray(a16), Image.fromarray(a16.astype(np.int32), mode="I"), Image.fromarray(f, mode="F"),
            Image.fromarray(rgb), Image.fromarray(rgb[..., 0])]
    assert [im.mode for im in imgs] == ["I;16", "I", "F", "RGB", "L"]
    px = _pixels_seen(vim, monkeypatch, imgs)  # (5, 3, 64, 64)
    gray16 = torch.from_numpy(a16.astype(np.float32) / 65535)
    for i in (0, 1):
        assert_equal(px[i], gray16.expand(3, 64, 64), msg=f"image {i}")
    assert_equal(px[2], torch.from_numpy(f).expand(3, 64, 64))
    assert_equal(px[3], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert_equal(px[4], (torch.from_numpy(rgb[..., 0]).float() / 255).expand(3, 64, 64))


@pytest.mark.parametrize("image, match", [
    (Image.fromarray(np.full((64, 64), 70000, np.int32), mode="I"), r"images\[0\] is a 32-bit integer.*\[0, 65535\]"),
    (Image.fromarray(np.full((64, 64), -1, np.int32), mode="I"), r"images\[0\] is a 32-bit integer.*\[0, 65535\]"),
    (Image.fromarray(np.full((64, 64), 1.5, np.float32), mode="F"), r"images\[0\] is a float .*\[0, 1\]"),
    (Image.fromarray(np.full((64, 64), np.nan, np.float32), mode="F"), r"images\[0\] is a float .*\[0, 1\]"),
])
def test_out_of_range_high_bit_depth_images_are_rejected(vim, image, match):
    with pytest.raises(ValueError, match=match):
        vim.encode_images([image])


_INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("dtype", _INT_DTYPES + [np.dtype(">i8"), np.dtype(">u2")], ids=str)
def test_codes_of_every_numpy_integer_dtype_decode(vim, dtype):
    codes = np.random.default_rng(0).integers(0, 100, (2, 8, 8))
    want = vim.decode_codes(torch.from_numpy(codes), output_type="pt")
    assert_equal(vim.decode_codes(codes.astype(dtype), output_type="pt"), want)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
                                   torch.uint32, torch.uint64], ids=str)
def test_codes_of_every_torch_integer_dtype_decode(vim, dtype):
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 100, (2, 8, 8)))
    want = vim.decode_codes(codes, output_type="pt")
    assert_equal(vim.decode_codes(codes.to(dtype), output_type="pt"), want)


def test_unsigned_codes_past_int64_are_reported_as_they_are(vim):
    big = np.full((1, 8, 8), 2**64 - 1, dtype=np.uint64)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 256\).*18446744073709551615"):
        vim.decode_codes(big)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 256\).*18446744073709551615"):
        vim.decode_codes(torch.from_numpy(big.astype(np.int64)).to(torch.uint64))
    for bad in (np.zeros((1, 8, 8), bool), torch.zeros(1, 8, 8, dtype=torch.bool), np.zeros((1, 8, 8), np.float16),
                np.zeros((1, 8, 8), object)):
        with pytest.raises(ValueError, match="codes must be an integer"):
            vim.decode_codes(bad)


# ----------------------------------------------------------------------------- round two (issue 25)


_IN_FLIGHT = """
import sys, time, torch
torch.set_num_threads(1)
from vqim.engine import Engine
kind = sys.argv[1]
if kind == "readme":
    Engine.from_pretrained().generate(["a large red circle in the center"])
else:
    eng = Engine.from_preset("tiny-t2i", device="cpu")
    if kind == "async":
        import asyncio
        loop = asyncio.new_event_loop()
        loop.create_task(eng.agenerate(["a red circle"], 8, seed=1))
        loop.run_until_complete(asyncio.sleep(0.05))
    else:
        eng.submit(["a red circle"], num_images=8, seed=0)
        time.sleep(float(kind))
print("exiting")
"""


def test_exiting_with_requests_in_flight_is_clean(tmp_path):
    """A program that submits and exits without close(): the loop is stopped before the
    interpreter tears down (it used to abort with SIGABRT / SIGSEGV most times)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(_IN_FLIGHT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind in ("0", "0.01", "0.05", "0.2", "async", "readme"):
        p = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, timeout=120,
                           env=env)
        assert p.returncode == 0 and p.stdout.strip() == "exiting", (kind, p.returncode, p.stderr[-2000:])
        assert "terminate called" not in p.stderr, (kind, p.stderr[-2000:])


def test_counts_are_checked_before_anything_per_image_is_made():
    eng = Engine.from_preset("tiny-t2i", device="cpu", max_queue=4)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"num_images: 1 prompts x 10000000 images = 10000000 images, over the 4"):
        eng.submit(["a red circle"], num_images=10**7)
    with pytest.raises(ValueError, match=r"candidates must be at most 64, got 10000000"):
        eng.generate_codes(["a red circle"], candidates=10**7)
    # A blocking call of ten million images waits outside the queue, one image made at a time: its
    # timeout ends it long before any memory of that size could be taken.
    with pytest.raises(TimeoutError):
        eng.generate_codes(["a red circle"], num_images=10**7, timeout=0.5)
    assert time.monotonic() - t0 < 30
    assert eng.generate_codes(["a red circle"], seed=0).shape == (1, 8, 8)  # the loop goes on
    eng.close()


def test_a_blocking_call_larger_than_the_queue_enters_as_it_drains():
    """Backpressure: 15 images through a queue of 4; progress counts every token, the images are
    the ones each draws alone."""
    eng = Engine.from_preset("tiny-vim", device="cpu", max_queue=4, max_batch_size=2)
    n = eng.cfg.decoder.num_tokens
    seen = []
    got = eng.generate_codes(class_ids=[1, 2, 3], num_images=5, seed=[0, 10, 20], progress=seen.append)
    assert got.shape == (15, 8, 8) and sum(seen) == 15 * n
    for k in (0, 7, 14):
        i, j = divmod(k, 5)
        assert_equal(got[k], eng.generate_codes(class_ids=[i + 1], seed=10 * i + j)[0], msg=f"image {k}")
    eng.close()


@pytest.mark.parametrize("decoding", ["raster", "wavefront", "sjd"])
def test_nan_weights_are_a_floating_point_error_in_every_decoding(decoding, tmp_path, capsys):
    eng = Engine.from_preset("tiny-t2i", device="cpu")
    with torch.no_grad():
        eng.model.decoder.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="no finite logit"):
        eng.generate_codes(["a red circle"], seed=0, decoding=decoding)
    eng.save_pretrained(tmp_path / "nan")
    eng.close()
    from vqim.engine.entrypoints.cli import main

    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(tmp_path / "nan"), "--device", "cpu", "-q",
                 "--decoding", decoding, "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vqim: error: a decode step produced no finite logit"), err


def test_text_that_is_not_unicode_is_named_wherever_it_is_given(t2i):
    bad = "a red \ud800 circle"
    with pytest.raises(ValueError, match=r"negative_prompt is not valid Unicode text"):
        t2i.generate_codes(["a red circle"], negative_prompt=bad)
    with pytest.raises(ValueError, match=r"negative_prompt\[1\] is not valid Unicode text"):
        t2i.generate_codes(["a", "b"], negative_prompt=["x", bad])
    with pytest.raises(ValueError, match=r"prompts\[0\] is not valid Unicode text"):
        t2i.submit([bad])
    scored = Engine.from_pretrained(device="cpu")
    with pytest.raises(ValueError, match=r"prompts\[0\] is not valid Unicode text"):
        scored.score(torch.rand(1, 3, 64, 64), bad)
    scored.close()
    with pytest.raises(ValueError, match="a prompt is not valid Unicode text"):
        t2i.tokenizer.ids(bad)  # the backstop every text passes through


@pytest.mark.parametrize("tp", [0, -1, True, 1.0, "2"])
def test_tp_is_an_int_of_at_least_one(tp):
    with pytest.raises(ValueError, match=r"tp must be an int >= 1 .*got"):
        Engine.from_preset("tiny-t2i", device="cpu", tp=tp)
    with pytest.raises(ValueError, match=r"tp must be an int >= 1"):
        Engine.from_pretrained(device="cpu", tp=tp)


def test_return_scores_and_a_model_off_the_engine_device_are_named(t2i):
    with pytest.raises(ValueError, match="return_scores must be true or false, got 'no'"):
        t2i.generate_codes(["x"], return_scores="no")
    with pytest.raises(ValueError, match="return_scores must be true or false"):
        t2i.generate(["x"], return_scores=1)
    from vqim.engine import ModelConfig
    from vqim.engine.weights import build_model

    with pytest.raises(ValueError, match=r"model: its weights are on meta .* device='cpu'"):
        Engine(build_model(ModelConfig.from_name("tiny-t2i"), "meta"), t2i.tokenizer, device="cpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        Engine.from_preset("tiny-t2i", device="meta")
