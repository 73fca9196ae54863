"""Training loops: stage 1 (ViT-VQGAN tokenizer) and stage 2 (image-token predictor).

Both train the engine's own model classes (``vqim.engine.models``). One step:

1. the global batch of step ``t`` is a function of ``(seed, t)`` (``data.batch_indices``); each
   data-parallel rank takes its contiguous shard. Condition dropout is drawn for the global
   batch from a seeded generator and sharded the same way, so N ranks see what one process with
   the same global batch sees.
2. forward under ``torch.autocast(bf16)`` when enabled; layer norms and the decoder's final norm
   and logits run in fp32 (autocast off, fp32 inputs).
3. the loss is all-reduced for the check: a NaN or inf loss (or gradient norm) on any rank stops
   every rank with :class:`TrainingDiverged` before the optimizer steps, and the last checkpoint
   on disk is the last good one.
4. gradients clipped to global norm ``grad_clip`` (4.0), optimizer step, learning rate set from
   the schedule (linear warmup, then exponential decay).

Checkpoints (``out_dir/checkpoint.pt``) are written to a temporary file and renamed. They hold
the model, the optimizer(s) (Adafactor8bit's int8 moments included), the step (the schedule is a
function of it), every rank's RNG state and the condition-dropout generator, so ``resume=True``
continues bit for bit. They hold plain values and tensors only and are read with
``weights_only=True`` (``train/checkpoint.py``). What a killed run leaves is tidied when the next
starts: the temporary file of an interrupted checkpoint write is removed, and a resume drops the
``metrics.jsonl`` records past the checkpoint's step (they are logged again).

Data parallelism: launched with ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
environment) the run initializes ``torch.distributed`` (NCCL on GPUs, gloo on CPU) and wraps the
trained modules in ``DistributedDataParallel``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vqim import kernels as K
from vqim.engine.config import ModelConfig
from vqim.engine.models import ViTVQGAN, VQIMModel, init_weights
from vqim.engine.text import ByteTokenizer, SentencePieceTokenizer, TextTokenizer
from vqim.engine.weights import atomic_write

from .checkpoint import blame, read_checkpoint, stale_temp_files, write_checkpoint
from .config import TrainConfig
from .data import ImageDataset, batch_indices
from .losses import (Discriminator, PerceptualLoss, discriminator_loss, generator_adv_loss, l2_loss,
                     logit_laplace_loss, psnr, r1_penalty, straight_through, vq_loss)
from .optim import Adafactor

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the run stopped without stepping the optimizer."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: linear warmup to ``lr``, then exponential decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decayed = cfg.lr * cfg.decay_rate ** ((step - cfg.warmup_steps) / cfg.decay_steps)
    return max(decayed, cfg.min_lr)


# ----------------------------------------------------------------------------- precision


def _fp32_layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def fp32_layer_norms(model: nn.Module) -> nn.Module:
    """Make every ``nn.LayerNorm`` of ``model`` compute in fp32 under autocast (CPU autocast would
    run them in bf16). The weights are untouched; in fp32 runs this changes nothing."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.forward = types.MethodType(_fp32_layer_norm_forward, m)
    return model


# ----------------------------------------------------------------------------- distributed


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str | None) -> DistInfo:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _rng_state(extra: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "cond": extra.get_state()}


def _set_rng_state(s: dict, extra: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    extra.set_state(s["cond"])


def _say(msg: str) -> None:
    print(f"vqim train: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- train modules


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


class PredictorForward(nn.Module):
    """Stage-2 forward: (text encoder) + AR decoder, teacher forcing, logits in fp32."""

    def __init__(self, model: VQIMModel):
        super().__init__()
        self.text = model.text
        self.decoder = model.decoder

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """prefix ``[B, 1]``, tokens ``[B, n]`` -> logits ``[B, 1 + n, V]`` float32."""
        memory = self.text(text_ids, text_mask) if self.text is not None else None  # (B, L, W)
        dec = self.decoder
        h = dec(prefix, tokens, memory, text_mask, hidden_layer=dec.cfg.layers - 1)  # (B, 1 + n, W)
        with torch.autocast(h.device.type, enabled=False):
            return dec.head(dec.norm(h.float())).float()


def _build_optimizer(kind: str, params, lr: float, weight_decay: float | None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay or 0.0)
    kw = {} if weight_decay is None else {"weight_decay": weight_decay}
    if kind == "adafactor":
        return Adafactor(params, lr=lr, **kw)
    return K.Adafactor8bit(params, lr=lr, **kw)


# ----------------------------------------------------------------------------- the run


class _Run:
    stage = ""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist = DistInfo.setup(cfg.device)
        if cfg.device is not None:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of ranks {self.dist.world}")
        self.local_batch = cfg.batch_size // self.dist.world
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.out = Path(cfg.out_dir)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / CHECKPOINT
        self.model_cfg = cfg.model_config()
        # Same init on every rank (the seed); per-rank dropout streams after that.
        torch.manual_seed(cfg.seed)
        self.cond_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.history: list[dict] = []
        self.saved_step: int | None = None  # of the checkpoint on disk that this run wrote or resumed from

    # ------------------------------------------------------------------ helpers

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        r = self.dist.rank
        return t[r * self.local_batch: (r + 1) * self.local_batch]

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.dist.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def log(self, rec: dict) -> None:
        if self.dist.main:
            with (self.out / METRICS).open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def check_finite(self, step: int, what: str, value: torch.Tensor) -> None:
        bad = self.dist.all_mean((~torch.isfinite(value.detach().float())).float().reshape(1))
        if bad.item() > 0:
            last = "none was written" if self.saved_step is None else f"{self.ckpt_path} (step {self.saved_step})"
            raise TrainingDiverged(f"{self.stage}: {what} is {value.item()} at step {step + 1}; stopped before the "
                                   f"optimizer step. The last good checkpoint is {last}; lower lr or raise "
                                   f"warmup_steps and resume from it.")

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        raise NotImplementedError

    def load_state(self, s: dict) -> None:
        raise NotImplementedError

    def save(self, step: int) -> None:
        rng = _rng_state(self.cond_gen)
        if self.dist.world > 1:
            all_rng: list = [None] * self.dist.world
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        if self.dist.main:
            ckpt = {"stage": self.stage, "step": step, "train_config": self.cfg.to_dict(),
                    "model_config": self.model_cfg.to_dict(), "rng": all_rng, "world": self.dist.world,
                    **self.state()}
            write_checkpoint(self.ckpt_path, ckpt)
        self.dist.barrier()
        self.saved_step = step

    def load(self) -> int:
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
        ckpt = read_checkpoint(self.ckpt_path, "--resume")
        if ckpt["stage"] != self.stage:
            raise ValueError(f"--resume: {self.ckpt_path} is a {ckpt['stage']} checkpoint, this run is {self.stage}")
        rngs = ckpt.get("rng")
        if not isinstance(rngs, list) or not rngs:
            raise ValueError(f"--resume: {self.ckpt_path} holds no RNG states (a list of one per rank)")
        with blame("--resume", self.ckpt_path):
            self.load_state(ckpt)
            _set_rng_state(rngs[self.dist.rank % len(rngs)], self.cond_gen)
        if len(rngs) != self.dist.world:
            _say(f"resuming a {len(rngs)}-rank checkpoint on {self.dist.world} ranks: dropout streams differ "
                 "from the original run")
        self.saved_step = ckpt["step"]
        return ckpt["step"]

    def remove_stale_temp_files(self) -> None:
        """Delete what a kill during a checkpoint (or metrics) write left beside it. A run owns its
        out_dir, so at its start no write is in flight and every such temporary file is stale."""
        for p in stale_temp_files(self.ckpt_path) + stale_temp_files(self.out / METRICS):
            p.unlink(missing_ok=True)
            _say(f"removed {p}, left by a run killed while writing it")

    def drop_metrics_after(self, step: int) -> None:
        """Keep the metrics records of steps <= ``step`` (the resumed checkpoint's), so the steps
        run again after it are logged once. A line that does not parse is the torn last append
        of a killed run and goes too. The file is replaced whole."""
        path = self.out / METRICS
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line)
        if len(kept) < len(lines):
            atomic_write(path, lambda p: p.write_text("".join(x + "\n" for x in kept), encoding="utf-8"))
            _say(f"resume: dropped {len(lines) - len(kept)} record(s) of {path} past the checkpoint's step {step}")

    # ------------------------------------------------------------------ loop

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def validate(self) -> dict:
        return {}

    def run(self, *, resume: bool = False, stop_after: int | None = None,
            on_step: Callable[[int, _Run], None] | None = None) -> list[dict]:
        """Train to ``cfg.steps`` (or stop after step ``stop_after``); returns per-step metrics."""
        cfg = self.cfg
        if self.dist.main:
            self.remove_stale_temp_files()
        start = self.load() if resume else 0
        if not resume:
            torch.manual_seed(cfg.seed * 7919 + 17 + self.dist.rank)
            if self.dist.main and (self.out / METRICS).exists():
                (self.out / METRICS).unlink()
        elif self.dist.main:
            self.drop_metrics_after(start)
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=self.stage, unit="step", file=sys.stderr)
        with K.use_backend(cfg.backend):
            for step in range(start, cfg.steps):
                lr = lr_at(step, cfg)
                for opt in self.optimizers():
                    for g in opt.param_groups:
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                t0 = time.perf_counter()
                rec = self.train_step(step)
                dt = time.perf_counter() - t0
                rec = {"step": step + 1, "lr": lr, "img_per_s": cfg.batch_size / dt, **rec}
                self.history.append(rec)
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    self.log(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.1f}")
                if cfg.val_every and (step + 1) % cfg.val_every == 0 and step + 1 < cfg.steps:
                    self.log({"step": step + 1, **self.validate()})
                if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                    self.save(step + 1)
                if on_step is not None:
                    on_step(step + 1, self)
                if stop_after is not None and step + 1 >= stop_after:
                    break
            if bar is not None:
                bar.close()
            if not self.history or self.history[-1]["step"] == cfg.steps:
                val = self.validate()
                if val:
                    self.log({"step": cfg.steps, **val})
                    if self.dist.main:
                        _say(f"{self.stage} validation: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
                    self.final_validation = val
        return self.history

    def optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def clip_and_step(self, step: int, params, opt: torch.optim.Optimizer, what: str) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.check_finite(step, f"the {what} gradient norm", norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)


# ----------------------------------------------------------------------------- stage 1


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


class Stage1(_Run):
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
        fp32_layer_norms(self.vqgan)
        if cfg.codebook_init == "kmeans":
            self.init_codebook_kmeans()
        encoder = [p for n, p in self.vqgan.named_parameters() if n.startswith("enc_")]
        if cfg.encoder_lr_scale == 0:
            for p in encoder:
                p.requires_grad_(False)
        self.gen = self.wrap(TokenizerForward(self.vqgan))
        rest = [p for n, p in self.vqgan.named_parameters() if not n.startswith("enc_")]
        self.opt = _build_optimizer(cfg.optimizer or "adamw", rest, cfg.lr, cfg.weight_decay)
        if cfg.encoder_lr_scale > 0:
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
                _say("perceptual loss off: no perceptual_weights (a TorchScript feature network) given")

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
        if cfg.code_restart_every:
            self.code_hits += torch.bincount(idx.reshape(-1), minlength=self.code_hits.numel())
            if (step + 1) % cfg.code_restart_every == 0:
                rec["codes_restarted"] = self.restart_dead_codes(step, z.detach(), codes.detach())
        if adv:
            with self.autocast():
                logits = self.disc(torch.cat([x, recon.detach()]))  # (2b,)
                d_loss = discriminator_loss(logits[: x.shape[0]], logits[x.shape[0]:])
                if cfg.r1_gamma > 0:
                    d_loss = d_loss + 0.5 * cfg.r1_gamma * r1_penalty(self.disc_module, x)
            d_loss.backward()
            self.check_finite(step, "the discriminator loss", d_loss)
            rec["d_loss"] = self.dist.all_mean(d_loss.detach()).item()
            self.clip_and_step(step, self.disc_module.parameters(), self.opt_d, "discriminator")
        return rec

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


# ----------------------------------------------------------------------------- stage 2


def load_tokenizer_weights(path: str | Path, cfg: ModelConfig) -> dict:
    """The ViT-VQGAN state dict from a stage-1 checkpoint or an engine model directory."""
    p = Path(path)
    if p.is_dir():
        from vqim.engine.weights import load_model

        model = load_model(p)
        got, state = model.cfg.vqgan, {k: v.float() for k, v in model.vqgan.state_dict().items()}
    elif p.is_file():
        ckpt = read_checkpoint(p, "tokenizer_checkpoint")
        if ckpt["stage"] == "stage1":
            state = ckpt["model"]
        else:
            state = {k[len("vqgan."):]: v for k, v in ckpt["model"].items() if k.startswith("vqgan.")}
        with blame("tokenizer_checkpoint", p):
            got = ModelConfig.from_dict(ckpt["model_config"]).vqgan
    else:
        raise ValueError(f"tokenizer_checkpoint: no such file or directory {p}")
    if got != cfg.vqgan:
        raise ValueError(f"tokenizer_checkpoint: its tokenizer config {got} differs from the model's {cfg.vqgan}")
    return state


def text_tokenizer(path: str | None, max_len: int) -> TextTokenizer:
    return TextTokenizer(SentencePieceTokenizer(path) if path else ByteTokenizer(), max_len)


class Stage2(_Run):
    """Image-token prediction: cross-entropy over tokens of the frozen stage-1 tokenizer."""

    stage = "stage2"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        mc = self.model_cfg
        mc.require_decoder("stage2 training")
        mc.decoder.dropout = cfg.dropout
        if mc.text is not None:
            mc.text.dropout = cfg.dropout
        if cfg.tokenizer_checkpoint is None:
            raise ValueError("stage2 needs tokenizer_checkpoint (the stage-1 checkpoint or a model directory)")
        self.model = VQIMModel(mc).to(self.device)
        init_weights(self.model, cfg.seed)
        tokenizer_state = load_tokenizer_weights(cfg.tokenizer_checkpoint, mc)
        with blame("tokenizer_checkpoint", Path(cfg.tokenizer_checkpoint)):
            self.model.vqgan.load_state_dict(tokenizer_state)
        self.model.vqgan.requires_grad_(False).eval()
        fp32_layer_norms(self.model)
        self.data = ImageDataset(cfg.data, mc.vqgan.image_size)
        self.tokens = self._encode_images()  # (N, n) int32
        self.kind = "text" if mc.is_text_to_image else ("class" if mc.decoder.num_classes > 0 else "uncond")
        if self.kind == "text":
            self.tok = text_tokenizer(cfg.text_tokenizer, mc.text.max_len)
            if self.tok.vocab_size > mc.text.vocab_size:
                raise ValueError(f"text_tokenizer has {self.tok.vocab_size} ids but text.vocab_size is "
                                 f"{mc.text.vocab_size}")
            self.text_ids = [self.tok.ids(c) for c in self.data.captions]
            self.null_ids = self.tok.ids("")  # the engine's unconditional prompt: [EOS]
        elif self.kind == "class":
            self.labels = torch.tensor(self.data.labels, dtype=torch.long)
            if int(self.labels.max()) >= mc.decoder.num_classes:
                raise ValueError(f"data: label {int(self.labels.max())} >= num_classes {mc.decoder.num_classes}")
        self.net = self.wrap(PredictorForward(self.model))
        params = [p for n, p in self.model.named_parameters() if not n.startswith("vqgan.")]
        self.opt = _build_optimizer(cfg.optimizer or "adafactor8", params, cfg.lr, cfg.weight_decay)

    @torch.no_grad()
    def _encode_images(self) -> torch.Tensor:
        vq = self.model.vqgan
        out = []
        for i in range(0, len(self.data), 64):
            x = self.data.pixels(range(i, min(i + 64, len(self.data)))).to(self.device)
            out.append(vq.encode(x).flatten(1).to(torch.int32).cpu())
        return torch.cat(out)

    def optimizers(self):
        return [self.opt]

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])

    def batch(self, step: int) -> dict:
        """The rank's shard of the global batch of ``step``: prefix, tokens, text (condition-dropped)."""
        cfg, mc = self.cfg, self.model_cfg
        idx = batch_indices(len(self.data), cfg.batch_size, step, cfg.seed)  # global
        drop = torch.rand(cfg.batch_size, generator=self.cond_gen) < cfg.cond_dropout  # global
        tokens = self.tokens[idx].long()  # (B, n)
        prefix = torch.full((cfg.batch_size, 1), mc.decoder.num_classes, dtype=torch.long)
        out = {}
        if self.kind == "class":
            prefix[:, 0] = torch.where(drop, mc.decoder.num_classes, self.labels[idx])
        if self.kind == "text":
            rows = [self.null_ids if d else self.text_ids[i] for i, d in zip(idx.tolist(), drop.tolist())]
            length = max(len(r) for r in rows)
            ids = torch.full((len(rows), length), self.tok.impl.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.bool)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = True
            out = {"text_ids": self.shard(ids).to(self.device), "text_mask": self.shard(mask).to(self.device)}
        return {"prefix": self.shard(prefix).to(self.device), "tokens": self.shard(tokens).to(self.device), **out}

    def loss(self, b: dict) -> torch.Tensor:
        tokens = b["tokens"]
        with self.autocast():
            logits = self.net(b["prefix"], tokens[:, :-1], b.get("text_ids"), b.get("text_mask"))  # (b, n, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    def train_step(self, step: int) -> dict:
        self.net.train()
        self.model.vqgan.eval()
        loss = self.loss(self.batch(step))
        loss.backward()
        self.check_finite(step, "the loss", loss)
        rec = {"loss": self.dist.all_mean(loss.detach()).item()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        rec["grad_norm"] = self.clip_and_step(step, params, self.opt, "model")
        return rec


def train(cfg: TrainConfig, stage: str, *, resume: bool = False, stop_after: int | None = None,
          on_step: Callable[[int, _Run], None] | None = None) -> _Run:
    """Build the run of ``stage`` (``"stage1"`` or ``"stage2"``), train it, return it (``.history``)."""
    runs = {"stage1": Stage1, "stage2": Stage2}
    if stage not in runs:
        raise ValueError(f"stage must be one of {sorted(runs)}, got {stage!r}")
    r = runs[stage](cfg)
    r.run(resume=resume, stop_after=stop_after, on_step=on_step)
    return r

