"""Model definitions, one each, shared by inference and ``vqim.train``.

* :class:`ViTVQGAN`: image tokenizer. Encoder: patchify -> transformer blocks -> tanh MLP ->
  projection to the code dim -> l2 norm -> ``codebook_lookup``. Decoder: codes -> up-projection ->
  blocks -> tanh MLP -> pixel patches (sigmoid or raw).
* :class:`TextEncoder`: bidirectional transformer over token ids with a padding mask.
* :class:`ARDecoder`: the autoregressive image-token decoder. Self-attention uses the
  conv-shaped mask (``vqim.kernels.conv_attention`` for a whole sequence,
  ``conv_decode_attention`` for one step on the static KV cache) on the layers the config
  names and plain causal attention on the others; cross-attention to the text when there is an
  encoder; a class-id or BOS prefix token otherwise.

All ``forward`` methods are full-sequence (teacher forcing, training). The cached path is
``ARDecoder.new_state`` / ``prefill`` / ``decode_step``: static buffers written by index, no
host synchronization, so a CUDA graph can capture ``decode_step``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from vqim import kernels as K

from .cnn_vq import CNNVQ
from .config import CNNVQConfig, DecoderConfig, ModelConfig, ScorerConfig, TextEncoderConfig, VQGANConfig
from .llama import LlamaDecoder
from .state import DecodeState
from .superres import SuperResolution


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, out: int | None = None, *, act: str = "gelu", dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out or width, bias=bias)
        self.act = nn.GELU(approximate="tanh") if act == "gelu" else nn.Tanh()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Projections for self- or cross-attention; the attention itself is chosen by the caller.

    :meth:`fuse` turns the input projections into one matmul for inference (``wqkv``; ``wkv``
    for cross-attention, whose query reads another input). ``state_dict`` and
    ``load_state_dict`` keep speaking ``wq``/``wk``/``wv`` either way, so checkpoints (and
    :mod:`vqim.engine.tp`'s shard plan, applied before fusing) do not change.
    """

    def __init__(self, width: int, heads: int, kv_dim: int | None = None, *, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.is_cross = kv_dim is not None
        self.wq = nn.Linear(width, width, bias=bias)
        self.wk = nn.Linear(kv_dim or width, width, bias=bias)
        self.wv = nn.Linear(kv_dim or width, width, bias=bias)
        self.wo = nn.Linear(width, width, bias=bias)
        self.fused = False

    def _fused_names(self) -> tuple[str, tuple[str, ...]]:
        return ("wkv", ("wk", "wv")) if self.is_cross else ("wqkv", ("wq", "wk", "wv"))

    @torch.no_grad()
    def fuse(self) -> None:
        """Concatenate the input projections into one ``nn.Linear`` (their output rows stacked
        in order) and drop the separate ones: one launch instead of three per decode step."""
        if self.fused:
            return
        name, parts = self._fused_names()
        lins = [getattr(self, n) for n in parts]
        w = torch.cat([lin.weight for lin in lins])  # (n * W_local, in)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=lins[0].bias is not None, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([lin.bias for lin in lins]), requires_grad=False)
        for n in parts:
            delattr(self, n)
        setattr(self, name, fused)
        self.fused = True
        self.register_state_dict_post_hook(_split_fused)
        self.register_load_state_dict_pre_hook(_join_fused)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, d = x.shape
        return self.wo(x.transpose(1, 2).reshape(b, s, h * d))  # (B, S, W)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention q, k, v ``[B, H, S, Dh]`` of ``h [B, S, W]`` (views of one matmul when fused)."""
        if self.fused:
            return tuple(self.split(t) for t in self.wqkv(h).chunk(3, dim=-1))  # 3 x (B, H, S, Dh)
        return self.split(self.wq(h)), self.split(self.wk(h)), self.split(self.wv(h))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused and self.is_cross:
            k, v = self.wkv(x).chunk(2, dim=-1)  # 2 x (B, L, W_local)
            return self.split(k), self.split(v)
        if self.fused:
            _, k, v = self.qkv(x)
            return k, v
        return self.split(self.wk(x)), self.split(self.wv(x))


def _split_fused(module: Attention, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook of a fused :class:`Attention`: the checkpoint's separate keys."""
    name, parts = module._fused_names()
    for kind in ("weight", "bias"):
        t = state.pop(f"{prefix}{name}.{kind}", None)
        if t is not None:
            for n, piece in zip(parts, t.chunk(len(parts))):
                state[f"{prefix}{n}.{kind}"] = piece


def _join_fused(module: Attention, state: dict, prefix: str, local_metadata, strict, missing, unexpected,
                errors) -> None:
    """load_state_dict pre-hook of a fused :class:`Attention`: the separate keys concatenated
    (any missing one is left for load_state_dict to report under the fused name)."""
    name, parts = module._fused_names()
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{n}.{kind}" for n in parts]
        if all(k in state for k in keys):
            state[f"{prefix}{name}.{kind}"] = torch.cat([state.pop(k) for k in keys])


class EncoderBlock(nn.Module):
    """Pre-LN bidirectional block (ViT-VQGAN encoder/decoder, text encoder)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float, *, bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, bias=bias)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, dropout=dropout, bias=bias)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.ln1(x))  # 3 x (B, H, S, Dh)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, S, Dh)
        x = x + self.drop(self.attn.merge(a))
        return x + self.drop(self.mlp(self.ln2(x)))


# ----------------------------------------------------------------------------- tokenizer


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, hh, ww = x.shape
    g_h, g_w = hh // p, ww // p
    x = x.reshape(b, c, g_h, p, g_w, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    return x.reshape(b, g_h * g_w, c * p * p)  # (B, N, C*p*p)


def unpatchify(x: torch.Tensor, p: int, g: int) -> torch.Tensor:
    b = x.shape[0]
    x = x.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, p, g, p)
    return x.reshape(b, 3, g * p, g * p)  # (B, 3, H, W)


class ViTVQGAN(nn.Module):
    """ViT-VQGAN with factorized (``code_dim``), l2-normalized codes."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        n, w = cfg.grid * cfg.grid, cfg.width
        self.enc_patch = nn.Linear(cfg.patch_dim, w)
        self.enc_pos = nn.Parameter(torch.zeros(n, w))
        self.enc_blocks = nn.ModuleList(EncoderBlock(w, cfg.heads, cfg.mlp_dim, cfg.dropout) for _ in range(cfg.layers))
        self.enc_norm = nn.LayerNorm(w)
        self.enc_out = MLP(w, cfg.mlp_dim, act="tanh")
        self.enc_proj = nn.Linear(w, cfg.code_dim)
        self.codebook = nn.Parameter(torch.zeros(cfg.codebook_size, cfg.code_dim))
        # The decoder's own shape (VQGANConfig.dec_*; the encoder's unless set).
        dw = cfg.dec_width
        self.dec_proj = nn.Linear(cfg.code_dim, dw)
        self.dec_pos = nn.Parameter(torch.zeros(n, dw))
        self.dec_blocks = nn.ModuleList(EncoderBlock(dw, cfg.dec_heads, cfg.dec_mlp_dim, cfg.dropout)
                                        for _ in range(cfg.dec_layers))
        self.dec_norm = nn.LayerNorm(dw)
        self.dec_out = MLP(dw, cfg.dec_mlp_dim, act="tanh")
        self.dec_patch = nn.Linear(dw, cfg.patch_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.enc_patch.weight.dtype

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] -> l2-normalized latents ``[B, N, code_dim]``."""
        x = self.enc_patch(patchify(pixels * 2 - 1, self.cfg.patch_size)) + self.enc_pos  # (B, N, W)
        for blk in self.enc_blocks:
            x = blk(x)
        z = self.enc_proj(self.enc_out(self.enc_norm(x)))  # (B, N, code_dim)
        return F.normalize(z.float(), dim=-1, eps=1e-12)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] -> code ids ``[B, g, g]``."""
        z = self.encode_latents(pixels)  # (B, N, D)
        b, n, d = z.shape
        idx = K.codebook_lookup(z.reshape(b * n, d), self.codebook)  # (B*N,)
        return idx.view(b, self.cfg.grid, self.cfg.grid)

    def decode_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """l2-normalized code vectors ``[B, N, code_dim]`` -> pixels ``[B, 3, H, W]``."""
        x = self.dec_proj(codes.to(self.dec_proj.weight.dtype)) + self.dec_pos  # (B, N, W)
        for blk in self.dec_blocks:
            x = blk(x)
        x = self.dec_patch(self.dec_out(self.dec_norm(x))).float()  # (B, N, 3*p*p)
        if self.cfg.output == "sigmoid":
            x = torch.sigmoid(x)
        return unpatchify(x, self.cfg.patch_size, self.cfg.grid)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, g, g]`` -> pixels ``[B, 3, H, W]`` (float32)."""
        b = ids.shape[0]
        codes = F.normalize(self.codebook.float()[ids.reshape(b, -1)], dim=-1, eps=1e-12)  # (B, N, D)
        return self.decode_latents(codes)


# ----------------------------------------------------------------------------- text encoder


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.dropout, bias=False)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask ``[B, L]`` (mask True on real tokens) -> memory ``[B, L, W]``."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.tok_embed(ids) + self.pos_embed(pos))  # (B, L, W)
        key_mask = mask[:, None, None, :]  # (B, 1, 1, L)
        for blk in self.blocks:
            x = blk(x, key_mask)
        return self.norm(x)


# ----------------------------------------------------------------------------- AR decoder


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.conv = cfg.uses_conv(layer)
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg.width, cfg.heads, bias=False)
        if cfg.cross_attention:
            self.ln_x = nn.LayerNorm(cfg.width)
            self.cross = Attention(cfg.width, cfg.heads, kv_dim=cfg.memory_dim, bias=False)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.mlp_dim, dropout=cfg.dropout, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def _self_attn_full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.conv:
            return K.conv_attention(q, k, v, grid=(cfg.grid_h, cfg.grid_w), kernel=cfg.conv_kernel, prefix=cfg.prefix)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def _cross(self, x: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.cross.split(self.cross.wq(self.ln_x(x)))  # (B, H, S, Dh)
        a = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask)  # (B, H, S, Dh)
        return x + self.drop(self.cross.merge(a))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Full sequence ``x [B, S, W]`` from position 0; K/V also written to ``cache[:, :, :S]``.

        ``memory_mask`` is ``[B, 1, 1, L]``, bool or additive (:func:`memory_bias`); ``cross_kv``
        reuses precomputed cross K/V."""
        q, k, v = self.attn.qkv(self.ln1(x))  # 3 x (B, H, S, Dh)
        if cache is not None:
            cache[0][:, :, : k.shape[2]] = k
            cache[1][:, :, : v.shape[2]] = v
        x = x + self.drop(self.attn.merge(self._self_attn_full(q, k, v)))
        if self.cfg.cross_attention:
            ck, cv = cross_kv if cross_kv is not None else self.cross.kv(memory)
            x = self._cross(x, ck, cv, memory_mask)
        return x + self.drop(self.mlp(self.ln2(x)))

    def step(self, x: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, state: DecodeState, layer: int,
             next_norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """One token. ``x [B, 1, W]`` is the residual stream and ``h = ln1(x)``; returns the
        block's output ``x'`` and ``next_norm(x')``: each residual add runs fused with the norm
        that follows it (``vqim.kernels.add_layer_norm``), the last one with the next block's
        ``ln1`` (or the final norm). ``pos [B]`` is each row's sequence position (prefix included)."""
        cfg = self.cfg
        kc, vc = state.k[layer], state.v[layer]
        q, k, v = self.attn.qkv(h)  # 3 x (B, H, 1, Dh), views of one matmul when fused
        if self.conv:
            # The kernel writes k, v into the cache (plain or ring slot) and attends: one launch.
            a = K.conv_decode_attention(q, kc, vc, pos, k_new=k, v_new=v, grid=(cfg.grid_h, cfg.grid_w),
                                        kernel=cfg.conv_kernel, prefix=cfg.prefix, ring=state.ring, validate=False)
        else:
            # Written by index from device tensors: no host sync, shapes static for graph capture.
            rows = torch.arange(x.shape[0], device=x.device)  # (B,)
            kc[rows, :, pos] = k[:, :, 0]  # (B, H, Dh) into each row's slot
            vc[rows, :, pos] = v[:, :, 0]
            visible = torch.arange(kc.shape[2], device=x.device) <= pos[:, None]  # (B, S_max)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=visible[:, None, None, :])
        if cfg.cross_attention:
            x, h = _add_norm(x, self.attn.merge(a), self.ln_x)
            qx = self.cross.split(self.cross.wq(h))  # (B, H, 1, Dh)
            a = F.scaled_dot_product_attention(qx, state.cross_k[layer], state.cross_v[layer],
                                               attn_mask=state.memory_bias)  # (B, H, 1, Dh)
            x, h = _add_norm(x, self.cross.merge(a), self.ln2)
        else:
            x, h = _add_norm(x, self.attn.merge(a), self.ln2)
        return _add_norm(x, self.mlp(h), next_norm)


    def step_tokens(self, x: torch.Tensor, state: DecodeState, layer: int, rows: torch.Tensor, entries: torch.Tensor,
                    slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``T`` tokens per row at once. ``x [R, T, W]`` is the residual stream; the ``N`` valid
        entries ``(rows[i], entries[i])`` write their K/V into slot ``slots[i]`` of their row before
        any query attends, so entries of one pass see each other; ``visible [R, T, S]`` is what each
        entry may attend to (its mask, and the slots written). Returns the block's output."""
        q, k, v = self.attn.qkv(self.ln1(x))  # 3 x (R, H, T, Dh)
        kc, vc = state.k[layer], state.v[layer]
        kc[rows, :, slots] = k[rows, :, entries]  # (N, H, Dh) into each entry's slot
        vc[rows, :, slots] = v[rows, :, entries]
        a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=visible[:, None])  # (R, H, T, Dh)
        x = x + self.attn.merge(a)
        if self.cfg.cross_attention:
            x = self._cross(x, state.cross_k[layer], state.cross_v[layer], state.memory_bias)
        return x + self.mlp(self.ln2(x))


def _add_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, norm(x + delta))`` in one kernel."""
    return K.add_layer_norm(x, delta, norm.weight, norm.bias, eps=norm.eps)


class ARDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.tok_embed = nn.Embedding(cfg.vocab_size, w)
        self.prefix_embed = nn.Embedding(cfg.num_classes + 1, w)  # row num_classes: BOS / null class
        self.row_embed = nn.Embedding(cfg.grid_h, w)
        self.col_embed = nn.Embedding(cfg.grid_w, w)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.layers))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.vocab_size, bias=False)

    @property
    def null_prefix(self) -> int:
        """The prefix of BOS / the null class (``prefix_embed``'s last row): a text model's and an
        unconditional model's every row, and a class model's unconditional rows."""
        return self.cfg.num_classes

    @property
    def device(self) -> torch.device:
        return self.tok_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the embeddings': the head may be int8)."""
        return self.tok_embed.weight.dtype

    def embed(self, prefix_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """prefix_ids ``[B, 1]``, tokens ``[B, n]`` (grid positions 0..n-1) -> ``[B, 1 + n, W]``."""
        i = torch.arange(tokens.shape[1], device=tokens.device)
        img = self.tok_embed(tokens) + self.row_embed(i // self.cfg.grid_w) + self.col_embed(i % self.cfg.grid_w)
        return self.drop(torch.cat([self.prefix_embed(prefix_ids), img], dim=1))  # (B, S, W)

    def forward(self, prefix_ids: torch.Tensor, tokens: torch.Tensor, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, *, hidden_layer: int | None = None) -> torch.Tensor:
        """Teacher forcing: logits ``[B, 1 + n, V]`` (float32); position j predicts image token j.

        With ``hidden_layer=l`` returns block ``l``'s output ``[B, 1 + n, W]`` instead.
        ``memory_mask`` is ``[B, L]`` bool, True on real text tokens.
        """
        if tokens.shape[1] > self.cfg.num_tokens:
            raise ValueError(f"tokens must have at most {self.cfg.num_tokens} positions, got {tokens.shape[1]}")
        x = self.embed(prefix_ids, tokens)
        mm = memory_mask[:, None, None, :] if memory_mask is not None else None
        for i, blk in enumerate(self.blocks):
            x = blk(x, memory, mm)
            if i == hidden_layer:
                return x
        return self.head(self.norm(x)).float()

    def new_state(self, batch: int, memory: torch.Tensor | None = None,
                  memory_mask: torch.Tensor | None = None, *, ring: bool = False) -> DecodeState:
        """Zeroed caches (masked slots must hold finite values: 0 * NaN would leak through).

        ``ring=True`` gives conv-masked layers a ring of ``conv_cache_len`` slots instead of
        ``max_seq``; fully causal layers always keep every position."""
        cfg = self.cfg
        ring_len = K.conv_cache_len((cfg.grid_h, cfg.grid_w), cfg.conv_kernel, cfg.prefix)
        # Heads this module holds: cfg.heads / N on a tensor-parallel rank (vqim.engine.tp).
        heads = self.blocks[0].attn.heads
        lengths = [ring_len if ring and blk.conv else cfg.max_seq for blk in self.blocks]
        k = [torch.zeros(batch, heads, n, cfg.head_dim, device=self.device, dtype=self.dtype) for n in lengths]
        v = [torch.zeros(batch, heads, n, cfg.head_dim, device=self.device, dtype=self.dtype) for n in lengths]
        state = DecodeState(k, v, ring=ring)
        if cfg.cross_attention:
            if memory is None or memory_mask is None:
                raise ValueError("this decoder cross-attends to text: memory and memory_mask are required")
            state.cross_k, state.cross_v = self.cross_kv(memory)
            state.memory_bias = memory_bias(memory_mask, self.dtype)
        return state

    def cross_kv(self, memory: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer cross-attention K and V ``[B, H, L, Dh]``: once per prompt, reused every step."""
        kv = [blk.cross.kv(memory) for blk in self.blocks]
        return [k for k, _ in kv], [v for _, v in kv]

    def prefill(self, state: DecodeState, prefix_ids: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prefix ``[B, 1]`` (one position: ``prefix_len`` is 1 for every row), fill its
        cache slots, return logits ``[B, V]`` for image token 0."""
        x = self.prefix_embed(prefix_ids)  # (B, 1, W)
        for i, blk in enumerate(self.blocks):
            cross = (state.cross_k[i], state.cross_v[i]) if state.cross_k is not None else None
            x = blk(x, memory_mask=state.memory_bias, cache=(state.k[i], state.v[i]), cross_kv=cross)
        return self.head(self.norm(x[:, -1])).float()

    def decode_step(self, state: DecodeState, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed image token ``token [B]`` at sequence positions ``pos`` (``[B]``, one per row, or
        ``[1]`` for all rows; >= prefix); returns logits ``[B, V]`` (float32) for the next image
        token. Rows may sit at different positions."""
        if pos.shape[0] != token.shape[0]:
            pos = pos.expand(token.shape[0]).contiguous()  # (B,): the kernels index it per row
        i = pos - self.cfg.prefix  # (B,) grid index of each fed token
        x = self.tok_embed(token) + self.row_embed(i // self.cfg.grid_w) + self.col_embed(i % self.cfg.grid_w)
        x = x[:, None, :]  # (B, 1, W)
        h = self.blocks[0].ln1(x)
        norms = [blk.ln1 for blk in self.blocks[1:]] + [self.norm]
        for li, (blk, norm) in enumerate(zip(self.blocks, norms)):
            x, h = blk.step(x, h, pos, state, li, norm)
        return self.head(h[:, 0]).float()

    def forward_tokens(self, state: DecodeState, tokens: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                       known: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``T`` image tokens per row at any positions in one forward over the KV cache.

        ``tokens [R, T]`` at sequence positions ``pos [R, T]`` (>= prefix, each position at most
        once per row); ``valid [R, T]`` is False on padding, whose K/V are never written and whose
        logits mean nothing. At each layer every valid entry's K/V is written to the cache before
        any query attends, so entries of one pass see each other as the mask allows: a prefill
        chunk at scattered positions. ``known [R, S]`` (bool, optional) marks the cache slots that
        hold a fed token's K/V after this pass's writes: an entry then sees only those (and
        itself), as a speculative query over a partly written cache must. Returns logits
        ``[R, T, V]`` (float32) for the token after each entry. Needs the plain cache (slot =
        position): the ring reuses slots that other entries of the pass may still read.
        """
        cfg = self.cfg
        if state.ring:
            raise ValueError("forward_tokens needs the plain KV cache (kv_cache='plain'), not the ring")
        i = pos - cfg.prefix  # (R, T) grid index of each fed token
        x = self.tok_embed(tokens) + self.row_embed(i // cfg.grid_w) + self.col_embed(i % cfg.grid_w)  # (R, T, W)
        rows, entries = valid.nonzero(as_tuple=True)  # (N,) each
        slots = pos[rows, entries]  # (N,)
        n_slots = state.k[0].shape[2]
        conv_vis = _conv_mask((cfg.grid_h, cfg.grid_w), tuple(cfg.conv_kernel), cfg.prefix, n_slots,
                              pos.device)[pos]  # (R, T, S)
        every = torch.arange(n_slots, device=pos.device)  # (S,)
        causal_vis = every <= pos[..., None]  # (R, T, S)
        if known is not None:
            seen = known[:, None, :] | (every == pos[..., None])  # (R, T, S)
            conv_vis, causal_vis = conv_vis & seen, causal_vis & seen
        for li, blk in enumerate(self.blocks):
            x = blk.step_tokens(x, state, li, rows, entries, slots, conv_vis if blk.conv else causal_vis)
        return self.head(self.norm(x)).float()  # (R, T, V)

    def fuse(self) -> None:
        """Fused input projections in every block (:meth:`Attention.fuse`), for inference."""
        for blk in self.blocks:
            blk.attn.fuse()
            if self.cfg.cross_attention:
                blk.cross.fuse()


@functools.lru_cache(maxsize=8)
def _conv_mask(grid: tuple[int, int], kernel: tuple[int, int], prefix: int, n_slots: int,
               device: torch.device) -> torch.Tensor:
    """``conv_mask_ref`` ``[S, S]`` of a decoder's geometry, built once, not every pass."""
    return K.conv_mask_ref(grid, kernel, prefix, seq_len=n_slots, device=device)


def memory_bias(memory_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``memory_mask [B, L]`` (True on real text tokens) -> additive ``[B, 1, 1, L]`` (0 / -inf)."""
    bias = torch.zeros(memory_mask.shape, dtype=dtype, device=memory_mask.device)
    return bias.masked_fill_(~memory_mask, float("-inf"))[:, None, None, :]


# ----------------------------------------------------------------------------- reranker


class ContrastiveScorer(nn.Module):
    """Image and text embeddings on the unit sphere; their dot product scores a pair (CLIP)."""

    def __init__(self, cfg: ScorerConfig, image_size: int, text: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        n = (image_size // cfg.patch_size) ** 2
        self.patch = nn.Linear(3 * cfg.patch_size ** 2, cfg.width)
        self.pos = nn.Parameter(torch.zeros(n, cfg.width))
        self.blocks = nn.ModuleList(EncoderBlock(cfg.width, cfg.heads, cfg.mlp_dim, 0.0) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.image_proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.text = TextEncoder(TextEncoderConfig(vocab_size=text.vocab_size, max_len=text.max_len,
                                                  width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
                                                  mlp_dim=cfg.text_mlp_dim, dropout=0.0))
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # CLIP's learned temperature, as a log; 1/0.07 at the start.
        self.log_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] -> unit embeddings ``[B, E]`` (float32).

        Each image's mean color is subtracted first: a plain background then adds nothing, and
        what differs between images drives the embedding (with the raw pixels a white background
        gave every image nearly the same embedding, cosine 0.99, and the contrastive loss stalled)."""
        x = pixels.to(self.patch.weight.dtype)
        x = x - x.mean(dim=(2, 3), keepdim=True)  # (B, 3, H, W)
        x = self.patch(patchify(x, self.cfg.patch_size)) + self.pos  # (B, N, W)
        for blk in self.blocks:
            x = blk(x)
        return F.normalize(self.image_proj(self.norm(x).mean(1)).float(), dim=-1)

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask ``[B, L]`` -> unit embeddings ``[B, E]`` (float32): the mean over real tokens."""
        h = self.text(ids, mask)  # (B, L, W)
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)  # (B, W)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B_images, B_texts]``: scaled cosine similarities (the contrastive loss's input)."""
        return self.log_scale.exp() * self.embed_images(pixels) @ self.embed_text(ids, mask).T


# ----------------------------------------------------------------------------- whole model


class VQIMModel(nn.Module):
    """Tokenizer + optional text encoder + AR decoder (absent in a tokenizer-only model) + optional
    reranker (``scorer``), as stored in one model directory."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vqgan = CNNVQ(cfg.vqgan) if isinstance(cfg.vqgan, CNNVQConfig) else ViTVQGAN(cfg.vqgan)
        self.text = TextEncoder(cfg.text) if cfg.text is not None else None
        self.decoder = None
        if cfg.decoder is not None:
            self.decoder = ARDecoder(cfg.decoder) if isinstance(cfg.decoder, DecoderConfig) else LlamaDecoder(cfg.decoder)
        self.scorer = None if cfg.scorer is None else ContrastiveScorer(cfg.scorer, cfg.vqgan.image_size, cfg.text)
        self.superres = SuperResolution(cfg.superres) if cfg.superres is not None else None


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random init (trunc-normal 0.02 linears/embeddings, unit codebook rows),
    the same on every device: values are drawn on CPU in fp32 and copied."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("codebook"):
            val = torch.randn(p.shape, generator=g)
        elif name.endswith("log_scale"):
            val = torch.full(p.shape, math.log(1 / 0.07))
        elif p.dim() == 1:
            val = torch.ones(p.shape) if (".ln" in name or "norm" in name) and name.endswith("weight") else torch.zeros(p.shape)
        else:
            val = torch.randn(p.shape, generator=g).mul_(0.02).clamp_(-0.04, 0.04)
        p.copy_(val.to(p.dtype))
