"""The one decode loop: continuous batching of every decode policy, tensor parallel included
(DESIGN §5, "Serving").

Requests from any number of threads or asyncio tasks go into one bounded queue as single images
(:class:`~vqim.engine.requests.ImageSpec`); one loop thread owns the engine's
:class:`~vqim.engine.runner.ModelRunner` and repeats, at every step boundary:

1. **plan**: requests that ended (cancelled, past their deadline, a callback that raised) leave;
   waiting images are admitted first come first served while their rows fit;
2. **exchange** (tensor parallel only): rank 0 owns the queue and sends the plan to every rank,
   which then runs the same loop in lock-step;
3. **admit**: the new images' conditions become rows (:func:`~vqim.engine.requests.condition`),
   the runner prefills them and draws their first tokens;
4. **step**: one forward over the rows in use. Each image has a decode policy: *raster* (one
   token per row per step: the runner's captured unit samples, records and advances every raster
   image on the device, with no Python per image), or *wavefront* / *SJD*
   (:mod:`vqim.engine.parallel`: several tokens per row per step). When no image of a parallel
   policy is in the step it is :meth:`ModelRunner.raster_step`, else one
   :meth:`ModelRunner.multi_step` in which the raster rows feed their one token beside them;
5. **events**: images that finished (the step of each raster image's last token is known when
   it joins, so finishing is a heap lookup, not a scan) are checked for a finite result and
   released, and partial images are handed to their callbacks.

Rows of one step sit at different positions, and every random draw is keyed by ``(seed, token
index)`` of its image, so an image's tokens do not depend on what else shares the step or when
it joined (the floating-point caveat of docs/design.md §5 aside). A guided image holds a pair of
rows (conditional, unconditional), an unguided one a single row.

Failures stay with their request: no finite logit fails its image's request with
``FloatingPointError`` when the image is done; cancellation, a ``timeout`` and a callback that
raises end a request at the next step boundary; an exception inside a step fails the requests
in it and the loop goes on. A full queue refuses a non-blocking submission at once
(:class:`QueueFullError`); a blocking one waits outside the queue and enters it as it drains.

Under tensor parallelism (``control``), rank 0 (the leader) plans; the other ranks (followers)
take its plan each iteration (:class:`~vqim.engine.tp.Control`), so admissions, ends and stops
happen on every rank at the same step. What every rank computes alike (finishing, no finite
logit, the parallel policies' choices, which see the same all-gathered logits) needs no message.
A follower's caller (the same call made on every rank, as ``torchrun ... vqim generate`` does)
gets rank 0's outcome of the call with the same index (:meth:`Scheduler.mirror`).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import heapq
import itertools
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from vqim import kernels as K

from .parallel import DecodeStats, ParallelDecode, SpeculativeJacobi, Wavefront
from .requests import ImageSpec, Request, Rows
from .runner import Entries, ModelRunner, Slot, check_tokens

# How long an idle leader waits before it tells the followers it is alive (their collective
# would otherwise time out while no request comes).
HEARTBEAT_S = 5.0
# Finished requests a follower keeps for a caller that has not asked for them yet.
MAX_MIRRORS = 1024


class QueueFullError(RuntimeError):
    """The engine's request queue is full: retry later (HTTP 429)."""


class RequestCancelled(concurrent.futures.CancelledError):
    """The request was cancelled before it finished."""


class RequestHandle:
    """A submitted request of one or more images: a future of its codes ``[n, grid_h, grid_w]``.

    ``result(timeout)`` waits for it; ``await handle`` does the same in asyncio; ``cancel()``
    ends it at the next step boundary; ``progress`` is ``(tokens drawn, tokens in all)``;
    ``stats`` sums the :class:`~vqim.engine.parallel.DecodeStats` of its finished images;
    ``started`` and ``finished`` are the ``time.monotonic()`` of its first image's admission and of
    its end (None until then).
    """

    def __init__(self, scheduler: Scheduler | None, request_id: int, num_images: int, num_tokens: int,
                 grid: tuple[int, int]):
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.request_id = request_id
        self.num_images = num_images
        self.num_tokens = num_tokens
        self.grid = grid
        self.stats = DecodeStats()
        self.cancelled = False
        self.started: float | None = None
        self.finished: float | None = None
        self._sched = scheduler
        self._codes: dict[int, torch.Tensor] = {}  # image index -> (n,), as images finish
        self._running: set[ImageRequest] = set()
        self._lock = threading.Lock()
        self.future.add_done_callback(self._on_done)

    @property
    def progress(self) -> tuple[int, int]:
        with self._lock:
            running = sum(img.tokens_done() for img in self._running)
            return len(self._codes) * self.num_tokens + running, self.num_images * self.num_tokens

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        """Ask the loop to end this request; False if it already ended."""
        if self.finished is not None or self.cancelled:
            return False
        self.cancelled = True
        if self._sched is not None:
            self._sched.end(self.request_id, RequestCancelled("the request was cancelled"))
        return True

    def _on_done(self, future: concurrent.futures.Future) -> None:
        # The future cancelled from outside (asyncio.wrap_future cancels it with its awaiting
        # task): the loop must hear of it, or the request's images would run on.
        if future.cancelled():
            self.cancel()

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

    def _fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.finished = time.monotonic()
            self.future.set_exception(error)

    def _finished(self, img: ImageRequest, tokens: torch.Tensor, stats: DecodeStats) -> None:
        with self._lock:
            self._running.discard(img)
            self._codes[img.spec.index] = tokens
            self.stats.add(stats)
            whole = len(self._codes) == self.num_images
        if whole and not self.future.done():
            self.finished = time.monotonic()
            codes = torch.stack([self._codes[k] for k in range(self.num_images)])  # (n, h * w)
            self.future.set_result(codes.view(self.num_images, *self.grid))


@dataclass(eq=False)  # compared by identity: two images may hold equal fields
class ImageRequest:
    """One image in the loop: its spec, its request, its rows and how far it is."""

    handle: RequestHandle
    spec: ImageSpec
    # on_partial(image index, tokens so far [k], grid rows done), every partial_every grid rows.
    on_partial: Callable[[int, torch.Tensor, int], None] | None = None
    partial_every: int = 0
    rows: list[int] = field(default_factory=list)  # decoder rows held: [cond] or [cond, uncond]
    # The loop's step count when its prefill drew its first token (raster: it has 1 + steps
    # since tokens); None before: it may hold rows, and count in its request's progress, first.
    t0: int | None = None
    policy: ParallelDecode | None = None  # None: raster
    prefix: list[int] = field(default_factory=list)  # each of its rows' prefix length
    clock: Callable[[], int] | None = None  # the loop's step count
    partials: int = 0  # partial images handed out

    @property
    def request_id(self) -> int:
        return self.handle.request_id

    def tokens_done(self) -> int:
        if not self.rows or self.t0 is None:
            return 0
        if self.policy is not None:
            return self.policy.final()
        return min(1 + self.clock() - self.t0, self.handle.num_tokens)


@dataclass
class Plan:
    """What one iteration does on every rank: requests that end, images admitted (with their
    rows), call indices rank 0 refused (tensor parallel: the followers' callers raise too)."""

    stop: bool = False
    ends: list[tuple[int, BaseException]] = field(default_factory=list)
    admit: list[ImageRequest] = field(default_factory=list)
    refused: list[tuple[int, BaseException]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.stop or bool(self.ends or self.admit or self.refused)


@dataclass
class LoopStats:
    """What the loop measured: steps run and their wall time, the most images in one step."""

    steps: int = 0
    step_seconds: float = 0.0
    widest: int = 0
    # (images in the step, seconds of the whole iteration: plan, exchange, admissions, step,
    # events), the most recent ones.
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every decode loop before the interpreter tears down: a loop thread still inside
    torch at finalization aborts the process ("terminate called without an active exception")."""
    for sched in list(_LIVE):
        sched.close()


class Scheduler:
    """The decode loop of one engine (module docstring)."""

    def __init__(self, runner: Callable[[], ModelRunner], condition: Callable[[list], Rows], *, num_tokens: int,
                 grid: tuple[int, int], max_rows: int, max_queue: int, oom_message: str = "out of memory",
                 backend: str | None = None, control=None):
        self._make_runner = runner
        self._condition = condition
        self.num_tokens = num_tokens
        self.grid = grid
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.oom_message = oom_message
        self.backend = backend
        self.control = control
        self.leader = control is None or control.rank == 0
        self.stats = LoopStats()
        self.runner: ModelRunner | None = None
        self._waiting: deque[ImageRequest] = deque()
        self._backlog: deque[tuple[RequestHandle, Iterator[ImageSpec], dict]] = deque()
        self._active: dict[ImageRequest, None] = {}  # insertion-ordered set
        # Requests still running (queued or not): their images in the loop, and their handles.
        self._by_request: dict[int, list[ImageRequest]] = {}
        self._handles: dict[int, RequestHandle] = {}
        self._free = list(range(max_rows))
        self._ends: list[tuple[int, BaseException]] = []
        self._refused: list[tuple[int, BaseException]] = []
        self._deadlines: list[tuple[float, int]] = []
        self._events: list[tuple[int, int, ImageRequest]] = []  # (step, seq, image): a raster image's next event
        self._seq = itertools.count()
        self._t = 0  # steps run
        self._dirty = False  # raster images changed since the runner's slots were set
        self._hi = 0
        self._parallel: list[ImageRequest] = []
        self._mirrors: dict[int, RequestHandle] = {}  # followers: call index -> handle
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        _LIVE.add(self)
        if control is not None:
            self._start()  # followers follow from the start; the leader heartbeats to them

    # ------------------------------------------------------------------ callers' side

    def submit(self, request: Request, handle: RequestHandle, *, deadline: float | None = None,
               on_partial: Callable | None = None, partial_every: int = 0, wait: bool = False) -> None:
        """Queue ``request``'s images under ``handle``. Without ``wait`` a request that does not
        fit the queue raises :class:`QueueFullError` at once (before any image is made); with
        ``wait`` it waits outside the queue and its images enter as the queue drains."""
        need = 2 if request.unconds is not None and any(p.cfg_scale != 1.0 for p in request.params) else 1
        if need > self.max_rows:
            raise ValueError(f"an image needs {need} decoder rows but the engine has {self.max_rows}")
        extra = {"on_partial": on_partial, "partial_every": partial_every}
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine's decode loop is closed")
            if not self.leader:
                raise RuntimeError("under tensor parallelism rank 0 takes the requests")
            if not wait and len(self._waiting) + request.count > self.max_queue:
                raise QueueFullError(f"the request queue is full ({len(self._waiting)} images waiting, max_queue="
                                     f"{self.max_queue}); retry later")
            self._by_request[handle.request_id] = []
            self._handles[handle.request_id] = handle
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, handle.request_id))
            if wait:
                self._backlog.append((handle, request.images(), extra))
                self._fill()
            else:
                for spec in request.images():
                    self._queue(ImageRequest(handle, spec, **extra))
            self._start()
            self._cv.notify()

    def end(self, request_id: int, error: BaseException) -> None:
        """End a request at the next step boundary (on every rank) with ``error``."""
        with self._cv:
            self._ends.append((request_id, error))
            self._cv.notify()

    def refuse(self, call: int, error: BaseException) -> None:
        """Tensor parallel: rank 0 refused its call ``call``; the followers' callers raise ``error`` too."""
        if self.control is None:
            return
        with self._cv:
            self._refused.append((call, error))
            self._cv.notify()

    def mirror(self, call: int) -> RequestHandle:
        """A follower's handle of rank 0's call ``call``: its outcome, once rank 0's loop has run it."""
        with self._cv:
            h = self._mirrors.get(call)
            if h is None:
                h = self._mirrors[call] = RequestHandle(None, call, 0, self.num_tokens, self.grid)
                # A follower serving rank 0's HTTP clients has no callers to claim its handles:
                # the oldest finished ones go.
                while len(self._mirrors) > MAX_MIRRORS:
                    old = next((c for c, m in self._mirrors.items() if m.done()), None)
                    if old is None:
                        break
                    del self._mirrors[old]
            return h

    def close(self) -> None:
        """Stop the loop (after the current step); requests still queued or running are cancelled.
        A follower waits for rank 0's stop."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def join(self) -> None:
        """Wait for the loop thread to end."""
        if self._thread is not None:
            self._thread.join()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vqim-decode-loop", daemon=True)
            self._thread.start()

    def _queue(self, img: ImageRequest) -> None:
        self._waiting.append(img)

    def _fill(self) -> None:
        """Backlogged images into the queue while it has room (under the lock)."""
        while self._backlog and len(self._waiting) < self.max_queue:
            handle, specs, extra = self._backlog[0]
            spec = next(specs, None)
            if spec is None or handle.done():
                self._backlog.popleft()
                continue
            self._queue(ImageRequest(handle, spec, **extra))

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        error: BaseException = RequestCancelled("the engine's decode loop was closed")
        try:
            with torch.inference_mode(), K.use_backend(self.backend):
                self.runner = self._make_runner()
                while True:
                    started = time.perf_counter()
                    plan = self._plan() if self.leader else None
                    if self.control is not None:
                        plan = self._exchange(plan)
                    if plan.stop:
                        break
                    self._apply(plan)
                    if self._active:
                        stepped = len(self._active)
                        try:
                            self._step()
                        except Exception as e:  # noqa: BLE001 (the loop survives; the step's requests get the error)
                            self._fail_active(e)
                        self.stats.recent.append((stepped, time.perf_counter() - started))
        except BaseException as e:  # noqa: BLE001 (the loop is dead: every request gets why)
            error = e
        finally:
            with self._cv:
                self._closed = True
                pending = list(self._waiting) + list(self._active)
                self._waiting.clear()
                backlog = [h for h, _, _ in self._backlog]
                self._backlog.clear()
            for img in pending:
                img.handle._fail(error)
            for h in backlog + list(self._mirrors.values()):
                h._fail(error)

    def _plan(self) -> Plan:
        """The leader's next iteration: wait for work, then ends and admissions (under the lock)."""
        def work() -> bool:
            return bool(self._closed or self._waiting or self._active or self._ends or self._refused
                        or self._deadlines and self._deadlines[0][0] <= time.monotonic())

        with self._cv:
            if not work():
                timeout = None
                if self._deadlines:
                    timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
                if self.control is not None:
                    # Woken by nothing, the plan is empty: a heartbeat for the followers.
                    timeout = HEARTBEAT_S if timeout is None else min(timeout, HEARTBEAT_S)
                self._cv.wait_for(work, timeout)
            if self._closed:
                return Plan(stop=True)
            plan = Plan(ends=self._ends, refused=self._refused)
            self._ends, self._refused = [], []
            now = time.monotonic()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, rid = heapq.heappop(self._deadlines)
                if self._by_request.get(rid) is not None:
                    plan.ends.append((rid, TimeoutError("the request did not finish within its timeout")))
            ended = {rid for rid, _ in plan.ends}
            while self._waiting:
                img = self._waiting[0]
                if img.request_id in ended or img.handle.done():
                    self._waiting.popleft()
                    continue
                n = 2 if img.spec.uncond is not None else 1
                if n > len(self._free):
                    break
                self._waiting.popleft()
                self._free.sort()
                img.rows, self._free = self._free[:n], self._free[n:]
                plan.admit.append(img)
            self._fill()
            return plan

    def _apply(self, plan: Plan) -> None:
        for call, error in plan.refused:
            if not self.leader:
                self.mirror(call)._fail(error)
        for rid, error in plan.ends:
            self._end(rid, error)
        if plan.admit:
            self._admit(plan.admit)

    # ------------------------------------------------------------------ tensor parallel

    def _exchange(self, plan: Plan | None) -> Plan:
        """Rank 0's plan on every rank (an empty one when it has nothing to say)."""
        if self.leader:
            self.control.broadcast(self._pack(plan) if plan else None)
            return plan
        msg = self.control.broadcast(None)
        return Plan() if msg is None else self._unpack(msg)

    @staticmethod
    def _pack(plan: Plan) -> dict:
        return {"stop": plan.stop, "ends": [(rid, portable(e)) for rid, e in plan.ends],
                "refused": [(c, portable(e)) for c, e in plan.refused],
                "admit": [(img.request_id, img.handle.num_images, img.spec, img.rows) for img in plan.admit]}

    def _unpack(self, msg: dict) -> Plan:
        admit = []
        for rid, num_images, spec, rows in msg["admit"]:
            handle = self.mirror(rid)
            handle.num_images = num_images
            self._by_request.setdefault(rid, [])
            self._handles[rid] = handle
            admit.append(ImageRequest(handle, spec, rows=rows))
        return Plan(msg["stop"], msg["ends"], admit, msg["refused"])

    # ------------------------------------------------------------------ admission

    def _admit(self, images: list[ImageRequest]) -> None:
        """Prefill the new images' rows, draw their first tokens, start their policies."""
        images = [img for img in images if self._alive(img)]
        failed: dict[tuple[int, int], BaseException] = {}
        for img in images:
            try:
                self._prepare(img)
            except Exception as e:  # noqa: BLE001 (that image's request fails, on every rank)
                failed[(img.request_id, img.spec.index)] = e
        if self.control is not None:
            # Before any collective of the admission: every rank drops what failed on any.
            failed = self.control.agree(failed)
        for (rid, _), e in sorted(failed.items(), key=lambda kv: kv[0]):
            self._end(rid, e)
        images = [img for img in images if img.rows and self._by_request.get(img.request_id) is not None]
        if not images:
            return
        try:
            self._prefill(images)
        except Exception as e:  # noqa: BLE001 (the new requests fail; those already running go on)
            for img in images:
                self._fail(img, e)
            return
        for img in images:
            # A one-token grid is done at its first token; so is an image whose policy had
            # nothing to decode (SJD with no finite logit at the prefill).
            if img in self._active and (img.policy.done if img.policy is not None else self.num_tokens == 1):
                self._finish(img)
        self._fire()

    def _alive(self, img: ImageRequest) -> bool:
        """Whether ``img``'s request still runs; if not, its rows go back."""
        if self._by_request.get(img.request_id) is None or img.handle.done():
            self._release(img)
            return False
        return True

    def _prepare(self, img: ImageRequest) -> None:
        """An admitted image's host side, before its rows are prefilled: registered with its
        request. Under tensor parallelism the ranks agree on what failed here before any
        collective of the admission."""
        self._by_request[img.request_id].append(img)
        with img.handle._lock:
            img.handle._running.add(img)
            if img.handle.started is None:
                img.handle.started = time.monotonic()
        img.clock = self._clock

    def _clock(self) -> int:
        return self._t

    def _prefill(self, images: list[ImageRequest]) -> None:
        runner = self.runner
        conds, local = [], []
        for img in images:
            local.append((len(conds), len(conds) + (img.spec.uncond is not None)))
            conds.append(img.spec.cond)
            if img.spec.uncond is not None:
                conds.append(img.spec.uncond)
        rows = self._condition(conds)
        logits = runner.prefill([r for img in images for r in img.rows], *rows)  # (k, V)
        lens = rows.prefix_len.tolist()
        slots = [self._slot(img, 0) for img in images]
        tok = runner.first_tokens(logits, local, slots, [img.spec.forced for img in images]).cpu()  # (B,)
        parallel = [i for i, img in enumerate(images) if img.spec.decoding != "raster"]
        q0 = None
        if any(images[i].spec.decoding == "sjd" for i in parallel):
            ci = torch.tensor([local[i][0] for i in parallel], device=runner.device)
            ui = torch.tensor([local[i][1] for i in parallel], device=runner.device)
            q0 = runner.probs(logits[ci], logits[ui], K.SamplingParams.rows(
                [images[i].spec.params for i in parallel], runner.device)).cpu()  # (P, V)
        dcfg = runner.dec.cfg
        for k, img in enumerate(images):
            img.t0 = self._t
            img.prefix = [lens[i] for i in sorted(set(local[k]))]
            self._active[img] = None
            spec = img.spec
            if spec.decoding == "wavefront":
                img.policy = Wavefront(dcfg, int(tok[k]), spec.forced)
            elif spec.decoding == "sjd":
                img.policy = SpeculativeJacobi(dcfg, int(tok[k]), spec.forced, window=spec.sjd_window,
                                               seed=spec.seed, q0=q0[parallel.index(k)])
            if img.policy is not None:
                self._parallel.append(img)
            else:
                self._dirty = True
                self._schedule(img)
        self._hi = max(self._hi, max(r for img in images for r in img.rows) + 1)

    def _slot(self, img: ImageRequest, step: int) -> Slot:
        return Slot(img.rows[0], img.rows[-1], img.spec.seed, step, img.spec.params, img.spec.forced is not None)

    # ------------------------------------------------------------------ the step

    def _step(self) -> None:
        runner = self.runner
        if self._dirty:
            raster = [img for img in self._active if img.policy is None]
            runner.set_slots([self._slot(img, 1 + self._t - img.t0) for img in raster],
                             [r for img in raster for r in img.rows])
            self._dirty = False
        started = time.perf_counter()
        if self._parallel:
            self._multi_step()
        else:
            runner.raster_step(self._hi)
        self._t += 1
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - started
        self.stats.widest = max(self.stats.widest, len(self._active))
        self._fire()

    def _multi_step(self) -> None:
        runner = self.runner
        entries, spans = [], []
        n = self.num_tokens
        for img in self._parallel:
            ents, cells = img.policy.entries()
            tokens = [t for t, _ in ents]
            for row, pre in zip(img.rows, img.prefix):
                known = None
                if cells is not None:  # the slots an entry may see: the prefix and the cells written
                    known = torch.zeros(runner.n_slots, dtype=torch.bool)
                    known[:pre] = True
                    known[pre:pre + n - 1] = cells[:n - 1]
                entries.append(Entries(row, tokens, [pre + c for _, c in ents], known))
            spans.append(len(ents))
        logits = runner.multi_step(self._hi, entries)  # (hi, T, V)
        dev = runner.device
        img_i = [i for i, k in enumerate(spans) for _ in range(k)]
        ent_j = [j for k in spans for j in range(k)]
        cond = torch.tensor([self._parallel[i].rows[0] for i in img_i], device=dev)
        uncond = torch.tensor([self._parallel[i].rows[-1] for i in img_i], device=dev)
        j = torch.tensor(ent_j, device=dev)
        c, u = logits[cond, j], logits[uncond, j]  # (N, V) each
        settings = K.SamplingParams.rows([self._parallel[i].spec.params for i in img_i], dev)
        wave = [i for i, img in enumerate(self._parallel) if img.policy.needs == "draws"]
        drawn = probs = None
        if wave:
            sel = [e for e, i in enumerate(img_i) if self._parallel[i].policy.needs == "draws"]
            targets = [t for i in wave for t in self._parallel[i].policy.targets()]
            s = torch.tensor(sel, device=dev)
            seed = torch.tensor([self._parallel[img_i[e]].spec.seed for e in sel], device=dev)
            drawn = runner.sample(c[s], u[s], seed, torch.tensor(targets, device=dev),
                                  {k: v[s] for k, v in settings.items()}).tolist()
        if len(wave) < len(self._parallel):
            sel = [e for e, i in enumerate(img_i) if self._parallel[i].policy.needs == "probs"]
            s = torch.tensor(sel, device=dev)
            probs = runner.probs(c[s], u[s], {k: v[s] for k, v in settings.items()}).cpu()  # (N', V)
        at_d = at_p = 0
        for img, k in zip(list(self._parallel), spans):
            if img.policy.needs == "draws":
                got, at_d = drawn[at_d:at_d + k], at_d + k
            else:
                got, at_p = probs[at_p:at_p + k], at_p + k
            if img not in self._active:  # its request failed earlier in this pass
                continue
            img.policy.update(got)
            self._partials(img)
            if img.policy.done:
                self._finish(img)

    # ------------------------------------------------------------------ events

    def _schedule(self, img: ImageRequest) -> None:
        """A raster image's next event: its next partial image, or its last token."""
        n, gw = self.num_tokens, self.grid[1]
        at = n
        if img.on_partial is not None and img.partial_every:
            every = img.partial_every * gw
            nxt = (img.partials + 1) * every
            if nxt < n:
                at = nxt
        # It has `at` tokens after at - 1 steps from joining.
        heapq.heappush(self._events, (img.t0 + at - 1, next(self._seq), img))

    def _fire(self) -> None:
        """Raster events due at this step: partial images, and images that drew their last token."""
        while self._events and self._events[0][0] <= self._t:
            _, _, img = heapq.heappop(self._events)
            if img not in self._active:
                continue
            if img.tokens_done() >= self.num_tokens:
                self._finish(img)
                continue
            self._partial(img, img.tokens_done())
            self._schedule(img)

    def _partials(self, img: ImageRequest) -> None:
        """A parallel image's partial images, when its final tokens crossed the cadence."""
        if img.on_partial is None or not img.partial_every:
            return
        every = img.partial_every * self.grid[1]
        k = img.policy.final() // every
        if k > img.partials and k * every < self.num_tokens:
            self._partial(img, k * every)

    def _partial(self, img: ImageRequest, tokens: int) -> None:
        img.partials = tokens // (img.partial_every * self.grid[1])
        if not self.leader or img.on_partial is None:
            return
        done = (img.policy.tokens[:tokens] if img.policy is not None
                else self.runner.tokens(img.rows[0])[:tokens])
        try:
            img.on_partial(img.spec.index, done, tokens // self.grid[1])
        except Exception as e:  # noqa: BLE001 (a caller's callback failed: its request ends, no other)
            self.end(img.request_id, e)

    # ------------------------------------------------------------------ endings

    def _finish(self, img: ImageRequest) -> None:
        if img.policy is not None:
            tokens, stats = img.policy.tokens.clone(), img.policy.stats
        else:
            tokens = self.runner.tokens(img.rows[0])  # (n,): the image's one host sync
            stats = DecodeStats(images=1, tokens=self.num_tokens, passes=self.num_tokens)
        try:
            check_tokens(tokens)
        except FloatingPointError as e:
            self._end(img.request_id, e)
            return
        self._release(img)
        img.handle._finished(img, tokens, stats)
        if img.handle.done():
            self._by_request.pop(img.request_id, None)
            self._handles.pop(img.request_id, None)

    def _end(self, rid: int, error: BaseException) -> None:
        """End request ``rid`` with ``error``: its images leave, queued or running."""
        handle = self._handles.pop(rid, None)
        for img in self._by_request.pop(rid, None) or []:
            self._release(img)
        with self._cv:
            for img in [img for img in self._waiting if img.request_id == rid]:
                self._waiting.remove(img)
            for entry in [e for e in self._backlog if e[0].request_id == rid]:
                self._backlog.remove(entry)
            self._fill()
        if handle is not None:
            handle._fail(error)

    def _fail(self, img: ImageRequest, error: BaseException) -> None:
        self._end(img.request_id, error)

    def _fail_active(self, error: Exception) -> None:
        if isinstance(error, torch.OutOfMemoryError):
            if self.runner is not None and self.runner.device.type == "cuda":
                torch.cuda.empty_cache()
            wrapped = torch.OutOfMemoryError(self.oom_message)
            wrapped.__cause__ = error
            error = wrapped
        for rid in {img.request_id for img in self._active}:
            self._end(rid, error)

    def _release(self, img: ImageRequest) -> None:
        if img in self._active:
            del self._active[img]
            if img.policy is None:
                self._dirty = True
            else:
                self._parallel.remove(img)
        with img.handle._lock:
            img.handle._running.discard(img)
        if img.rows:
            if self.runner is not None:
                self.runner.release(img.rows)
            with self._cv:
                self._free += img.rows
                self._fill()
            img.rows = []
            held = [r for i in self._active for r in i.rows]
            self._hi = max(held) + 1 if held else 0


def portable(error: BaseException) -> BaseException:
    """``error`` as it can travel to another rank (pickled): itself, or a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 (any exception that does not round-trip)
        return RuntimeError(f"{type(error).__name__}: {error}")
