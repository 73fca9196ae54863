"""Stage 1: the ViT-VQGAN tokenizer (the engine's ``ViTVQGAN``), trained on images alone."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqim import kernels as K
from vqim.engine.models import ViTVQGAN, init_weights

from .checkpoint import blame
from .config import TrainConfig
from .data import ImageDataset, batch_indices
from .losses import (Discriminator, PerceptualLoss, generator_adv_loss, l2_loss, logit_laplace_loss, psnr,
                     straight_through, vq_loss)
from .precision import fp32_layer_norms
from .run import Run, build_optimizer, say
from .stage2 import read_tokenizer


class TokenizerForward(nn.Module):
    """Stage-1 forward over the engine's ViTVQGAN: encode -> quantize (straight-through) -> decode."""

    def __init__(self, vqgan: ViTVQGAN):
        super().__init__()
        self.vqgan = vqgan

    def forward(self, pixels: torch.Tensor):
        z = self.vqgan.encode_latents(pixels)  # (B, N, D) fp32, l2-normalized
        b, n, d = z.shape
        idx, codes = K.codebook_quantize(z.reshape(b * n, d), self.vqgan.codebook)  # (B*N,), (B*N, D)
        codes = codes.view(b, n, d)
        recon = self.vqgan.decode_latents(straight_through(z, codes))  # (B, 3, H, W) fp32
        return recon, z, codes, idx.view(b, n)


@torch.no_grad()
def spherical_kmeans(z: torch.Tensor, k: int, *, seed: int, iters: int = 10, seed_sample: int = 100_000,
                     chunk: int = 65536) -> torch.Tensor:
    """``k`` unit centroids ``[k, D]`` of unit vectors ``z`` ``[n, D]`` (float32).

    Seeding is k-means++ (each next centroid drawn with probability proportional to its squared
    distance to the nearest chosen one) on at most ``seed_sample`` rows, so rare patches such as
    shape edges get centroids of their own; then ``iters`` Lloyd steps on all rows, assigning by
    largest dot product and renormalizing the means. A centroid that loses all its rows keeps
    its place. Deterministic given ``seed``.
    """
    n, d = z.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} latents, got {n}; raise codebook_init_images")
    g = torch.Generator().manual_seed(seed)
    z = z.float().cpu()
    sub = z[torch.randperm(n, generator=g)[:seed_sample]]  # (m, D)
    cent = torch.empty(k, d)
    cent[0] = sub[torch.randint(len(sub), (1,), generator=g)]
    dmin = (sub - cent[0]).square().sum(1)  # (m,)
    for j in range(1, k):
        cent[j] = sub[torch.multinomial(dmin + 1e-12, 1, generator=g)]
        dmin = torch.minimum(dmin, (sub - cent[j]).square().sum(1))
    for _ in range(iters):
        sums = torch.zeros(k, d)
        counts = torch.zeros(k)
        for i in range(0, n, chunk):
            part = z[i:i + chunk]  # (c, D)
            a = (part @ cent.T).argmax(1)  # (c,)
            sums.index_add_(0, a, part)
            counts.index_add_(0, a, torch.ones(len(a)))
        cent = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1, eps=1e-12), cent)
    return cent


class Stage1(Run):
    """ViT-VQGAN training: VQ + adversarial + perceptual + logit-Laplace + L2 (seed §[0096])."""

    stage = "stage1"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        vcfg = self.model_cfg.vqgan
        if cfg.w_logit_laplace > 0 and vcfg.output != "sigmoid":
            raise ValueError("w_logit_laplace > 0 needs vqgan.output='sigmoid' (the logit-Laplace mean); "
                             "set w_logit_laplace to 0 for a raw-output decoder")
        self.data = ImageDataset(cfg.data, vcfg.image_size)
        self.val = ImageDataset(cfg.val_data or cfg.data, vcfg.image_size, limit=cfg.val_images)
        self.vqgan = ViTVQGAN(vcfg).to(self.device)
        init_weights(self.vqgan, cfg.seed)
        self.finetune = cfg.finetune_decoder_from is not None
        if self.finetune:
            self.load_frozen_encoder(Path(cfg.finetune_decoder_from))
        fp32_layer_norms(self.vqgan)
        if cfg.codebook_init == "kmeans" and not self.finetune:
            self.init_codebook_kmeans()
        encoder = [p for n, p in self.vqgan.named_parameters() if n.startswith("enc_")]
        if cfg.encoder_lr_scale == 0 or self.finetune:
            for p in encoder:
                p.requires_grad_(False)
        self.gen = self.wrap(TokenizerForward(self.vqgan))
        rest = [p for n, p in self.vqgan.named_parameters() if not n.startswith("enc_") and p.requires_grad]
        self.opt = build_optimizer(cfg.optimizer or "adamw", rest, cfg.lr, cfg.weight_decay)
        if cfg.encoder_lr_scale > 0 and not self.finetune:
            self.opt.add_param_group({"params": encoder, "lr_scale": cfg.encoder_lr_scale})
        self.use_adv = cfg.w_adv > 0
        if self.use_adv:
            self.disc_module = Discriminator(vcfg.image_size, cfg.disc_channels, cfg.disc_max_channels).to(self.device)
            self.disc = self.wrap(self.disc_module)
            self.opt_d = torch.optim.Adam(self.disc_module.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.0, 0.99))
            self.opt_d.param_groups[0]["lr_scale"] = (cfg.disc_lr or cfg.lr) / cfg.lr
        # Tokens that chose each code since the last restart check (long, summed over ranks there).
        self.code_hits = torch.zeros(vcfg.codebook_size, dtype=torch.long, device=self.device)
        self.perceptual = None
        if cfg.w_perceptual > 0:
            if cfg.perceptual_weights:
                self.perceptual = PerceptualLoss(cfg.perceptual_weights).to(self.device)
            elif self.dist.main:
                say("perceptual loss off: no perceptual_weights (a TorchScript feature network) given")

    def optimizers(self):
        return [self.opt, self.opt_d] if self.use_adv else [self.opt]

    def state(self) -> dict:
        s = {"model": self.vqgan.state_dict(), "optimizer": self.opt.state_dict(), "code_hits": self.code_hits.cpu()}
        if self.use_adv:
            s.update(disc=self.disc_module.state_dict(), disc_optimizer=self.opt_d.state_dict())
        return s

    def load_state(self, s: dict) -> None:
        self.vqgan.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        if "code_hits" in s:
            self.code_hits.copy_(s["code_hits"])
        if self.use_adv:
            self.disc_module.load_state_dict(s["disc"])
            self.opt_d.load_state_dict(s["disc_optimizer"])

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        idx = self.shard(batch_indices(len(self.data), cfg.batch_size, step, cfg.seed))
        x = self.data.pixels(idx).to(self.device)  # (b, 3, H, W)
        adv = self.use_adv and step >= cfg.adv_start
        self.gen.train()
        with self.autocast():
            recon, z, codes, idx = self.gen(x)
            parts = {"vq": vq_loss(z, codes, cfg.beta), "l2": l2_loss(recon, x)}
            if cfg.w_logit_laplace > 0:
                parts["logit_laplace"] = logit_laplace_loss(recon, x)
            if self.perceptual is not None:
                parts["perceptual"] = self.perceptual(recon, x)
            if adv:
                self.disc_module.requires_grad_(False)
                parts["adv"] = generator_adv_loss(self.disc_module(recon))
                self.disc_module.requires_grad_(True)
        weights = {"vq": cfg.w_vq, "l2": cfg.w_l2, "logit_laplace": cfg.w_logit_laplace,
                   "perceptual": cfg.w_perceptual, "adv": cfg.w_adv}
        loss = sum(weights[k] * v for k, v in parts.items())
        loss.backward()
        self.check_finite(step, "the loss", loss)
        rec = {"loss": self.dist.all_mean(loss.detach()).item(),
               **{k: self.dist.all_mean(v.detach()).item() for k, v in parts.items()}}
        rec["grad_norm"] = self.clip_and_step(step, self.vqgan.parameters(), self.opt, "tokenizer")
        if cfg.code_restart_every and not self.finetune:
            self.code_hits += torch.bincount(idx.reshape(-1), minlength=self.code_hits.numel())
            if (step + 1) % cfg.code_restart_every == 0:
                rec["codes_restarted"] = self.restart_dead_codes(step, z.detach(), codes.detach())
        if adv:
            rec["d_loss"] = self.discriminator_step(step, x, recon)
        return rec

    @torch.no_grad()
    def load_frozen_encoder(self, path: Path) -> None:
        """Encoder and codebook of the tokenizer at ``path`` (its encoder side must be this
        config's), frozen: only the decoder trains, so the codes stage 2 learned stay valid."""
        src, state = read_tokenizer(path, "finetune_decoder_from")
        mine = self.vqgan.cfg
        side = ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "codebook_size", "code_dim")
        diff = [f for f in side if getattr(src, f) != getattr(mine, f)]
        if diff:
            raise ValueError(f"finetune_decoder_from: {path}: its encoder differs from the config's in {diff}")
        keep = {k: v for k, v in state.items() if k.startswith("enc_") or k == "codebook"}
        with blame("finetune_decoder_from", path):
            missing, _ = self.vqgan.load_state_dict(keep, strict=False)
        if any(k.startswith("enc_") or k == "codebook" for k in missing):
            raise ValueError(f"finetune_decoder_from: {path}: lacks encoder weights {missing[:4]}")
        self.vqgan.codebook.requires_grad_(False)

    @torch.no_grad()
    def init_codebook_kmeans(self) -> None:
        """Codebook <- spherical k-means of the initial encoder's latents (rank 0, broadcast).

        A random ViT's latents are close to a random projection of the patch, so clustering them
        partitions the patches themselves: on the shapes data, 2048 clusters of the initial
        latents already separate shape edges that 3000 steps from a random codebook did not.
        A resumed run loads its codebook from the checkpoint instead.
        """
        cfg, vq = self.cfg, self.vqgan
        if self.dist.main:
            n = min(cfg.codebook_init_images, len(self.data))
            lat = []
            for i in range(0, n, 256):
                x = self.data.pixels(range(i, min(i + 256, n))).to(self.device)
                lat.append(vq.encode_latents(x).reshape(-1, vq.cfg.code_dim).cpu())  # (b*N, D)
            book = spherical_kmeans(torch.cat(lat), vq.cfg.codebook_size, seed=cfg.seed)
            vq.codebook.data.copy_(book.to(vq.codebook.dtype))
        if self.dist.world > 1:
            dist.broadcast(vq.codebook.data, 0)

    @torch.no_grad()
    def restart_dead_codes(self, step: int, z: torch.Tensor, codes: torch.Tensor) -> int:
        """Move every code no token chose since the last check onto a latent of this batch.

        z, codes: ``[b, N, D]`` l2-normalized latents of this rank's batch and their chosen codes.
        Latents are drawn with probability proportional to their squared quantization error
        (k-means++'s rule), so dead codes go where the codebook fits worst rather than onto the
        background that most tokens show. Rank 0 draws (a generator keyed by ``(seed, step)``,
        so a resumed run draws the same) and broadcasts the codebook. Dead rows of the optimizer's moments are zeroed, so the moved code starts
        fresh. Returns how many codes moved.
        """
        hits = self.code_hits
        if self.dist.world > 1:
            dist.all_reduce(hits)
        dead = (hits == 0).nonzero().flatten()  # (n_dead,)
        hits.zero_()
        if dead.numel() == 0:
            return 0
        book = self.vqgan.codebook
        if self.dist.main:
            flat = z.reshape(-1, z.shape[-1]).float()  # (b*N, D)
            err = (flat - codes.reshape(flat.shape).float()).square().sum(-1).cpu() + 1e-12  # (b*N,)
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            pick = torch.multinomial(err, dead.numel(), replacement=True, generator=g).to(flat.device)
            book.data[dead] = flat[pick].to(book.dtype)
        if self.dist.world > 1:
            dist.broadcast(book.data, 0)
        for v in self.opt.state.get(book, {}).values():
            if torch.is_tensor(v) and v.shape == book.shape:
                v[dead] = 0
        return int(dead.numel())

    @torch.no_grad()
    def validate(self) -> dict:
        return evaluate_tokenizer(self.vqgan, self.val, batch_size=self.local_batch, device=self.device)


@torch.no_grad()
def evaluate_tokenizer(vqgan: ViTVQGAN, data: ImageDataset, *, batch_size: int = 16,
                       device: torch.device | str = "cpu") -> dict:
    """Codebook usage (share of codes used over the pass), reconstruction L2 and PSNR."""
    was = vqgan.training
    vqgan.eval()
    used = torch.zeros(vqgan.cfg.codebook_size, dtype=torch.bool, device=device)
    se, ps, n = 0.0, 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data.pixels(range(i, min(i + batch_size, len(data)))).to(device)
        ids = vqgan.encode(x)  # (b, g, g)
        used[ids.reshape(-1)] = True
        recon = vqgan.decode(ids).clamp(0, 1)
        se += (recon - x).square().flatten(1).mean(1).sum().item()
        ps += psnr(recon, x).sum().item()
        n += x.shape[0]
    vqgan.train(was)
    return {"codebook_usage": used.float().mean().item(), "recon_l2": se / n, "psnr": ps / n}
