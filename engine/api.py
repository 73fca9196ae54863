"""The ``Engine``: what embedding services call (DESIGN §5), a facade.

One engine holds one model on one device, shared by any number of threads and asyncio tasks.
It checks a call (:mod:`.requests`), hands its images to the engine's one decode loop
(:mod:`.scheduler`, continuous batching of every decode policy; :mod:`.runner` owns the model's
rows and passes) and turns codes into pixels and back (:mod:`.images`, under a lock). Every input
is validated before any work starts, a failing request raises only in its caller and leaves
nothing half-changed behind, and a CUDA out-of-memory error is re-raised naming the batch size
(or the decode loop's row budget) that failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from vqim import kernels as K

from . import images as I
from .config import ModelConfig, dtype_from_name, dtype_name
from .models import VQIMModel, init_weights
from .quantize import QUANTIZE_CHOICES, is_quantized, quantize_decoder
from .requests import check_count, check_request, condition, kept_tokens, tokenize
from .runner import ModelRunner
from .scheduler import RequestHandle, Scheduler
from .text import JanusTokenizer, TextTokenizer, check_text
from .tp import Control, agreed, check_tp, init_distributed, load_tp_model, tensor_parallel
from .weights import (build_model, check_generation_defaults, load_config, load_generation_defaults, load_model,
                      save_pretrained)

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "demo"
# Candidates per image one request may ask the reranker for (each is a whole image drawn and scored).
MAX_CANDIDATES = 64
# How often a blocking call updates its progress bar (seconds).
_PROGRESS_S = 0.1


def _check_device(device: str | int | torch.device) -> torch.device:
    """``device`` as a torch.device the engine runs on: the CPU or a CUDA GPU that exists
    (checked here, at construction, not at the first generate)."""
    allowed = "device must be 'cpu' or 'cuda[:N]' (a string, a torch.device or a GPU index)"
    if isinstance(device, bool):
        raise ValueError(f"{allowed}, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{allowed}, got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{allowed}, got {device!r}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {str(dev)!r} needs a CUDA GPU; none is available "
                             "(torch.cuda.is_available() is False): use device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(dev)!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    return dev


def _default_device(device: str | int | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _check_device(device)


def _check_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A weight dtype the engine runs in (a name or a torch.dtype; ValueError naming the choices)."""
    return None if dtype is None else dtype_from_name(dtype_name(dtype))


def _default_dtype(cfg: ModelConfig, device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """The config's dtype on GPUs; float32 on CPU, where bf16 matmuls are slow."""
    if dtype is None:
        return dtype_from_name(cfg.dtype) if device.type == "cuda" else torch.float32
    return _check_dtype(dtype)


# CPU engines of models below this many parameters run torch with one intra-op thread
# (cpu_threads="auto"). Their ops are too small for a second thread to pay for itself, and when
# the cores are busy torch's OpenMP threads spin-wait on each other: the bundled model's main
# command took 45 s with 2 threads and 3.9 s with 1 while two other processes kept the 2 cores
# busy (benchmarks/bench_demo.py has the idle and busy rows).
CPU_ONE_THREAD_PARAMS = 50_000_000


def cpu_threads_for(model: VQIMModel, cpu_threads: int | str | None) -> int | None:
    """The intra-op thread count a CPU engine sets (None: leave torch's): an int as given;
    ``"auto"``: one thread for a model under :data:`CPU_ONE_THREAD_PARAMS` parameters, else torch's."""
    if cpu_threads != "auto":
        return cpu_threads
    return 1 if sum(p.numel() for p in model.parameters()) < CPU_ONE_THREAD_PARAMS else None


def _check_options(max_batch_size: int = 16, kv_cache: str = "plain", compile: bool = False,
                   quantize: str | None = None, max_queue: int = 1024, backend: str | None = None,
                   cpu_threads: int | str | None = "auto", **_) -> None:
    """The engine options that ``from_preset``/``from_pretrained`` check before building a model."""
    if cpu_threads not in ("auto", None) and (not isinstance(cpu_threads, int) or isinstance(cpu_threads, bool)
                                              or cpu_threads < 1):
        raise ValueError(f"cpu_threads must be 'auto', None or an int >= 1, got {cpu_threads!r}")
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
        raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
    if kv_cache not in ("plain", "ring"):
        raise ValueError(f"kv_cache must be 'plain' or 'ring', got {kv_cache!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_CHOICES)} or None, got {quantize!r}")
    if backend is not None and backend not in K.BACKENDS:
        raise ValueError(f"backend must be one of {list(K.BACKENDS)} or None, got {backend!r}")


def _check_model_device(model: VQIMModel, device: torch.device) -> None:
    """The model's weights must be on the engine's device (a model on the meta device has none:
    it would fail deep inside the first encode or decode)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        here = t.device
        if here.type != device.type or (device.index is not None and here.index not in (None, device.index)):
            raise ValueError(f"model: its weights are on {here} ({name}) but the engine runs on device={str(device)!r}; "
                             f"move the model there first (model.to({str(device)!r}))")


def _check_tp(tp) -> None:
    """``tp``: an int >= 1 (1: no tensor parallelism), checked before anything else is read."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be an int >= 1 (the tensor-parallel size, the ranks torchrun starts), got {tp!r}")


def _check_compile(device: torch.device) -> None:
    """``compile=True`` on CPU builds C++ with Inductor: a compiler must be on PATH."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("compile=True on the CPU needs a C++ compiler for torch.compile's Inductor backend "
                         "(g++, c++ or clang++ on PATH); none was found: install one or use compile=False")


class Engine:
    """Text-to-image (or class-conditional / unconditional) generation and image tokenization.

    Build with :meth:`from_pretrained` (a model directory) or :meth:`from_preset` (random
    weights of a named shape). A tokenizer-only model (``vit-vqgan-*``) has
    :meth:`encode_images` and :meth:`decode_codes`; generating raises a ValueError.
    ``max_batch_size`` bounds the images processed together, by the AR decoder (the decode loop
    holds ``2 * max_batch_size`` rows: a guided image takes two, an unguided one) and by the image
    tokenizer's encoder and decoder; longer requests run as rows free up. ``max_queue`` bounds
    the images waiting for rows. ``kv_cache="ring"`` keeps, for conv-masked layers, only the
    ``kernel_h // 2 + 1`` grid rows their window can still reach (``vqim.kernels.conv_cache_len``);
    ``"plain"`` keeps every position (the parallel decodings need it). ``backend`` is the kernel
    backend the decode loop runs (``vqim.kernels.use_backend``; None: the default per device).

    The decode step is built for speed: the decoder's q/k/v projections are fused into one matmul
    when the engine is made (``ARDecoder.fuse``: the model's ``state_dict`` keeps its names).
    ``compile=True`` runs the step through ``torch.compile(fullgraph=True)`` (on CUDA, inside the
    captured graph; on CPU, Inductor's C++ backend, which needs a C++ compiler); it draws the
    same tokens as eager. ``quantize="int8"`` stores the decoder blocks' linears as int8 with a
    scale per output channel (:mod:`vqim.engine.quantize`): half the weight bytes per step of
    bf16, a quarter of fp32.

    ``cpu_threads`` (CPU engines): torch's intra-op threads, set process-wide when the engine is
    made. ``"auto"`` (the default) sets one thread for models under
    :data:`CPU_ONE_THREAD_PARAMS` parameters (the bundled and tiny models), where a second thread
    buys nothing idle and costs 10x when the cores are busy, and leaves torch's count for larger
    ones; an int sets that many; None leaves torch alone. Tensor-parallel ranks run one each.

    ``tp=N`` (under ``torchrun --nproc-per-node N``) makes an engine of one tensor-parallel
    shard per process (``vqim.engine.tp``, passed in as ``tp_group``). Rank 0 takes the requests
    (its ``submit``, ``generate``, ``agenerate`` work as with ``tp=1``: timeouts, cancellation,
    concurrent callers) and the decode loops of all ranks run them in lock-step. A call made on
    another rank too (the same calls in the same order on every rank, as ``torchrun ... vqim
    generate`` makes them) checks its own arguments, then returns rank 0's outcome of the call
    with the same index: the same codes and images, or the same error. :attr:`is_main` (rank 0)
    is the one that should write them. One tensor-parallel engine per process at a time (its
    loop owns the process group's collectives): :meth:`close` one before making the next.
    """

    def __init__(self, model: VQIMModel, tokenizer: TextTokenizer | None, *, device: torch.device,
                 max_batch_size: int = 16, use_cuda_graph: bool = True, model_dir: Path | None = None,
                 kv_cache: str = "plain", generation: dict | None = None,
                 tp_group: dist.ProcessGroup | None = None, compile: bool = False, quantize: str | None = None,
                 max_queue: int = 1024, backend: str | None = None, cpu_threads: int | str | None = "auto"):
        _check_options(max_batch_size, kv_cache, compile, quantize, max_queue, backend, cpu_threads)
        if compile:
            _check_compile(torch.device(device))
        if quantize is not None and tp_group is not None:
            raise ValueError("quantize='int8' is not supported with tensor parallelism (tp > 1) yet")
        self.device = _check_device(device)
        _check_model_device(model, self.device)
        threads = cpu_threads_for(model, cpu_threads) if self.device.type == "cpu" and tp_group is None else None
        if threads is not None:
            # Process-wide (torch has one intra-op pool): the decode loop's thread follows it.
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.model_dir = model_dir
        self.kv_cache = kv_cache
        self.compiled = compile
        self.backend = backend
        # generate()'s settings for those a call leaves out (or None): the model's generation.json
        # over SamplingParams' defaults.
        self.generation = check_generation_defaults(generation or {}, "generation")
        self.sampling_defaults = K.SamplingParams(**self.generation).to_dict()
        self.quantize = None
        if model.decoder is not None:
            model.decoder.fuse()
            if quantize is not None:
                quantize_decoder(model.decoder, quantize)
            # A model quantized by an earlier engine stays so.
            self.quantize = "int8" if is_quantized(model.decoder) else None
        self._lock = threading.Lock()
        # The process group whose ranks each hold a shard of the model; None: the whole model.
        self._tp_group = tp_group
        self._use_cuda_graph = use_cuda_graph
        # Every generation call gets the next index: under tensor parallelism, a call on another
        # rank is matched with rank 0's call of the same index.
        self._calls = itertools.count()
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        if tp_group is not None and model.decoder is not None:
            self.scheduler  # every rank's loop starts now: rank 0's plans drive them

    @property
    def is_main(self) -> bool:
        """Whether this process writes the results: always, unless it is a tensor-parallel rank other than 0."""
        return self._tp_group is None or dist.get_rank(self._tp_group) == 0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, tp: int = 1, **kwargs) -> Engine:
        """Load ``config.json`` + ``*.safetensors`` (+ ``tokenizer.model``) from ``path``.

        ``path=None`` loads the demo model bundled with the package. ``tp=N`` (under
        ``torchrun --nproc-per-node N``) loads only this rank's tensor-parallel shard.
        """
        # Cheap checks first: a bad dtype or option fails before any weight is read.
        _check_tp(tp)
        _check_dtype(dtype)
        _check_options(**kwargs)
        if path is None:
            if not (BUNDLED_MODEL / "config.json").is_file():
                raise FileNotFoundError(
                    f"no bundled demo model is installed yet (expected at {BUNDLED_MODEL}); pass a model "
                    "directory to Engine.from_pretrained(path), or build a random-weight model with "
                    "Engine.from_preset('tiny-t2i')")
            path = BUNDLED_MODEL
        path = Path(path)
        if tp != 1:
            return cls._tp_from_pretrained(path, tp, device, dtype, **kwargs)
        dev = _default_device(device)
        # The small files first, so that a bad one fails before the weights are read.
        cfg = load_config(path)
        tokenizer = cls._text_tokenizer(cfg, path)
        kwargs.setdefault("generation", load_generation_defaults(path))
        model = load_model(path, "cpu", cfg=cfg)
        model = model.to(device=dev, dtype=_default_dtype(cfg, dev, dtype))
        return cls(model, tokenizer, device=dev, model_dir=path, **kwargs)

    @classmethod
    def _tp_from_pretrained(cls, path: Path, tp: int, device: str | torch.device | None,
                            dtype: str | torch.dtype | None, **kwargs) -> Engine:
        """This process's shard of ``path``: only its slices are read (``tp.load_tp_model``)."""
        rank, dev = init_distributed(tp, device)
        group = dist.group.WORLD
        with agreed(group):
            want_dtype = _default_dtype(load_config(path), dev, dtype)
        model = load_tp_model(path, rank, tp, group, dev, want_dtype)
        with agreed(group):
            kwargs.setdefault("generation", load_generation_defaults(path))
            return cls(model, cls._text_tokenizer(model.cfg, path), device=dev, model_dir=path, tp_group=group,
                       **kwargs)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, tp: int = 1, **kwargs) -> Engine:
        """A random-weight engine of a named shape (``ModelConfig.from_name``), same weights for the same seed
        (an int in [0, 2**63 - 1]). ``tp=N`` (under ``torchrun --nproc-per-node N``, benchmarks): every
        rank draws the same full weights, then keeps its tensor-parallel shard."""
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= K.MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
        _check_tp(tp)
        _check_options(**kwargs)
        if tp != 1:
            return cls._tp_from_preset(name, seed, tp, device, dtype, **kwargs)
        cfg = ModelConfig.from_name(name)
        dev = _default_device(device)
        model = build_model(cfg, dev, _default_dtype(cfg, dev, dtype))
        init_weights(model, seed)
        return cls(model, cls._text_tokenizer(cfg, None), device=dev, **kwargs)

    @classmethod
    def _tp_from_preset(cls, name: str, seed: int, tp: int, device: str | torch.device | None,
                        dtype: str | torch.dtype | None, **kwargs) -> Engine:
        rank, dev = init_distributed(tp, device)
        group = dist.group.WORLD
        with agreed(group):
            cfg = ModelConfig.from_name(name)
            check_tp(cfg, tp)
        # Drawn on CPU in the engine's dtype, exactly as the tp=1 path draws them; each rank holds
        # the full weights once (benchmarks only: real models load by slices).
        model = build_model(cfg, "cpu", _default_dtype(cfg, dev, dtype))
        init_weights(model, seed)
        model = tensor_parallel(model, rank, tp, group).to(dev)
        with agreed(group):
            return cls(model, cls._text_tokenizer(cfg, None), device=dev, tp_group=group, **kwargs)

    @staticmethod
    def _text_tokenizer(cfg: ModelConfig, path: Path | None) -> TextTokenizer | None:
        if cfg.prompt is not None:
            return JanusTokenizer.load(path, cfg.prompt)
        if cfg.text is None:
            return None
        # The config decides, not the files present: a tokenizer.model left beside a model
        # trained on bytes must not change its prompts' ids.
        tok = TextTokenizer.load(path, cfg.text.max_len, kind=cfg.text.tokenizer)
        if tok.vocab_size > cfg.text.vocab_size:
            raise ValueError(f"the text tokenizer has {tok.vocab_size} ids but the text encoder embeds only "
                             f"{cfg.text.vocab_size} (config text.vocab_size)")
        return tok

    def save_pretrained(self, path: str | Path) -> Path:
        if self._tp_group is not None:
            raise ValueError("save_pretrained needs the full model: this engine holds one tensor-parallel shard "
                             "(save from a tp=1 engine)")
        if self.quantize is not None:
            raise ValueError(f"save_pretrained writes full-precision checkpoints: this engine's decoder is quantized "
                             f"({self.quantize!r}); save from an engine made without quantize")
        # The tokenizer in use (read at load), not whatever the old directory holds now.
        tok = self.tokenizer.impl.model_proto if self.tokenizer is not None else None
        hf = self.tokenizer.impl.json if isinstance(self.tokenizer, JanusTokenizer) else None
        with self._lock:
            return save_pretrained(self.model, path, tokenizer_model=tok, generation=self.generation,
                                   tokenizer_json=hf)


    # ------------------------------------------------------------------ generation

    @property
    def scheduler(self) -> Scheduler:
        """The engine's decode loop (started at the first request, or at once under tensor parallelism)."""
        self.cfg.require_decoder("generating images")
        with self._scheduler_lock:
            if self._scheduler is None:
                rows = 2 * self.max_batch_size
                oom = (f"out of GPU memory in the decode loop ({rows} decoder rows); lower "
                       f"Engine.max_batch_size (now {self.max_batch_size})")
                text = None if self.cfg.text is None else (self.cfg.text.max_len, self.cfg.text.width)
                dec = self.cfg.decoder

                def runner() -> ModelRunner:
                    return ModelRunner(self.model.decoder, max_rows=rows, device=self.device, text=text,
                                       ring=self.kv_cache == "ring", compile=self.compiled,
                                       use_cuda_graph=self._use_cuda_graph)

                pad = self.cfg.text.max_len if self.cfg.text is not None else (
                    self.cfg.prompt.max_len if self.cfg.prompt is not None else None)
                self._scheduler = Scheduler(
                    runner, lambda conds: condition(self.model, self.tokenizer, conds, pad_to=pad),
                    num_tokens=dec.num_tokens, grid=(dec.grid_h, dec.grid_w), max_rows=rows,
                    max_queue=self.max_queue, oom_message=oom, backend=self.backend,
                    control=None if self._tp_group is None else Control(self._tp_group))
            return self._scheduler

    def generate_codes(self, prompts: Sequence[str] | str | None = None, num_images: int = 1, *, seed=None,
                       class_ids=None, negative_prompt=None, progress: bool | Callable[[int], None] = False,
                       timeout: float | None = None, image=None, keep=None, candidates: int = 1,
                       return_scores: bool = False, decoding: str = "auto", sjd_window: int = 16, **sampling):
        """Image tokens ``[len(prompts) * num_images, grid_h, grid_w]``, request-major.

        ``sampling``: settings by :class:`~vqim.kernels.SamplingParams` field name (``cfg_scale``,
        ``temperature``, ``top_k``, ...; another name is a TypeError). Each setting and ``seed``
        is a scalar or one value per prompt / class id. A setting left out (or ``None``) takes
        the model directory's recommendation (``generation.json``, in :attr:`sampling_defaults`)
        or else SamplingParams' default. Image ``j`` of a request draws with seed ``seed + j``, so its
        tokens do not depend on the other requests in the batch. ``seed=None`` picks one.
        ``negative_prompt`` (text models; a string or one per prompt): what the unconditional
        branch of guidance conditions on instead of the empty prompt. ``progress=True`` shows a
        tqdm bar over sampled tokens (a callable gets the count of each update). ``timeout``
        (seconds) fails the call with ``TimeoutError`` if it has not finished by then.

        ``image`` + ``keep``: image-conditioned generation. The image (a PIL image or a
        ``[3, H, W]`` tensor of the tokenizer's size, or one per prompt) is encoded, the tokens
        ``keep`` marks are kept as they are and the rest are drawn. ``keep`` is an int, the number
        of top grid rows kept (raster completion: exact, each drawn token sees every kept one), or
        a bool mask ``[grid_h, grid_w]`` (True: keep). An arbitrary mask is approximate in a raster
        model: a drawn token sees the kept tokens before it in raster order, not those after it.

        ``candidates=N`` (a model with a scorer, seed §[0116]; at most ``MAX_CANDIDATES``) draws
        ``N`` images per requested one and keeps the one the scorer rates best against its prompt
        (:meth:`score`): candidate ``c`` of image ``j`` is image ``j + c * num_images`` of an
        ``N * num_images`` request, so candidate 0 is the image ``candidates=1`` draws.
        ``return_scores=True`` returns ``(codes, scores [len(codes)])``.

        ``decoding`` (:mod:`vqim.engine.parallel`): ``"raster"`` (one token per image per forward
        pass), ``"wavefront"`` (rows advance as a staggered wavefront, several tokens per pass:
        the same tokens as raster; needs every decoder layer conv-masked, else a warning says so
        and the call decodes in raster order) or ``"sjd"`` (speculative Jacobi decoding with
        ``sjd_window`` drafts per image: the same distribution as raster, other tokens; any
        model); ``"auto"`` (the default) is the wavefront where the model runs it (and the KV
        cache is plain), else raster. Every decoding runs in the engine's one decode loop, beside
        other callers' images.

        The call's images go to the decode loop as its queue has room (a call larger than
        ``max_queue`` waits for room, it is not refused) and the call waits for them.
        """
        check_count("candidates", candidates, MAX_CANDIDATES)
        if not isinstance(return_scores, bool):
            raise ValueError(f"return_scores must be true or false, got {return_scores!r}")
        if candidates > 1 or return_scores:
            codes, scores, _ = self._reranked(prompts, num_images, candidates, seed=seed, class_ids=class_ids,
                                              negative_prompt=negative_prompt, progress=progress, timeout=timeout,
                                              image=image, keep=keep, decoding=decoding, sjd_window=sjd_window,
                                              **sampling)
            return (codes, scores) if return_scores else codes
        handle = self._submit(next(self._calls), prompts, num_images, wait=True, seed=seed, class_ids=class_ids,
                              negative_prompt=negative_prompt, timeout=timeout, image=image, keep=keep,
                              decoding=decoding, sjd_window=sjd_window, **sampling)
        return self._wait(handle, progress if self.is_main else False)

    def submit(self, prompts: Sequence[str] | str | None = None, num_images: int = 1, *, seed=None, class_ids=None,
               negative_prompt=None, timeout: float | None = None,
               on_partial: Callable[[int, torch.Tensor, int], None] | None = None, partial_every: int = 1,
               image=None, keep=None, decoding: str = "auto", sjd_window: int = 16, **sampling) -> RequestHandle:
        """Queue a request (the arguments of :meth:`generate_codes`) and return its
        :class:`~vqim.engine.scheduler.RequestHandle` at once: ``handle.result()`` or ``await
        handle`` gives the codes ``[n, grid_h, grid_w]``, ``handle.cancel()`` ends it,
        ``handle.progress`` counts its tokens. Every input is checked here, before it is queued.

        ``on_partial(image, codes [grid_h, grid_w], rows)`` is called from the decode loop every
        ``partial_every`` grid rows of each image with the tokens so far (-1 where not yet drawn).
        A request that does not fit the queue raises :class:`~vqim.engine.scheduler.QueueFullError`
        at once.
        """
        return self._submit(next(self._calls), prompts, num_images, wait=False, seed=seed, class_ids=class_ids,
                            negative_prompt=negative_prompt, timeout=timeout, on_partial=on_partial,
                            partial_every=partial_every, image=image, keep=keep, decoding=decoding,
                            sjd_window=sjd_window, **sampling)

    def _submit(self, call: int, prompts, num_images, *, wait: bool, seed, class_ids, negative_prompt, timeout,
                on_partial=None, partial_every: int = 1, image=None, keep=None, decoding: str = "auto",
                sjd_window: int = 16, **sampling) -> RequestHandle:
        """Check a call and queue it (rank 0) or wait for rank 0's (another tensor-parallel rank)."""
        try:
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                        or not 0 < timeout < float("inf")):
                raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
            if not isinstance(partial_every, int) or isinstance(partial_every, bool) or partial_every < 1:
                raise ValueError(f"partial_every must be an int >= 1 (grid rows), got {partial_every!r}")
            if on_partial is not None and not callable(on_partial):
                raise ValueError("on_partial must be a callable or None")
            sched = self.scheduler
            request = check_request(
                self.model, self.tokenizer, K.SamplingParams(**self.sampling_defaults), prompts, num_images,
                sampling, seed, class_ids, negative_prompt, decoding=decoding, sjd_window=sjd_window,
                ring_cache=self.kv_cache == "ring", most_images=None if wait else self.max_queue,
                kept=lambda n: kept_tokens(self.cfg, image, keep, n, self.encode_images))
            if not self.is_main:
                return sched.mirror(call)
            cfg = self.cfg.decoder
            handle = RequestHandle(sched, call, request.count, cfg.num_tokens, (cfg.grid_h, cfg.grid_w))
            sched.submit(request, handle, deadline=None if timeout is None else time.monotonic() + timeout,
                         on_partial=self._partial(on_partial), partial_every=partial_every if on_partial else 0,
                         wait=wait)
            return handle
        except Exception as e:
            if self.is_main and self._scheduler is not None:
                self._scheduler.refuse(call, e)
            raise

    def _partial(self, on_partial: Callable | None) -> Callable | None:
        """A caller's ``on_partial``, given the tokens so far as a grid (-1 where not drawn yet)."""
        if on_partial is None:
            return None
        cfg = self.cfg.decoder

        def partial(index: int, tokens: torch.Tensor, grid_rows: int) -> None:
            grid = torch.full((cfg.num_tokens,), -1, dtype=torch.long)
            grid[: tokens.shape[0]] = tokens
            on_partial(index, grid.view(cfg.grid_h, cfg.grid_w), grid_rows)

        return partial

    @staticmethod
    def _wait(handle: RequestHandle, progress: bool | Callable[[int], None]) -> torch.Tensor:
        """``handle``'s codes; a progress bar (or callable) fed from ``handle.progress`` meanwhile."""
        if progress is False:
            return handle.result()
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=handle.progress[1], unit="tok", desc="generate")
            progress = bar.update
        seen = 0
        try:
            while not concurrent.futures.wait([handle.future], timeout=_PROGRESS_S).done:
                now = handle.progress[0]
                if now > seen:
                    progress(now - seen)
                    seen = now
            if handle.future.exception() is None and handle.progress[1] > seen:
                progress(handle.progress[1] - seen)
            return handle.result()
        finally:
            if bar is not None:
                bar.close()

    def generate(self, prompts: Sequence[str] | str | None = None, num_images: int = 1, *, upscale: bool = False,
                 **kwargs):
        """Images for each prompt (``num_images`` each, request-major): see :meth:`generate_codes`
        (with ``return_scores=True``: ``(images, scores)``). ``upscale=True`` passes them through
        the model's super-resolution module (:meth:`decode_codes`)."""
        self._check_upscale(upscale)
        candidates = kwargs.pop("candidates", 1)
        return_scores = kwargs.pop("return_scores", False)
        check_count("candidates", candidates, MAX_CANDIDATES)
        if not isinstance(return_scores, bool):
            raise ValueError(f"return_scores must be true or false, got {return_scores!r}")
        if candidates > 1 or return_scores:
            # The reranker decoded every candidate to score it: the chosen ones' pixels are reused.
            _, scores, pixels = self._reranked(prompts, num_images, candidates, **kwargs)
            images = self.to_images(pixels, upscale=upscale)
            return (images, scores) if return_scores else images
        return self.decode_codes(self.generate_codes(prompts, num_images, **kwargs), upscale=upscale)

    def _check_upscale(self, upscale: bool) -> None:
        if not isinstance(upscale, bool):
            raise ValueError(f"upscale must be true or false, got {upscale!r}")
        if upscale and self.model.superres is None:
            raise ValueError(f"upscale needs a model with a super-resolution module (config 'superres'); "
                             f"{self.cfg.name} has none")

    def _reranked(self, prompts, num_images: int, candidates: int, **kwargs):
        """``generate_codes`` with ``candidates`` per image, the best by :meth:`score`: its codes
        ``[P * n, g, g]``, scores ``[P * n]`` and decoded pixels ``[P * n, 3, H, W]``."""
        self._require_scorer("candidates > 1 / return_scores")
        check_count("num_images", num_images)
        if isinstance(prompts, str):
            prompts = [prompts]
        codes = self.generate_codes(prompts, num_images * candidates, **kwargs)  # (P * N * n, g, g)
        return self.rerank(codes, prompts, num_images, candidates)

    def rerank(self, codes: torch.Tensor, prompts: Sequence[str], num_images: int, candidates: int):
        """The scorer's best of ``candidates`` per image: ``codes [P * N * n, g, g]`` are what a
        request of ``N * n`` images per prompt drew (candidate ``c`` of image ``j`` is image
        ``j + c * n``); returns the chosen codes ``[P * n, g, g]``, their scores ``[P * n]`` and
        decoded pixels ``[P * n, 3, H, W]``. One candidate of every image at a time is decoded
        and scored, so the pixels held are two per image, whatever ``N`` (ties: the first)."""
        self._require_scorer("rerank")
        p = len(prompts)
        grid = codes.view(p, candidates, num_images, *codes.shape[1:])
        per_image = [q for q in prompts for _ in range(num_images)]
        best_codes = best_scores = best_pixels = None
        for c in range(candidates):
            cand = grid[:, c].reshape(p * num_images, *codes.shape[1:])  # (P * n, g, g)
            pixels = self.decode_codes(cand, output_type="pt")  # (P * n, 3, H, W)
            scores = self.score(pixels, per_image)  # (P * n,)
            if best_codes is None:
                best_codes, best_scores, best_pixels = cand.clone(), scores, pixels
                continue
            better = scores > best_scores  # (P * n,)
            best_scores = torch.where(better, scores, best_scores)
            best_codes[better.to(best_codes.device)] = cand[better.to(cand.device)]
            best_pixels[better.to(best_pixels.device)] = pixels[better.to(pixels.device)]
        return best_codes, best_scores, best_pixels

    def _require_scorer(self, what: str) -> None:
        if self.model.scorer is None:
            raise ValueError(f"{what} needs a model with a scorer (a reranker: config 'scorer'); {self.cfg.name} has "
                             "none")

    @torch.no_grad()
    def score(self, images, prompts) -> torch.Tensor:
        """How well each image matches its prompt: the cosine similarity ``[B]`` (float32, in
        [-1, 1]) of the scorer's image and text embeddings. ``images`` as :meth:`encode_images`
        takes them; ``prompts`` one string per image (or one for all)."""
        self._require_scorer("score")
        x = I.pixels(images, self.cfg.vqgan.image_size)
        b = x.shape[0]
        if isinstance(prompts, str):
            prompts = [prompts] * b
        if not isinstance(prompts, (list, tuple)) or len(prompts) != b or not all(isinstance(q, str) for q in prompts):
            raise ValueError(f"prompts must be a string or a list of {b} strings (one per image)")
        for i, q in enumerate(prompts):
            check_text(f"prompts[{i}]", q)
        rows = tokenize(self.tokenizer, prompts)
        scorer = self.model.scorer
        out = []
        with self._lock:
            for sl in I.chunks(b, self.max_batch_size):
                ids = torch.stack([i for i, _ in rows[sl]]).to(self.device)
                mask = torch.stack([m for _, m in rows[sl]]).to(self.device)  # (b, L)
                img = scorer.embed_images(x[sl].to(self.device))  # (b, E)
                out.append((img * scorer.embed_text(ids, mask)).sum(-1).cpu())
        return torch.cat(out)

    async def agenerate_codes(self, prompts=None, num_images: int = 1, **kwargs) -> torch.LongTensor:
        """``await`` form of :meth:`generate_codes` (vLLM's async engine shape): the request joins
        the decode loop's batch; cancelling the awaiting task cancels the request."""
        return await self.submit(prompts, num_images, **kwargs)

    async def agenerate(self, prompts=None, num_images: int = 1, **kwargs) -> list[Image.Image]:
        """``await`` form of :meth:`generate`; the pixels are decoded in a worker thread."""
        codes = await self.agenerate_codes(prompts, num_images, **kwargs)
        return await asyncio.to_thread(self.decode_codes, codes)

    def join(self) -> None:
        """Wait until the decode loop stops: on a tensor-parallel rank other than 0 (``vqim serve``
        under torchrun), until rank 0's engine closes."""
        if self._scheduler is not None:
            self._scheduler.join()

    def close(self) -> None:
        """Stop the decode loop; requests still queued or running fail with ``RequestCancelled``.
        Under tensor parallelism rank 0's close stops every rank's loop (another rank's waits for it)."""
        with self._scheduler_lock:
            if self._scheduler is not None:
                self._scheduler.close()
                self._scheduler = None

    # ------------------------------------------------------------------ tokenizer

    @torch.no_grad()
    def encode_images(self, images) -> torch.LongTensor:
        """Images -> tokens ``[B, g, g]`` (PIL images of the tokenizer's size, or a tensor).

        PIL images are read by bit depth: 8-bit modes via ``convert("RGB")`` / 255, ``I;16``
        / 65535, ``I`` / 65535 when in [0, 65535], ``F`` as is when in [0, 1]; other values
        raise ValueError."""
        x = I.pixels(images, self.cfg.vqgan.image_size)
        with self._lock:
            return torch.cat(list(I.encode_chunks(self.model, x, self.device, self.max_batch_size, "encoding")))

    @torch.no_grad()
    def decode_codes(self, codes, *, output_type: str = "pil", upscale: bool = False):
        """Tokens ``[B, g, g]`` (any integer dtype) -> PIL images (``output_type="pil"``) or float
        pixels ``[B, 3, H, W]`` in [0, 1] (``"pt"``; raw-output tokenizers are clamped to [0, 1]).
        Non-finite pixels raise FloatingPointError. ``upscale=True``: the tokenizer's images
        through the model's super-resolution module (seed §[0108]; ``superres.scale`` times
        larger, 256 x 256 for the bundled model)."""
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        self._check_upscale(upscale)
        c = I.codes_tensor(codes, self.cfg, self.device)
        with self._lock:
            return I.output(self.model, I.decode_chunks(self.model, c, self.device, self.max_batch_size), output_type,
                            upscale)

    @torch.no_grad()
    def to_images(self, pixels: torch.Tensor, *, upscale: bool = False) -> list[Image.Image]:
        """Pixels ``[B, 3, H, W]`` in [0, 1] (what ``decode_codes(..., output_type="pt")`` gives)
        -> PIL images, through the super-resolution module with ``upscale``."""
        self._check_upscale(upscale)
        with self._lock:
            return I.output(self.model, pixels.split(self.max_batch_size), "pil", upscale)

    @torch.no_grad()
    def image_features(self, images, layer: int) -> torch.Tensor:
        """Mean over the image tokens of decoder block ``layer``'s output ``[B, W]`` (float32):
        the linear-probe feature (seed §[0102]). The prefix is BOS / null class; a text model
        cross-attends to the empty prompt."""
        n_layers = self.cfg.require_decoder("image_features").layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
            raise ValueError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
        if self._tp_group is not None:
            raise ValueError("image_features runs the decoder outside the decode loop, and under tensor parallelism "
                             "the loop owns every collective of the sharded decoder: use a tp=1 engine")
        x = I.pixels(images, self.cfg.vqgan.image_size)
        feats = []
        with self._lock:
            for codes in I.encode_chunks(self.model, x, self.device, self.max_batch_size, "featurizing"):
                b = codes.shape[0]
                with I.oom_names_batch("featurizing", b, self.max_batch_size, self.device):
                    null = "" if self.cfg.is_text_to_image else self.model.decoder.null_prefix
                    prefix, memory, mask, _ = condition(self.model, self.tokenizer, [null] * b)
                    h = self.model.decoder(prefix, codes.view(b, -1), memory, mask, hidden_layer=layer)  # (b, 1 + n, W)
                    feats.append(h[:, prefix.shape[1]:].float().mean(dim=1))  # (b, W)
        return torch.cat(feats)
