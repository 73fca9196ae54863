"""The super-resolution module (``VQIMModel.superres``, seed §[0108]) trained beside a model.

The rest of the model is loaded from ``init_from`` and left as it is; only the super-resolution
module trains, on pairs made on the fly from the shapes grammar, which renders at any size: the
input is the model's tokenizer's reconstruction of a scene rendered at the tokenizer's size
(``decode(encode(render(scene, 64)))`` for the bundled model), the target the same scene rendered
``scale`` times larger. Scenes come from the training split only, never a held-out description.

Losses are the tokenizer's (``losses.py``): L2, the perceptual distance when ``perceptual_weights``
names a feature network, and StyleGAN's adversarial loss against a discriminator of the large
images when ``w_adv > 0``. ``data`` must be ``"shapes"``: there is no dataset on disk.

``vqim train superres CONFIG --export MODEL_DIR`` writes ``init_from``'s model, its tokenizer.model
and generation.json included, with the trained module into ``MODEL_DIR`` once training ends;
``--resume`` continues from ``checkpoint.pt`` (a step's pairs are a function of the seed and the
step, so a resumed run trains on what the uninterrupted one would have), and ``vqim train export``
exports the checkpoint like the other stages'.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from vqim.engine.models import VQIMModel
from vqim.engine.superres import bicubic
from vqim.engine.weights import TOKENIZER_NAME, load_generation_defaults, save_pretrained

from . import shapes as S
from .config import TrainConfig
from .data import to_pixels
from .losses import Discriminator, PerceptualLoss, generator_adv_loss, l2_loss, psnr
from .run import ModelRun, build_optimizer, say
from .stage2 import load_weights_from

DATA = "shapes"


def render_pairs(rng: random.Random, n: int, size: int, scale: int, *, split: str = "train"
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` scenes of ``split``, each rendered at ``size`` and at ``size * scale``:
    ``[n, 3, size, size]``, ``[n, 3, size * scale, size * scale]`` and the scenes' captions.

    ``render`` draws each shape's jitter from its rng as a share of the cell, so one seed per scene,
    replayed for both sizes, puts the shapes at the same place in both images."""
    small, large, captions = [], [], []
    for _ in range(n):
        scene = S.sample_scene(rng, split=split)
        seed = rng.getrandbits(64)
        small.append(S.render(scene, size, random.Random(seed)))
        large.append(S.render(scene, size * scale, random.Random(seed)))
        captions.append(S.caption(scene))
    return to_pixels(small), to_pixels(large), captions


@torch.no_grad()
def reconstruct(vqgan, pixels: torch.Tensor) -> torch.Tensor:
    """The tokenizer's reconstruction ``decode(encode(pixels))``, clamped to [0, 1] (a ``raw``
    decoder's output may leave it): the super-resolution module's input."""
    return vqgan.decode(vqgan.encode(pixels.to(vqgan.codebook.device))).clamp(0, 1)  # (B, 3, H, W)


class SuperResRun(ModelRun):
    """Training of ``model.superres`` on tokenizer reconstructions -> renders ``scale`` times larger."""

    stage = "superres"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        mc = self.model_cfg
        if mc.superres is None:
            raise ValueError("the superres stage needs a model config with a 'superres' section")
        if cfg.init_from is None:
            raise ValueError("the superres stage needs init_from: the model directory the super-resolution "
                             "module is added to")
        if cfg.data != DATA:
            raise ValueError(f"data must be {DATA!r} for the superres stage (pairs are rendered on the fly), "
                             f"got {cfg.data!r}")
        if cfg.w_perceptual > 0 and not cfg.perceptual_weights:
            raise ValueError("w_perceptual > 0 needs perceptual_weights (a TorchScript feature network); "
                             "set w_perceptual to 0 to train without the perceptual loss")
        self.model = VQIMModel(mc).to(self.device)  # the module's own init: its last conv is zero
        load_weights_from(self.model, Path(cfg.init_from), skip=("superres.",))
        self.model.requires_grad_(False)
        self.model.superres.requires_grad_(True)
        self.model.eval()
        self.size, self.scale = mc.vqgan.image_size, mc.superres.scale
        self.net = self.wrap(self.model.superres)
        self.opt = build_optimizer(cfg.optimizer or "adamw", list(self.model.superres.parameters()), cfg.lr,
                                   cfg.weight_decay)
        self.perceptual = PerceptualLoss(cfg.perceptual_weights).to(self.device) if cfg.w_perceptual > 0 else None
        self.use_adv = cfg.w_adv > 0
        if self.use_adv:
            self.disc_module = Discriminator(self.size * self.scale, cfg.disc_channels,
                                             cfg.disc_max_channels).to(self.device)
            self.disc = self.wrap(self.disc_module)
            self.opt_d = torch.optim.Adam(self.disc_module.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.0, 0.99))
            self.opt_d.param_groups[0]["lr_scale"] = (cfg.disc_lr or cfg.lr) / cfg.lr

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt, self.opt_d] if self.use_adv else [self.opt]

    def state(self) -> dict:
        s = super().state()
        if self.use_adv:
            s.update(disc=self.disc_module.state_dict(), disc_optimizer=self.opt_d.state_dict())
        return s

    def load_state(self, s: dict) -> None:
        super().load_state(s)
        if self.use_adv:
            self.disc_module.load_state_dict(s["disc"])
            self.opt_d.load_state_dict(s["disc_optimizer"])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's pairs of ``step`` (a function of the seed and the step): the tokenizer's
        reconstructions ``(b, 3, h, w)`` and the large renders ``(b, 3, h * scale, w * scale)``."""
        rng = random.Random(f"superres/{self.cfg.seed}/{step}/{self.dist.rank}")
        small, large, _ = render_pairs(rng, self.local_batch, self.size, self.scale)
        return reconstruct(self.model.vqgan, small), large.to(self.device)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        x, target = self.batch(step)
        self.net.train()
        with self.autocast():
            out = self.net(x)  # (b, 3, H, W)
        parts = {"l2": l2_loss(out, target)}
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(out, target)
        adv = self.use_adv and step >= cfg.adv_start
        if adv:
            self.disc_module.requires_grad_(False)
            parts["adv"] = generator_adv_loss(self.disc_module(out))
            self.disc_module.requires_grad_(True)
        weights = {"l2": cfg.w_l2, "perceptual": cfg.w_perceptual, "adv": cfg.w_adv}
        loss = sum(weights[k] * v for k, v in parts.items())
        loss.backward()
        self.check_finite(step, "the loss", loss)
        rec = {"loss": self.dist.all_mean(loss.detach()).item(),
               **{k: self.dist.all_mean(v.detach()).item() for k, v in parts.items()}}
        rec["grad_norm"] = self.clip_and_step(step, self.model.superres.parameters(), self.opt, "superres")
        if adv:
            rec["d_loss"] = self.discriminator_step(step, target, out)
        return rec

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean PSNR of the module and of bicubic upsampling against the large renders, on
        ``val_images`` validation-split scenes (the same ones every time)."""
        rng = random.Random("superres/validate")
        small, large, _ = render_pairs(rng, self.cfg.val_images, self.size, self.scale, split="validation")
        x = reconstruct(self.model.vqgan, small)
        sr, base = [], []
        for i in range(0, len(x), 32):
            xb, tb = x[i: i + 32], large[i: i + 32].to(self.device)
            sr.append(psnr(self.model.superres(xb), tb))
            base.append(psnr(bicubic(xb, self.scale), tb))
        return {"psnr_superres": torch.cat(sr).mean().item(), "psnr_bicubic": torch.cat(base).mean().item()}

    def export(self, model_dir: str | Path) -> Path:
        """Write the trained model, with ``init_from``'s tokenizer.model and generation.json, to
        ``model_dir`` (``init_from`` itself is fine: it has been read whole)."""
        src = Path(self.cfg.init_from)
        tok = src / TOKENIZER_NAME
        return save_pretrained(self.model.eval(), model_dir, tokenizer_model=tok if tok.is_file() else None,
                               generation=load_generation_defaults(src) or None)


def train_superres(cfg: TrainConfig, *, export_to: str | Path | None = None, resume: bool = False) -> SuperResRun:
    """Train ``cfg``'s super-resolution module (``resume``: from its checkpoint); with
    ``export_to``, then write the model there."""
    run = SuperResRun(cfg)
    run.run(resume=resume)
    if export_to is not None and run.dist.main:
        say(f"superres: writing {export_to}")
        run.export(export_to)
    return run
