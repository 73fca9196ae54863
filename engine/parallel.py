"""Fewer forward passes than tokens: conv-wavefront decoding (exact) and speculative Jacobi decoding.

Both feed several tokens per decoder row in one forward over the KV cache
(:func:`forward_tokens`), where raster decoding (:meth:`Generator.run`) feeds one.

**Wavefront** (every decoder layer conv-masked, kernel ``kh x kw``, ``h = kw // 2``). The
output at the position of fed token ``(r, c)`` sees, per layer, row ``r`` up to ``c`` and the
``kh // 2`` rows above up to column ``c + h``; stacked, row ``r - k`` up to ``c + k h`` (tested
in ``tests/test_parallel_decoding.py``). So row ``r`` may feed column ``c`` as soon as row
``r - 1`` has fed up to column ``c + h`` (in an earlier pass, or in the same one: a pass writes
every new key of a layer before any of its queries attends). Rows advance as a staggered
wavefront, one token each per pass: a ``16 x 16`` grid with a ``9 x 9`` kernel takes
``1 + 15 * 4 + 15 = 76`` passes, a ``32 x 32`` one with ``11 x 11`` 187, instead of 256 / 1024.

The first token of row ``r`` is the exception: raster order predicts it from the last position
of row ``r - 1``. Each pass also feeds every started row's cells not fed yet as a *speculative
tail*: each cell its guess (the token the tail's previous pass drew for it, with the draw raster
decoding makes for that token: ``cfg_sample``'s key is ``(seed, token index)``, so close
distributions land on the same token), one Jacobi step per pass. The tail's last cell drafts the
next row's first token; a started row whose draft changes restarts on the new one at once. The
draft is checked when row ``r - 1`` feeds its last token: if the true sample equals it the row
goes on; otherwise row ``r`` restarts from the sampled token and every row below it from
scratch. Tail entries see only cache slots written (fed, or by this pass); their K/V land in
slots that no fed query reads before the real token overwrites them (a fed query at column ``c``
sees the row above up to ``c + h``, fed by then). Measured on the all-conv shapes model (6
held-out prompts, cfg 1.5, temperature 0.5, batch 1): drafting once from a single speculative
query at the last cell, fed the row's latest token, kept 59 of 90 first tokens (0.54 passes per
token); the tail keeps 90 of 90 (0.34). The token above, ``(r - 1, 0)``, was never right: the
tokenizer's codes of a plain background differ by position.

Every kept token is therefore drawn from the same logits with the same uniform as in raster
decoding: the **same tokens**, not just the same distribution,
up to float rounding of the logits, which differ in the last bits between a one-token and a
many-token forward (as between batch sizes; docs/design.md §5). In float32 that never showed in
the tests; in bfloat16 the two forwards differ by about bfloat16's own error (0.004 on logits of
size 0.5 for tiny-t2i, the same as either's distance to float32), and on tiny-t2i's random,
nearly flat logits 3 of 64 tokens came out otherwise: bit-identical tokens in low precision need
batch-invariant kernels, not built.

**Speculative Jacobi decoding** (any decoder; Teng et al. 2024, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding"). Each image keeps a
window of ``window`` draft tokens after its accepted prefix, each with the distribution ``q``
it was drawn from. One forward over the window gives the model's distribution ``p`` at each
position given the drafts before it; drafts are accepted left to right with probability
``min(1, p(x) / q(x))``; at the first rejection the token is drawn from ``max(0, p - q)``
renormalized, and the rest of the window is redrawn from this pass's ``p`` (Jacobi), which
becomes their ``q``. Positions newly in the window are drafted from the last position's ``p``.
Rejected drafts' cache entries are overwritten when their positions are fed again and no query
sees past itself, so nothing stale is read. Lossless in distribution (tested with chi-square
tests against raster sampling); the tokens differ from raster's, since acceptance needs other
randomness: a ``torch.Generator`` per image seeded with its seed, so a seed still fixes the image.

Both keep per-image bookkeeping on the host (a sync per pass) and run eagerly (no CUDA graph:
the number of tokens per pass changes), with the plain (not ring) KV cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqim import kernels as K

from .generate import Rows, Sampling
from .models import ARDecoder, DecodeState

DECODINGS = ("raster", "wavefront", "sjd")


@dataclass
class DecodeStats:
    """What a parallel decode did, summed over the images of a batch."""

    images: int = 0
    tokens: int = 0
    # Forward passes each image took part in, prefill included, summed over the images (a batch's
    # passes times its images: each pass feeds one or more tokens of every image in it).
    passes: int = 0
    # Wavefront: first tokens of a row drafted and then checked, and how many matched.
    row_starts: int = 0
    row_starts_accepted: int = 0
    # SJD: drafts verified and accepted.
    drafts: int = 0
    drafts_accepted: int = 0

    @property
    def passes_per_token(self) -> float:
        """Forward passes per token (raster decoding: 1)."""
        return self.passes / self.tokens if self.tokens else 0.0


def check_decoding(decoding: str) -> str:
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {list(DECODINGS)}, got {decoding!r}")
    return decoding


def check_window(name: str, window, num_tokens: int) -> int:
    """An SJD window: an int in ``[1, num_tokens]``; ``name`` is what the caller calls it."""
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= num_tokens:
        raise ValueError(f"{name} must be an int in [1, {num_tokens}] (the image's tokens), got {window!r}")
    return window


def wavefront_unsupported(decoder: ARDecoder) -> str | None:
    """Why ``decoder`` cannot decode as a wavefront (``None`` if it can): a fully causal layer
    sees every earlier token, so no token may be computed before the whole raster prefix."""
    causal = [i for i in range(decoder.cfg.layers) if not decoder.cfg.uses_conv(i)]
    if causal:
        return (f"wavefront decoding needs every decoder layer conv-masked; layers {causal} of this model are "
                f"fully causal (DecoderConfig.conv_layers = {list(decoder.cfg.conv_layers)})")
    return None


def forward_tokens(dec: ARDecoder, state: DecodeState, tokens: torch.Tensor, pos: torch.Tensor,
                   valid: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``T`` image tokens per row at any positions in one forward over the KV cache.

    ``tokens [R, T]`` at sequence positions ``pos [R, T]`` (>= prefix, each position at most once
    per row); ``valid [R, T]`` is False on padding, whose K/V are never written and whose logits
    mean nothing. At each layer every valid entry's K/V is written to the cache before any query
    attends, so entries of one pass see each other as the mask allows: a prefill chunk at
    scattered positions. ``known [R, S]`` (bool, optional) marks the cache slots that hold a
    fed token's K/V after this pass's writes: an entry then sees only those (and itself), as a
    speculative query over a partly written cache must. Returns logits ``[R, T, V]`` (float32)
    for the token after each entry.
    """
    cfg = dec.cfg
    if state.ring:
        raise ValueError("forward_tokens needs the plain KV cache (kv_cache='plain'), not the ring")
    grid = (cfg.grid_h, cfg.grid_w)
    i = pos - cfg.prefix  # (R, T) grid index of each fed token
    x = dec.tok_embed(tokens) + dec.row_embed(i // cfg.grid_w) + dec.col_embed(i % cfg.grid_w)  # (R, T, W)
    r_idx, t_idx = valid.nonzero(as_tuple=True)  # (N,) each
    p_idx = pos[r_idx, t_idx]  # (N,)
    n_slots = state.k[0].shape[2]
    conv_vis = _conv_mask(grid, tuple(cfg.conv_kernel), cfg.prefix, n_slots, pos.device)[pos]  # (R, T, S)
    slots = torch.arange(n_slots, device=pos.device)  # (S,)
    causal_vis = slots <= pos[..., None]  # (R, T, S)
    if known is not None:
        seen = known[:, None, :] | (slots == pos[..., None])  # (R, T, S)
        conv_vis, causal_vis = conv_vis & seen, causal_vis & seen
    for li, blk in enumerate(dec.blocks):
        q, k, v = blk.attn.qkv(blk.ln1(x))  # 3 x (R, H, T, Dh)
        kc, vc = state.k[li], state.v[li]
        kc[r_idx, :, p_idx] = k[r_idx, :, t_idx]  # (N, H, Dh) into each entry's slot
        vc[r_idx, :, p_idx] = v[r_idx, :, t_idx]
        vis = conv_vis if blk.conv else causal_vis
        a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=vis[:, None])  # (R, H, T, Dh)
        x = x + blk.attn.merge(a)
        if cfg.cross_attention:
            qx = blk.cross.split(blk.cross.wq(blk.ln_x(x)))  # (R, H, T, Dh)
            a = F.scaled_dot_product_attention(qx, state.cross_k[li], state.cross_v[li], attn_mask=state.memory_bias)
            x = x + blk.cross.merge(a)
        x = x + blk.mlp(blk.ln2(x))
    return dec.head(dec.norm(x)).float()  # (R, T, V)


@functools.lru_cache(maxsize=8)
def _conv_mask(grid: tuple[int, int], kernel: tuple[int, int], prefix: int, n_slots: int,
               device: torch.device) -> torch.Tensor:
    """``conv_mask_ref`` ``[S, S]`` of a decoder's geometry, built once, not every pass."""
    return K.conv_mask_ref(grid, kernel, prefix, seq_len=n_slots, device=device)


def _new_state(dec: ARDecoder, rows: Rows) -> tuple[DecodeState, torch.Tensor]:
    """A plain cache for ``rows``, prefilled; returns it and the prefix's logits ``[R, V]``."""
    state = dec.new_state(rows.prefix.shape[0], rows.memory, rows.memory_mask)
    return state, dec.prefill(state, rows.prefix)


def _entries(per_image: list[list[tuple[int, int]]], prefix: int, device: torch.device,
             guided: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's ``(token, position)`` entries -> ``(tokens, pos, valid)`` ``[R, T]`` for
    :func:`forward_tokens`; an image with fewer entries is padded (at the first image position)."""
    b = len(per_image)
    t = max(1, max(len(e) for e in per_image))
    tok = torch.zeros(b, t, dtype=torch.long)
    pos = torch.full((b, t), prefix, dtype=torch.long)
    valid = torch.zeros(b, t, dtype=torch.bool)
    for bi, ents in enumerate(per_image):
        for j, (token, p) in enumerate(ents):
            tok[bi, j], pos[bi, j], valid[bi, j] = token, p, True
    if guided:  # the unconditional row of each image is fed the same tokens
        tok, pos, valid = torch.cat([tok, tok]), torch.cat([pos, pos]), torch.cat([valid, valid])
    return tok.to(device), pos.to(device), valid.to(device)


@torch.no_grad()
def run_wavefront(dec: ARDecoder, rows: Rows, sampling: Sampling, *, guided: bool,
                  stats: DecodeStats | None = None) -> torch.Tensor:
    """Image tokens ``[B, n]`` by wavefront decoding: the tokens raster decoding
    (:meth:`Generator.run`) draws for the same rows and sampling. ``rows`` as :func:`condition`
    lays them out (``R = 2B`` when ``guided``)."""
    why = wavefront_unsupported(dec)
    if why is not None:
        raise ValueError(why)
    cfg = dec.cfg
    gh, gw = cfg.grid_h, cfg.grid_w
    half = cfg.conv_kernel[1] // 2
    dev = rows.prefix.device
    r_all = rows.prefix.shape[0]
    b = r_all // 2 if guided else r_all
    state, first = _new_state(dec, rows)
    n_slots = state.k[0].shape[2]
    tokens = torch.full((b, gh * gw), -1, dtype=torch.long)
    tokens[:, 0] = _draw(first[:b], first[b:] if guided else None, sampling, torch.arange(b), torch.zeros(b)).cpu()
    # Per image and grid row: tokens known (sampled, or a first token drafted), tokens fed (in
    # the cache), a drafted first token waiting for the row to start; per image and cell, the
    # speculative tail's guess of a token not known yet.
    have = [[1] + [0] * (gh - 1) for _ in range(b)]
    fed = [[0] * gh for _ in range(b)]
    ready: list[dict[int, int]] = [{} for _ in range(b)]
    guess: list[dict[tuple[int, int], int]] = [{} for _ in range(b)]
    passes = 1
    starts = accepted = 0

    def need(c: int) -> int:
        """Tokens row r - 1 must have fed for row r to feed column c."""
        return min(c + half + 1, gw)

    def at(r: int, c: int) -> int:
        return cfg.prefix + r * gw + c

    def reset_below(bi: int, r: int) -> None:
        for rr in range(r, gh):
            have[bi][rr], fed[bi][rr] = 0, 0
            ready[bi].pop(rr, None)
            for c in range(gw):
                guess[bi].pop((rr, c), None)
            tokens[bi, rr * gw:(rr + 1) * gw] = -1

    while True:
        per_image: list[list[tuple[int, int]]] = []
        cells: list[list[tuple[str, int, int]]] = []
        # The cache slots holding a token's K/V once this pass has written: the prefix, every
        # row's fed cells and this pass's entries (what a speculative entry may see).
        written = torch.zeros(b, n_slots, dtype=torch.bool)
        written[:, :cfg.prefix] = True
        for bi in range(b):
            ents, cl = [], []
            above = gw  # tokens the row above will have fed after this pass (none above row 0)
            for r in range(gh):
                if have[bi][r] == 0 and r in ready[bi] and above >= need(0):
                    tokens[bi, r * gw] = ready[bi].pop(r)
                    have[bi][r] = 1
                if have[bi][r] == 0:
                    break
                c = fed[bi][r]
                written[bi, at(r, 0):at(r, c)] = True
                last = gw if r < gh - 1 else gw - 1  # the grid's last token is drawn, never fed
                go = c < last and above >= need(c)
                if go:
                    ents.append((int(tokens[bi, r * gw + c].clamp_min(0)), at(r, c)))
                    cl.append(("feed", r, c))
                    written[bi, at(r, c)] = True
                # The speculative tail: the row's cells not fed yet, fed their guesses, one
                # Jacobi step a pass; its last cell drafts the next row's first token.
                if r < gh - 1 and c + go < gw:
                    latest = int(tokens[bi, r * gw + have[bi][r] - 1].clamp_min(0))
                    for cc in range(c + go, gw):
                        t = int(tokens[bi, r * gw + cc]) if cc < have[bi][r] else guess[bi].get((r, cc), latest)
                        ents.append((max(t, 0), at(r, cc)))
                        cl.append(("tail", r, cc))
                        written[bi, at(r, cc)] = True
                above = c + go
            per_image.append(ents)
            cells.append(cl)
        if not any(per_image):
            break
        tok, pos, valid = _entries(per_image, cfg.prefix, dev, guided)
        seen = (torch.cat([written, written]) if guided else written).to(dev)
        logits = forward_tokens(dec, state, tok, pos, valid, seen)  # (R, T, V)
        passes += 1
        img = torch.tensor([bi for bi in range(b) for _ in cells[bi]], dtype=torch.long)
        slot = torch.tensor([j for bi in range(b) for j in range(len(cells[bi]))], dtype=torch.long)
        # An entry at (r, c), fed or speculative, predicts token (r, c + 1), or (r + 1, 0) after the
        # last column, drawn as raster decoding draws that token.
        target = torch.tensor([r * gw + c + 1 for bi in range(b) for _, r, c in cells[bi]], dtype=torch.long)
        sel = logits[img.to(dev), slot.to(dev)]  # (N, V)
        unsel = logits[(img + b).to(dev), slot.to(dev)] if guided else None
        drawn = _draw(sel, unsel, sampling, img, target).cpu().tolist()
        k = 0
        for bi in range(b):
            stop = gh  # entries of rows below `stop` were fed on a first token just redrawn: discarded
            for kind, r, c in cells[bi]:
                t = drawn[k]
                k += 1
                if kind == "tail":
                    if r > stop:
                        continue
                    if c + 1 < gw:
                        guess[bi][(r, c + 1)] = t
                    elif have[bi][r + 1] == 0:
                        ready[bi][r + 1] = t
                    elif int(tokens[bi, (r + 1) * gw]) != t:
                        # A new draft of a started row's first token: it restarts on it now,
                        # cheaper than finding out when the row above completes.
                        reset_below(bi, r + 1)
                        ready[bi][r + 1] = t
                        stop = min(stop, r)
                    continue
                if r > stop:
                    continue
                fed[bi][r] = c + 1
                if c + 1 < gw:
                    tokens[bi, r * gw + c + 1] = t
                    have[bi][r] = c + 2
                    continue
                if have[bi][r + 1]:
                    starts += 1
                    if int(tokens[bi, (r + 1) * gw]) == t:
                        accepted += 1
                        continue
                # The true first token of row r + 1: it restarts there, the rows below from nothing.
                reset_below(bi, r + 1)
                tokens[bi, (r + 1) * gw] = t
                have[bi][r + 1] = 1
                stop = min(stop, r)
    if stats is not None:
        stats.images += b
        stats.tokens += b * gh * gw
        stats.passes += passes * b
        stats.row_starts += starts
        stats.row_starts_accepted += accepted
    return tokens.to(dev)


@torch.no_grad()
def run_sjd(dec: ARDecoder, rows: Rows, sampling: Sampling, *, guided: bool, window: int = 16,
            stats: DecodeStats | None = None) -> torch.Tensor:
    """Image tokens ``[B, n]`` by speculative Jacobi decoding with ``window`` drafts per image:
    distributed as raster decoding's, not the same tokens (see the module docstring)."""
    check_window("window", window, dec.cfg.num_tokens)
    cfg = dec.cfg
    n = cfg.num_tokens
    dev = rows.prefix.device
    r_all = rows.prefix.shape[0]
    b = r_all // 2 if guided else r_all
    state, first = _new_state(dec, rows)
    tokens = torch.full((b, n), -1, dtype=torch.long)
    everyone = torch.arange(b)
    tokens[:, 0] = _draw(first[:b], first[b:] if guided else None, sampling, everyone, torch.zeros(b)).cpu()
    gens = [torch.Generator().manual_seed(int(s)) for s in sampling.seed.tolist()]
    done = [1] * b  # tokens accepted per image
    # Each image's drafts for tokens done .. done + len - 1, and the distribution q each was drawn from.
    q0 = _probs(first[:b], first[b:] if guided else None, sampling, everyone).cpu()  # (B, V)
    q = [q0[bi].expand(min(window, n - 1), -1) for bi in range(b)]
    drafts = [torch.multinomial(q[bi], 1, generator=gens[bi])[:, 0] for bi in range(b)]
    passes = 1
    proposed = accepted = 0
    while any(d < n for d in done):
        live = [bi for bi in range(b) if done[bi] < n]
        per_image = [[] for _ in range(b)]
        for bi in live:
            fed = [int(tokens[bi, done[bi] - 1])] + drafts[bi][:len(drafts[bi]) - 1].tolist()
            per_image[bi] = [(max(t, 0), cfg.prefix + done[bi] - 1 + j) for j, t in enumerate(fed)]
        tok, pos, valid = _entries(per_image, cfg.prefix, dev, guided)
        logits = forward_tokens(dec, state, tok, pos, valid)  # (R, T, V)
        passes += 1
        img = torch.tensor([bi for bi in live for _ in per_image[bi]], dtype=torch.long)
        slot = torch.tensor([j for bi in live for j in range(len(per_image[bi]))], dtype=torch.long)
        sel = logits[img.to(dev), slot.to(dev)]  # (N, V)
        p_all = _probs(sel, logits[(img + b).to(dev), slot.to(dev)] if guided else None, sampling, img).cpu()
        k0 = 0
        for bi in live:
            length = len(per_image[bi])
            p = p_all[k0:k0 + length]  # (L, V): the model's distribution of tokens done .. done + L - 1
            k0 += length
            d, qd = drafts[bi], q[bi]
            u = torch.rand(length, generator=gens[bi])
            rows_ = torch.arange(length)
            ok = u * qd[rows_, d] < p[rows_, d]  # accept with probability min(1, p / q)
            take = int(ok.long().cumprod(0).sum())
            proposed += length
            accepted += take
            start = done[bi]
            dead = (p.sum(1) <= 0).nonzero()
            if dead.numel() and int(dead[0]) <= min(take, length - 1):
                # No finite guided logit: the image is marked (-1) and stops; check_tokens raises.
                tokens[bi, start + int(dead[0]):] = -1
                done[bi] = n
                continue
            tokens[bi, start:start + take] = d[:take]
            rest = p[take + 1:]  # (., V) Jacobi: later positions redrawn from this pass's p
            if take < length:
                residual = (p[take] - qd[take]).clamp_min(0)
                residual = residual if residual.sum() > 0 else p[take]
                tokens[bi, start + take] = torch.multinomial(residual, 1, generator=gens[bi])
                done[bi] = start + take + 1
            else:
                done[bi] = start + length
            more = min(window, n - done[bi]) - rest.shape[0]
            q[bi] = torch.cat([rest, p[-1].expand(max(more, 0), -1)])[:min(window, n - done[bi])]
            drafts[bi] = (torch.multinomial(q[bi], 1, generator=gens[bi])[:, 0] if q[bi].shape[0]
                          else torch.zeros(0, dtype=torch.long))
    if stats is not None:
        stats.images += b
        stats.tokens += b * n
        stats.passes += passes * b
        stats.drafts += proposed
        stats.drafts_accepted += accepted
    return tokens.to(dev)


def _settings(sampling: Sampling, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each entry's sampling settings ``[N]``, entry ``j`` from image ``image[j]`` (on their device)."""
    return {name: v[image.to(v.device)] for name, v in sampling.settings.items()}


def _probs(cond: torch.Tensor, uncond: torch.Tensor | None, sampling: Sampling, image: torch.Tensor) -> torch.Tensor:
    """What ``cfg_sample`` draws from for logits ``[N, V]``, entry ``j`` with image ``image[j]``'s settings."""
    return K.cfg_probs_ref(cond, uncond, **_settings(sampling, image))  # (N, V)


def _draw(cond: torch.Tensor, uncond: torch.Tensor | None, sampling: Sampling, image: torch.Tensor,
          target: torch.Tensor) -> torch.Tensor:
    """``cfg_sample`` of logits ``[N, V]``, entry ``j`` for image ``image[j]`` (its settings and
    seed) and token index ``target[j]`` (the step raster decoding draws that token at)."""
    dev = cond.device
    return K.cfg_sample(cond, uncond, seed=sampling.seed[image.to(dev)], step=target.to(dev, torch.long),
                        validate=False, **_settings(sampling, image))  # (N,)
