"""The fp32 Adafactor reference (Shazeer & Stern, 2018) with the hyper-parameters Parti trains with.

This file is the definition that ``vqim.kernels.Adafactor8bit`` (int8 first moments, fused step
kernels) is tested against. It is written to be read: a plain loop over parameters, one formula
per line.

For a parameter ``p`` with gradient ``g`` at step ``t`` (1-based), all arithmetic in fp32:

    beta2_t = beta2 * (1 - beta2^(t-1)) / (1 - beta2^t)      # bias-corrected decay (paper §7.1)
    G       = g * g + eps1                                    # eps1 = 1e-30, as in the paper
    rank >= 2 (factored over the last two dims, rows R x cols C; leading dims are a batch):
        r   = beta2_t * r + (1 - beta2_t) * mean_cols(G)      # (..., R)
        c   = beta2_t * c + (1 - beta2_t) * mean_rows(G)      # (..., C)
        V   = (r / mean(r))[..., :, None] * c[..., None, :]   # rank-1 estimate of E[g^2]
    rank 0 or 1:
        V   = v = beta2_t * v + (1 - beta2_t) * G             # full second moment
    u       = g / sqrt(V)
    u       = u / max(1, RMS(u) / clip_threshold)             # update clipping, RMS over the tensor
    m       = beta1 * m + (1 - beta1) * u                     # first moment, no bias correction
    p       = p - lr * (m + weight_decay * p)                 # decoupled weight decay

Choices where the paper leaves room:

* ``beta2`` is a constant (0.96) rather than the paper's ``1 - t^-0.8`` schedule; the bias
  correction above is the paper's own equivalent of Adam's, and makes ``V = G`` at step 1.
* Relative step size and parameter-scale multiplication are off: ``lr`` is absolute and comes
  from the caller (a scheduler writes ``param_group["lr"]``); so the paper's eps2 is unused.
* Decoupled weight decay is scaled by ``lr`` as in ``torch.optim.AdamW``
  (``p <- p * (1 - lr * wd) - lr * m``).
* ``r / mean(r)`` is formed before multiplying by ``c``: the product of two ~eps1 numbers would
  underflow fp32 for an all-zero gradient, while the ratio stays O(1).
* Tensors of rank > 2 (e.g. conv kernels) are factored over their last two dims, each leading
  index having its own row/column statistics, as in Hugging Face's and torch's Adafactor.

State per parameter: ``step`` (int), ``exp_avg`` (fp32, like the param), and ``exp_avg_sq_row``
+ ``exp_avg_sq_col`` (factored) or ``exp_avg_sq`` (full). All state is fp32 whatever the param
dtype, and ``load_state_dict`` keeps it so (torch's default would cast it to the param dtype).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vqim.kernels.adafactor_hparams import (BETA1, BETA2, CLIP_THRESHOLD, EPS1, WEIGHT_DECAY, beta2_at,
                                          check_hyperparameters, load_state_keeping_dtypes)


class Adafactor(torch.optim.Optimizer):
    """fp32 Adafactor with factored second moments, update clipping and a first moment.

    Args:
        params: parameters or param groups (fp32 or bf16/fp16 params; state is fp32).
        lr: absolute learning rate (relative step is off); schedulers set ``group["lr"]``.
        betas: ``(beta1, beta2)``; beta2 is the constant decay of the second moment.
        eps1: added to ``g^2`` before averaging (paper's eps1).
        weight_decay: decoupled, multiplied by ``lr``.
        clip_threshold: ``d`` of the update clipping ``u / max(1, RMS(u) / d)``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (BETA1, BETA2),
                 eps1: float = EPS1, weight_decay: float = WEIGHT_DECAY, clip_threshold: float = CLIP_THRESHOLD):
        check_hyperparameters(lr, betas, eps1, weight_decay, clip_threshold)
        defaults = dict(lr=lr, betas=tuple(betas), eps1=eps1, weight_decay=weight_decay,
                        clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_keeping_dtypes(self, state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps1, wd, d = group["lr"], group["eps1"], group["weight_decay"], group["clip_threshold"]
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("Adafactor does not support sparse gradients")
                g = p.grad.float()
                state = self.state[p]
                factored = p.dim() >= 2
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    if factored:
                        state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                        state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32,
                                                              device=p.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                beta2_t = beta2_at(beta2, state["step"])

                g2 = g * g + eps1
                if factored:
                    r, c = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    r.mul_(beta2_t).add_(g2.mean(dim=-1), alpha=1.0 - beta2_t)  # (..., R)
                    c.mul_(beta2_t).add_(g2.mean(dim=-2), alpha=1.0 - beta2_t)  # (..., C)
                    v_hat = (r / r.mean(dim=-1, keepdim=True)).unsqueeze(-1) * c.unsqueeze(-2)  # (..., R, C)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2_t).add_(g2, alpha=1.0 - beta2_t)
                    v_hat = v
                u = g / v_hat.sqrt()
                rms = u.square().mean().sqrt()
                u = u / torch.clamp(rms / d, min=1.0)

                m = state["exp_avg"]
                m.mul_(beta1).add_(u, alpha=1.0 - beta1)
                p_new = p.float() * (1.0 - lr * wd) - lr * m
                p.copy_(p_new)
        return loss
