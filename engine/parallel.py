"""Fewer forward passes than tokens: conv-wavefront decoding (exact) and speculative Jacobi decoding.

Both are per-image decode policies of the one scheduler loop (``engine/scheduler.py``): each
step, an image decoded this way feeds several tokens per decoder row through the runner's
multi-token forward (``ARDecoder.forward_tokens``) in the same pass as the raster images beside it,
which feed one. This module is their bookkeeping only: which cells to feed, which tokens the
pass's logits draw, and what is accepted.

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
the number of tokens per pass changes), with the plain (not ring) KV cache. Kept tokens
(image-conditioned generation) take the place of the draws at their cells, as in raster order:
the wavefront assigns them wherever it would assign a draw, SJD accepts them unconditionally.
"""


from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DecoderConfig
from .models import ARDecoder

# "auto": the wavefront where it draws raster's tokens (every decoder layer conv-masked, the plain
# KV cache), else raster.
DECODINGS = ("auto", "raster", "wavefront", "sjd")


@dataclass
class DecodeStats:
    """What decoding did, summed over images (a request's: ``RequestHandle.stats``)."""

    images: int = 0
    tokens: int = 0
    # Forward passes each image took part in, prefill included, summed over the images.
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

    def add(self, other: DecodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


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


class ParallelDecode:
    """One image's multi-token decoding: each pass, :meth:`entries` says what to feed; the
    scheduler runs the forward and hands back what the pass's logits give (:meth:`update`).

    ``tokens [n]`` (CPU, -1 where not known yet) is the image's result once :attr:`done`;
    ``token0`` is its first token, drawn from the prefill logits as raster order draws it.
    """

    #: What :meth:`update` takes: ``"draws"`` (one ``cfg_sample`` token per entry, keyed by the
    #: token index of :meth:`targets`) or ``"probs"`` (the distribution ``[L, V]`` at each entry).
    needs = ""

    def __init__(self, cfg: DecoderConfig, token0: int, forced: torch.Tensor | None):
        self.cfg = cfg
        self.forced = forced
        self.tokens = torch.full((cfg.num_tokens,), -1, dtype=torch.long)
        self.tokens[0] = token0
        self.stats = DecodeStats(images=1, tokens=cfg.num_tokens, passes=1)

    def kept(self, index: int, drawn: int) -> int:
        """Token ``index``'s value when the draw is ``drawn``: the kept token where there is one."""
        if self.forced is not None and int(self.forced[index]) >= 0:
            return int(self.forced[index])
        return drawn

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def final(self) -> int:
        """How many leading tokens are final (no later pass changes them): partial images show these."""
        raise NotImplementedError

    def entries(self) -> tuple[list[tuple[int, int]], torch.Tensor | None]:
        """This pass's ``(token, cell)`` entries (a token fed at grid cell ``cell``: position
        ``prefix + cell`` of each of the image's rows) and the cells ``[n]`` (bool) whose K/V an
        entry may see once the pass has written (None: every cell the mask allows)."""
        raise NotImplementedError


class Wavefront(ParallelDecode):
    """Conv-wavefront decoding of one image (module docstring): the raster tokens, in about
    ``(grid_h - 1) * (kw // 2) + grid_w`` passes."""

    needs = "draws"

    def __init__(self, cfg: DecoderConfig, token0: int, forced: torch.Tensor | None):
        super().__init__(cfg, token0, forced)
        gh = cfg.grid_h
        self.half = cfg.conv_kernel[1] // 2
        # Per grid row: tokens known (sampled, or a first token drafted), tokens fed (in the
        # cache), a drafted first token waiting for the row to start; per cell, the speculative
        # tail's guess of a token not known yet.
        self.have = [1] + [0] * (gh - 1)
        self.fed = [0] * gh
        self.ready: dict[int, int] = {}
        self.guess: dict[tuple[int, int], int] = {}
        self.cells: list[tuple[str, int, int]] = []

    @property
    def done(self) -> bool:
        return self.fed[-1] >= self.cfg.grid_w - 1 and self.have[-1] == self.cfg.grid_w

    def final(self) -> int:
        # Row r's tokens are final once its first token was checked: row r - 1 fed its last cell.
        gw = self.cfg.grid_w
        count = 0
        for r in range(self.cfg.grid_h):
            if r > 0 and self.fed[r - 1] < gw:
                break
            count = r * gw + self.have[r]
            if self.have[r] < gw:
                break
        return count

    def _need(self, c: int) -> int:
        """Tokens row r - 1 must have fed for row r to feed column c."""
        return min(c + self.half + 1, self.cfg.grid_w)

    def _at(self, r: int, c: int) -> int:
        return r * self.cfg.grid_w + c

    def _reset_below(self, r: int) -> None:
        gh, gw = self.cfg.grid_h, self.cfg.grid_w
        for rr in range(r, gh):
            self.have[rr], self.fed[rr] = 0, 0
            self.ready.pop(rr, None)
            for c in range(gw):
                self.guess.pop((rr, c), None)
            self.tokens[rr * gw:(rr + 1) * gw] = -1

    def entries(self) -> tuple[list[tuple[int, int]], torch.Tensor]:
        cfg = self.cfg
        gh, gw = cfg.grid_h, cfg.grid_w
        tokens, have, fed = self.tokens, self.have, self.fed
        ents: list[tuple[int, int]] = []
        self.cells = []
        # The cells holding a token's K/V once this pass has written: every row's fed cells and
        # this pass's entries (what a speculative entry may see, with the prefix).
        written = torch.zeros(cfg.num_tokens, dtype=torch.bool)
        above = gw  # tokens the row above will have fed after this pass (none above row 0)
        for r in range(gh):
            if have[r] == 0 and r in self.ready and above >= self._need(0):
                tokens[r * gw] = self.ready.pop(r)
                have[r] = 1
            if have[r] == 0:
                break
            c = fed[r]
            written[self._at(r, 0):self._at(r, c)] = True
            last = gw if r < gh - 1 else gw - 1  # the grid's last token is drawn, never fed
            go = c < last and above >= self._need(c)
            if go:
                ents.append((int(tokens[r * gw + c].clamp_min(0)), self._at(r, c)))
                self.cells.append(("feed", r, c))
                written[self._at(r, c)] = True
            # The speculative tail: the row's cells not fed yet, fed their guesses, one Jacobi
            # step a pass; its last cell drafts the next row's first token.
            if r < gh - 1 and c + go < gw:
                latest = int(tokens[r * gw + have[r] - 1].clamp_min(0))
                for cc in range(c + go, gw):
                    t = int(tokens[r * gw + cc]) if cc < have[r] else self.guess.get((r, cc), latest)
                    ents.append((max(t, 0), self._at(r, cc)))
                    self.cells.append(("tail", r, cc))
                    written[self._at(r, cc)] = True
            above = c + go
        return ents, written

    def targets(self) -> list[int]:
        """The token index each entry of this pass draws: an entry at ``(r, c)``, fed or
        speculative, predicts token ``(r, c + 1)`` (``(r + 1, 0)`` after the last column), drawn
        as raster decoding draws that token."""
        gw = self.cfg.grid_w
        return [r * gw + c + 1 for _, r, c in self.cells]

    def update(self, drawn: list[int]) -> None:
        """This pass's draws, one per entry, in :meth:`entries`' order."""
        gh, gw = self.cfg.grid_h, self.cfg.grid_w
        tokens, have = self.tokens, self.have
        self.stats.passes += 1
        stop = gh  # entries of rows below `stop` were fed on a first token just redrawn: discarded
        for (kind, r, c), t in zip(self.cells, drawn):
            t = self.kept(r * gw + c + 1, t)
            if kind == "tail":
                if r > stop:
                    continue
                if c + 1 < gw:
                    self.guess[(r, c + 1)] = t
                elif have[r + 1] == 0:
                    self.ready[r + 1] = t
                elif int(tokens[(r + 1) * gw]) != t:
                    # A new draft of a started row's first token: it restarts on it now,
                    # cheaper than finding out when the row above completes.
                    self._reset_below(r + 1)
                    self.ready[r + 1] = t
                    stop = min(stop, r)
                continue
            if r > stop:
                continue
            self.fed[r] = c + 1
            if c + 1 < gw:
                tokens[r * gw + c + 1] = t
                have[r] = c + 2
                continue
            if have[r + 1]:
                self.stats.row_starts += 1
                if int(tokens[(r + 1) * gw]) == t:
                    self.stats.row_starts_accepted += 1
                    continue
            # The true first token of row r + 1: it restarts there, the rows below from nothing.
            self._reset_below(r + 1)
            tokens[(r + 1) * gw] = t
            have[r + 1] = 1
            stop = min(stop, r)


class SpeculativeJacobi(ParallelDecode):
    """Speculative Jacobi decoding of one image (module docstring): raster's distribution with
    ``window`` drafts per pass; ``q0 [V]`` is the distribution token 0 was drawn from and
    ``seed`` keys the image's acceptance randomness."""

    needs = "probs"

    def __init__(self, cfg: DecoderConfig, token0: int, forced: torch.Tensor | None, *, window: int, seed: int,
                 q0: torch.Tensor):
        super().__init__(cfg, token0, forced)
        check_window("window", window, cfg.num_tokens)
        self.window = window
        self.gen = torch.Generator().manual_seed(seed)
        self.accepted = 1  # tokens accepted
        if token0 < 0:
            # No finite logit at the prefill: nothing to draft from; the scheduler fails the image.
            self.tokens[:] = -1
            self.accepted = cfg.num_tokens
            return
        # Drafts for tokens accepted .. accepted + len - 1, and the distribution q each was drawn from.
        self._redraft(q0.expand(min(window, cfg.num_tokens - 1), -1))

    @property
    def done(self) -> bool:
        return self.accepted >= self.cfg.num_tokens

    def final(self) -> int:
        return min(self.accepted, self.cfg.num_tokens)

    def _redraft(self, q: torch.Tensor) -> None:
        """New drafts ``[len(q)]`` drawn from ``q [len, V]``, kept tokens in place of their draws."""
        self.q = q
        # A row with no mass (no finite logit there) drafts anything: its p is zero too, which
        # update() finds before the draft could be kept.
        some = torch.where(q.sum(1, keepdim=True) > 0, q, 1.0)  # (len, V)
        self.drafts = (torch.multinomial(some, 1, generator=self.gen)[:, 0] if q.shape[0]
                       else torch.zeros(0, dtype=torch.long))
        for j in range(self.drafts.shape[0]):
            self.drafts[j] = self.kept(self.accepted + j, int(self.drafts[j]))

    def entries(self) -> tuple[list[tuple[int, int]], None]:
        done = self.accepted
        fed = [int(self.tokens[done - 1])] + self.drafts[:len(self.drafts) - 1].tolist()
        return [(max(t, 0), done - 1 + j) for j, t in enumerate(fed)], None

    def update(self, p: torch.Tensor) -> None:
        """The model's distribution ``p [L, V]`` (CPU) of tokens ``accepted .. accepted + L - 1``
        given the drafts before each."""
        n = self.cfg.num_tokens
        length = p.shape[0]
        self.stats.passes += 1
        d, qd = self.drafts, self.q
        u = torch.rand(length, generator=self.gen)
        rows = torch.arange(length)
        start = self.accepted
        ok = u * qd[rows, d] < p[rows, d]  # accept with probability min(1, p / q)
        if self.forced is not None:
            ok |= self.forced[start:start + length] >= 0  # kept tokens are given, never rejected
        take = int(ok.long().cumprod(0).sum())
        self.stats.drafts += length
        self.stats.drafts_accepted += take
        dead = (p.sum(1) <= 0).nonzero()
        if dead.numel() and int(dead[0]) <= min(take, length - 1):
            # No finite guided logit: the image is marked (-1) and stops; the scheduler fails it.
            self.tokens[start + int(dead[0]):] = -1
            self.accepted = n
            return
        self.tokens[start:start + take] = d[:take]
        rest = p[take + 1:]  # (., V) Jacobi: later positions redrawn from this pass's p
        if take < length:
            residual = (p[take] - qd[take]).clamp_min(0)
            residual = residual if residual.sum() > 0 else p[take]
            self.tokens[start + take] = torch.multinomial(residual, 1, generator=self.gen)
            self.accepted = start + take + 1
        else:
            self.accepted = start + length
        window = min(self.window, n - self.accepted)
        more = window - rest.shape[0]
        self._redraft(torch.cat([rest, p[-1].expand(max(more, 0), -1)])[:window])
