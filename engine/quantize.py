"""Int8 weight-only decoder linears (``Engine(quantize="int8")``), gpt-fast style.

A decode step is memory-bound: it reads every decoder weight once for a handful of rows. Stored
as int8 with one float32 scale per output channel, the linears a step runs (fused q/k/v,
attention output, cross-attention query and output, MLP (Parti's fc1/fc2, a Llama block's fused
w1/w3 and w2), the output head, Janus's head projection and aligner) cost one byte per
weight instead of two (bf16) or four (fp32); ``vqim.kernels.int8_linear`` dequantizes inside the
matrix-vector kernel, so the full-precision weight never exists in memory. The embeddings, the
norms and the cross-attention K/V projection (run once per prompt, not per token) stay in full
precision.
"""

from __future__ import annotations

import torch
from torch import nn

from vqim import kernels as K

from .llama import LlamaBlock, LlamaDecoder
from .models import ARDecoder

QUANTIZE_CHOICES = ("int8",)


class Int8Linear(nn.Module):
    """``y = x @ dequant(qweight).T + bias`` with ``qweight [N, K]`` int8 and ``scale [N]`` float32
    (symmetric, per output channel: :func:`vqim.kernels.quantize_int8`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight, scale = K.quantize_int8(linear.weight.detach())  # (N, K) int8, (N,) float32
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = K.int8_linear(x, self.qweight, self.scale)  # (..., N) in x's dtype
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_decoder(decoder: ARDecoder | LlamaDecoder, mode: str) -> None:
    """Replace, in place, the per-step linears of every block and the head with :class:`Int8Linear`.

    Fuses the input projections first (:meth:`ARDecoder.fuse`), so q/k/v is one int8 matmul.
    Idempotent: an already quantized linear is left as it is.
    """
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_CHOICES)} or None, got {mode!r}")
    decoder.fuse()
    targets = [(decoder, "head")] + ([(decoder, "head_proj")] if hasattr(decoder, "head_proj") else [])
    # Janus's aligner runs every step too (the fed image token's embedding).
    targets += [(decoder.aligner, str(i)) for i in range(len(decoder.aligner))] if hasattr(decoder, "aligner") else []
    for blk in decoder.blocks:
        targets += [(blk.attn, "wqkv"), (blk.attn, "wo")]
        targets += [(blk.mlp, "w13"), (blk.mlp, "w2")] if isinstance(blk, LlamaBlock) else [(blk.mlp, "fc1"),
                                                                                             (blk.mlp, "fc2")]
        if decoder.cfg.cross_attention:
            targets += [(blk.cross, "wq"), (blk.cross, "wo")]
    for parent, name in targets:
        lin = getattr(parent, name)
        if type(lin) is nn.Linear:
            setattr(parent, name, Int8Linear(lin))


def is_quantized(decoder: ARDecoder) -> bool:
    return any(isinstance(m, Int8Linear) for m in decoder.modules())


def decoder_step_weight_bytes(decoder: ARDecoder) -> int:
    """Bytes of decoder weights one decode step reads: every parameter and buffer of the blocks,
    the final norm and the head (the embedding tables are excluded: one row of each is read)."""
    embeds = {"tok_embed", "prefix_embed", "row_embed", "col_embed", "class_embed", "text_embed", "gen_embed",
              "rope_cos", "rope_sin"}
    tensors = list(decoder.named_parameters()) + list(decoder.named_buffers())
    cross_kv = {f"blocks.{i}.cross.{n}" for i in range(len(decoder.blocks)) for n in ("wkv", "wk", "wv")}
    total = 0
    for name, t in tensors:
        if name.split(".")[0] in embeds or name.rpartition(".")[0] in cross_kv:
            continue
        total += t.numel() * t.element_size()
    return total
