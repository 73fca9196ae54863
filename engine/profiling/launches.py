"""Counting the kernel launches of a decode step, on any machine.

A decode step is so small that launches, not bytes, can bound it (about 1.3 us each on an H100
even replayed from a CUDA graph). Two counts, both exact for what they count:

* **eager**: :class:`LaunchCounter`, a ``TorchDispatchMode``, sees every op dispatched to a
  kernel: each ATen op and each ``vqim::`` custom op counts once. Ops that only make a new view
  of existing memory (``view``, ``transpose``, ``split``, ...) or allocate without writing
  (``empty``) launch nothing and are not counted. A ``vqim::`` op is one kernel on its Triton
  backend (the torch reference behind it on CPU runs several ATen ops, which the mode does not
  see, so the count is the CUDA path's), and the ATen ops of the step (matmuls, embeddings,
  elementwise) are one kernel each on CUDA.
* **compiled**: the kernels in the code Inductor generated for the step
  (:func:`compiled_launches`): each generated kernel (``cpp_fused_*`` on CPU, ``triton_*`` on
  CUDA), each extern kernel (a matmul) and each custom op call it makes.

On CUDA, ``benchmarks/bench_decode_step.py`` also counts the kernels the profiler records.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..llama import LlamaDecoder

_aten = torch.ops.aten
# Not views by schema, but no kernel either.
_NO_KERNEL = {_aten._unsafe_view.default, _aten.empty.memory_format, _aten.empty_strided.default,
              _aten.empty_like.default, _aten.lift_fresh.default, _aten.detach.default, _aten.alias.default}


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: step()``; then ``c.total`` and ``c.ops`` (op name -> count)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func in _NO_KERNEL):
            self.ops[str(func.overloadpacket).replace("aten.", "").replace("vqim.", "vqim::")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_launches(fn: Callable[[], object]) -> LaunchCounter:
    """The eager launches of one call of ``fn``."""
    with torch.no_grad(), LaunchCounter() as c:
        fn()
    return c


# A kernel call in Inductor's generated wrapper: a generated kernel, an extern kernel, a custom op.
_CALL = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+(?:\.run)?|extern_kernels\.\w+|torch\.ops\.\w+\.\w+"
                   r"(?:\.\w+)?)\(", re.M)


def compiled_launches(fn: Callable, *args) -> Counter[str]:
    """Kernel calls in the code ``torch.compile(fn, fullgraph=True)`` generates for ``args``
    (one call of the compiled step runs each once)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, *args)
    calls: Counter[str] = Counter()
    for code in codes:
        body = code.split("def call(", 1)[-1].split("\ndef ", 1)[0]
        for name in _CALL.findall(body):
            calls[re.sub(r"_\d+(\.run)?$", "", name)] += 1
    return calls


def _first_norm(decoder, i: int):
    """The norm before block ``i``'s attention (the final norm past the last block)."""
    if i == len(decoder.blocks):
        return decoder.norm
    blk = decoder.blocks[i]
    return blk.attn_norm if isinstance(decoder, LlamaDecoder) else blk.ln1


def _block_inputs(decoder, token: torch.Tensor, pos: torch.Tensor) -> tuple:
    """Inputs of block 0's step of the decode step's shapes: ``(x, h, pos)``, ``pos [B]``."""
    x = torch.zeros(token.shape[0], 1, decoder.cfg.width, device=token.device,
                    dtype=decoder.dtype)  # (B, 1, W)
    return x, _first_norm(decoder, 0)(x), pos.expand(token.shape[0]).contiguous()


def _block_step(decoder, state) -> Callable:
    blk, next_norm = decoder.blocks[0], _first_norm(decoder, 1)
    if isinstance(decoder, LlamaDecoder):
        return lambda x, h, pos: blk.step(x, h, pos, state, 0, next_norm, decoder.rope_cos, decoder.rope_sin)
    return lambda x, h, pos: blk.step(x, h, pos, state, 0, next_norm)


def step_launches(decoder, state, token: torch.Tensor, pos: torch.Tensor, *, compiled: bool = False) -> dict[str, int]:
    """Launches of one ``decode_step`` (``step``) and of one block's step (``per_layer``: block 0),
    eager (:class:`LaunchCounter`) or compiled (:func:`compiled_launches`)."""
    block, inputs = _block_step(decoder, state), _block_inputs(decoder, token, pos)
    if compiled:
        step = compiled_launches(decoder.decode_step, state, token, pos)
        layer = compiled_launches(block, *inputs)
        return {"step": sum(step.values()), "per_layer": sum(layer.values())}
    step = count_launches(lambda: decoder.decode_step(state, token, pos))
    layer = count_launches(lambda: block(*inputs))
    return {"step": step.total, "per_layer": layer.total}
