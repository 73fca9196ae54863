"""The ``Engine``: what embedding services call (DESIGN §5).

One engine holds one model on one device, shared by any number of threads and asyncio tasks:
generation requests go to the engine's decode loop (``engine/serving.py``: continuous
batching), where they share decode steps; the tokenizer calls take a lock. Every input is
validated before any work starts, a failing request raises only in its caller and leaves
nothing half-changed behind, and a CUDA out-of-memory error is re-raised naming the batch size
(or the decode loop's row budget) that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import time
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from vqim import kernels as K

from .config import ModelConfig, dtype_from_name, dtype_name
from .generate import Generator, Sampling, check_tokens, condition, tokenize
from .models import VQIMModel, init_weights
from .parallel import check_decoding, check_window, run_sjd, run_wavefront, wavefront_unsupported
from .quantize import QUANTIZE_CHOICES, is_quantized, quantize_decoder
from .serving import ImageRequest, QueueFullError, RequestHandle, Scheduler
from .text import TextTokenizer
from .tp import agreed, check_tp, from_rank0, init_distributed, load_tp_model, tensor_parallel
from .weights import (build_model, check_generation_defaults, load_config, load_generation_defaults, load_model,
                      save_pretrained)

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "demo"


def draw_seed(num_images: int) -> int:
    """A fresh seed for a request left unseeded: image j draws with seed + j, so all of them
    stay within [0, MAX_SEED]."""
    return random.SystemRandom().randrange(0, K.MAX_SEED - num_images + 1)


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


def _check_options(max_batch_size: int = 16, kv_cache: str = "plain", compile: bool = False,
                   quantize: str | None = None, max_queue: int = 1024, continuous_batching: bool = True, **_) -> None:
    """The engine options that ``from_preset``/``from_pretrained`` check before building a model."""
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
        raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
    if not isinstance(continuous_batching, bool):
        raise ValueError(f"continuous_batching must be True or False, got {continuous_batching!r}")
    if kv_cache not in ("plain", "ring"):
        raise ValueError(f"kv_cache must be 'plain' or 'ring', got {kv_cache!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_CHOICES)} or None, got {quantize!r}")


def _check_compile(device: torch.device) -> None:
    """``compile=True`` on CPU builds C++ with Inductor: a compiler must be on PATH."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("compile=True on the CPU needs a C++ compiler for torch.compile's Inductor backend "
                         "(g++, c++ or clang++ on PATH); none was found: install one or use compile=False")


def _check_candidates(candidates) -> None:
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")


def _chunks(n: int, size: int) -> list[slice]:
    """``[0, n)`` in slices of at most ``size``."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _per_request(name: str, value, n: int) -> list:
    """A scalar for all requests or one value per request."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be a scalar or a list of {n} values (one per request), got {len(value)}")
        return list(value)
    if isinstance(value, torch.Tensor) or isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a python scalar or list, got {type(value).__name__}")
    return [value] * n


class Engine:
    """Text-to-image (or class-conditional / unconditional) generation and image tokenization.

    Build with :meth:`from_pretrained` (a model directory) or :meth:`from_preset` (random
    weights of a named shape). A tokenizer-only model (``vit-vqgan-*``) has
    :meth:`encode_images` and :meth:`decode_codes`; generating raises a ValueError.
    ``max_batch_size`` bounds the images processed together, by the AR decoder (each is two
    decoder rows with guidance) and by the image tokenizer's encoder and decoder; longer
    requests run in chunks. ``kv_cache="ring"`` keeps, for conv-masked layers, only the
    ``kernel_h // 2 + 1`` grid rows their window can still reach (``vqim.kernels.conv_cache_len``);
    ``"plain"`` keeps every position.

    The decode step is built for speed: the decoder's q/k/v projections are fused into one matmul
    when the engine is made (``ARDecoder.fuse``: the model's ``state_dict`` keeps its names).
    ``compile=True`` runs the step through ``torch.compile(fullgraph=True)`` (on CUDA, inside the
    captured graph; on CPU, Inductor's C++ backend, which needs a C++ compiler); it draws the
    same tokens as eager. ``quantize="int8"`` stores the decoder blocks' linears as int8 with a
    scale per output channel (:mod:`vqim.engine.quantize`): half the weight bytes per step of
    bf16, a quarter of fp32.

    ``tp=N`` (under ``torchrun --nproc-per-node N``) makes an engine of one tensor-parallel
    shard per process (``vqim.engine.tp``, passed in as ``tp_group``): every rank makes the same
    calls with the same arguments and gets the same tokens and images; :attr:`is_main` (rank 0)
    is the one that should write them.
    """

    def __init__(self, model: VQIMModel, tokenizer: TextTokenizer | None, *, device: torch.device,
                 max_batch_size: int = 16, use_cuda_graph: bool = True, model_dir: Path | None = None,
                 kv_cache: str = "plain", generation: dict | None = None,
                 tp_group: dist.ProcessGroup | None = None, compile: bool = False, quantize: str | None = None,
                 max_queue: int = 1024, continuous_batching: bool = True):
        _check_options(max_batch_size, kv_cache, compile, quantize, max_queue, continuous_batching)
        if compile:
            _check_compile(torch.device(device))
        if quantize is not None and tp_group is not None:
            raise ValueError("quantize='int8' is not supported with tensor parallelism (tp > 1) yet")
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = _check_device(device)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.model_dir = model_dir
        # generate()'s settings for those a call leaves out (or None): the model's generation.json
        # over SamplingParams' defaults.
        self.generation = check_generation_defaults(generation or {}, "generation")
        self.sampling_defaults = K.SamplingParams(**self.generation).to_dict()
        self.generator = None
        self.quantize = None
        if model.decoder is not None:
            model.decoder.fuse()
            if quantize is not None:
                quantize_decoder(model.decoder, quantize)
            # A model quantized by an earlier engine stays so.
            self.quantize = "int8" if is_quantized(model.decoder) else None
            self.generator = Generator(model.decoder, use_cuda_graph=use_cuda_graph, ring_cache=kv_cache == "ring",
                                       compile=compile)
        self._lock = threading.Lock()
        # The process group whose ranks each hold a shard of the model; None: the whole model.
        self._tp_group = tp_group
        # Tensor-parallel ranks must step in lockstep: they keep one batch per call.
        self.continuous_batching = continuous_batching and tp_group is None
        self.max_queue = max_queue
        self._use_cuda_graph = use_cuda_graph
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()

    @property
    def is_main(self) -> bool:
        """Whether this process writes the results: always, unless it is a tensor-parallel rank other than 0."""
        return self._tp_group is None or dist.get_rank(self._tp_group) == 0

    def _agreed(self) -> contextlib.AbstractContextManager:
        """Under tensor parallelism, a block after which the ranks agree on whether it raised
        (``tp.agreed``): one rank's error raises on all instead of the others entering a collective alone."""
        return contextlib.nullcontext() if self._tp_group is None else agreed(self._tp_group)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, tp: int = 1, **kwargs) -> Engine:
        """Load ``config.json`` + ``*.safetensors`` (+ ``tokenizer.model``) from ``path``.

        ``path=None`` loads the demo model bundled with the package. ``tp=N`` (under
        ``torchrun --nproc-per-node N``) loads only this rank's tensor-parallel shard.
        """
        # Cheap checks first: a bad dtype or option fails before any weight is read.
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
        with self._lock:
            return save_pretrained(self.model, path, tokenizer_model=tok, generation=self.generation)

    # ------------------------------------------------------------------ generation

    @contextlib.contextmanager
    def _oom_names_batch(self, what: str, batch: int):
        try:
            yield
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise torch.OutOfMemoryError(
                f"out of GPU memory {what} a batch of {batch} images; lower the batch size "
                f"(Engine.max_batch_size is {self.max_batch_size})") from e

    def _requests(self, prompts, class_ids, num_images: int) -> tuple[list, bool]:
        """One condition per request, and whether the model has a real unconditional branch."""
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        if self.cfg.is_text_to_image:
            if class_ids is not None:
                raise ValueError("class_ids is for class-conditional models; this one takes text prompts")
            if isinstance(prompts, str):
                prompts = [prompts]
            if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
                raise ValueError("prompts must be a non-empty list of strings")
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise ValueError(f"prompts must be strings, got {type(p).__name__} at prompts[{i}]")
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError as e:
                    # A lone surrogate: what Python makes of command-line bytes that are not UTF-8.
                    raise ValueError(f"prompts[{i}] is not valid Unicode text (a lone surrogate at index "
                                     f"{e.start}, e.g. bytes that were not UTF-8): {p!r}") from e
            return list(prompts), True
        if prompts is not None:
            raise ValueError(f"{self.cfg.name} is not a text-to-image model: pass class_ids (or nothing), not prompts")
        nc = self.cfg.decoder.num_classes
        if class_ids is None:
            return [nc], False  # unconditional: the BOS / null prefix
        if nc == 0:
            raise ValueError(f"{self.cfg.name} is unconditional: class_ids must be None")
        if isinstance(class_ids, int):
            class_ids = [class_ids]
        if not isinstance(class_ids, (list, tuple)) or len(class_ids) == 0:
            raise ValueError("class_ids must be a non-empty list of ints")
        for c in class_ids:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < nc:
                raise ValueError(f"class_ids must be ints in [0, {nc}), got {c!r}")
        return list(class_ids), True

    def generate_codes(self, prompts: Sequence[str] | str | None = None, num_images: int = 1, *, seed=None,
                       class_ids=None, negative_prompt=None, progress: bool | Callable[[int], None] = False,
                       timeout: float | None = None, image=None, keep=None, candidates: int = 1,
                       return_scores: bool = False, decoding: str = "raster", sjd_window: int = 16, **sampling):
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

        ``candidates=N`` (a model with a scorer, seed §[0116]) draws ``N`` images per requested one
        and keeps the one the scorer rates best against its prompt (:meth:`score`): candidate
        ``c`` of image ``j`` is image ``j + c * num_images`` of an ``N * num_images`` request, so
        candidate 0 is the image ``candidates=1`` draws. ``return_scores=True`` returns
        ``(codes, scores [len(codes)])``.

        ``decoding`` (:mod:`vqim.engine.parallel`): ``"raster"`` (one token per image per forward
        pass), ``"wavefront"`` (rows advance as a staggered wavefront, several tokens per pass:
        the same tokens as raster; needs every decoder layer conv-masked, else a warning says so
        and the call decodes in raster order) or ``"sjd"`` (speculative Jacobi decoding with
        ``sjd_window`` drafts per image: the same distribution as raster, other tokens; any
        model). The parallel decodings run one batch per call, outside the continuous-batching
        loop (no ``timeout``, ``image``/``keep`` or tensor parallelism).

        With continuous batching (the default) the call submits its images to the engine's
        decode loop (:meth:`submit`) and waits: calls from other threads share its steps.
        """
        _check_candidates(candidates)
        if candidates > 1 or return_scores:
            codes, scores, _ = self._reranked(prompts, num_images, candidates, seed=seed, class_ids=class_ids,
                                              negative_prompt=negative_prompt, progress=progress, timeout=timeout,
                                              image=image, keep=keep, decoding=decoding, sjd_window=sjd_window,
                                              **sampling)
            return (codes, scores) if return_scores else codes
        decoding = self._decoding(decoding, sjd_window)
        if decoding != "raster":
            for name, value in (("timeout", timeout), ("image", image), ("keep", keep)):
                if value is not None:
                    raise ValueError(f"{name} needs decoding='raster' (got decoding={decoding!r})")
            request = self._check_request(prompts, num_images, sampling, seed, class_ids, negative_prompt)
            with self._lock:
                return self._generate_rows(*request, progress, decoding=decoding, sjd_window=sjd_window)
        if not self.continuous_batching:
            for name, value in (("timeout", timeout), ("image", image)):
                if value is not None:
                    raise ValueError(f"{name} needs continuous batching (Engine(continuous_batching=True), tp=1)")
            if self._tp_group is not None:
                seed = self._rank0_seed(seed, num_images)
            with self._agreed():
                request = self._check_request(prompts, num_images, sampling, seed, class_ids, negative_prompt)
            # Reached by every rank only once all have validated the request: none enters the decode
            # loop's collectives alone. Tensor parallel: one progress bar, rank 0's.
            with self._agreed(), self._lock:
                return self._generate_rows(*request, progress if self.is_main else False)
        bar = None
        on_step = None
        if progress is True:
            from tqdm.auto import tqdm

            n = (len(prompts) if isinstance(prompts, (list, tuple)) else 1) * num_images \
                if isinstance(num_images, int) else 0
            bar = tqdm(total=n * self.cfg.decoder.num_tokens if self.cfg.decoder else 0, unit="tok", desc="generate")
            on_step = lambda: bar.update(1)  # noqa: E731
        elif callable(progress):
            on_step = lambda: progress(1)  # noqa: E731
        try:
            handle = self.submit(prompts, num_images, seed=seed, class_ids=class_ids, negative_prompt=negative_prompt,
                                 timeout=timeout, image=image, keep=keep, _on_step=on_step, **sampling)
            return handle.result()
        finally:
            if bar is not None:
                bar.close()

    def submit(self, prompts: Sequence[str] | str | None = None, num_images: int = 1, *, seed=None, class_ids=None,
               negative_prompt=None, timeout: float | None = None,
               on_partial: Callable[[int, torch.Tensor, int], None] | None = None, partial_every: int = 1,
               image=None, keep=None, _on_step: Callable[[], None] | None = None, **sampling) -> RequestHandle:
        """Queue a request (the arguments of :meth:`generate_codes`) and return its
        :class:`~vqim.engine.serving.RequestHandle` at once: ``handle.result()`` or ``await
        handle`` gives the codes ``[n, grid_h, grid_w]``, ``handle.cancel()`` ends it,
        ``handle.progress`` counts its tokens. Every input is checked here, before it is queued.

        ``on_partial(image, codes [grid_h, grid_w], rows)`` is called from the decode loop every
        ``partial_every`` grid rows of each image with the tokens so far (-1 where not yet drawn).
        A full queue raises :class:`~vqim.engine.serving.QueueFullError` at once.
        """
        if not self.continuous_batching:
            raise ValueError("submit needs continuous batching (Engine(continuous_batching=True), tp=1)")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if not isinstance(partial_every, int) or isinstance(partial_every, bool) or partial_every < 1:
            raise ValueError(f"partial_every must be an int >= 1 (grid rows), got {partial_every!r}")
        if on_partial is not None and not callable(on_partial):
            raise ValueError("on_partial must be a callable or None")
        conds, rows, params, seeds, has_uncond, uncond = self._check_request(prompts, num_images, sampling, seed,
                                                                            class_ids, negative_prompt)
        forced = self._kept_tokens(image, keep, len(conds))
        cfg = self.cfg.decoder
        handle = RequestHandle(len(rows), cfg.num_tokens, (cfg.grid_h, cfg.grid_w))
        deadline = None if timeout is None else time.monotonic() + timeout
        partial = None
        if on_partial is not None:
            def partial(index: int, tokens: torch.Tensor, grid_rows: int) -> None:
                grid = torch.full((cfg.num_tokens,), -1, dtype=torch.long)
                grid[: tokens.shape[0]] = tokens
                on_partial(index, grid.view(cfg.grid_h, cfg.grid_w), grid_rows)
        images = []
        for k, (i, j) in enumerate(rows):
            # An image with guidance scale 1 needs no unconditional row.
            guided = has_uncond and params[i].cfg_scale != 1.0
            images.append(ImageRequest(handle, k, conds[i], uncond[i] if guided else None, params[i], seeds[i] + j,
                                       deadline=deadline, on_step=_on_step, on_partial=partial,
                                       partial_every=partial_every if partial else 0,
                                       forced=None if forced is None else forced[i]))
        handle._images = images
        self._get_scheduler().submit(images)
        return handle

    def _reranked(self, prompts, num_images: int, candidates: int, **kwargs):
        """``generate_codes`` with ``candidates`` per image, the best by :meth:`score`: its codes
        ``[P * n, g, g]``, scores ``[P * n]`` and decoded pixels ``[P * n, 3, H, W]``."""
        self._require_scorer("candidates > 1 / return_scores")
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        codes = self.generate_codes(prompts, num_images * candidates, **kwargs)  # (P * N * n, g, g)
        p = len(prompts)
        per_image = [q for q in prompts for _ in range(num_images * candidates)]
        pixels = self.decode_codes(codes, output_type="pt")  # (P * N * n, 3, H, W)
        scores = self.score(pixels, per_image).view(p, candidates, num_images)
        best = scores.argmax(1)  # (P, n): the first best candidate
        rows = torch.arange(p)[:, None]
        cols = torch.arange(num_images)[None, :]

        def pick(t: torch.Tensor) -> torch.Tensor:
            grid = t.view(p, candidates, num_images, *t.shape[1:])
            return grid[rows, best.to(grid.device), cols].reshape(p * num_images, *t.shape[1:])

        return pick(codes), scores.max(1).values.reshape(-1), pick(pixels)

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
        x = self._pixels(images)
        b = x.shape[0]
        if isinstance(prompts, str):
            prompts = [prompts] * b
        if not isinstance(prompts, (list, tuple)) or len(prompts) != b or not all(isinstance(q, str) for q in prompts):
            raise ValueError(f"prompts must be a string or a list of {b} strings (one per image)")
        rows = tokenize(self.tokenizer, prompts)
        scorer = self.model.scorer
        out = []
        with self._lock:
            for sl in _chunks(b, self.max_batch_size):
                ids = torch.stack([i for i, _ in rows[sl]]).to(self.device)
                mask = torch.stack([m for _, m in rows[sl]]).to(self.device)  # (b, L)
                img = scorer.embed_images(x[sl].to(self.device))  # (b, E)
                out.append((img * scorer.embed_text(ids, mask)).sum(-1).cpu())
        return torch.cat(out)

    def _kept_tokens(self, image, keep, n: int) -> list[torch.Tensor] | None:
        """Per request, the tokens ``[grid_h * grid_w]`` image-conditioned generation keeps (-1:
        drawn), from ``image`` and ``keep`` (see :meth:`generate_codes`); None without an image."""
        if image is None and keep is None:
            return None
        if image is None or keep is None:
            raise ValueError("image-conditioned generation needs both image and keep (the tokens to keep)")
        cfg = self.cfg.decoder
        gh, gw = cfg.grid_h, cfg.grid_w
        if self.cfg.vqgan.grid != gh or gh != gw:
            raise ValueError(f"image: the tokenizer's {self.cfg.vqgan.grid} x {self.cfg.vqgan.grid} grid is not the "
                             f"decoder's {gh} x {gw}")
        images = list(image) if isinstance(image, (list, tuple)) else [image] * n
        keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * n
        for name, got in (("image", images), ("keep", keeps)):
            if len(got) != n:
                raise ValueError(f"{name} must be one value or a list of {n} (one per prompt / class id), got {len(got)}")
        masks = []
        for i, k in enumerate(keeps):
            if isinstance(k, int) and not isinstance(k, bool):
                if not 0 <= k <= gh:
                    raise ValueError(f"keep must be a number of top grid rows in [0, {gh}], got {k} at keep[{i}]")
                m = torch.zeros(gh, gw, dtype=torch.bool)
                m[:k] = True
            else:
                m = torch.from_numpy(k) if isinstance(k, np.ndarray) else k
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (gh, gw):
                    raise ValueError(f"keep must be an int (top grid rows) or a bool mask [{gh}, {gw}], got "
                                     f"{type(k).__name__} {tuple(getattr(k, 'shape', ()))} at keep[{i}]")
            masks.append(m.cpu())
        codes = []
        for i, im in enumerate(images):
            if isinstance(im, torch.Tensor) and im.dim() == 3:
                im = im[None]
            try:
                codes.append(self.encode_images(im).cpu())  # (1, g, g)
            except ValueError as e:
                raise ValueError(f"image[{i}]: {e}") from e
            if codes[-1].shape[0] != 1:
                raise ValueError(f"image must be one image per prompt, got {codes[-1].shape[0]} at image[{i}]")
        return [torch.where(m, c[0], -1).flatten() for m, c in zip(masks, codes)]

    async def agenerate_codes(self, prompts=None, num_images: int = 1, **kwargs) -> torch.LongTensor:
        """``await`` form of :meth:`generate_codes` (vLLM's async engine shape): the request joins
        the decode loop's batch; cancelling the awaiting task cancels the request."""
        return await self.submit(prompts, num_images, **kwargs)

    async def agenerate(self, prompts=None, num_images: int = 1, **kwargs) -> list[Image.Image]:
        """``await`` form of :meth:`generate`; the pixels are decoded in a worker thread."""
        codes = await self.agenerate_codes(prompts, num_images, **kwargs)
        return await asyncio.to_thread(self.decode_codes, codes)

    def _get_scheduler(self) -> Scheduler:
        with self._scheduler_lock:
            if self._scheduler is None:
                oom = (f"out of GPU memory in the decode loop ({2 * self.max_batch_size} decoder rows); lower "
                       f"Engine.max_batch_size (now {self.max_batch_size})")
                self._scheduler = Scheduler(self.model, self.tokenizer, self.generator, self.device,
                                            max_rows=2 * self.max_batch_size, max_queue=self.max_queue,
                                            use_cuda_graph=self._use_cuda_graph, oom_message=oom)
            return self._scheduler

    def close(self) -> None:
        """Stop the decode loop; requests still queued or running fail with ``RequestCancelled``."""
        with self._scheduler_lock:
            if self._scheduler is not None:
                self._scheduler.close()
                self._scheduler = None

    def _rank0_seed(self, seed, num_images):
        """``seed`` with rank 0's draw for the unseeded requests: a seed picked per rank would make
        the ranks draw different tokens."""
        if seed is None or (isinstance(seed, (list, tuple)) and any(s is None for s in seed)):
            # num_images is validated later, under agreed(); a bad one draws for one image.
            drawn = from_rank0(draw_seed(num_images if isinstance(num_images, int) and num_images >= 1 else 1),
                               self._tp_group)
            seed = [drawn if s is None else s for s in seed] if isinstance(seed, (list, tuple)) else drawn
        return seed

    def _check_request(self, prompts, num_images, sampling: dict, seed, class_ids, negative_prompt=None) -> tuple:
        """Everything ``generate_codes`` checks before the first decode step: ``(conds, rows, params,
        seeds, has_uncond, uncond)`` for :meth:`_generate_rows` (``uncond``: each request's
        unconditional condition)."""
        self.cfg.require_decoder("generating images")
        conds, has_uncond = self._requests(prompts, class_ids, num_images)
        n = len(conds)
        if negative_prompt is not None and not self.cfg.is_text_to_image:
            raise ValueError("negative_prompt is for text-to-image models; this one takes class ids")
        negatives = _per_request("negative_prompt", "" if negative_prompt is None else negative_prompt, n)
        for i, neg in enumerate(negatives):
            if not isinstance(neg, str):
                raise ValueError(f"negative_prompt must be a string (or one per prompt), got {type(neg).__name__} "
                                 f"at negative_prompt[{i}]")
        unknown = set(sampling) - set(K.SamplingParams.names())
        if unknown:
            raise TypeError(f"unknown sampling settings {sorted(unknown)}; expected among "
                            f"{list(K.SamplingParams.names())}")
        given = {k: _per_request(k, v, n) for k, v in sampling.items()}
        defaults = K.SamplingParams(**self.sampling_defaults)
        # One SamplingParams per request (validated on construction).
        params = [defaults.updated(**{k: v[i] for k, v in given.items()}) for i in range(n)]
        seeds = _per_request("seed", seed, n)
        seeds = [draw_seed(num_images) if s is None else s for s in seeds]
        for i in range(n):
            K.validate_sampling_params(seed=seeds[i])
            if seeds[i] + num_images - 1 > K.MAX_SEED:
                raise ValueError(f"seed must be <= 2**63 - num_images (image j uses seed + j), got {seeds[i]}")
        if self.cfg.is_text_to_image:
            # Every prompt tokenized (and any truncation warned) before the first decode step.
            conds = tokenize(self.tokenizer, conds)
            uncond = tokenize(self.tokenizer, negatives)
        else:
            uncond = [self.model.decoder.null_prefix] * n
        # One row per image.
        rows = [(i, j) for i in range(n) for j in range(num_images)]
        return conds, rows, params, seeds, has_uncond, uncond

    def _decoding(self, decoding: str, sjd_window: int) -> str:
        """``decoding`` checked (and ``sjd_window`` for ``"sjd"``); ``"raster"`` for a wavefront the
        model cannot run, with a warning saying why."""
        check_decoding(decoding)
        if decoding == "raster":
            return decoding
        self.cfg.require_decoder("generating images")
        if self._tp_group is not None:
            raise ValueError(f"decoding={decoding!r} is not supported with tensor parallelism (tp > 1); use 'raster'")
        if decoding == "sjd":
            check_window("sjd_window", sjd_window, self.cfg.decoder.num_tokens)
        why = wavefront_unsupported(self.model.decoder) if decoding == "wavefront" else None
        if why is not None:
            warnings.warn(f"{why}: decoding in raster order instead", stacklevel=3)
            return "raster"
        return decoding

    def _generate_rows(self, conds, rows, params, seeds, has_uncond, uncond, progress, *, decoding: str = "raster",
                       sjd_window: int = 16) -> torch.Tensor:
        """``conds``: one :func:`condition` request per prompt / class id."""
        cfg = self.cfg.decoder
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows) * cfg.num_tokens, unit="tok", desc="generate")
        outs = []
        try:
            for s in range(0, len(rows), self.max_batch_size):
                chunk = rows[s:s + self.max_batch_size]
                b = len(chunk)
                on_step = None
                if bar is not None:
                    on_step = lambda b=b: bar.update(b)  # noqa: E731
                elif callable(progress):
                    on_step = lambda b=b: progress(b)  # noqa: E731
                with self._oom_names_batch("generating", b):
                    outs.append(self._generate_chunk(conds, chunk, params, seeds, has_uncond, uncond, on_step,
                                                     decoding, sjd_window))
        finally:
            if bar is not None:
                bar.close()
        return torch.cat(outs).view(len(rows), cfg.grid_h, cfg.grid_w)

    @torch.no_grad()
    def _generate_chunk(self, conds, chunk, params, seeds, has_uncond, uncond, on_step, decoding: str = "raster",
                        sjd_window: int = 16) -> torch.Tensor:
        dev = self.device
        req = [i for i, _ in chunk]
        guided = has_uncond and any(params[i].cfg_scale != 1.0 for i in req)
        sampling = Sampling(K.SamplingParams.rows([params[i] for i in req], dev),
                            seed=torch.tensor([seeds[i] + j for i, j in chunk], dtype=torch.long, device=dev))
        # On CUDA every batch is padded to max_len, so one captured graph serves all prompts and
        # graph and eager runs compute the same thing.
        pad = self.cfg.text.max_len if self.cfg.is_text_to_image and dev.type == "cuda" else None
        rows = condition(self.model, self.tokenizer, [conds[i] for i in req], guided=guided, pad_to=pad,
                         uncond=[uncond[i] for i in req])
        if decoding == "raster":
            return check_tokens(self.generator.run(*rows, sampling, guided=guided, on_step=on_step))
        dec = self.model.decoder
        if decoding == "wavefront":
            tokens = run_wavefront(dec, rows, sampling, guided=guided)
        else:
            tokens = run_sjd(dec, rows, sampling, guided=guided, window=sjd_window)
        if on_step is not None:
            for _ in range(self.cfg.decoder.num_tokens):
                on_step()
        return check_tokens(tokens)

    def generate(self, prompts: Sequence[str] | str | None = None, num_images: int = 1, *, upscale: bool = False,
                 **kwargs):
        """Images for each prompt (``num_images`` each, request-major): see :meth:`generate_codes`
        (with ``return_scores=True``: ``(images, scores)``). ``upscale=True`` passes them through
        the model's super-resolution module (:meth:`decode_codes`)."""
        self._check_upscale(upscale)
        candidates = kwargs.pop("candidates", 1)
        return_scores = kwargs.pop("return_scores", False)
        _check_candidates(candidates)
        if candidates > 1 or return_scores:
            # The reranker decoded every candidate to score it: the chosen ones' pixels are reused.
            _, scores, pixels = self._reranked(prompts, num_images, candidates, **kwargs)
            with torch.no_grad(), self._lock:
                images = self._output(pixels.split(self.max_batch_size), "pil", upscale)
            return (images, scores) if return_scores else images
        return self.decode_codes(self.generate_codes(prompts, num_images, **kwargs), upscale=upscale)

    def _check_upscale(self, upscale: bool) -> None:
        if not isinstance(upscale, bool):
            raise ValueError(f"upscale must be true or false, got {upscale!r}")
        if upscale and self.model.superres is None:
            raise ValueError(f"upscale needs a model with a super-resolution module (config 'superres'); "
                             f"{self.cfg.name} has none")

    # ------------------------------------------------------------------ tokenizer

    @staticmethod
    def _image_array(i: int, im: Image.Image) -> np.ndarray:
        """One PIL image -> float32 ``[H, W, 3]`` in [0, 1], scaled by its bit depth.

        ``convert("RGB")`` clips 16-bit and float images (everything above 255, or above 0 for
        floats, turns white or black), so those modes are read as they are: ``I;16*`` divided
        by 65535; ``I`` (32-bit) the same when its values fit 16 bits (how PIL opens 16-bit
        PNGs), else rejected; ``F`` taken as is when in [0, 1], else rejected. One channel is
        repeated to RGB. Every other mode goes through ``convert("RGB")`` and is divided by 255.
        """
        if im.mode.startswith("I;16"):
            a = np.asarray(im, dtype=np.float32) / 65535  # (H, W)
        elif im.mode == "I":
            a = np.asarray(im)  # (H, W) int32
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 65535:
                raise ValueError(f"images[{i}] is a 32-bit integer (mode 'I') image with values in [{lo}, {hi}]; "
                                 "only 16-bit values in [0, 65535] are accepted (scaled by 65535)")
            a = a.astype(np.float32) / 65535
        elif im.mode == "F":
            a = np.asarray(im, dtype=np.float32)  # (H, W)
            lo, hi = float(a.min()), float(a.max())
            if not (0.0 <= lo and hi <= 1.0):  # NaN fails both
                raise ValueError(f"images[{i}] is a float (mode 'F') image with values in [{lo:.3g}, {hi:.3g}]; "
                                 "float images must hold values in [0, 1]")
        else:
            try:
                rgb = im.convert("RGB")
            except ValueError as e:
                raise ValueError(f"images[{i}]: PIL cannot convert mode {im.mode!r} to RGB ({e})") from e
            return np.asarray(rgb, dtype=np.float32) / 255  # (H, W, 3)
        return np.repeat(a[:, :, None], 3, axis=2)  # (H, W, 3)

    def _pixels(self, images) -> torch.Tensor:
        """PIL images / uint8 or float ``[B, 3, H, W]`` in [0, 1] -> float pixels (not yet on the
        device: callers move one ``max_batch_size`` chunk at a time)."""
        size = self.cfg.vqgan.image_size
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("images must be a non-empty list")
            arrs = []
            for i, im in enumerate(images):
                if not isinstance(im, Image.Image):
                    raise ValueError(f"images[{i}] must be a PIL image, got {type(im).__name__}")
                if im.size != (size, size):
                    raise ValueError(f"images[{i}] is {im.size[0]}x{im.size[1]}; this tokenizer takes {size}x{size} "
                                     "(resize or crop before encoding)")
                arrs.append(self._image_array(i, im))
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, 3, H, W) float32 in [0, 1]
        elif isinstance(images, torch.Tensor):
            x = images
        else:
            raise ValueError(f"images must be PIL images or a [B, 3, H, W] tensor, got {type(images).__name__}")
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (size, size) or x.shape[0] == 0:
            raise ValueError(f"images must be [B, 3, {size}, {size}] with B >= 1, got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255
        elif x.is_floating_point():
            lo, hi = float(x.min()), float(x.max())
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"float images must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        else:
            raise ValueError(f"images must be uint8 or float, got {x.dtype}")
        return x

    def _encode_chunks(self, x: torch.Tensor, what: str):
        """Codes ``[b, g, g]`` per ``max_batch_size`` images: the device never holds the pixels
        or the tokenizer's activations of more than one chunk. Call under the lock."""
        dtype = self.model.vqgan.enc_patch.weight.dtype
        for sl in _chunks(x.shape[0], self.max_batch_size):
            with self._oom_names_batch(what, sl.stop - sl.start):
                codes = self.model.vqgan.encode(x[sl].to(self.device, dtype))  # (b, g, g)
            yield codes

    @torch.no_grad()
    def encode_images(self, images) -> torch.LongTensor:
        """Images -> tokens ``[B, g, g]`` (PIL images of the tokenizer's size, or a tensor).

        PIL images are read by bit depth: 8-bit modes via ``convert("RGB")`` / 255, ``I;16``
        / 65535, ``I`` / 65535 when in [0, 65535], ``F`` as is when in [0, 1]; other values
        raise ValueError."""
        x = self._pixels(images)
        with self._lock:
            return torch.cat(list(self._encode_chunks(x, "encoding")))

    def _codes(self, codes) -> torch.Tensor:
        """Any integer array or tensor (numpy or torch, any width, signed or not), checked
        against the codebook, as int64 on the device."""
        if isinstance(codes, torch.Tensor) and codes.dtype in (torch.uint16, torch.uint32, torch.uint64):
            # torch has almost no ops for these (not even min/max): check them in numpy.
            codes = codes.cpu().numpy()
        if isinstance(codes, np.ndarray):
            integer = codes.dtype.kind in "iu"
        elif isinstance(codes, torch.Tensor):
            integer = not (codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool)
        else:
            raise ValueError(f"codes must be a LongTensor [B, h, w] or an integer numpy array, "
                             f"got {type(codes).__name__}")
        g = self.cfg.vqgan.grid
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (g, g) or codes.shape[0] == 0:
            raise ValueError(f"codes must be [B, {g}, {g}] with B >= 1, got {tuple(codes.shape)}")
        if not integer:
            raise ValueError(f"codes must be an integer tensor or array, got {codes.dtype}")
        k = self.cfg.vqgan.codebook_size
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"codes must be in [0, {k}) (the codebook size), got values in [{lo}, {hi}]")
        if isinstance(codes, np.ndarray):
            # Values fit int64 now; astype also gives native byte order, which torch requires.
            codes = torch.from_numpy(codes.astype(np.int64))
        return codes.to(self.device, torch.long)

    def _decode_chunks(self, c: torch.Tensor):
        """Pixels ``[b, 3, H, W]`` in [0, 1] per ``max_batch_size`` codes. Call under the lock."""
        for sl in _chunks(c.shape[0], self.max_batch_size):
            with self._oom_names_batch("decoding", sl.stop - sl.start):
                pixels = self.model.vqgan.decode(c[sl])  # (b, 3, H, W) float32
            # A clamp would hide inf as 0 or 1 and an 8-bit cast turns NaN into black.
            if not bool(pixels.isfinite().all()):
                raise FloatingPointError("the image tokenizer's decoder produced non-finite pixels (NaN/inf in its "
                                         "weights or activations)")
            yield pixels.clamp_(0, 1)

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
        c = self._codes(codes)
        with self._lock:
            return self._output(self._decode_chunks(c), output_type, upscale)

    def _output(self, chunks, output_type: str, upscale: bool):
        """Pixel chunks ``[b, 3, H, W]`` in [0, 1] -> what :meth:`decode_codes` returns. Call under the lock."""
        out = []
        for pixels in chunks:
            if upscale:
                pixels = self.model.superres(pixels)  # (b, 3, sH, sW)
            if output_type == "pt":
                out.append(pixels)
                continue
            arr = (pixels * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (b, H, W, 3)
            out += [Image.fromarray(a, mode="RGB") for a in arr]
        return torch.cat(out) if output_type == "pt" else out

    @torch.no_grad()
    def image_features(self, images, layer: int) -> torch.Tensor:
        """Mean over the image tokens of decoder block ``layer``'s output ``[B, W]`` (float32):
        the linear-probe feature (seed §[0102]). The prefix is BOS / null class; a text model
        cross-attends to the empty prompt."""
        n_layers = self.cfg.require_decoder("image_features").layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
            raise ValueError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
        x = self._pixels(images)
        feats = []
        with self._lock:
            for codes in self._encode_chunks(x, "featurizing"):
                b = codes.shape[0]
                with self._oom_names_batch("featurizing", b):
                    null = "" if self.cfg.is_text_to_image else self.model.decoder.null_prefix
                    prefix, memory, mask = condition(self.model, self.tokenizer, [null] * b, guided=False)
                    h = self.model.decoder(prefix, codes.view(b, -1), memory, mask, hidden_layer=layer)  # (b, 1 + n, W)
                    feats.append(h[:, self.cfg.decoder.prefix:].float().mean(dim=1))  # (b, W)
        return torch.cat(feats)
