"""Continuous batching: many callers, one decode loop (DESIGN §5, "Serving").

Requests from any number of threads or asyncio tasks go into one bounded queue as single images;
one loop thread owns a static :class:`~vqim.engine.models.DecodeState` of ``max_rows`` decoder
rows and, at every step boundary, admits waiting images into free rows (prefill of their prefix,
text K/V written into their rows), runs one decode step over the rows in use, samples a token
for every active image, and releases the rows of images that finished, at once, for the next.

Rows of one step sit at different positions: ``decode_step`` takes one position per row, the
conv decode kernel writes and reads each row's own slot, and ``cfg_sample`` takes each image's
own step. An image with ``cfg_scale = 1`` holds one row; a guided one holds a pair (conditional,
and unconditional: the empty prompt, a negative prompt, or the null class), sampled together.
Every random draw is keyed by ``(seed, token index)`` of its image, and every row is computed
from its own inputs only, so an image's tokens do not depend on what else shares the step or
when it joined. The one caveat is floating point: a CPU BLAS may pick another matmul kernel for
another number of rows, which can change a logit in its last bits; a token changes only if its
random draw lands within that distance of a boundary of the sampling distribution (the tests
check token identity across batch compositions).

Failures stay with their request: a row with no finite logit fails its image's request with
``FloatingPointError`` once the image is done (the loop never waits on the device mid-image);
cancellation (:meth:`RequestHandle.cancel`, or the caller's asyncio task being cancelled) and a
per-request ``timeout`` end a request at the next step boundary; an exception inside a step fails
the requests that were in it, the state is cleared, and the loop goes on. A full queue refuses a
submission at once with :class:`QueueFullError`.

On CUDA with graphs on, the step is captured once per bucket of rows in use (powers of two up to
``max_rows``) when the loop starts, before any request holds a row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vqim import kernels as K

from .generate import CapturedStep, Generator, condition
from .models import DecodeState, VQIMModel
from .text import TextTokenizer


class QueueFullError(RuntimeError):
    """The engine's request queue is full: retry later (HTTP 429)."""


class RequestCancelled(concurrent.futures.CancelledError):
    """The request was cancelled before it finished."""


class RequestHandle:
    """A submitted request of one or more images: a future of its codes ``[n, grid_h, grid_w]``.

    ``result(timeout)`` waits for it; ``await handle`` does the same in asyncio; ``cancel()``
    ends it at the next step boundary; ``progress`` is ``(tokens sampled, tokens in all)``.
    """

    def __init__(self, num_images: int, num_tokens: int, grid: tuple[int, int]):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.num_images = num_images
        self.grid = grid
        self.codes = torch.full((num_images, num_tokens), -1, dtype=torch.long)  # (n, h * w), filled as images end
        self._tokens = 0
        self._total = num_images * num_tokens
        self._images: list[ImageRequest] = []  # set by the engine when it submits them
        self._finished = 0
        self.cancelled = False

    @property
    def progress(self) -> tuple[int, int]:
        return self._tokens, self._total

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        """Ask the loop to end this request; False if it already finished."""
        if self.future.done():
            return False
        self.cancelled = True
        return True

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self.future.result(timeout)

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self) -> torch.Tensor:
        try:
            return await asyncio.wrap_future(self.future)
        except asyncio.CancelledError:
            # The awaiting task was cancelled (e.g. its HTTP client went away): so is the request.
            self.cancel()
            raise


@dataclass(eq=False)  # compared by identity: two images may hold equal fields
class ImageRequest:
    """One image to draw: its condition, its unconditional branch (``None``: unguided), its settings."""

    handle: RequestHandle
    index: int  # image index within the request
    cond: object  # a tokenize() row or a class id
    uncond: object | None
    params: K.SamplingParams
    seed: int
    deadline: float | None = None
    on_step: Callable[[], None] | None = None
    # on_partial(image index, tokens so far [k], grid rows done), every partial_every grid rows.
    on_partial: Callable[[int, torch.Tensor, int], None] | None = None
    partial_every: int = 0
    # Image-conditioned generation: tokens ``[n]`` taken as given where >= 0 (kept), drawn where -1.
    forced: torch.Tensor | None = None
    rows: list[int] = field(default_factory=list)  # decoder rows held: [cond] or [cond, uncond]
    step: int = 0  # tokens sampled so far


class Scheduler:
    """The decode loop of one engine: a queue, a thread, ``max_rows`` decoder rows."""

    def __init__(self, model: VQIMModel, tokenizer: TextTokenizer | None, generator: Generator, device: torch.device,
                 *, max_rows: int, max_queue: int, use_cuda_graph: bool, oom_message: str = "out of memory"):
        self.model, self.tokenizer, self.generator, self.device = model, tokenizer, generator, device
        self.dec = model.decoder
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.oom_message = oom_message
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self._waiting: deque[ImageRequest] = deque()
        self._active: list[ImageRequest] = []
        self._free = list(range(max_rows))
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._graphs: dict[int, CapturedStep] = {}
        self._dirty = False  # the active set changed since the device tensors were built

    # ------------------------------------------------------------------ callers' side

    def submit(self, images: list[ImageRequest]) -> None:
        """Queue ``images`` (one request's), or raise :class:`QueueFullError` at once."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine's decode loop is closed")
            if len(self._waiting) + len(images) > self.max_queue:
                raise QueueFullError(f"the request queue is full ({len(self._waiting)} images waiting, max_queue="
                                     f"{self.max_queue}); retry later")
            need = max(len(self._rows_of(i)) for i in images)
            if need > self.max_rows:
                raise ValueError(f"an image needs {need} decoder rows but the engine has {self.max_rows}")
            self._waiting.extend(images)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vqim-decode-loop", daemon=True)
                self._thread.start()
            self._cv.notify()

    def close(self) -> None:
        """Stop the loop (after the current step); requests still queued or running are cancelled."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @staticmethod
    def _rows_of(img: ImageRequest) -> list:
        return [img.cond] if img.uncond is None else [img.cond, img.uncond]

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            self._setup()
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self._active:
                        self._cv.wait()
                    if self._closed:
                        break
                    admitted = self._take_admissible()
                try:
                    self._drop_ended()
                    if admitted:
                        self._admit(admitted)
                    if self._active:
                        self._step()
                except Exception as e:  # noqa: BLE001 (the loop survives; the step's requests get the error)
                    self._fail_active(e)
            for img in list(self._waiting) + self._active:
                self._fail(img, RequestCancelled("the engine's decode loop was closed"))

    def _setup(self) -> None:
        """The static state (every row zeroed, text K/V buffers at ``max_len``) and, on CUDA, the
        step of every row bucket captured before any row is in use."""
        dec, r = self.dec, self.max_rows
        dev = self.device
        text = self.model.cfg.text
        memory = mask = None
        if text is not None:
            memory = torch.zeros(r, text.max_len, text.width, device=dev, dtype=dec.tok_embed.weight.dtype)
            mask = torch.ones(r, text.max_len, dtype=torch.bool, device=dev)
        self.state = dec.new_state(r, memory, mask, ring=self.generator.ring_cache)
        self.feed = torch.zeros(r, dtype=torch.long, device=dev)  # (R,) token each row is fed next
        self.pos = torch.full((r,), dec.cfg.prefix, dtype=torch.long, device=dev)  # (R,) its position
        self.out = torch.zeros(r, dec.cfg.num_tokens, dtype=torch.long, device=dev)  # (R, n) tokens by cond row
        self.forced = torch.full((r, dec.cfg.num_tokens), -1, dtype=torch.long, device=dev)  # (R, n) kept tokens
        if self.use_cuda_graph:
            b = 1
            while True:
                self._graphs[b] = CapturedStep(dec, _rows(self.state, b), self.generator.step)
                if b >= r:
                    break
                b = min(2 * b, r)
            for t in self.state.k + self.state.v:
                t.zero_()  # the captures' warm-up writes

    def _take_admissible(self) -> list[ImageRequest]:
        """Waiting images, first come first served, while their rows fit (under the lock)."""
        taken = []
        while self._waiting:
            img = self._waiting[0]
            if img.handle.done() or img.handle.cancelled or _expired(img):
                self._waiting.popleft()
                taken.append(img)  # ended while queued: _drop_ended settles it
                continue
            n = len(self._rows_of(img))
            if n > len(self._free):
                break
            self._waiting.popleft()
            self._free.sort()
            img.rows, self._free = self._free[:n], self._free[n:]
            taken.append(img)
        return taken

    def _drop_ended(self) -> None:
        """Requests cancelled or past their deadline leave at this step boundary."""
        for img in list(self._active):
            if img.handle.done():
                self._release(img)
            elif img.handle.cancelled:
                self._fail(img, RequestCancelled("the request was cancelled"))
            elif _expired(img):
                self._fail(img, TimeoutError("the request did not finish within its timeout"))

    def _admit(self, images: list[ImageRequest]) -> None:
        """Prefill the new images' rows and sample their first tokens."""
        live = []
        for img in images:
            if not img.rows:  # ended while queued
                if img.handle.cancelled:
                    self._fail(img, RequestCancelled("the request was cancelled"))
                elif _expired(img):
                    self._fail(img, TimeoutError("the request did not finish within its timeout"))
                continue
            live.append(img)
        if not live:
            return
        try:
            self._prefill(live)
        except Exception as e:  # noqa: BLE001 (the new requests fail; those already running go on)
            for img in live:
                self._fail(img, e)

    def _prefill(self, live: list[ImageRequest]) -> None:
        """Prefill ``live``'s rows, sample their first tokens, make them active."""
        dec, state = self.dec, self.state
        conds = [c for img in live for c in self._rows_of(img)]
        rows = torch.tensor([r for img in live for r in img.rows], device=self.device)  # (n,)
        text = self.model.cfg.text
        pad = text.max_len if text is not None else None
        prefix, memory, mask = condition(self.model, self.tokenizer, conds, guided=False, pad_to=pad)
        fresh = dec.new_state(len(conds), memory, mask, ring=self.generator.ring_cache)
        logits = dec.prefill(fresh, prefix)  # (n, V)
        for dst, src in zip(state.k + state.v, fresh.k + fresh.v):
            # Whole rows: the fresh zeros replace whatever the rows' last occupant left (even the
            # NaN of a failed request), and the prefix slots get this prefill.
            dst[rows] = src
        if state.cross_k is not None:
            for dst, src in zip(state.cross_k + state.cross_v, fresh.cross_k + fresh.cross_v):
                dst[rows] = src
            state.memory_bias[rows] = fresh.memory_bias
        self.pos[rows] = dec.cfg.prefix
        # The first token, from the prefill logits (row k of ``logits`` is ``rows[k]``).
        local = {r: k for k, r in enumerate(int(r) for r in rows)}
        cond_i = torch.tensor([local[img.rows[0]] for img in live], device=self.device)  # (b,)
        uncond_i = torch.tensor([local[img.rows[-1]] for img in live], device=self.device)
        settings, seed = self._draws(live)
        tok = K.cfg_sample(logits[cond_i], logits[uncond_i], seed=seed, step=0, validate=False, **settings)  # (b,)
        cond = torch.tensor([img.rows[0] for img in live], device=self.device)
        uncond = torch.tensor([img.rows[-1] for img in live], device=self.device)
        free = torch.full((dec.cfg.num_tokens,), -1, dtype=torch.long)
        self.forced[cond] = torch.stack([free if img.forced is None else img.forced for img in live]).to(self.device)
        self._record(tok, cond, uncond, torch.zeros_like(cond))
        self._active += live
        self._dirty = True
        self._advance(live)

    def _rebuild(self) -> None:
        """Device tensors of the active set: rows, per-image settings, seeds, steps."""
        act = self._active
        dev = self.device
        self.cond_rows = torch.tensor([i.rows[0] for i in act], device=dev)  # (B,)
        self.uncond_rows = torch.tensor([i.rows[-1] for i in act], device=dev)  # (B,) = cond for unguided
        self.settings, self.seeds = self._draws(act)
        self.steps = torch.tensor([i.step for i in act], device=dev)  # (B,) index of the token fed next
        held = [r for i in act for r in i.rows]
        self.held = torch.tensor(held, device=dev)
        self.hi = max(held) + 1 if held else 0
        self._dirty = False

    def _draws(self, images: list[ImageRequest]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each image's sampling settings (``[B]`` tensors by name) and seed ``[B]``."""
        settings = K.SamplingParams.rows([i.params for i in images], self.device)
        return settings, torch.tensor([i.seed for i in images], device=self.device)

    def _record(self, tok: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, index: torch.Tensor) -> None:
        """Token ``index [B]`` of the images whose rows are ``cond``/``uncond`` ``[B]`` is the draw
        ``tok [B]``, or the kept token where image-conditioned generation keeps one (the draw is
        still made, keyed as raster decoding keys it): stored, and fed to both rows next."""
        keep = self.forced[cond, index]  # (B,)
        tok = torch.where(keep >= 0, keep, tok)
        self.out[cond, index] = tok
        fed = tok.clamp_min(0)  # a row marked -1 (no finite logit) is fed 0; its -1 stays in ``out``
        self.feed[cond] = fed
        self.feed[uncond] = fed

    def _step(self) -> None:
        if self._dirty:
            self._rebuild()
        b = self.hi
        if self.use_cuda_graph:
            b = min(k for k in self._graphs if k >= b)
            logits = self._graphs[b](self.feed[:b], self.pos[:b])  # (b, V)
        else:
            logits = self.generator.step(_rows(self.state, b), self.feed[:b], self.pos[:b])  # (b, V)
        tok = K.cfg_sample(logits[self.cond_rows], logits[self.uncond_rows], seed=self.seeds, step=self.steps,
                           validate=False, **self.settings)  # (B,)
        self._record(tok, self.cond_rows, self.uncond_rows, self.steps)
        self.pos.index_add_(0, self.held, torch.ones_like(self.held))
        self.steps += 1
        self._advance(list(self._active))

    def _advance(self, images: list[ImageRequest]) -> None:
        """Host bookkeeping after each of ``images`` got one more token; then the active set's
        device tensors are rebuilt if it changed (here or by the caller)."""
        n = self.dec.cfg.num_tokens
        gw = self.dec.cfg.grid_w
        finished = []
        for img in images:
            if not img.rows:  # its request failed earlier in this pass
                continue
            img.step += 1
            img.handle._tokens += 1
            try:
                if img.on_step is not None:
                    img.on_step()
                if img.on_partial is not None and img.partial_every and img.step < n \
                        and img.step % (img.partial_every * gw) == 0:
                    img.on_partial(img.index, self.out[img.rows[0], :img.step].cpu(), img.step // gw)
            except Exception as e:  # noqa: BLE001 (a caller's callback failed: its request ends, no other)
                self._fail(img, e)
                continue
            if img.step == n:
                finished.append(img)
        for img in finished:
            if img.rows:
                self._finish(img)
        if self._dirty:
            self._rebuild()

    def _finish(self, img: ImageRequest) -> None:
        tokens = self.out[img.rows[0]].cpu()  # (n,): the image's one host sync
        if bool((tokens < 0).any()):
            self._fail(img, FloatingPointError(
                "a decode step produced no finite logit: NaN/inf in the model's output, or a cfg_scale/temperature "
                "so extreme that the guided logits overflow float32"))
            return
        h = img.handle
        h.codes[img.index] = tokens
        h._finished += 1
        self._release(img)
        if not h.future.done() and h._finished == h.num_images:
            g = h.grid
            h.future.set_result(h.codes.view(h.num_images, g[0], g[1]))

    def _release(self, img: ImageRequest) -> None:
        if img in self._active:
            self._active.remove(img)
            self._dirty = True
        if img.rows:
            # A free row below the highest one in use still runs in every step (idle, its output
            # unused): parked at the first position, its cache writes stay in bounds.
            self.pos[torch.tensor(img.rows, device=self.device)] = self.dec.cfg.prefix
        with self._cv:
            self._free += img.rows
        img.rows = []

    def _fail(self, img: ImageRequest, error: BaseException) -> None:
        """End ``img``'s whole request with ``error``; its other images leave too."""
        h = img.handle
        if not h.future.done():
            h.future.set_exception(error)
        for other in h._images:
            if other.rows:
                self._release(other)

    def _fail_active(self, error: Exception) -> None:
        if isinstance(error, torch.OutOfMemoryError):
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            wrapped = torch.OutOfMemoryError(self.oom_message)
            wrapped.__cause__ = error
            error = wrapped
        for img in list(self._active):
            self._fail(img, error)


def _rows(state: DecodeState, b: int) -> DecodeState:
    """The first ``b`` rows of ``state``: views, so writes land in the full state."""
    cut = (lambda ts: None if ts is None else [t[:b] for t in ts])
    return DecodeState(cut(state.k), cut(state.v), cut(state.cross_k), cut(state.cross_v),
                       None if state.memory_bias is None else state.memory_bias[:b], ring=state.ring)


def _expired(img: ImageRequest) -> bool:
    return img.deadline is not None and time.monotonic() > img.deadline
