"""The Llama-style image-token decoder of the public models: LlamaGen's GPT and Janus-Pro's
language model with its image embedding and generation head.

A block: RMSNorm, attention (q/k/v projections, rotary positions on q and k, grouped-query
attention over a causal cache, output projection), residual; RMSNorm, SwiGLU MLP
(``w2(silu(w1 x) * w3 x)``), residual. The sequence is a prefix, then the image tokens: one class
token (LlamaGen c2i: ``class_embed``, whose last row is the null class of guidance) or the
prompt's tokens (Janus: ``text_embed``), each row of a batch its own length; image tokens are
embedded by ``tok_embed`` (LlamaGen) or Janus's ``gen_embed`` and aligner MLP. The head is one
linear (LlamaGen) or Janus's MLP (``head_proj``, GELU, ``head``), after the final RMSNorm.

Rotary positions come from tables ``rope_cos``/``rope_sin`` ``[max_seq, head_dim / 2]`` indexed by
a token's position: ``rope="1d"`` is Hugging Face Llama's (angle ``p / theta^(2i/d)``, halves
rotated), ``"2d"`` LlamaGen's (the first half of the angles from the grid row, the second from
the column, pairs interleaved; the class token's row all zeros, as LlamaGen's table has it).

The decode step is built like Parti's (DESIGN §1): q/k/v one matmul and w1/w3 one matmul after
:meth:`LlamaDecoder.fuse`; the rotation, the cache write and the attention one kernel
(``vqim.kernels.rope_decode_attention``); each residual add fused with the norm after it
(``vqim.kernels.add_rms_norm``): 9 launches a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqim import kernels as K

from .config import LlamaDecoderConfig
from .state import DecodeState


class RMSNorm(nn.Module):
    """``(x / rms(x)).to(x.dtype) * weight``, the statistics in fp32 (Hugging Face's and LlamaGen's)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm_ref(x, self.weight, self.eps)


def rope_tables(cfg: LlamaDecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_seq, head_dim / 2]`` (fp32) of every position (module docstring)."""
    d = cfg.head_dim
    if cfg.rope == "1d":
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (d/2,)
        angles = torch.arange(cfg.max_seq, dtype=torch.float32)[:, None] * inv[None, :]  # (S, d/2)
        return angles.cos(), angles.sin()
    half = d // 2
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (d/4,)
    rows = torch.arange(cfg.grid_h, dtype=torch.float32)[:, None] * inv  # (gh, d/4)
    cols = torch.arange(cfg.grid_w, dtype=torch.float32)[:, None] * inv  # (gw, d/4)
    grid = torch.cat([rows[:, None, :].expand(-1, cfg.grid_w, -1), cols[None, :, :].expand(cfg.grid_h, -1, -1)],
                     dim=-1).flatten(0, 1)  # (n, d/2)
    cos = torch.cat([torch.zeros(cfg.prefix, half), grid.cos()])[: cfg.max_seq]  # (S, d/2): zeros on the class token
    sin = torch.cat([torch.zeros(cfg.prefix, half), grid.sin()])[: cfg.max_seq]
    return cos, sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaDecoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        w, kv = cfg.width, cfg.kv_heads * cfg.head_dim
        self.wq = nn.Linear(w, w, bias=False)
        self.wk = nn.Linear(w, kv, bias=False)
        self.wv = nn.Linear(w, kv, bias=False)
        self.wo = nn.Linear(w, w, bias=False)
        self.fused = False

    @torch.no_grad()
    def fuse(self) -> None:
        """q/k/v as one ``wqkv`` (rows q, then k, then v); the state dict keeps the three names."""
        if self.fused:
            return
        w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])  # ((H + 2 Hkv) Dh, W)
        self.wqkv = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        self.wqkv.weight = nn.Parameter(w, requires_grad=False)
        sizes = (self.wq.weight.shape[0], self.wk.weight.shape[0], self.wv.weight.shape[0])
        del self.wq, self.wk, self.wv
        self.fused = True
        self.register_state_dict_post_hook(_split(("wq", "wk", "wv"), "wqkv", lambda m: sizes))
        self.register_load_state_dict_pre_hook(_join(("wq", "wk", "wv"), "wqkv"))

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, H, S, Dh]`` and k, v ``[B, Hkv, S, Dh]`` of ``h [B, S, W]`` (views of one matmul when fused)."""
        b, s, _ = h.shape
        if self.fused:
            q, k, v = self.wqkv(h).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                          self.kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.wq(h), self.wk(h), self.wv(h)
        return (q.view(b, s, self.heads, self.head_dim).transpose(1, 2),
                k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2),
                v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2))

    def merge(self, a: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = a.shape
        return self.wo(a.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))  # (B, S, W)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.fused = False

    @torch.no_grad()
    def fuse(self) -> None:
        """w1 and w3 as one ``w13``; the state dict keeps both names."""
        if self.fused:
            return
        w = torch.cat([self.w1.weight, self.w3.weight])  # (2 hidden, W)
        self.w13 = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        self.w13.weight = nn.Parameter(w, requires_grad=False)
        hidden = self.w1.weight.shape[0]
        del self.w1, self.w3
        self.fused = True
        self.register_state_dict_post_hook(_split(("w1", "w3"), "w13", lambda m: (hidden, hidden)))
        self.register_load_state_dict_pre_hook(_join(("w1", "w3"), "w13"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            a, b = self.w13(x).chunk(2, dim=-1)
        else:
            a, b = self.w1(x), self.w3(x)
        return self.w2(F.silu(a) * b)


def _split(parts: tuple[str, ...], name: str, sizes):
    """state_dict post-hook of a fused linear: the checkpoint's separate keys."""
    def hook(module, state: dict, prefix: str, local_metadata) -> None:
        t = state.pop(f"{prefix}{name}.weight", None)
        if t is not None:
            for n, piece in zip(parts, t.split(list(sizes(module)))):
                state[f"{prefix}{n}.weight"] = piece
    return hook


def _join(parts: tuple[str, ...], name: str):
    """load_state_dict pre-hook of a fused linear: the separate keys concatenated."""
    def hook(module, state: dict, prefix: str, local_metadata, strict, missing, unexpected, errors) -> None:
        keys = [f"{prefix}{n}.weight" for n in parts]
        if all(k in state for k in keys):
            state[f"{prefix}{name}.weight"] = torch.cat([state.pop(k) for k in keys])
    return hook


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q ``[B, H, T, Dh]`` over k, v ``[B, Hkv, S, Dh]`` (their heads repeated per group)."""
        g = self.cfg.heads // self.cfg.kv_heads
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The full sequence ``x [B, S, W]`` from position 0, causal; ``cos``, ``sin`` ``[S, Dh/2]``;
        K/V also written to ``cache[:, :, :S]``."""
        inter = self.cfg.rope == "2d"
        q, k, v = self.attn.qkv(self.attn_norm(x))
        q = K.apply_rope_ref(q, cos, sin, interleaved=inter)  # (B, H, S, Dh)
        k = K.apply_rope_ref(k, cos, sin, interleaved=inter)  # (B, Hkv, S, Dh)
        if cache is not None:
            cache[0][:, :, : k.shape[2]] = k
            cache[1][:, :, : v.shape[2]] = v
        x = x + self.attn.merge(self._attend(q, k, v, None))
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, state: DecodeState, layer: int,
             next_norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: ``x [B, 1, W]`` the residual stream, ``h`` its norm, ``pos [B]`` each row's
        position. Returns the block's output and ``next_norm`` of it (residual adds fused with the norms)."""
        q, k, v = self.attn.qkv(h)
        a = K.rope_decode_attention(q, state.k[layer], state.v[layer], pos, k, v, cos, sin,
                                    interleaved=self.cfg.rope == "2d", validate=False)  # (B, H, 1, Dh)
        x, h = K.add_rms_norm(x, self.attn.merge(a), self.mlp_norm.weight, eps=self.mlp_norm.eps)
        return K.add_rms_norm(x, self.mlp(h), next_norm.weight, eps=next_norm.eps)

    def step_tokens(self, x: torch.Tensor, state: DecodeState, layer: int, rows: torch.Tensor, entries: torch.Tensor,
                    slots: torch.Tensor, visible: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``T`` tokens per row (``ARDecoder.forward_tokens``' contract): ``cos``, ``sin`` ``[R, T, Dh/2]``."""
        inter = self.cfg.rope == "2d"
        q, k, v = self.attn.qkv(self.attn_norm(x))
        q = K.apply_rope_ref(q, cos[:, None], sin[:, None], interleaved=inter)  # (R, H, T, Dh)
        k = K.apply_rope_ref(k, cos[:, None], sin[:, None], interleaved=inter)  # (R, Hkv, T, Dh)
        kc, vc = state.k[layer], state.v[layer]
        kc[rows, :, slots] = k[rows, :, entries]  # (N, Hkv, Dh) into each entry's slot
        vc[rows, :, slots] = v[rows, :, entries]
        x = x + self.attn.merge(self._attend(q, kc, vc, visible[:, None]))
        return x + self.mlp(self.mlp_norm(x))


def _tables_after_load(module: LlamaDecoder, incompatible) -> None:
    """A model built on the meta device and loaded with ``assign=True`` (how weights are read)
    has real parameters but meta tables, which no checkpoint fills: compute them beside the weights."""
    if module.rope_cos.is_meta and not module.norm.weight.is_meta:
        cos, sin = rope_tables(module.cfg)
        module.rope_cos, module.rope_sin = cos.to(module.device), sin.to(module.device)


class LlamaDecoder(nn.Module):
    """The decoder of :class:`~vqim.engine.config.LlamaDecoderConfig` (module docstring), with the
    interface of Parti's ``ARDecoder`` the runner drives."""

    def __init__(self, cfg: LlamaDecoderConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        if cfg.num_classes:
            self.class_embed = nn.Embedding(cfg.num_classes + 1, w)  # last row: the null class
        else:
            self.text_embed = nn.Embedding(cfg.prompt_vocab, w)
        if cfg.image_embed == "table":
            self.tok_embed = nn.Embedding(cfg.vocab_size, w)
        else:
            self.gen_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
            self.aligner = nn.ModuleList([nn.Linear(cfg.embed_dim, w)] +
                                         [nn.Linear(w, w) for _ in range(cfg.aligner_layers - 1)])
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(w, cfg.norm_eps)
        if cfg.head == "linear":
            self.head = nn.Linear(w, cfg.vocab_size, bias=False)
        else:
            self.head_proj = nn.Linear(w, cfg.head_dim_mlp)
            self.head = nn.Linear(cfg.head_dim_mlp, cfg.vocab_size)
        cos, sin = rope_tables(cfg)
        # Derived from the config, never stored: a checkpoint holds none.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_load_state_dict_post_hook(_tables_after_load)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def null_prefix(self) -> int:
        """The null class (the class table's last row): the unconditional branch of a class model."""
        return self.cfg.num_classes

    def embed_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image codes ``[...]`` -> ``[..., W]``."""
        if self.cfg.image_embed == "table":
            return self.tok_embed(tokens)
        x = self.aligner[0](self.gen_embed(tokens))
        for lin in self.aligner[1:]:
            x = lin(F.gelu(x))
        return x

    def embed_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """Prefix ids ``[B, P]`` (class ids or prompt ids) -> ``[B, P, W]``."""
        return self.class_embed(prefix) if self.cfg.num_classes else self.text_embed(prefix)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden states ``[..., W]`` -> logits ``[..., V]`` (float32)."""
        if self.cfg.head == "mlp":
            h = F.gelu(self.head_proj(h))
        return self.head(h).float()

    def _sequence(self, x: torch.Tensor, cache: DecodeState | None = None,
                  hidden_layer: int | None = None) -> torch.Tensor:
        s = x.shape[1]
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, None if cache is None else (cache.k[i], cache.v[i]))
            if i == hidden_layer:
                return x
        return self.norm(x)

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, *, hidden_layer: int | None = None) -> torch.Tensor:
        """Teacher forcing: prefix ids ``[B, P]`` (one length for the batch) and image tokens
        ``[B, t]`` -> logits ``[B, 1 + t, V]`` (float32), position ``j`` predicting image token ``j``.
        With ``hidden_layer=l``: block ``l``'s output ``[B, P + t, W]``."""
        if tokens.shape[1] > self.cfg.num_tokens:
            raise ValueError(f"tokens must have at most {self.cfg.num_tokens} positions, got {tokens.shape[1]}")
        x = torch.cat([self.embed_prefix(prefix), self.embed_image(tokens)], dim=1)  # (B, P + t, W)
        h = self._sequence(x, hidden_layer=hidden_layer)
        if hidden_layer is not None:
            return h
        return self.logits(h[:, prefix.shape[1] - 1:])

    def new_state(self, batch: int, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None, *,
                  ring: bool = False) -> DecodeState:
        """Zeroed caches ``[batch, Hkv, max_seq, Dh]`` (every layer is causal: no ring)."""
        if ring:
            raise ValueError("kv_cache='ring' keeps the rows a conv-masked layer's window reaches; this decoder has "
                             "none (every layer is causal): use kv_cache='plain'")
        cfg = self.cfg
        # Heads this module holds: cfg.kv_heads / N on a tensor-parallel rank (vqim.engine.tp).
        shape = (batch, self.blocks[0].attn.kv_heads, cfg.max_seq, cfg.head_dim)
        k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.blocks]
        v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.blocks]
        return DecodeState(k, v)

    def prefill(self, state: DecodeState, prefix: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        """Run prefixes ``[B, P]`` (row ``b``'s first ``prefix_len[b]`` ids real, the rest padding
        after them, which no later query reads before its slot is overwritten), fill their cache
        slots, return each row's logits ``[B, V]`` for image token 0."""
        b, p = prefix.shape
        if prefix_len is None:
            prefix_len = torch.full((b,), p, dtype=torch.long, device=prefix.device)
        h = self._sequence(self.embed_prefix(prefix), cache=state)  # (B, P, W)
        last = h[torch.arange(b, device=h.device), prefix_len - 1]  # (B, W)
        return self.logits(last)

    def decode_step(self, state: DecodeState, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed image token ``token [B]`` at positions ``pos [B]`` (or ``[1]`` for all rows); logits ``[B, V]``."""
        if pos.shape[0] != token.shape[0]:
            pos = pos.expand(token.shape[0]).contiguous()
        x = self.embed_image(token)[:, None, :]  # (B, 1, W)
        h = self.blocks[0].attn_norm(x)
        norms = [blk.attn_norm for blk in self.blocks[1:]] + [self.norm]
        for li, (blk, norm) in enumerate(zip(self.blocks, norms)):
            x, h = blk.step(x, h, pos, state, li, norm, self.rope_cos, self.rope_sin)
        return self.logits(h[:, 0])

    def forward_tokens(self, state: DecodeState, tokens: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                       known: torch.Tensor | None = None) -> torch.Tensor:
        """``T`` image tokens per row in one forward (``ARDecoder.forward_tokens``' contract; every
        layer causal). Returns logits ``[R, T, V]``."""
        x = self.embed_image(tokens)  # (R, T, W)
        rows, entries = valid.nonzero(as_tuple=True)  # (N,) each
        slots = pos[rows, entries]  # (N,)
        every = torch.arange(state.k[0].shape[2], device=pos.device)  # (S,)
        visible = every <= pos[..., None]  # (R, T, S)
        if known is not None:
            visible = visible & (known[:, None, :] | (every == pos[..., None]))
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (R, T, Dh/2)
        for li, blk in enumerate(self.blocks):
            x = blk.step_tokens(x, state, li, rows, entries, slots, visible, cos, sin)
        return self.logits(self.norm(x))

    def fuse(self) -> None:
        """Fused q/k/v and w1/w3 in every block, for inference (the state dict keeps its names)."""
        for blk in self.blocks:
            blk.attn.fuse()
            blk.mlp.fuse()
