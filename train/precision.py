"""Layer norms that compute in fp32 under bf16 autocast.

The stages swap every ``nn.LayerNorm`` of the model they train for an :class:`FP32LayerNorm`
(:func:`fp32_layer_norms`) instead of changing how ``nn.LayerNorm`` behaves: the engine's model
classes stay as they are, and the swap is visible in the module tree. The new module holds the
old one's parameters under the same names, so state dicts, checkpoints and exported models are
the same tensors under the same keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in fp32 with autocast off (CPU autocast would run it in bf16).

    The output stays fp32 rather than being cast back to the input's dtype: ops that autocast
    runs in bf16 cast it themselves, and the rest (residual adds, the decoder's fp32 logits) read
    the fp32 result. Outside autocast, on fp32 inputs, it is ``nn.LayerNorm``.
    """

    @classmethod
    def like(cls, ln: nn.LayerNorm) -> FP32LayerNorm:
        """An FP32LayerNorm holding ``ln``'s own parameter objects (not copies), so optimizers and
        other references to them see one tensor. Built on the meta device: nothing is allocated."""
        new = cls(ln.normalized_shape, ln.eps, ln.elementwise_affine, bias=ln.bias is not None, device="meta")
        new.weight, new.bias = ln.weight, ln.bias
        return new.train(ln.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def fp32_layer_norms(model: nn.Module) -> nn.Module:
    """Replace every ``nn.LayerNorm`` inside ``model`` by :meth:`FP32LayerNorm.like` it; returns
    ``model``. A norm reachable under two names becomes one FP32LayerNorm under both."""
    swapped: dict[nn.Module, FP32LayerNorm] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm) and not isinstance(child, FP32LayerNorm):
                if child not in swapped:
                    swapped[child] = FP32LayerNorm.like(child)
                setattr(parent, name, swapped[child])
    return model
