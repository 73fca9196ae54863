"""The training stack: losses, data, schedule, both stages end to end on CPU, resume, NaN stop,
export into the engine, kernels vs torch references, and DDP with gloo on 2 processes.

Models are tiny (16 px images, a 4 x 4 token grid, width 32) so the file runs in about two
minutes on 2 cores; torch runs single-threaded here (thread spin-waits dominate such small ops).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vqim import kernels as K
from vqim.engine import Engine
from vqim.train import shapes, train
from vqim.train.cli import main as train_cli
from vqim.train.config import TrainConfig
from vqim.train.data import ImageDataset, batch_indices, load_image, train_sentencepiece
from vqim.train.export import export, model_from_checkpoint
from vqim.train.losses import (Discriminator, PerceptualLoss, discriminator_loss, generator_adv_loss,
                               logit_laplace_loss, psnr, straight_through, vq_loss)
from vqim.train.precision import fp32_layer_norms
from vqim.train.run import CHECKPOINT, TrainingDiverged, lr_at
from vqim.train.stage1 import Stage1, evaluate_tokenizer, spherical_kmeans
from vqim.train.stage2 import PredictorForward

VQGAN = dict(image_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_dim=64, codebook_size=64, code_dim=8)
T2I = {"vqgan": VQGAN,
       "decoder": dict(vocab_size=64, grid_h=4, grid_w=4, width=32, layers=2, heads=2, mlp_dim=64,
                       conv_kernel=[3, 3], conv_layers=[0], memory_dim=32),
       "text": dict(vocab_size=384, width=32, layers=1, heads=2, mlp_dim=64, max_len=32)}
VIM = {"vqgan": VQGAN,
       "decoder": dict(vocab_size=64, grid_h=4, grid_w=4, width=32, layers=2, heads=2, mlp_dim=64,
                       conv_kernel=[3, 3], num_classes=4)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.make_dataset(root, 24, seed=0, size=32)
    # Class labels for the decoder-only model: the first shape's kind as a class id.
    lines = [json.loads(x) for x in (root / "captions.jsonl").read_text().splitlines()]
    labelled = tmp_path_factory.mktemp("labelled")
    (labelled / "images").symlink_to(root / "images")
    with (labelled / "captions.jsonl").open("w") as f:
        for rec in lines:
            f.write(json.dumps({"file": rec["file"], "label": shapes.SHAPES.index(rec["caption"].split()[3])}) + "\n")
    return root, labelled


@pytest.fixture(scope="module")
def stage1_ckpt(data, tmp_path_factory):
    """Sentencepiece + stage 1 through the CLI (30 steps); returns (checkpoint, tokenizer.model, run dir)."""
    root, _ = data
    out = tmp_path_factory.mktemp("stage1")
    tok = out / "tokenizer.model"
    assert train_cli(["tokenizer", str(root), "-o", str(tok), "--vocab-size", "64"]) == 0
    cfg = dict(data=str(root), out_dir=str(out / "run"), model="tiny-t2i", model_overrides=T2I, steps=30,
               batch_size=8, lr=3e-3, warmup_steps=5, log_every=1, ckpt_every=10, progress=False)
    (out / "s1.json").write_text(json.dumps(cfg))
    assert train_cli(["stage1", str(out / "s1.json")]) == 0
    return out / "run" / CHECKPOINT, tok, out / "run"


def _cfg(data_dir, out_dir, ckpt, **kw) -> TrainConfig:
    base = dict(data=str(data_dir), out_dir=str(out_dir), model="tiny-t2i", model_overrides=T2I, steps=6,
                batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, ckpt_every=3, progress=False,
                tokenizer_checkpoint=str(ckpt))
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- losses


def test_vq_loss_gradients_and_straight_through():
    z = torch.nn.functional.normalize(torch.randn(5, 7, 8), dim=-1).requires_grad_(True)
    e = torch.nn.functional.normalize(torch.randn(5, 7, 8), dim=-1).requires_grad_(True)
    loss = vq_loss(z, e, beta=0.25)
    d2 = (z - e).square().sum(-1).mean()
    torch.testing.assert_close(loss, 1.25 * d2)
    loss.backward()
    # Codebook term moves e toward z with weight 1, commitment moves z with weight beta.
    torch.testing.assert_close(e.grad, 2 * (e - z).detach() / 35)
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - e).detach() / 35)

    z.grad = None
    st = straight_through(z, e.detach())
    torch.testing.assert_close(st, e.detach())
    (st * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(8.0).expand(5, 7, 8))


def test_pixel_losses():
    x = torch.rand(2, 3, 8, 8)
    # Logit-Laplace NLL is smallest at mean == target and is the b=1 density's NLL.
    at = logit_laplace_loss(x, x)
    assert logit_laplace_loss((x + 0.1).clamp(0, 1), x) > at
    xe = x * 0.8 + 0.1
    torch.testing.assert_close(at, (math.log(2.0) + torch.log(xe * (1 - xe))).mean())
    y = torch.full((1, 3, 4, 4), 0.5)
    torch.testing.assert_close(psnr(y + 0.1, y), torch.tensor([20.0]))


def test_discriminator_and_gan_losses():
    d = Discriminator(16, channels=8, max_channels=16)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    logits = d(x)
    assert logits.shape == (4,) and logits.dtype == torch.float32
    g = generator_adv_loss(logits)
    torch.testing.assert_close(g, torch.nn.functional.softplus(-logits).mean())
    dl = discriminator_loss(logits, -logits)
    torch.testing.assert_close(dl, 2 * torch.nn.functional.softplus(-logits).mean())
    g.backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(24)


def test_perceptual_loss_from_torchscript_file(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3))
    path = tmp_path / "features.pt"
    torch.jit.script(net).save(str(path))
    loss = PerceptualLoss(path)
    x = torch.rand(2, 3, 12, 12)
    r = torch.rand(2, 3, 12, 12, requires_grad=True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    out = loss(r, x)
    assert out.item() > 0
    out.backward()
    assert r.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.net.parameters())
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="perceptual_weights"):
        PerceptualLoss(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no such file"):
        PerceptualLoss(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- schedule, data, config


def test_lr_schedule():
    cfg = TrainConfig(data=".", out_dir=".", lr=1.0, warmup_steps=4, decay_rate=0.5, decay_steps=10, min_lr=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(14, cfg) == pytest.approx(0.5)
    assert lr_at(24, cfg) == pytest.approx(0.25)
    assert lr_at(1000, cfg) == 0.1


def test_batch_order_is_epoch_permutations_and_stateless():
    n, b = 10, 4
    stream = torch.cat([batch_indices(n, b, s, seed=3) for s in range(5)])  # 20 = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(n, b, 3, seed=3), stream[12:16])
    assert not torch.equal(batch_indices(n, b, 0, seed=4), stream[:4])


def test_data_folder_kinds(data, tmp_path):
    root, labelled = data
    ds = ImageDataset(root, 16)
    x = ds.pixels([0, 5])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert ds.captions[0].startswith("a ")
    assert ImageDataset(labelled, 16).labels[0] in (0, 1, 2)
    with pytest.raises(ValueError, match="caption"):
        ImageDataset(labelled, 16).captions
    # Class sub-folders, non-square images: center crop then resize.
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "cls" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "cls" / cls / "a.png")
    ds2 = ImageDataset(tmp_path / "cls", 8)
    assert ds2.labels == [0, 1]
    assert load_image(tmp_path / "cls" / "cat" / "a.png", 8).shape == (3, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageDataset(tmp_path / "empty", 8)


def test_sentencepiece_matches_engine_ids(data, tmp_path):
    from vqim.engine.text import SentencePieceTokenizer

    root, _ = data
    caps = ImageDataset(root, 8).captions
    path = train_sentencepiece(caps, tmp_path / "tokenizer.model", vocab_size=64)
    tok = SentencePieceTokenizer(path)
    assert tok.pad_id == 0 and tok.eos_id == 1
    ids = tok.encode(caps[0])
    assert 0 < len(ids) < len(caps[0].split()) * 3 and tok.sp.decode(ids) == caps[0]


def test_cli_writes_the_shapes_dataset(tmp_path, capsys):
    assert train_cli(["shapes", str(tmp_path / "d"), "-n", "3", "--split", "validation", "--image-size", "32"]) == 0
    ds = ImageDataset(tmp_path / "d", 32)
    assert len(ds) == 3 and all(shapes.parse_caption(c) for c in ds.captions)
    assert train_cli(["shapes", str(tmp_path / "e"), "-n", "3", "--split", "test"]) == 2
    assert "split" in capsys.readouterr().err


def test_partial_captions_name_part_of_the_same_scenes(tmp_path, capsys):
    """--partial: the same images as without it; that share of the captions drops sizes and
    positions (each shape's shape and color kept, and its analyzer reading still matching)."""
    full = shapes.make_dataset(tmp_path / "full", 60, seed=3, size=32)
    assert train_cli(["shapes", str(tmp_path / "part"), "-n", "60", "--seed", "3", "--image-size", "32",
                      "--partial", "0.5"]) == 0
    a, b = ImageDataset(full, 32), ImageDataset(tmp_path / "part", 32)
    assert a.captions[0] == b.captions[0] or shapes.parse_caption(b.captions[0])
    changed = [(x, y) for x, y in zip(a.captions, b.captions) if x != y]
    assert 10 <= len(changed) <= 50, len(changed)
    for x, y in changed:
        want, got = shapes.parse_caption(x), shapes.parse_caption(y)
        assert [(s.shape, s.color) for s in want] == [(s.shape, s.color) for s in got]
        assert all(g.size in (None, w.size) and g.position in (None, w.position) for w, g in zip(want, got))
        assert any(g.size is None or g.position is None for g in got)
    for i in range(60):
        assert (full / f"images/{i:05d}.png").read_bytes() == (tmp_path / f"part/images/{i:05d}.png").read_bytes()
    assert train_cli(["shapes", str(tmp_path / "bad"), "-n", "3", "--partial", "1.5"]) == 2
    assert "partial" in capsys.readouterr().err


def test_example_configs_parse(monkeypatch):
    from pathlib import Path

    root = Path(__file__).parent.parent
    monkeypatch.chdir(root)  # the configs' paths are relative to the repository root
    for name in ("shapes_stage1.json", "shapes_stage2.json"):
        cfg = TrainConfig.load(root / "train" / "configs" / name)
        assert cfg.model_config().name == "shapes-demo"


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="cond_dropout"):
        TrainConfig(data=".", out_dir=".", cond_dropout=1.5)
    with pytest.raises(ValueError, match="unknown training config"):
        TrainConfig.from_dict({"data": ".", "out_dir": ".", "stepz": 3})
    with pytest.raises(ValueError, match="model must be a preset"):
        TrainConfig(data=".", out_dir=".", model="nope").model_config()
    (tmp_path / "empty").mkdir()
    (tmp_path / "c.toml").write_text(f'data = "{tmp_path / "empty"}"\nout_dir = "{tmp_path / "o"}"\nsteps = 7\n')
    assert TrainConfig.load(tmp_path / "c.toml", steps=9).steps == 9
    assert train_cli(["stage1", str(tmp_path / "c.toml")]) == 2  # an empty folder holds no images


# ----------------------------------------------------------------------------- stage 1


def test_stage1_trains_and_reports_codebook_usage(stage1_ckpt):
    ckpt, _, run_dir = stage1_ckpt
    hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in hist if "loss" in h]
    assert len(steps) == 30
    first = sum(h["loss"] for h in steps[:5]) / 5
    last = sum(h["loss"] for h in steps[-5:]) / 5
    assert last < first - 0.1, (first, last)
    assert {"vq", "l2", "logit_laplace", "adv", "d_loss", "img_per_s"} <= set(steps[-1])
    val = hist[-1]
    assert 0 < val["codebook_usage"] <= 1 and val["psnr"] > 10 and val["recon_l2"] < 0.1
    c = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert c["step"] == 30 and {"model", "optimizer", "disc", "disc_optimizer", "rng"} <= set(c)
    assert not list(ckpt.parent.glob("*.tmp"))


def test_stage1_says_once_that_perceptual_is_off(data, tmp_path, capsys):
    root, _ = data
    cfg = TrainConfig(data=str(root), out_dir=str(tmp_path), model="tiny-t2i", model_overrides=T2I, steps=2,
                      batch_size=4, w_adv=0.0, progress=False)
    run = train(cfg, "stage1")
    err = capsys.readouterr().err
    assert err.count("perceptual loss off") == 1
    assert "adv" not in run.history[-1]


def test_dead_codes_move_onto_latents_of_the_batch(data, tmp_path):
    root, _ = data
    cfg = TrainConfig(data=str(root), out_dir=str(tmp_path), model="tiny-t2i", model_overrides=T2I, steps=1,
                      batch_size=4, w_adv=0.0, w_perceptual=0.0, code_restart_every=1, progress=False)
    run = Stage1(cfg)
    with torch.no_grad():
        x = run.data.pixels(batch_indices(len(run.data), 4, 0, cfg.seed))
        z = run.vqgan.encode_latents(x).reshape(-1, run.model_cfg.vqgan.code_dim)  # (4*N, D)
        used = torch.zeros(run.model_cfg.vqgan.codebook_size, dtype=torch.bool)
        used[K.codebook_lookup(z, run.vqgan.codebook)] = True
        before = run.vqgan.codebook.detach().clone()
    run.run()
    after = run.vqgan.codebook.detach()
    assert run.history[-1]["codes_restarted"] == int((~used).sum()) > 0
    # A restarted row is one of the batch's latents; a used row moved by the optimizer only.
    dist = torch.cdist(after[~used], z, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert float(dist.max()) < 1e-6
    assert torch.cdist(before[used], z).min(dim=1).values.min() > 1e-3
    assert int(run.code_hits.sum()) == 0  # counted from zero again after the check


def test_spherical_kmeans_finds_rare_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)  # (6, D)
    # Cluster 5 holds 0.5% of the rows: uniform seeding would pick it with chance ~3%; k-means++
    # (squared-distance weighting) with chance > 90%, and this seed does.
    sizes = [4000, 3000, 2000, 600, 350, 50]
    z = torch.cat([torch.nn.functional.normalize(c + 0.003 * torch.randn(n, 16, generator=g), dim=1)
                   for c, n in zip(centers, sizes)])
    got = spherical_kmeans(z[torch.randperm(len(z), generator=g)], 6, seed=1)
    assert torch.allclose(got.norm(dim=1), torch.ones(6), atol=1e-5)
    match = (got @ centers.T).max(dim=0).values  # best centroid for each true center
    assert float(match.min()) > 0.999, match
    assert torch.equal(spherical_kmeans(z, 6, seed=1), spherical_kmeans(z, 6, seed=1))
    with pytest.raises(ValueError, match="codebook_init_images"):
        spherical_kmeans(z[:5], 6, seed=0)


def test_kmeans_codebook_init_places_codes_on_initial_latents(data, tmp_path):
    root, _ = data
    cfg = TrainConfig(data=str(root), out_dir=str(tmp_path), model="tiny-t2i", model_overrides=T2I, steps=1,
                      batch_size=4, w_adv=0.0, w_perceptual=0.0, codebook_init="kmeans", progress=False)
    run = Stage1(cfg)
    with torch.no_grad():
        z = run.vqgan.encode_latents(run.data.pixels(range(len(run.data)))).reshape(-1, VQGAN["code_dim"])
    book = torch.nn.functional.normalize(run.vqgan.codebook.detach(), dim=1)
    # Every latent has a code nearby, far nearer than under the random init.
    near = (z @ book.T).max(dim=1).values
    rand = Stage1(dataclasses.replace(cfg, codebook_init="random", out_dir=str(tmp_path / "r")))
    rand_book = torch.nn.functional.normalize(rand.vqgan.codebook.detach(), dim=1)
    assert float(near.mean()) > 0.99 > float((z @ rand_book.T).max(dim=1).values.mean())
    with pytest.raises(ValueError, match="codebook_init"):
        dataclasses.replace(cfg, codebook_init="pca")


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_encoder_lr_scale_freezes_or_slows_the_encoder(data, tmp_path, scale):
    root, _ = data
    cfg = TrainConfig(data=str(root), out_dir=str(tmp_path), model="tiny-t2i", model_overrides=T2I, steps=3,
                      batch_size=4, w_adv=0.0, w_perceptual=0.0, encoder_lr_scale=scale, progress=False)
    run = Stage1(cfg)
    before = {n: p.detach().clone() for n, p in run.vqgan.named_parameters()}
    run.run()
    moved = {n: not torch.equal(before[n], p) for n, p in run.vqgan.named_parameters()}
    enc = [n for n in moved if n.startswith("enc_")]
    assert all(moved[n] for n in ("dec_patch.weight", "codebook"))
    assert any(moved[n] for n in enc) == (scale > 0)
    if scale > 0:
        assert [g.get("lr_scale", 1.0) for g in run.opt.param_groups] == [1.0, scale]
        assert run.opt.param_groups[1]["lr"] == pytest.approx(scale * run.opt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="encoder_lr_scale"):
        dataclasses.replace(cfg, encoder_lr_scale=-1.0)


def test_a_tokenizer_only_preset_trains_in_stage1_and_is_refused_by_stage2(data, tmp_path):
    root, _ = data
    cfg = TrainConfig(data=str(root), out_dir=str(tmp_path / "s1"), model="vit-vqgan-small",
                      model_overrides={"vqgan": VQGAN}, steps=2, batch_size=4, w_adv=0.0, w_perceptual=0.0,
                      progress=False)
    assert len(train(cfg, "stage1").history) == 2
    s2 = dataclasses.replace(cfg, out_dir=str(tmp_path / "s2"), tokenizer_checkpoint=str(tmp_path / "s1" / CHECKPOINT))
    with pytest.raises(ValueError, match="tokenizer-only"):
        train(s2, "stage2")


def test_decoder_finetune_keeps_encoder_and_codebook_bit_for_bit(data, stage1_ckpt, tmp_path):
    """Seed §[0106]: the encoder and codebook of a trained tokenizer, frozen, under a larger
    decoder that trains; the codes stage 2 learned stay the same codes."""
    root, _ = data
    ckpt, _, _ = stage1_ckpt
    src = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    big = {**VQGAN, "dec_width": 48, "dec_layers": 2, "dec_heads": 3, "dec_mlp_dim": 96}
    cfg = TrainConfig(data=str(root), out_dir=str(tmp_path / "ft"), model="tiny-t2i",
                      model_overrides={**T2I, "vqgan": big}, steps=4, batch_size=4, lr=3e-3, w_adv=0.0,
                      w_perceptual=0.0, progress=False, finetune_decoder_from=str(ckpt))
    run = Stage1(cfg)
    dec_before = {n: p.detach().clone() for n, p in run.vqgan.named_parameters() if n.startswith("dec_")}
    run.run()
    after = run.vqgan.state_dict()
    frozen = [k for k in src if k.startswith("enc_") or k == "codebook"]
    assert frozen and all(torch.equal(after[k], src[k]) for k in frozen)
    assert after["dec_proj.weight"].shape == (48, VQGAN["code_dim"]) and len(run.vqgan.dec_blocks) == 2
    assert all(not torch.equal(after[n], p) for n, p in dec_before.items() if n.endswith("weight"))
    # The tokens of an image are the frozen tokenizer's.
    x = run.data.pixels(range(4))
    original = Stage1(dataclasses.replace(cfg, finetune_decoder_from=None, model_overrides=T2I,
                                          out_dir=str(tmp_path / "o")))
    original.vqgan.load_state_dict(src)
    with torch.no_grad():
        assert torch.equal(run.vqgan.encode(x), original.vqgan.encode(x))
    other = {**VQGAN, "width": 48, "heads": 2}
    with pytest.raises(ValueError, match="finetune_decoder_from.*encoder differs.*width"):
        Stage1(dataclasses.replace(cfg, model_overrides={**T2I, "vqgan": other}))


def test_stage2_init_from_starts_at_a_model_directorys_weights(data, stage1_ckpt, tmp_path):
    root, _ = data
    ckpt, tok, _ = stage1_ckpt
    first = train(_cfg(root, tmp_path / "a", ckpt, steps=2, ckpt_every=2, text_tokenizer=str(tok)), "stage2")
    model_dir = tmp_path / "model"
    assert train_cli(["export", str(tmp_path / "a" / CHECKPOINT), "-o", str(model_dir)]) == 0
    from vqim.train.stage2 import Stage2

    again = Stage2(_cfg(root, tmp_path / "b", ckpt, text_tokenizer=str(tok), init_from=str(model_dir)))
    for k, v in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    wider = {**T2I, "decoder": {**T2I["decoder"], "mlp_dim": 96}}
    with pytest.raises(ValueError, match="init_from"):
        Stage2(_cfg(root, tmp_path / "c", ckpt, text_tokenizer=str(tok), init_from=str(model_dir),
                    model_overrides=wider))


# ----------------------------------------------------------------------------- stage 2 + export


def test_stage2_trains_and_export_matches_engine(data, stage1_ckpt, tmp_path):
    root, _ = data
    ckpt, tok, _ = stage1_ckpt
    cfg = _cfg(root, tmp_path / "s2", ckpt, steps=30, ckpt_every=30, text_tokenizer=str(tok), dropout=0.1,
               cond_dropout=0.2)
    run = train(cfg, "stage2")
    losses = [h["loss"] for h in run.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert isinstance(run.opt, K.Adafactor8bit)  # the default optimizer of stage 2
    state = torch.load(tmp_path / "s2" / CHECKPOINT, map_location="cpu", weights_only=False)["optimizer"]["state"]
    assert any(s["exp_avg_q"].dtype == torch.int8 for s in state.values())

    out = tmp_path / "model"
    assert train_cli(["export", str(tmp_path / "s2" / CHECKPOINT), "-o", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}
    eng = Engine.from_pretrained(out, device="cpu")

    # The same tokens through the training model and the engine's model: equal logits.
    model = run.model.eval()
    b = run.batch(0)
    with torch.no_grad():
        want = PredictorForward(model)(b["prefix"], b["tokens"][:, :-1], b["text_ids"], b["text_mask"])
        got = PredictorForward(eng.model)(b["prefix"], b["tokens"][:, :-1], b["text_ids"], b["text_mask"])
        plain = eng.model.decoder(b["prefix"], b["tokens"][:, :-1], eng.model.text(b["text_ids"], b["text_mask"]),
                                  b["text_mask"])
    assert torch.equal(want, got)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)
    # The engine tokenizes prompts with the exported sentencepiece model, as training did.
    cap = run.data.captions[0]
    ids, _ = eng.tokenizer.batch([cap], torch.device("cpu"))
    assert ids[0].tolist() == run.text_ids[0][run.text_mask[0]].tolist()
    img = eng.generate([cap], num_images=1, seed=0, progress=False)[0]
    assert img.size == (16, 16)
    # Tokenizer weights survived the round trip: same codes for the same images.
    x = run.data.pixels(range(4))
    assert torch.equal(eng.model.vqgan.encode(x), model.vqgan.encode(x))


def test_bf16_autocast_keeps_norms_and_logits_fp32(data, stage1_ckpt, tmp_path):
    root, _ = data
    ckpt, _, _ = stage1_ckpt
    run = train(_cfg(root, tmp_path, ckpt, steps=2, precision="bf16"), "stage2")
    assert all(math.isfinite(h["loss"]) for h in run.history)
    b = run.batch(0)
    seen = {}
    ln = run.model.decoder.blocks[0].ln1
    def record(name):
        def hook(module, inputs, out):
            seen[name] = out.dtype
        return hook

    hook = ln.register_forward_hook(record("ln"))
    mlp = run.model.decoder.blocks[0].mlp.fc1.register_forward_hook(record("mlp"))
    with run.autocast():
        logits = run.net(b["prefix"], b["tokens"][:, :-1], b["text_ids"], b["text_mask"])
    hook.remove()
    mlp.remove()
    assert logits.dtype == torch.float32 and seen == {"ln": torch.float32, "mlp": torch.bfloat16}
    # Outside autocast the fp32 layer norm computes what the plain one does.
    x = torch.randn(3, 32)
    fresh = torch.nn.LayerNorm(32)
    fresh.load_state_dict(ln.state_dict())
    assert torch.equal(fp32_layer_norms(torch.nn.Sequential(fresh))(x), torch.nn.functional.layer_norm(
        x, (32,), ln.weight, ln.bias, ln.eps))


# ----------------------------------------------------------------------------- resume, NaN


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_resume_is_bit_exact(data, stage1_ckpt, tmp_path, stage):
    root, _ = data
    ckpt, tok, _ = stage1_ckpt
    kw = dict(steps=6, ckpt_every=3, dropout=0.1, cond_dropout=0.5, text_tokenizer=str(tok), code_restart_every=2)
    full = train(_cfg(root, tmp_path / "a", ckpt, **kw), stage)
    train(_cfg(root, tmp_path / "b", ckpt, **kw), stage, stop_after=4)  # dies after step 4; checkpoint at 3
    resumed = train(_cfg(root, tmp_path / "b", ckpt, **kw), stage, resume=True)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]
    a = torch.load(tmp_path / "a" / CHECKPOINT, map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "b" / CHECKPOINT, map_location="cpu", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, stage1_ckpt, tmp_path):
    root, _ = data
    ckpt, _, _ = stage1_ckpt

    def poison(step, run):
        if step == 4:
            with torch.no_grad():
                run.model.decoder.head.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*checkpoint.pt \(step 3\)"):
        train(_cfg(root, tmp_path, ckpt, steps=8, ckpt_every=3), "stage2", on_step=poison)
    c = torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=False)
    assert c["step"] == 3 and all(torch.isfinite(v).all() for v in c["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- kernels vs references


def _relative_diffs(a: list[dict], b: list[dict]) -> list[float]:
    return [abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_kernels_match_references_in_training(data, stage1_ckpt, tmp_path, stage):
    """Same 3 steps with backend="triton" (interpreter: conv_attention fwd/bwd, codebook_quantize,
    Adafactor8bit kernels) and backend="torch"; per-step relative loss differences within 1e-4."""
    root, _ = data
    ckpt, _, _ = stage1_ckpt
    kw = dict(steps=3, ckpt_every=3, dropout=0.0, cond_dropout=0.3,
              optimizer="adafactor8", w_adv=0.0, w_logit_laplace=0.1)
    ref = train(_cfg(root, tmp_path / "t", ckpt, backend="torch", **kw), stage).history
    tri = train(_cfg(root, tmp_path / "k", ckpt, backend="triton", **kw), stage).history
    rel = _relative_diffs(tri, ref)
    print(f"{stage} per-step relative loss difference (triton vs torch): {['%.2e' % r for r in rel]}")
    assert len(rel) == 3 and max(rel) < 1e-4, rel


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    run = train(TrainConfig(**cfg_dict), "stage2")
    torch.save({"losses": [h["loss"] for h in run.history], "params": run.model.state_dict()},
               os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_equals_one(data, stage1_ckpt, tmp_path):
    _, labelled = data
    ckpt, _, _ = stage1_ckpt
    kw = dict(model="tiny-vim", model_overrides=VIM, steps=3, ckpt_every=3, dropout=0.0, cond_dropout=0.5,
              optimizer="adamw")
    single = train(_cfg(labelled, tmp_path / "one", ckpt, **kw), "stage2")
    cfg = dataclasses.asdict(_cfg(labelled, tmp_path / "two", ckpt, **kw))
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["losses"] == r1["losses"]  # the logged loss is the all-reduced mean
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor([h["loss"] for h in single.history]),
                               rtol=1e-5, atol=1e-6)
    for k, v in single.model.state_dict().items():
        assert torch.equal(r0["params"][k], r1["params"][k]), k
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=1e-5)
    c = torch.load(tmp_path / "two" / CHECKPOINT, map_location="cpu", weights_only=False)
    assert c["world"] == 2 and len(c["rng"]) == 2


def test_evaluate_tokenizer_usage_counts_distinct_codes(data, stage1_ckpt):
    root, _ = data
    ckpt, _, _ = stage1_ckpt
    model, _ = model_from_checkpoint(ckpt)
    ds = ImageDataset(root, 16, limit=8)
    val = evaluate_tokenizer(model.vqgan, ds, batch_size=3)
    codes = model.vqgan.encode(ds.pixels(range(8)))
    assert val["codebook_usage"] == pytest.approx(codes.unique().numel() / 64)
    with pytest.raises(ValueError, match="not a vqim training checkpoint"):
        torch.save({"x": 1}, ckpt.parent / "junk.pt")
        export(ckpt.parent / "junk.pt", ckpt.parent / "junk")
