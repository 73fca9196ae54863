"""Adafactor's hyper-parameters, their checks and the state loading shared by the fp32 reference
(``vqim.train.Adafactor``) and ``vqim.kernels.Adafactor8bit``.

They live in kernels/, the bottom layer, so that the int8 optimizer takes them from its own
package and the training stack imports them from here (imports only go kernels <- engine <- train).
"""

from __future__ import annotations

from typing import Any

import torch

# Parti's settings (DESIGN §3).
BETA1 = 0.9
BETA2 = 0.96
WEIGHT_DECAY = 4.5e-2
CLIP_THRESHOLD = 1.0
EPS1 = 1e-30


def check_hyperparameters(lr: float, betas: tuple[float, float], eps1: float, weight_decay: float,
                          clip_threshold: float) -> None:
    """ValueErrors shared by the fp32 reference and the int8 optimizer."""
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas}")
    for name, b in zip(("beta1", "beta2"), betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas: {name} must be in [0, 1), got {b}")
    if not eps1 > 0.0:
        raise ValueError(f"eps1 must be > 0 (it keeps sqrt(V) away from 0), got {eps1}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not clip_threshold > 0.0:
        raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")


def beta2_at(beta2: float, step: int) -> float:
    """Bias-corrected second-moment decay at 1-based ``step``: 0 at step 1, -> beta2 later."""
    return beta2 * (1.0 - beta2 ** (step - 1)) / (1.0 - beta2**step)


def load_state_keeping_dtypes(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """``Optimizer.load_state_dict`` that keeps each state tensor's saved dtype.

    torch casts every floating-point-param state tensor to the param's dtype (int8 moments would
    become floats, fp32 statistics of a bf16 param would lose bits); resuming bit-for-bit needs
    the saved tensors exactly, so they are copied back after the default load.
    """
    saved_groups = state_dict["param_groups"]
    saved_state = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(opt, state_dict)
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in saved_groups for i in g["params"]]
    for pid, p in zip(ids, params):
        if pid not in saved_state:
            continue
        opt.state[p] = {
            k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in saved_state[pid].items()
        }
