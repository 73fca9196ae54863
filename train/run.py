"""The run loop both stages share: distributed setup, schedule, step loop, metrics, checkpoints.

A stage (``stage1.py``, ``stage2.py``) subclasses :class:`Run` with its models, optimizers,
``train_step`` and checkpoint contents. One step:

1. the global batch of step ``t`` is a function of ``(seed, t)`` (``data.batch_indices``); each
   data-parallel rank takes its contiguous shard. Condition dropout is drawn for the global
   batch from a seeded generator and sharded the same way, so N ranks see what one process with
   the same global batch sees.
2. forward under ``torch.autocast(bf16)`` when enabled; layer norms (``precision.FP32LayerNorm``)
   and the decoder's final norm and logits run in fp32 (autocast off, fp32 inputs).
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vqim import kernels as K
from vqim.engine.weights import atomic_write

from .checkpoint import blame, read_checkpoint, stale_temp_files, write_checkpoint
from .config import TrainConfig
from .losses import discriminator_loss, r1_penalty
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


def say(msg: str) -> None:
    print(f"vqim train: {msg}", file=sys.stderr, flush=True)


def build_optimizer(kind: str, params, lr: float, weight_decay: float | None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay or 0.0)
    kw = {} if weight_decay is None else {"weight_decay": weight_decay}
    if kind == "adafactor":
        return Adafactor(params, lr=lr, **kw)
    return K.Adafactor8bit(params, lr=lr, **kw)


# ----------------------------------------------------------------------------- the run


class Run:
    """The shared part of a training run. A stage subclass supplies ``stage``, its models and
    ``optimizers()``, ``train_step``, ``validate`` and the checkpoint contents (``state``/``load_state``)."""

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
            say(f"resuming a {len(rngs)}-rank checkpoint on {self.dist.world} ranks: dropout streams differ "
                 "from the original run")
        self.saved_step = ckpt["step"]
        return ckpt["step"]

    def remove_stale_temp_files(self) -> None:
        """Delete what a kill during a checkpoint (or metrics) write left beside it. A run owns its
        out_dir, so at its start no write is in flight and every such temporary file is stale."""
        for p in stale_temp_files(self.ckpt_path) + stale_temp_files(self.out / METRICS):
            p.unlink(missing_ok=True)
            say(f"removed {p}, left by a run killed while writing it")

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
            say(f"resume: dropped {len(lines) - len(kept)} record(s) of {path} past the checkpoint's step {step}")

    # ------------------------------------------------------------------ loop

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def validate(self) -> dict:
        return {}

    def run(self, *, resume: bool = False, stop_after: int | None = None,
            on_step: Callable[[int, Run], None] | None = None) -> list[dict]:
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
                        say(f"{self.stage} validation: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
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

    def discriminator_step(self, step: int, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One step of the adversarial discriminator (a run with ``disc``, ``disc_module`` and
        ``opt_d``) on ``real`` and detached ``fake`` images ``[b, 3, H, W]``, with the R1 penalty
        when ``r1_gamma > 0``; returns its loss, the mean over ranks."""
        with self.autocast():
            logits = self.disc(torch.cat([real, fake.detach()]))  # (2b,)
            d_loss = discriminator_loss(logits[: real.shape[0]], logits[real.shape[0]:])
            if self.cfg.r1_gamma > 0:
                d_loss = d_loss + 0.5 * self.cfg.r1_gamma * r1_penalty(self.disc_module, real)
        d_loss.backward()
        self.check_finite(step, "the discriminator loss", d_loss)
        self.clip_and_step(step, self.disc_module.parameters(), self.opt_d, "discriminator")
        return self.dist.all_mean(d_loss.detach()).item()


class ModelRun(Run):
    """A run whose checkpoint is one whole model and one optimizer (``self.model``, ``self.opt``)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
