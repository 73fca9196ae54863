"""The super-resolution module (seed §[0108]): SuperResConfig, SuperResolution, its training beside
a model (``vqim train superres``), the bundled module, and the benchmark's SSIM."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors

from tests.helpers import assert_equal
from vqim.engine.api import BUNDLED_MODEL
from vqim.engine.config import MAX_IMAGE_SIZE, ModelConfig, SuperResConfig
from vqim.engine.models import VQIMModel
from vqim.engine.superres import SuperResolution, bicubic
from vqim.engine.weights import WEIGHTS_NAME, load_config, load_model, save_pretrained
from vqim.train import shapes as S
from vqim.train.cli import main as train_cli
from vqim.train.config import TrainConfig
from vqim.train.superres import SuperResRun, reconstruct, render_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
# The last commit that exported the bundled model before the super-resolution module joined it.
BEFORE_SUPERRES = "9f7d5ce"
SMALL = dict(scale=4, channels=8, blocks=1)


def _bench():
    """benchmarks/bench_superres.py as a module (it imports its sibling _common)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_superres", ROOT / "benchmarks" / "bench_superres.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, field", [
    (dict(scale=1), "scale"), (dict(scale=9), "scale"), (dict(scale=2.0), "scale"), (dict(scale=True), "scale"),
    (dict(channels=0), "channels"), (dict(channels="32"), "channels"), (dict(blocks=0), "blocks"),
    (dict(blocks=10**6), "blocks"),
])
def test_config_refuses_bad_fields_by_name(kw, field):
    with pytest.raises(ValueError, match=rf"SuperResConfig\.{field} must be an int in \["):
        SuperResConfig(**kw)


def test_model_config_carries_superres_and_old_configs_load():
    base = ModelConfig.from_name("tiny-t2i")
    assert base.superres is None and "superres" not in base.to_dict()
    d = base.to_dict()
    d["superres"] = SMALL
    cfg = ModelConfig.from_dict(json.loads(json.dumps(d)))
    assert cfg.superres == SuperResConfig(**SMALL)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict({**d, "superres": None}).superres is None
    with pytest.raises(ValueError, match="unknown key 'depth' in config section 'superres'"):
        ModelConfig.from_dict({**d, "superres": {"depth": 3}})
    with pytest.raises(ValueError, match="config section 'superres' must be a JSON object"):
        ModelConfig.from_dict({**d, "superres": 4})
    big = {**d, "vqgan": {**d["vqgan"], "image_size": MAX_IMAGE_SIZE // 4}, "superres": {"scale": 8}}
    with pytest.raises(ValueError, match=r"superres\.scale 8 times the image size"):
        ModelConfig.from_dict(big)


# ----------------------------------------------------------------------------- module


def test_output_shape_range_and_bad_input():
    m = SuperResolution(SuperResConfig(scale=3, channels=8, blocks=2))
    with torch.no_grad():
        for p in m.parameters():  # a tail far from zero: the clamp is what holds the range
            p.normal_(0, 0.5)
        y = m(torch.rand(2, 3, 10, 12))
    assert y.shape == (2, 3, 30, 36) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1 and y.min() == 0 and y.max() == 1
    for bad in (torch.rand(3, 10, 10), torch.rand(1, 4, 10, 10)):
        with pytest.raises(ValueError, match=r"pixels must be \[B, 3, h, w\]"):
            m(bad)


def test_untrained_module_is_bicubic():
    m = SuperResolution(SuperResConfig(**SMALL))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        y = m(x)
    assert_equal(y, bicubic(x, 4))
    ref = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    assert_equal(y, ref)
    # Training moves the tail off zero, and the output off bicubic.
    with torch.no_grad():
        m.tail.bias.fill_(0.1)
    assert not torch.equal(m(x), y)


def test_save_load_round_trip_through_a_model_directory(tmp_path):
    cfg = dataclasses.replace(ModelConfig.from_name("tiny-t2i"), superres=SuperResConfig(**SMALL))
    model = VQIMModel(cfg).eval()
    with torch.no_grad():
        model.superres.tail.weight.normal_(0, 0.1)
    save_pretrained(model, tmp_path / "m")
    assert load_config(tmp_path / "m").superres == cfg.superres
    back = load_model(tmp_path / "m").eval()
    for k, v in model.state_dict().items():
        assert_equal(back.state_dict()[k], v, k)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert_equal(back.superres(x), model.superres(x))
    # A config that asks for a super-resolution module its weights lack is refused by name.
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    d["superres"]["blocks"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"superres\.blocks\.1\."):
        load_model(tmp_path / "m")


# ----------------------------------------------------------------------------- data and training


def test_pairs_show_one_scene_at_both_sizes():
    small, large, captions = render_pairs(random.Random(3), 8, 64, 4)
    assert small.shape == (8, 3, 64, 64) and large.shape == (8, 3, 256, 256)
    # Training pairs never hold a held-out description.
    assert not any(set(S.parse_caption(c)) & S.HELD_OUT for c in captions)
    ink_small = (small < 0.99).any(1).float()  # (8, 64, 64): where a shape is
    ink_large = F.avg_pool2d((large < 0.99).any(1, keepdim=True).float(), 4)[:, 0]
    agree = ((ink_large > 0.5) == (ink_small > 0.5)).float().mean(dim=(1, 2))  # (8,)
    assert agree.min() > 0.97, agree
    # Another draw is another scene.
    other, _, _ = render_pairs(random.Random(4), 8, 64, 4)
    assert not torch.equal(other, small)


def _bundled_with(superres: dict, root: Path) -> Path:
    d = json.loads((BUNDLED_MODEL / "config.json").read_text())
    d["superres"] = superres
    (root / "model.json").write_text(json.dumps(d))
    return root / "model.json"


def test_training_lowers_the_loss_and_leaves_the_rest_alone(tmp_path):
    model_json = _bundled_with(dict(scale=4, channels=16, blocks=2), tmp_path)
    cfg = TrainConfig(data="shapes", out_dir=str(tmp_path / "run"), model=str(model_json), steps=60, batch_size=4,
                      lr=2e-3, warmup_steps=2, log_every=5, ckpt_every=60, progress=False, val_images=8,
                      init_from=str(BUNDLED_MODEL), w_adv=0.0, w_perceptual=0.0)
    run = SuperResRun(cfg)
    x, target = run.batch(1000)  # a batch no step trains on

    def loss() -> float:
        with torch.no_grad():
            return F.mse_loss(run.model.superres(x), target).item()

    first = loss()
    assert first == pytest.approx(F.mse_loss(bicubic(x, 4), target).item(), rel=1e-6)
    run.run()
    # 60 steps of 4 images: about 5% below bicubic's loss, and above its PSNR on validation scenes.
    assert loss() < 0.97 * first, (first, loss())
    assert run.final_validation["psnr_superres"] > run.final_validation["psnr_bicubic"] + 0.1
    run.export(tmp_path / "out")
    out = load_model(tmp_path / "out")
    base = load_model(BUNDLED_MODEL).state_dict()
    for k, v in out.state_dict().items():
        if not k.startswith("superres."):
            assert_equal(v, base[k], k)
    for name in ("tokenizer.model", "generation.json"):
        assert (tmp_path / "out" / name).read_bytes() == (BUNDLED_MODEL / name).read_bytes()


def test_training_with_the_adversarial_loss_runs(tmp_path):
    model_json = _bundled_with(dict(scale=2, channels=4, blocks=1), tmp_path)
    cfg = TrainConfig(data="shapes", out_dir=str(tmp_path / "run"), model=str(model_json), steps=2, batch_size=2,
                      log_every=1, ckpt_every=2, progress=False, val_images=2, init_from=str(BUNDLED_MODEL),
                      w_adv=0.1, w_perceptual=0.0, disc_channels=4, disc_max_channels=8)
    run = SuperResRun(cfg)
    run.run()
    assert all("adv" in h and "d_loss" in h for h in run.history)


def test_resume_is_bit_exact_and_the_checkpoint_exports(tmp_path, capsys):
    """A run stopped after step 3 (checkpoint at 2) and resumed trains what the uninterrupted run
    trains, the discriminator included; ``vqim train export`` writes the checkpoint's model."""
    from vqim.train import train
    from vqim.train.run import CHECKPOINT

    model_json = _bundled_with(dict(scale=2, channels=4, blocks=1), tmp_path)

    def cfg(out: str) -> TrainConfig:
        return TrainConfig(data="shapes", out_dir=str(tmp_path / out), model=str(model_json), steps=4, batch_size=2,
                           log_every=1, ckpt_every=2, progress=False, val_images=2, init_from=str(BUNDLED_MODEL),
                           w_adv=0.1, w_perceptual=0.0, disc_channels=4, disc_max_channels=8)

    full = train(cfg("a"), "superres")
    train(cfg("b"), "superres", stop_after=3)
    resumed = train(cfg("b"), "superres", resume=True)
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    a = torch.load(tmp_path / "a" / CHECKPOINT, map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "b" / CHECKPOINT, map_location="cpu", weights_only=False)
    for part in ("model", "disc"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert train_cli(["export", str(tmp_path / "b" / CHECKPOINT), "-o", str(tmp_path / "out")]) == 0
    out = load_model(tmp_path / "out").state_dict()
    for k, v in b["model"].items():
        assert_equal(out[k], v, k)
    # The run joined the bundled model: its sentencepiece model goes with the export.
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (BUNDLED_MODEL / "tokenizer.model").read_bytes()


def test_bad_superres_runs_are_named(tmp_path, capsys):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({k: v for k, v in json.loads((BUNDLED_MODEL / "config.json").read_text()).items()
                                 if k != "superres"}))
    model_json = _bundled_with(SMALL, tmp_path)
    good = dict(data="shapes", out_dir=str(tmp_path / "run"), model=str(model_json), init_from=str(BUNDLED_MODEL),
                w_perceptual=0.0, progress=False)
    for over, message in ((dict(data="data/shapes/train"), "data must be 'shapes'"),
                          (dict(init_from=None), "needs init_from"),
                          (dict(model=str(plain)), "needs a model config with a 'superres' section"),
                          (dict(w_perceptual=0.1), "w_perceptual > 0 needs perceptual_weights")):
        (tmp_path / "cfg.json").write_text(json.dumps({**good, **over}))
        assert train_cli(["superres", str(tmp_path / "cfg.json")]) == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- the bundled module


def test_bundled_superres_beats_bicubic_on_held_out_scenes():
    model = load_model(BUNDLED_MODEL).eval()
    assert model.superres is not None and model.cfg.superres.scale == 4
    small, truth, captions = render_pairs(random.Random("test_superres/held_out"), 8, 64, 4, split="held_out")
    assert all(set(S.parse_caption(c)) & S.HELD_OUT for c in captions)
    recon = reconstruct(model.vqgan, small)
    bench = _bench()
    with torch.no_grad():
        sr = model.superres(recon)
    base = bicubic(recon, 4)
    assert bench.psnr(sr, truth).mean() > bench.psnr(base, truth).mean() + 0.5
    assert bench.ssim(sr, truth).mean() > bench.ssim(base, truth).mean()


def test_bundled_weights_other_than_superres_are_unchanged():
    shipped = load_safetensors((BUNDLED_MODEL / WEIGHTS_NAME).read_bytes())
    blob = subprocess.run(["git", "show", f"{BEFORE_SUPERRES}:engine/assets/demo/{WEIGHTS_NAME}"], cwd=ROOT,
                          check=True, capture_output=True).stdout
    before = load_safetensors(blob)
    assert any(k.startswith("superres.") for k in shipped)
    assert sorted(k for k in shipped if not k.startswith("superres.")) == sorted(before)
    for k, v in before.items():
        assert_equal(shipped[k], v, k)
    assert any(k.startswith(p) for k in before for p in ("vqgan.", "decoder.", "text.", "scorer."))


# ----------------------------------------------------------------------------- the benchmark's metrics


def test_ssim_of_an_image_with_itself_is_one_and_of_flat_images_is_hand_computed():
    bench = _bench()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(bench.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)
    # Flat images: no variance or covariance, so SSIM is the luminance term alone.
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.25)
    c1 = 0.01 ** 2
    want = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    assert bench.ssim(a, b).item() == pytest.approx(want, rel=1e-12)
    # Symmetric, lower for more noise.
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    noisier = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(bench.ssim(x, noisy), bench.ssim(noisy, x))
    assert (bench.ssim(x, noisier) < bench.ssim(x, noisy)).all() and (bench.ssim(x, noisy) < 1).all()
    w = bench.gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0) and w[5, 5] == w.max()
    assert w[5, 6] / w[5, 5] == pytest.approx(torch.exp(torch.tensor(-1 / (2 * 1.5 ** 2), dtype=torch.float64)))
    with pytest.raises(ValueError, match="at least 11 pixels"):
        bench.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_psnr_of_a_known_error():
    bench = _bench()
    a = torch.zeros(1, 3, 4, 4)
    assert bench.psnr(a, a + 0.1).item() == pytest.approx(20.0)
