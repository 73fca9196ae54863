"""The decoders' KV state: what one batch of rows keeps between decode steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeState:
    """Static buffers of one generation batch: per-layer self-attention caches
    ``[B, H, max_seq, Dh]`` and cross-attention K/V ``[B, H, L, Dh]`` computed once."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    cross_k: list[torch.Tensor] | None = None
    cross_v: list[torch.Tensor] | None = None
    # (B, 1, 1, L): 0 on real text tokens, -inf on padding. Additive, so attention applies it as
    # is (a bool mask costs a conversion kernel per layer per step).
    memory_bias: torch.Tensor | None = None
    # Conv-masked layers keep a ring of the rows their window can reach (kernels.conv_cache_slot).
    ring: bool = False

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]
