"""The model runner: the one owner of the decoder's static rows, its forward passes and sampling
(DESIGN §5).

One :class:`ModelRunner` per engine holds a static :class:`~vqim.engine.models.DecodeState` of
``max_rows`` decoder rows (KV caches, cross-attention K/V of the text padded to ``max_len``)
and, beside it, device tensors per row: the token each row is fed next (``feed``), its position
(``pos``), the tokens drawn so far (``out``, by conditional row) and the tokens image-conditioned
generation keeps (``forced``). Row ``max_rows`` of those per-row tensors is a trash row: writes
for padding slots land there, never in a row in use.

It runs three things, and nothing else in the engine touches the decoder's state:

* :meth:`prefill`: the prefix of newly admitted rows, in a fresh state whose rows are then
  scattered, whole, into the static rows (whatever a row's last occupant left is gone);
* :meth:`raster_step`: one token per row, the decode step over rows ``[0, b)``, then sampling,
  recording and advancing every *slot* (one per raster-decoded image: its conditional and
  unconditional row, seed, step and settings, in static device buffers the scheduler rewrites only
  when an image joins or leaves). Nothing in it syncs with the host or depends on the number of
  images in Python, so on CUDA the whole unit (decode + sampling + record + advance) is captured
  once per bucket of rows in use (powers of two up to ``max_rows``) and replayed: one graph
  replay per step. With ``compile=True`` the decode step inside it is
  ``torch.compile(decode_step, fullgraph=True)``;
* :meth:`multi_step`: several tokens per row (``ARDecoder.forward_tokens``) for the parallel
  decodings, with the raster rows feeding their one token in the same pass (eager: the number of
  tokens per pass changes).

:meth:`sample` is the engine's only call of ``cfg_sample``; :func:`check_tokens` its only
no-finite-logit check (a row with no finite guided logit is marked -1 by the sampler and fed
token 0; the image fails when it is done).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vqim import kernels as K

from .models import ARDecoder
from .state import DecodeState


def check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """An image's tokens ``[n]``, or ``FloatingPointError`` where the sampler marked one -1 (no
    finite guided logit)."""
    if bool((tokens < 0).any()):
        raise FloatingPointError("a decode step produced no finite logit: NaN/inf in the model's output, or a "
                                 "cfg_scale/temperature so extreme that the guided logits overflow float32")
    return tokens


@dataclass
class Slot:
    """One raster-decoded image as :meth:`ModelRunner.set_slots` lays it out."""

    cond: int  # its conditional row
    uncond: int  # its unconditional row (``cond`` when unguided)
    seed: int
    step: int  # the index of the token it draws next
    params: K.SamplingParams
    keeps: bool = False  # some of its tokens are kept (image-conditioned), not drawn


@dataclass
class Entries:
    """One row's entries of a multi-token pass: ``tokens`` at ``positions``; ``known [S]``: the
    cache slots they may see (None: all the mask allows)."""

    row: int
    tokens: list[int]
    positions: list[int]
    known: torch.Tensor | None = None


class ModelRunner:
    """The static rows of one decoder and the passes over them (module docstring)."""

    def __init__(self, decoder: ARDecoder, *, max_rows: int, device: torch.device, text: tuple[int, int] | None,
                 ring: bool = False, compile: bool = False, use_cuda_graph: bool = True):
        self.dec = decoder
        self.device = device
        self.max_rows = max_rows
        self.ring = ring
        cfg = decoder.cfg
        r, n = max_rows, cfg.num_tokens
        memory = mask = None
        if text is not None:
            length, width = text
            memory = torch.zeros(r, length, width, device=device, dtype=decoder.dtype)
            mask = torch.ones(r, length, dtype=torch.bool, device=device)
        self.state = decoder.new_state(r, memory, mask, ring=ring)
        self.n_slots = self.state.k[0].shape[2]
        long = dict(dtype=torch.long, device=device)
        # Per row, plus the trash row r.
        self.feed = torch.zeros(r + 1, **long)  # (R + 1,) token each row is fed next
        # (R + 1,) each row's prefix length (its prompt's, for a prompt in the sequence; else 1)
        self.prefix_len = torch.ones(r + 1, **long)
        self.pos = self.prefix_len.clone()  # (R + 1,) the position the row's next token is fed at
        self.out = torch.zeros(r + 1, n, **long)  # (R + 1, n) tokens drawn, by conditional row
        self.forced = torch.full((r + 1, n), -1, **long)  # (R + 1, n) kept tokens, -1 where drawn
        self.raster_rows = torch.zeros(r, dtype=torch.bool, device=device)  # (R,) rows of raster images
        # Per slot (one raster image each; at most one per row): gather rows for the logits,
        # write rows (the trash row for padding), seed, step, whether live, settings.
        self.slot_cond = torch.zeros(r, **long)
        self.slot_uncond = torch.zeros(r, **long)
        # (2, R): each slot's conditional and unconditional write rows, one index for both.
        self.slot_write = torch.full((2, r), r, **long)
        self.slot_wcond, self.slot_wuncond = self.slot_write[0], self.slot_write[1]
        self.slot_seed = torch.zeros(r, **long)
        self.slot_step = torch.zeros(r, **long)
        self.slot_live = torch.zeros(r, **long)
        self.slot_settings = K.SamplingParams.rows([K.SamplingParams()] * r, device)
        # (2, R): the prefix lengths of slot_write's rows, so that a step's positions need no gather.
        self.slot_base = torch.ones(2, r, **long)
        self.slots = 0  # live slots
        # Host facts of the live slots, set with them: the sampler's plan of their settings, and
        # whether any image keeps tokens (else a step skips the kept-token lookup; a captured
        # graph always does it: captures happen here, before any slot is set).
        self._plan: K.RowsPlan | None = None
        self._keeps = True
        self._views: dict[int, DecodeState] = {}  # b -> view(b)
        self._slot_views: dict[int, tuple] = {}  # m -> the slot buffers' first m entries (views)
        # On a CPU the sampler's counter-based uniforms (~60 us a step in python integers) are
        # drawn once per image: row c holds those of every token of the image whose conditional
        # row is c (drawn for seed _uniform_seed[c]). GPU kernels draw theirs in-kernel.
        self.uniforms = torch.zeros(r + 1, n) if device.type == "cpu" else None  # (R + 1, n)
        self._uniform_seed: list[int | None] = [None] * (r + 1)
        # dynamic=False: one specialized graph per row count, as the CUDA graphs are.
        self.compiled = compile
        self._compiled: Callable | None = (torch.compile(decoder.decode_step, fullgraph=True, dynamic=False)
                                           if compile else None)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_cuda_graph and device.type == "cuda":
            self._capture()

    # ------------------------------------------------------------------ rows

    def view(self, b: int) -> DecodeState:
        """The first ``b`` rows of the state: views, so writes land in the full state (made once
        per ``b``: the state's tensors are only ever written in place)."""
        view = self._views.get(b)
        if view is None:
            s = self.state
            cut = (lambda ts: None if ts is None else [t[:b] for t in ts])
            view = self._views[b] = DecodeState(cut(s.k), cut(s.v), cut(s.cross_k), cut(s.cross_v),
                                                None if s.memory_bias is None else s.memory_bias[:b], ring=s.ring)
        return view

    def buckets(self) -> list[int]:
        """Row counts a step runs over on CUDA with graphs: powers of two up to ``max_rows``."""
        out, b = [], 1
        while True:
            out.append(b)
            if b >= self.max_rows:
                return out
            b = min(2 * b, self.max_rows)

    def width(self, hi: int) -> int:
        """The rows a step over rows ``[0, hi)`` runs: ``hi``, or its graph's bucket."""
        return min(b for b in self._graphs if b >= hi) if self._graphs else hi

    def release(self, rows: list[int]) -> None:
        """Rows no longer in use. A free row below the highest one in use still runs in every
        step (idle, its output unused): parked at the first position, fed token 0, its cache
        writes stay in bounds."""
        idx = torch.tensor(rows, device=self.device)
        self.pos[idx] = self.prefix_len[idx]
        self.feed[idx] = 0

    @torch.no_grad()
    def prefill(self, rows: list[int], prefix: torch.Tensor, memory: torch.Tensor | None,
                memory_mask: torch.Tensor | None, prefix_len: torch.Tensor) -> torch.Tensor:
        """Prefill ``prefix [k, P]`` (``prefix_len [k]`` of each row real; text ``memory
        [k, max_len, W]``) into static rows ``rows``; returns the logits ``[k, V]`` of each row's
        first image token."""
        dec = self.dec
        state = self.state
        fresh = dec.new_state(len(rows), memory, memory_mask, ring=self.ring)
        logits = dec.prefill(fresh, prefix, prefix_len)  # (k, V)
        idx = torch.tensor(rows, device=self.device)  # (k,)
        for dst, src in zip(state.k + state.v, fresh.k + fresh.v):
            # Whole rows: the fresh zeros replace whatever the rows' last occupant left (even the
            # NaN of a failed request), and the prefix slots get this prefill.
            dst[idx] = src
        if state.cross_k is not None:
            for dst, src in zip(state.cross_k + state.cross_v, fresh.cross_k + fresh.cross_v):
                dst[idx] = src
            state.memory_bias[idx] = fresh.memory_bias
        self.prefix_len[idx] = prefix_len
        self.pos[idx] = prefix_len
        return logits

    # ------------------------------------------------------------------ sampling

    def sample(self, cond: torch.Tensor, uncond: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
               settings: dict[str, torch.Tensor], uniforms: torch.Tensor | None = None,
               plan: K.RowsPlan | None = None) -> torch.Tensor:
        """Tokens ``[N]`` of guided logits ``cond``, ``uncond`` ``[N, V]`` (``uncond`` is ``cond``
        itself for an unguided image: ``u + s (c - u)`` is then ``c`` exactly), each entry with its
        own seed, token index and settings (``[N]`` tensors); ``uniforms [N]`` the entries' draws
        where the runner holds them (:attr:`uniforms`), ``plan`` the settings' ``rows_plan``
        where it does. -1 marks no finite logit."""
        return K.cfg_sample_rows(cond, uncond, settings, seed, step, uniforms=uniforms, plan=plan)

    def probs(self, cond: torch.Tensor, uncond: torch.Tensor, settings: dict[str, torch.Tensor]) -> torch.Tensor:
        """What :meth:`sample` draws from, ``[N, V]`` (speculative decoding's acceptance test)."""
        return K.cfg_probs_ref(cond, uncond, **settings)

    def first_tokens(self, logits: torch.Tensor, local: list[tuple[int, int]], slots: list[Slot],
                     forced: list[torch.Tensor | None]) -> torch.Tensor:
        """Token 0 of newly admitted images from their prefill ``logits [k, V]``: image ``i``'s
        conditional and unconditional rows are ``local[i]`` in ``logits`` and ``slots[i]`` in the
        state. Records them (kept tokens in place) and sets each image's kept tokens; returns
        the tokens ``[B]`` as recorded."""
        dev = self.device
        ci = torch.tensor([c for c, _ in local], device=dev)
        ui = torch.tensor([u for _, u in local], device=dev)
        settings = K.SamplingParams.rows([s.params for s in slots], dev)
        seed = torch.tensor([s.seed for s in slots], device=dev)
        tok = self.sample(logits[ci], logits[ui], seed, torch.zeros_like(seed), settings)  # (B,)
        wc = torch.tensor([s.cond for s in slots], device=dev)
        wu = torch.tensor([s.uncond for s in slots], device=dev)
        free = torch.full((self.dec.cfg.num_tokens,), -1, dtype=torch.long)
        self.forced[wc] = torch.stack([free if f is None else f for f in forced]).to(dev)
        write = torch.stack([wc, wu])  # (2, B)
        return self._record(tok, write, torch.zeros_like(wc), self.prefix_len[write])

    def _record(self, tok: torch.Tensor, write: torch.Tensor, step: torch.Tensor, base: torch.Tensor,
                keeps: bool = True) -> torch.Tensor:
        """Token ``step [B]`` of the images whose conditional and unconditional rows are ``write
        [2, B]`` (prefix lengths ``base [2, B]``) is the draw ``tok [B]``, or the kept token where
        image-conditioned generation keeps one (the draw is still made, keyed as raster decoding
        keys it): stored, and fed to both rows at its position next. ``keeps=False``: no image
        keeps tokens (the lookup is skipped)."""
        wc = write[0]
        if keeps:
            keep = self.forced[wc, step]  # (B,)
            tok = torch.where(keep >= 0, keep, tok)
        # index_put_, not item assignment: a step's few dispatches are its cost on a CPU.
        self.out.index_put_((wc, step), tok)
        # A row marked -1 (no finite logit) is fed 0; its -1 stays in `out`. The [B] value is
        # broadcast to both rows of each image.
        self.feed.index_put_((write,), tok.clamp_min(0))  # (2, B)
        self.pos.index_put_((write,), base + step)  # (2, B)
        return tok

    # ------------------------------------------------------------------ slots

    def set_slots(self, slots: list[Slot], raster_rows: list[int]) -> None:
        """The raster images of the next steps (host -> device, once per join or leave):
        padding slots read row 0 and write the trash row."""
        r = self.max_rows
        m = len(slots)
        pad = r - m
        dev = self.device

        def put(dst: torch.Tensor, values: list, fill) -> None:
            dst.copy_(torch.tensor(values + [fill] * pad, dtype=dst.dtype), non_blocking=True)

        put(self.slot_cond, [s.cond for s in slots], 0)
        put(self.slot_uncond, [s.uncond for s in slots], 0)
        put(self.slot_wcond, [s.cond for s in slots], r)
        put(self.slot_wuncond, [s.uncond for s in slots], r)
        put(self.slot_seed, [s.seed for s in slots], 0)
        put(self.slot_step, [s.step for s in slots], 0)
        put(self.slot_live, [1] * m, 0)
        rows = K.SamplingParams.rows([s.params for s in slots] + [K.SamplingParams()] * pad, torch.device("cpu"))
        for name, t in rows.items():
            self.slot_settings[name].copy_(t, non_blocking=True)
        self.slot_base.copy_(self.prefix_len[self.slot_write])
        self._plan = K.rows_plan(rows)
        self._keeps = any(s.keeps for s in slots)
        if self.uniforms is not None:
            fresh = [s for s in slots if self._uniform_seed[s.cond] != s.seed]
            if fresh:
                cond_rows = torch.tensor([s.cond for s in fresh])
                self.uniforms[cond_rows] = K.sampling_uniforms(torch.tensor([s.seed for s in fresh]), self.uniforms.shape[1])
                for s in fresh:
                    self._uniform_seed[s.cond] = s.seed
        held = torch.zeros(r, dtype=torch.bool)
        held[raster_rows] = True
        self.raster_rows.copy_(held.to(dev))
        self.slots = m

    def _sample_record(self, logits: torch.Tensor, m: int) -> None:
        """Sample, record and advance slots ``[0, m)`` from ``logits [b, V]`` (row-indexed)."""
        views = self._slot_views.get(m)
        if views is None:
            # Views of the static buffers, valid for every later step (written in place only).
            s = slice(0, m)
            views = self._slot_views[m] = (self.slot_cond[s], self.slot_uncond[s], self.slot_write[:, s],
                                           self.slot_base[:, s], self.slot_seed[s], self.slot_step[s],
                                           self.slot_live[s], {k: v[s] for k, v in self.slot_settings.items()})
        cond, uncond, write, base, seed, step, live, settings = views
        uniforms = None if self.uniforms is None else self.uniforms[write[0], step]  # (m,)
        tok = self.sample(logits.index_select(0, cond), logits.index_select(0, uncond), seed, step, settings,
                          uniforms=uniforms, plan=self._plan)  # (m,)
        self._record(tok, write, step, base, self._keeps)
        step += live

    def _unit(self, b: int, m: int) -> None:
        """One raster step over rows ``[0, b)`` and slots ``[0, m)``: what a graph captures."""
        logits = self.decode(self.view(b), self.feed[:b], self.pos[:b])  # (b, V)
        self._sample_record(logits, m)

    # ------------------------------------------------------------------ steps

    @property
    def decode(self) -> Callable[[DecodeState, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The one-token decode step: compiled, or the decoder's own (looked up per call)."""
        return self._compiled if self._compiled is not None else self.dec.decode_step

    @torch.no_grad()
    def raster_step(self, hi: int) -> None:
        """One token for every slot, over rows ``[0, hi)``: a graph replay where captured (its
        bucket's padding slots do their work into the trash row), else eager over the live slots."""
        b = self.width(hi)
        graph = self._graphs.get(b)
        if graph is not None:
            graph.replay()
        else:
            self._unit(b, self.slots)

    @torch.no_grad()
    def multi_step(self, hi: int, entries: list[Entries]) -> torch.Tensor:
        """One forward over rows ``[0, hi)`` in which each raster row feeds its one token (and its
        slot is sampled as in :meth:`raster_step`) and each row of ``entries`` its several;
        returns the logits ``[hi, T, V]`` (entry ``j`` of a row at ``[row, j]``)."""
        dev = self.device
        t = max([1] + [len(e.tokens) for e in entries])
        tok = torch.zeros(hi, t, dtype=torch.long, device=dev)
        pos = self.prefix_len[:hi, None].repeat(1, t)  # (hi, T): padding entries at each row's first image slot
        valid = torch.zeros(hi, t, dtype=torch.bool, device=dev)
        tok[:, 0] = self.feed[:hi]
        pos[:, 0] = self.pos[:hi]
        valid[:, 0] = self.raster_rows[:hi]
        known = None
        if entries:
            rows = torch.tensor([e.row for e in entries], device=dev)
            e_tok = torch.zeros(len(entries), t, dtype=torch.long)
            e_pos = pos[rows].cpu()  # (E, T)
            e_valid = torch.zeros(len(entries), t, dtype=torch.bool)
            for i, e in enumerate(entries):
                k = len(e.tokens)
                e_tok[i, :k] = torch.tensor(e.tokens)
                e_pos[i, :k] = torch.tensor(e.positions)
                e_valid[i, :k] = True
            tok[rows], pos[rows], valid[rows] = e_tok.to(dev), e_pos.to(dev), e_valid.to(dev)
            if any(e.known is not None for e in entries):
                known = torch.ones(hi, self.n_slots, dtype=torch.bool, device=dev)
                sel = [i for i, e in enumerate(entries) if e.known is not None]
                known[rows[sel]] = torch.stack([entries[i].known for i in sel]).to(dev)
        logits = self.dec.forward_tokens(self.view(hi), tok, pos, valid, known)  # (hi, T, V)
        if self.slots:
            self._sample_record(logits[:, 0], self.slots)
        return logits

    def tokens(self, row: int) -> torch.Tensor:
        """A copy of the tokens ``[n]`` recorded for the image whose conditional row is ``row`` (a
        host sync: once per finished image); a copy, since the row's next occupant overwrites them."""
        return self.out[row].to("cpu", copy=True)

    # ------------------------------------------------------------------ graphs

    def _capture(self) -> None:
        """Capture the raster step of every bucket, before any row is in use (every slot is
        padding: the warm-up's records land in the trash row; its cache writes are zeroed)."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.no_grad():
            for b in self.buckets():
                with torch.cuda.stream(side):
                    for _ in range(2):  # compiles the Triton kernels and settles allocations
                        self._unit(b, b)
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._unit(b, b)
                self._graphs[b] = graph
            for t in self.state.k + self.state.v:
                t.zero_()
