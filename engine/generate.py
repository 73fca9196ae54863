"""The decode loop: static KV cache, cross-attention K/V once per prompt, CFG as one batch.

With guidance the decoder runs ``2B`` rows, conditional rows ``[0, B)`` and unconditional rows
``[B, 2B)`` (empty prompt / null class), as :func:`condition` lays them out;
``vqim.kernels.cfg_sample`` combines each pair and draws one token per request, and the same
token is fed to both rows of the pair. Nothing in the loop reads a value back to the host:
positions live in a device tensor, sampling runs with ``validate=False`` and a row with no
finite logit (token ``-1``, fed back as token 0 so the embedding never sees it) is checked once
at the end.

On CUDA the decode step (embedding, all blocks, head) is captured once per batch shape into a
CUDA graph and replayed; the graph owns a static :class:`DecodeState` whose cross-attention
buffers are refilled per request (text padded to ``max_len`` so one graph serves any prompt).
That path needs a GPU and is not exercised by the CPU test suite. With ``compile=True`` the step
is ``torch.compile``'d first (the compiled step is what the graph captures on CUDA; on CPU it
runs as Inductor's C++).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vqim import kernels as K

from .models import ARDecoder, DecodeState, VQIMModel, memory_bias
from .text import TextTokenizer


@dataclass
class Sampling:
    """Per-request sampling as ``[B]`` device tensors (one row per image): every
    :class:`~vqim.kernels.SamplingParams` setting by name (``SamplingParams.rows``), and the seeds."""

    settings: dict[str, torch.Tensor]
    seed: torch.Tensor


class Rows(NamedTuple):
    """A batch's decoder rows, from :func:`condition`: what :meth:`Generator.run` takes."""

    prefix: torch.Tensor  # (R, 1) class id or BOS / null class
    memory: torch.Tensor | None  # (R, L, W) text encoder output; None without a text encoder
    memory_mask: torch.Tensor | None  # (R, L) bool, True on real text tokens


def tokenize(tokenizer: TextTokenizer, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each prompt's ids ``[max_len]`` and mask ``[max_len]`` on the CPU, for :func:`condition`.

    Tokenizing once, when a request arrives, checks it (and warns of a truncation once) before
    any decode work; padding to ``max_len`` lets any prompts share a batch later.
    """
    ids, mask = tokenizer.batch(list(prompts), torch.device("cpu"), pad_to=tokenizer.max_len)  # (N, max_len)
    return list(zip(ids, mask))


@torch.no_grad()
def condition(model: VQIMModel, tokenizer: TextTokenizer | None, requests: Sequence, *, guided: bool,
              pad_to: int | None = None, uncond: Sequence | None = None) -> Rows:
    """The decoder rows of ``B = len(requests)`` images, one condition each, on the model's device.

    A request is a class id (``ARDecoder.null_prefix`` for none) for a model without text, or a
    prompt for a text model: a string or its :func:`tokenize` row. With ``guided`` the rows are
    ``R = 2B``, conditional ``[0, B)`` then unconditional ``[B, 2B)``: ``uncond``'s conditions
    (one per request: a negative prompt), by default the null class or the empty prompt
    ``[EOS]``; else ``R = B``. Text is padded to ``pad_to`` (at most ``max_len``: the engine pads
    to ``max_len`` on CUDA, so one captured graph serves any prompt), by default to the longest
    row, as a batch of these prompts alone would be.
    """
    dec = model.decoder
    dev = dec.tok_embed.weight.device
    b = len(requests)
    if uncond is None:
        uncond = [dec.null_prefix if model.text is None else ""] * b
    every = list(requests) + (list(uncond) if guided else [])
    if model.text is None:
        return Rows(torch.tensor(every, dtype=torch.long, device=dev)[:, None], None, None)  # (R, 1)
    rows = [tokenize(tokenizer, [r])[0] if isinstance(r, str) else r for r in every]
    mask = torch.stack([m for _, m in rows])  # (R, max_len)
    length = pad_to or int(mask.sum(1).max())
    ids, mask = torch.stack([i for i, _ in rows])[:, :length].to(dev), mask[:, :length].to(dev)  # (R, L)
    prefix = torch.full((len(rows), 1), dec.null_prefix, dtype=torch.long, device=dev)
    return Rows(prefix, model.text(ids, mask), mask)  # memory (R, L, W)


class CapturedStep:
    """``ARDecoder.decode_step`` (or ``step``, its compiled form) of one static
    :class:`DecodeState`, captured in a CUDA graph.

    Call it as ``step(token [R], pos [R] or [1]) -> logits [R, V]``: the arguments are copied into the
    graph's input buffers and the graph is replayed, so the returned logits are the same tensor
    every call (overwritten by the next). ``state`` is the graph's KV cache: prefill it, or refill
    its cross-attention buffers, in place. CUDA only.
    """

    def __init__(self, decoder: ARDecoder, state: DecodeState, step: Callable | None = None):
        step = step or decoder.decode_step
        rows = state.batch
        dev = state.k[0].device
        self.state = state
        self.token = torch.zeros(rows, dtype=torch.long, device=dev)
        # Capture at the first image position: warm-up writes land in a slot that step 1
        # overwrites before any query can read it.
        self.pos = torch.full((rows,), decoder.cfg.prefix, dtype=torch.long, device=dev)  # one per row
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the Triton kernels and settles allocations
                step(state, self.token, self.pos)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(state, self.token, self.pos)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


class Generator:
    """Runs the decode loop of one decoder; caches CUDA graphs by (rows, text length).

    ``use_cuda_graph`` is read at each :meth:`run`: on CUDA the loop replays the step from
    :meth:`capture`, elsewhere (or when off) it calls the step directly. ``compile=True`` makes
    the step ``torch.compile(decode_step, fullgraph=True)`` (Inductor: Triton on CUDA, where the
    compiled step is then captured in the graph; C++ on CPU), compiled at its first call per
    batch shape.
    """

    def __init__(self, decoder: ARDecoder, *, use_cuda_graph: bool = True, max_graphs: int = 4,
                 ring_cache: bool = False, compile: bool = False):
        self.decoder = decoder
        self.ring_cache = ring_cache
        self.use_cuda_graph = use_cuda_graph
        self.max_graphs = max_graphs
        self.compiled = compile
        # dynamic=False: one specialized graph per batch shape, as the CUDA graphs are.
        self._compiled_step = torch.compile(decoder.decode_step, fullgraph=True, dynamic=False) if compile else None
        self._graphs: dict[tuple[int, int], CapturedStep] = {}

    @property
    def step(self) -> Callable[[DecodeState, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The decode step the loop runs: compiled, or the decoder's own (looked up per call)."""
        return self._compiled_step if self._compiled_step is not None else self.decoder.decode_step

    @torch.no_grad()
    def capture(self, rows: int, memory: torch.Tensor | None, memory_mask: torch.Tensor | None) -> CapturedStep:
        """The decode step for ``rows`` decoder rows over ``memory [rows, L, W]`` (masked by
        ``memory_mask [rows, L]``; ``None`` for a model without text), captured in a CUDA graph.

        The graph is what :meth:`run` replays; it is cached per ``(rows, L)`` (at most
        ``max_graphs``, the oldest dropped first), and a cached one gets ``memory``'s
        cross-attention K/V copied into its state. Its KV cache is shared with every later run of
        the same shape, so a caller holding the step must not interleave it with :meth:`run`.
        """
        length = 0 if memory is None else memory.shape[1]
        key = (rows, length)
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= self.max_graphs:
                # Each graph pins a whole KV cache: drop the oldest shape.
                self._graphs.pop(next(iter(self._graphs)))
                torch.cuda.empty_cache()
            g = CapturedStep(self.decoder, self.decoder.new_state(rows, memory, memory_mask, ring=self.ring_cache),
                             self.step)
            self._graphs[key] = g
        elif memory is not None:
            ks, vs = self.decoder.cross_kv(memory)
            for dst, src in zip(g.state.cross_k + g.state.cross_v, ks + vs):
                dst.copy_(src)
            g.state.memory_bias.copy_(memory_bias(memory_mask, g.state.memory_bias.dtype))
        return g

    @torch.no_grad()
    def run(self, prefix_ids: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None,
            sampling: Sampling, *, guided: bool, on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Sample ``[B, n]`` image tokens.

        ``prefix_ids [R, 1]``, ``memory [R, L, W]``, ``memory_mask [R, L]`` (the :class:`Rows`
        of :func:`condition`) hold ``R = 2B`` rows (conditional then unconditional) when
        ``guided``, else ``R = B``.
        """
        dec = self.decoder
        cfg = dec.cfg
        rows = prefix_ids.shape[0]
        b = rows // 2 if guided else rows
        dev = prefix_ids.device
        graph = None
        if self.use_cuda_graph and dev.type == "cuda":
            graph = self.capture(rows, memory, memory_mask)
            state = graph.state
        else:
            state = dec.new_state(rows, memory, memory_mask, ring=self.ring_cache)
        step = self.step

        def sample(logits: torch.Tensor, step: int) -> torch.Tensor:
            cond, uncond = (logits[:b], logits[b:]) if guided else (logits, None)
            return K.cfg_sample(cond, uncond, seed=sampling.seed, step=step, validate=False,
                                **sampling.settings)  # (B,)

        out = torch.empty(b, cfg.num_tokens, dtype=torch.long, device=dev)
        tok = sample(dec.prefill(state, prefix_ids), 0)
        out[:, 0] = tok
        pos = torch.full((rows,), cfg.prefix, dtype=torch.long, device=dev)  # (R,) one position per row
        if on_step is not None:
            on_step()
        for i in range(1, cfg.num_tokens):
            # A row marked -1 (no finite logit) must not index the embedding (IndexError on
            # CPU, a device-side assert on CUDA): it is fed token 0 and keeps its -1 in ``out``,
            # so check_tokens still raises after the loop.
            fed = tok.clamp_min(0)  # (B,)
            feed = torch.cat([fed, fed]) if guided else fed  # (R,)
            logits = graph(feed, pos) if graph is not None else step(state, feed, pos)
            tok = sample(logits, i)
            out[:, i] = tok
            pos += 1
            if on_step is not None:
                on_step()
        return out


def check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The one host sync of a generation, after the loop: ``cfg_sample`` marks a row whose
    guided logits had no finite entry with token -1 instead of syncing every step."""
    if bool((tokens < 0).any()):
        raise FloatingPointError("a decode step produced no finite logit: NaN/inf in the model's output, or a "
                                 "cfg_scale/temperature so extreme that the guided logits overflow float32")
    return tokens
