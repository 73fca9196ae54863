"""Tensor-parallel inference on ``torch.distributed`` (DESIGN §5).

The model code stays single-device: :func:`tensor_parallel` is a transform applied to a built
:class:`~vqim.engine.models.VQIMModel` (gpt-fast's ``tp.py`` pattern). Per rank ``r`` of ``N``:

* attention (decoder self- and cross-attention, text encoder): ``wq``/``wk``/``wv`` are
  column-parallel (output rows of heads ``[r H/N, (r+1) H/N)``), ``wo`` is row-parallel followed
  by an all-reduce. ``Attention.heads`` becomes ``H / N`` with ``head_dim`` unchanged, so the
  split/merge of the model and the KV cache and cross-attention K/V (allocated from the module's
  head count) are sharded by heads with no change to the model code;
* MLP: ``fc1`` column-parallel, ``fc2`` row-parallel + all-reduce (the bias, if any, is added
  once, after the reduce);
* token embeddings (decoder image tokens, text ids) are vocab-parallel: each rank embeds the ids
  of its row range, zeros the others, all-reduce;
* the decoder's output projection is vocab-parallel and its logits are all-gathered, so every
  rank holds the same full ``[R, V]`` logits and ``cfg_sample`` (same seed, same step) draws
  the same token on every rank with no other collective.

The ViT-VQGAN tokenizer, the norms and the position/prefix embeddings stay replicated (the
tokenizer runs once per image, not per token). Per decode step that is ``2 L`` all-reduces
(``3 L`` with cross-attention) of ``[R, W]`` plus one for the embedding, and one all-gather of
the logits: :func:`collectives_per_step`.

:func:`load_tp_model` reads only this rank's slices from the safetensors files
(``safe_open(...).get_slice``): no rank materializes the full decoder or text encoder.
Every load and validation point goes through :func:`agree`, which all-gathers an error flag and
message, so a failure on one rank raises on all ranks with that message instead of leaving the
others blocked in a collective; the process group also gets a timeout.

This module is the transform and its plumbing only (it imports the config, model and weights
modules, never the engine): ``Engine.from_pretrained(..., tp=N)`` and
``Engine.from_preset(..., tp=N)`` build on it, and the engine itself takes the engine-level steps
(rank 0 picks an unseeded request's seed, :func:`from_rank0`; requests are validated and run
under :func:`agreed`; ``Engine.is_main`` is the rank that writes).

CUDA graphs: the row-parallel all-reduce and the logits all-gather are plain in-place NCCL
collectives on the current stream, which CUDA-graph capture accepts (NCCL >= 2.9.6), so
``Generator``'s captured decode step is kept under TP. That path needs GPUs and is not run by
the CPU test suite (gloo on CPU has no graphs).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import LlamaDecoderConfig, ModelConfig, dtype_from_name
from .llama import LlamaAttention, SwiGLU
from .models import Attention, VQIMModel
from .weights import build_model, check_weights, load_config, load_state_dict

# Seconds a rank waits in a collective before the process group gives up on a silent peer.
DEFAULT_TIMEOUT_S = float(os.environ.get("VQIM_TP_TIMEOUT_S", "600"))


# ----------------------------------------------------------------------------- collectives


@dataclass
class CollectiveStats:
    """Collectives issued by the TP layers while :func:`count_collectives` is active
    (counted in Python: a CUDA-graph replay issues them without passing through here)."""

    counts: dict[str, int] = field(default_factory=lambda: {"all_reduce": 0, "all_gather": 0})
    # Payload bytes per rank: the all-reduced tensor; the all-gather's full output.
    bytes: dict[str, int] = field(default_factory=lambda: {"all_reduce": 0, "all_gather": 0})


_STATS: CollectiveStats | None = None


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveStats]:
    global _STATS
    prev, _STATS = _STATS, CollectiveStats()
    try:
        yield _STATS
    finally:
        _STATS = prev


def _note(kind: str, nbytes: int) -> None:
    if _STATS is not None:
        _STATS.counts[kind] += 1
        _STATS.bytes[kind] += nbytes


def all_reduce_(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``x`` over the group, in place (ring all-reduce: every rank gets the same values)."""
    _note("all_reduce", x.numel() * x.element_size())
    dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: torch.Tensor, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim, in rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    _note("all_gather", x.numel() * x.element_size() * world)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- parallel layers


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r W_r^T) + b``: input features of this rank, full output.

    ``weight`` is ``[out, in / N]``; ``bias`` (replicated) is added once after the reduce."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_(F.linear(x, self.weight), self.group)  # (..., out)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V / N)`` of an embedding table; other ids embed to zero on this
    rank and the all-reduce fills them from the rank that holds them."""

    def __init__(self, weight: torch.Tensor, start: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (V / N, W)
        self.start = start
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (..., W)
        return all_reduce_(out.masked_fill_(outside[..., None], 0), self.group)


class VocabParallelHead(nn.Module):
    """Output projection over vocab rows ``[r V / N, (r+1) V / N)`` (and their bias, if any),
    logits all-gathered to ``[..., V]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, world: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (V / N, W)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # (V / N,)
        self.world = world
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(F.linear(x, self.weight, self.bias), self.world, self.group)  # (..., V)


# ----------------------------------------------------------------------------- the transform


# How each sharded module's parameters split: "col" (dim 0 of weight and bias), "row" (dim 1 of
# the weight), "vocab" (dim 0 of an embedding table), "head" (dim 0 of the output projection's
# weight and bias). Keys are module paths. A fused projection (Attention.fuse: wqkv / wkv;
# LlamaAttention.fuse: wqkv; SwiGLU.fuse: w13) is "col" per part: each of its row blocks is split
# by heads (or hidden units) and the rank's slices are concatenated, which is what fusing the
# sharded parts gives.
def shard_plan(model: VQIMModel) -> dict[str, str]:
    plan: dict[str, str] = {}
    dec = model.decoder

    def attention(prefix: str) -> None:
        attn = model.get_submodule(prefix)
        if isinstance(attn, LlamaAttention):
            names = ("wqkv",) if attn.fused else ("wq", "wk", "wv")
        else:
            names = tuple(n for n in ("wq", "wk", "wv") if hasattr(attn, n))
            if attn.fused:
                names += (attn._fused_names()[0],)
        for n in names:
            plan[f"{prefix}.{n}"] = "col"
        plan[f"{prefix}.wo"] = "row"

    def block(prefix: str, cross: bool) -> None:
        attention(f"{prefix}.attn")
        if cross:
            attention(f"{prefix}.cross")
        mlp = model.get_submodule(f"{prefix}.mlp")
        if isinstance(mlp, SwiGLU):
            for n in ("w13",) if mlp.fused else ("w1", "w3"):
                plan[f"{prefix}.mlp.{n}"] = "col"
            plan[f"{prefix}.mlp.w2"] = "row"
        else:
            plan[f"{prefix}.mlp.fc1"] = "col"
            plan[f"{prefix}.mlp.fc2"] = "row"

    if model.text is not None:
        plan["text.tok_embed"] = "vocab"
        for i in range(len(model.text.blocks)):
            block(f"text.blocks.{i}", False)
    # Janus's prompt table (its language model's vocabulary) is split like any token table; the
    # class table, Janus's small image table (codes x 8) and its aligner stay replicated.
    for table in ("tok_embed", "text_embed"):
        if hasattr(dec, table):
            plan[f"decoder.{table}"] = "vocab"
    for i in range(len(dec.blocks)):
        block(f"decoder.blocks.{i}", model.cfg.decoder.cross_attention)
    plan["decoder.head"] = "head"
    return plan


def param_shard_dims(model: VQIMModel) -> dict[str, int]:
    """Full parameter name -> the dim it is split along (absent: replicated)."""
    dims = {}
    for mod, kind in shard_plan(model).items():
        dims[f"{mod}.weight"] = 1 if kind == "row" else 0
        if kind in ("col", "head"):
            dims[f"{mod}.bias"] = 0
    return dims


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ``ValueError`` naming the first size of ``cfg`` that ``tp`` does not divide."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be an int >= 1, got {tp!r}")
    d = cfg.require_decoder("tensor parallelism")
    sizes = []
    if cfg.text is not None:
        t = cfg.text
        sizes += [("text.heads", t.heads), ("text.mlp_dim", t.mlp_dim), ("text.vocab_size", t.vocab_size)]
    sizes += [("decoder.heads", d.heads)]
    if isinstance(d, LlamaDecoderConfig):
        sizes += [("decoder.kv_heads", d.kv_heads)]
        if d.prompt_vocab:
            sizes += [("decoder.prompt_vocab", d.prompt_vocab)]
    sizes += [("decoder.mlp_dim", d.mlp_dim), ("decoder.vocab_size", d.vocab_size)]
    for name, v in sizes:
        if v % tp:
            raise ValueError(f"{cfg.name}: {name} = {v} does not divide by the tensor-parallel size tp = {tp} "
                             f"(heads, MLP width and vocab are split evenly across ranks)")


def _shard(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    n = t.shape[dim] // world
    # A copy, not a view: a view would keep the whole unsharded tensor alive.
    return t.narrow(dim, rank * n, n).clone()


def _shard_parts(t: torch.Tensor, sizes: list[int], rank: int, world: int) -> torch.Tensor:
    """Dim 0 of each of ``t``'s row blocks (``sizes`` rows each), sharded and concatenated."""
    return torch.cat([_shard(p, 0, rank, world) for p in t.split(sizes)])


def _part_sizes(parent: nn.Module, leaf: str, rows: int) -> list[int]:
    """Row blocks of a column-parallel linear: q/k/v of a fused projection (grouped-query
    attention's k and v are smaller than q), w1/w3 of a fused SwiGLU, else one block."""
    if isinstance(parent, LlamaAttention) and leaf == "wqkv":
        return [parent.heads * parent.head_dim] + [parent.kv_heads * parent.head_dim] * 2
    parts = {"wqkv": 3, "wkv": 2, "w13": 2}.get(leaf, 1)
    return [rows // parts] * parts


def tensor_parallel(model: VQIMModel, rank: int, world: int, group: dist.ProcessGroup | None = None) -> VQIMModel:
    """Shard ``model`` in place for rank ``rank`` of ``world`` (meta or materialized weights), for
    inference (the new parameters do not require grad).

    Module paths and parameter names are unchanged, so a state dict of the local slices (see
    :func:`load_tp_model`) loads with ``strict=True``. Raises ``ValueError`` where ``world``
    does not divide a head count, MLP width or vocab.
    """
    check_tp(model.cfg, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if world == 1:
        return model  # nothing to split, and no collective to issue
    for path, kind in shard_plan(model).items():
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, leaf)
        w = old.weight.detach()
        if kind == "col":
            # A fused projection splits each of its parts (q, k, v; w1, w3) by heads or units.
            sizes = _part_sizes(parent, leaf, w.shape[0])
            b = old.bias.detach() if old.bias is not None else None
            new = nn.Linear(1, 1, bias=b is not None, device="meta")
            new.weight = nn.Parameter(_shard_parts(w, sizes, rank, world), requires_grad=False)
            new.in_features, new.out_features = w.shape[1], w.shape[0] // world
            if b is not None:
                new.bias = nn.Parameter(_shard_parts(b, sizes, rank, world), requires_grad=False)
        elif kind == "row":
            b = old.bias.detach() if old.bias is not None else None
            new = RowParallelLinear(_shard(w, 1, rank, world), b, group)
        elif kind == "vocab":
            new = VocabParallelEmbedding(_shard(w, 0, rank, world), rank * (w.shape[0] // world), group)
        else:
            b = old.bias.detach() if old.bias is not None else None
            new = VocabParallelHead(_shard(w, 0, rank, world), None if b is None else _shard(b, 0, rank, world),
                                    world, group)
        setattr(parent, leaf, new)
    for m in model.modules():
        # The tokenizer's attention stays replicated; only sharded blocks lose heads.
        if isinstance(m, (Attention, LlamaAttention)) and isinstance(m.wo, RowParallelLinear):
            m.heads = m.heads // world
            if isinstance(m, LlamaAttention):
                m.kv_heads = m.kv_heads // world
    return model


# ----------------------------------------------------------------------------- process group


def agree(error: BaseException | None, group: dist.ProcessGroup | None = None) -> None:
    """Collective check point: if any rank passes an error, every rank raises.

    The failing rank re-raises its own exception; the others raise ``RuntimeError`` carrying
    its message, so no rank goes on into a collective the failed one never joins. Either is
    marked as agreed, so an enclosing :func:`agreed` lets it through without another round."""
    msg = None if error is None else f"{type(error).__name__}: {error}"
    msgs: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(msgs, msg, group=group)
    if error is not None:
        error._vqim_tp_agreed = True  # type: ignore[union-attr]
        raise error
    for r, m in enumerate(msgs):
        if m is not None:
            err = RuntimeError(f"tensor-parallel rank {r} failed: {m}")
            err._vqim_tp_agreed = True  # type: ignore[attr-defined]
            raise err


@contextlib.contextmanager
def agreed(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Run a block on every rank, then :func:`agree` on whether it raised (``Exception`` only).

    An error some inner :func:`agree` already shared (on this rank or another) is re-raised as is:
    the other ranks have raised too and will not join another round."""
    err: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 (re-raised by agree on this rank, reported on the others)
        if getattr(e, "_vqim_tp_agreed", False):
            raise
        err = e
    agree(err, group)


def from_rank0(value: object, group: dist.ProcessGroup | None = None) -> object:
    """Rank 0's ``value`` on every rank of ``group`` (e.g. a seed one rank picks for all)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class Control:
    """The decode loop's messages between ranks (``engine/scheduler.py``): rank 0's plan each
    iteration and, at an admission, the ranks' local failures. A gloo group of its own, created
    when the engine is made (collectively, by every rank), so the messages are CPU objects
    whatever the model's backend and never interleave with the model's collectives."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.group = dist.new_group(ranks=dist.get_process_group_ranks(group or dist.group.WORLD), backend="gloo")
        self._src = dist.get_global_rank(self.group, 0)

    def broadcast(self, obj: object | None) -> object | None:
        """Rank 0's ``obj`` on every rank; ``None`` costs one flag."""
        flag = torch.tensor([0 if obj is None else 1], dtype=torch.int64)
        dist.broadcast(flag, src=self._src, group=self.group)
        if not int(flag):
            return None
        box = [obj]
        dist.broadcast_object_list(box, src=self._src, group=self.group)
        return box[0]

    def agree(self, failed: dict) -> dict:
        """Every rank's ``{key: error}``, merged: a key failed on another rank carries a
        ``RuntimeError`` naming it (a rank's own error stays as it is)."""
        msgs: list[dict | None] = [None] * self.world
        dist.all_gather_object(msgs, {k: f"{type(e).__name__}: {e}" for k, e in failed.items()}, group=self.group)
        merged = dict(failed)
        for r, m in enumerate(msgs):
            for k, text in (m or {}).items():
                merged.setdefault(k, RuntimeError(f"tensor-parallel rank {r} failed: {text}"))
        return merged


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(tp: int, device: str | torch.device | None = None, *,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, torch.device]:
    """Join (or reuse) the default process group; return ``(rank, device)`` of this process.

    Outside an initialized group this needs ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). NCCL for CUDA devices, gloo for CPU.
    ``device=None`` or ``"cuda"`` means ``cuda:LOCAL_RANK`` when CUDA is available.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"tp={tp} needs torch.distributed: run under `torchrun --nproc-per-node {tp} ...` "
                             f"(environment lacks {', '.join(missing)})")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        atexit.register(_destroy)
    world = dist.get_world_size()
    if world != tp:
        raise ValueError(f"tp={tp} but the process group has {world} ranks (torchrun --nproc-per-node must equal tp)")
    return dist.get_rank(), dev


# ----------------------------------------------------------------------------- loading


def load_tp_state_dict(model_dir: str | Path, cfg: ModelConfig, model: VQIMModel, rank: int,
                       world: int) -> dict[str, torch.Tensor]:
    """This rank's slices of every tensor in ``model_dir`` (checked like ``weights.load_state_dict``:
    names, full shapes, dtypes), read with ``get_slice`` so only the slices leave the file."""
    dims = param_shard_dims(model)

    def read(name: str, sl, shape: tuple[int, ...]) -> torch.Tensor:
        dim = dims.get(name)
        if dim is None:
            # Replicated, read whole; ``[:]`` cannot index a 0-dim tensor (the scorer's temperature).
            return sl[()] if len(shape) == 0 else sl[:]
        n = shape[dim] // world
        index = [slice(None)] * len(shape)
        index[dim] = slice(rank * n, (rank + 1) * n)
        return sl[tuple(index)]

    return load_state_dict(model_dir, cfg, "cpu", read=read)


def load_tp_model(model_dir: str | Path, rank: int, world: int, group: dist.ProcessGroup | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> VQIMModel:
    """Build the sharded model on the meta device and fill it with this rank's slices.

    Every step that can fail runs under :func:`agreed`, so all ranks raise together."""
    with agreed(group):
        cfg = load_config(model_dir)
        check_tp(cfg, world)
        # Headers against the config before the meta model is built: a mismatch fails in
        # milliseconds, not after building a model of up to the config's bounds.
        check_weights(model_dir, cfg)
    model = tensor_parallel(build_model(cfg, "meta"), rank, world, group)
    with agreed(group):
        state = load_tp_state_dict(model_dir, cfg, model, rank, world)
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(device=device, dtype=dtype or dtype_from_name(cfg.dtype))
    return model


# ----------------------------------------------------------------------------- accounting


def collectives_per_step(cfg: ModelConfig, rows: int, tp: int, dtype: torch.dtype) -> dict[str, int]:
    """Collectives of one decode step of ``rows`` decoder rows (2 per image with CFG), per rank.

    ``all_reduce_bytes`` is the summed payload (a ring all-reduce moves about ``2 (N-1)/N`` of
    it over each link); ``all_gather_bytes`` is the gathered logits ``[rows, V]``.
    """
    d = cfg.decoder
    elt = torch.empty((), dtype=dtype).element_size()
    per_layer = 3 if d.cross_attention else 2  # self-attn wo, (cross wo), fc2 / w2
    # + the vocab-parallel image-token table (Janus embeds image tokens through a replicated one).
    table = not isinstance(d, LlamaDecoderConfig) or d.image_embed == "table"
    n_reduce = d.layers * per_layer + int(table)
    if tp == 1:
        return {"all_reduce": 0, "all_reduce_bytes": 0, "all_gather": 0, "all_gather_bytes": 0}
    return {"all_reduce": n_reduce, "all_reduce_bytes": n_reduce * rows * d.width * elt,
            "all_gather": 1, "all_gather_bytes": rows * d.vocab_size * elt}
