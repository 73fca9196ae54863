"""``vqim serve``: one engine behind an HTTP server in the shape of OpenAI's images API.

Endpoints (JSON; every error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /v1/images/generations``: ``{"prompt": str, "n": 1, "size": "WxH", "response_format":
  "b64_json", "seed", "guidance_scale", "negative_prompt", "temperature", "top_k", "top_p",
  "min_p", "model", "stream": false}`` -> ``{"created": unix time, "data": [{"b64_json": PNG}, ...]}``.
  A text model requires ``prompt``; a class-conditional one (LlamaGen) takes ``"class_id"`` (an
  extension field), or a ``prompt`` that is the class id's decimal form (``"207"``: what an
  OpenAI client, which always sends a prompt, can say); ``size`` may only be the model's own (``"64x64"`` for the demo
  model) or, for a model with a super-resolution module, its upscaled size (``"256x256"``:
  the images pass through it), ``response_format`` only ``"b64_json"`` (no files are hosted), ``model`` only the
  served model's name, ``guidance_scale`` is the engine's ``cfg_scale``; a setting left out takes
  the model's recommendation (``generation.json``). ``"stream": true`` answers with server-sent
  events instead: ``event: partial_image`` with ``{"index", "rows", "b64_json"}`` as grid rows are
  drawn, then ``event: done`` with the response above, or ``event: error`` with the error body.
  A partial image is its grid decoded with token 0 in place of the tokens not drawn yet, and
  the pixel rows below the drawn grid rows then filled with gray (128, 128, 128).
  ``"decoding": "raster" | "wavefront" | "sjd"`` (and ``"sjd_window"``) picks the engine's
  decoding (each runs in the decode loop beside the other requests, and streams).
  ``"candidates": N`` (at most ``--max-candidates``, and ``n * N`` at most the queue) draws N
  images per image and returns the reranker's best (``Engine.rerank``); it does not stream: no
  image is final before the reranking.
- ``GET /v1/models``: the served model, in OpenAI's list shape.
- ``GET /health``: 200 ``{"status": "ok"}`` once the model is loaded, 503 while it loads.

Status codes: 400 for any bad input (a wrong type, an unknown field, a value out of range, a body
that is not a JSON object, a prompt or ``n`` over the server's limits), 413 for a body over the
size limit (by its Content-Length, and by the bytes read: no more than the limit is read), 429
when the engine's queue is full (retry later), 503 while the model loads, 504 when a request runs
past its timeout, 500 when the model itself fails (no finite logit, non-finite pixels). A request
whose client goes away is cancelled: its images leave the decode loop at the next step.

The engine loads in a background thread when the server starts, so ``/health`` answers (503)
meanwhile. Requests share the engine's decode loop (continuous batching, :mod:`vqim.engine.scheduler`).
Under ``torchrun`` (tensor parallel) rank 0 serves HTTP and the other ranks' loops follow it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import hmac
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..scheduler import QueueFullError, RequestCancelled
from .factory import engine_from_args

# How often a waiting request checks whether its client went away.
_POLL_S = 0.1
# Partial images per image in a stream, at most (each one is a decode of the whole grid).
_PARTIALS = 8
# Where a partial image's rows are not drawn yet.
_GRAY = (128, 128, 128)
# Request fields whose engine argument is named otherwise (engine errors are renamed for the client).
_ENGINE_NAMES = {"cfg_scale": "guidance_scale", "num_images": "n", "prompts": "prompt", "class_ids": "class_id"}
_PARAMS = ("prompt", "class_id", "n", "seed", "negative_prompt", "guidance_scale", "temperature", "top_k", "top_p", "min_p",
           "decoding", "sjd_window", "candidates")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a ``vqim serve`` flag."""

    max_prompt_chars: int = 1000
    max_n: int = 8
    max_body_bytes: int = 64 * 1024
    timeout: float = 300.0  # seconds, the engine's per-request ``timeout``
    max_candidates: int = 8  # reranked candidates per image (each is a whole image drawn)

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_n", "max_body_bytes", "max_candidates"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or not 0 < self.timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


class ImageGenerationRequest(BaseModel):
    """The body of ``POST /v1/images/generations`` (strict: ``"1"`` is not an int, ``1`` is not a bool)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = None
    class_id: int | None = None
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    seed: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    model: str | None = None
    stream: bool = False
    decoding: str = "raster"
    sjd_window: int = 16
    candidates: int = 1


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _KeyRequired:
    """ASGI middleware: ``Authorization: Bearer <key>`` on every HTTP route but ``/health`` (which
    load balancers probe), as OpenAI's API checks its keys; 401 ``invalid_api_key`` otherwise."""

    def __init__(self, app, key: str):
        self.app = app
        self._want = f"Bearer {key}".encode()

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(got, self._want):
            return await self.app(scope, receive, send)
        error = APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with "
                         "the key this server was started with", code="invalid_api_key")
        await error.response()(scope, receive, send)


class _ClientGone(Exception):
    """The HTTP client disconnected while its request waited."""


class _EngineSlot:
    """The engine, loaded in a background thread: ``get()`` it, or an :class:`APIError` 503."""

    def __init__(self, factory: Callable[[], Any], on_load_error: Callable[[Exception], None] | None):
        self._factory, self._on_load_error = factory, on_load_error
        self.engine = None
        self.error: Exception | None = None
        self.loaded_at = 0

    def load(self) -> None:
        try:
            engine = self._factory()
        except Exception as e:  # noqa: BLE001 (reported by /health and to the server, which stops)
            self.error = e
            if self._on_load_error is not None:
                self._on_load_error(e)
            return
        self.loaded_at = int(time.time())
        self.engine = engine

    def get(self):
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            raise APIError(503, f"the model failed to load: {self.error}", type="server_error",
                           code="model_load_failed")
        raise APIError(503, "the model is loading; retry shortly", type="server_error", code="model_loading",
                       headers={"Retry-After": "1"})


def build_app(engine_factory: Callable[[], Any], *, limits: Limits,
              on_load_error: Callable[[Exception], None] | None = None, api_key: str | None = None):
    """The server's app. ``engine_factory()`` builds the :class:`~vqim.engine.api.Engine` in a
    background thread at startup (``on_load_error(e)`` is told if it raises); the engine is
    closed at shutdown. With ``api_key`` every route but ``/health`` needs
    ``Authorization: Bearer <api_key>`` (401 in OpenAI's error shape otherwise)."""
    slot = _EngineSlot(engine_factory, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=slot.load, name="vqim-serve-load", daemon=True).start()
        try:
            yield
        finally:
            if slot.engine is not None:
                slot.engine.close()

    app = FastAPI(title="vqim", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_api_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        return _request_error(e).response()

    @app.get("/health")
    async def health() -> dict:
        slot.get()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        engine = slot.get()
        return {"object": "list", "data": [{"id": engine.cfg.name, "object": "model", "created": slot.loaded_at,
                                            "owned_by": "vqim"}]}

    schema = ImageGenerationRequest.model_json_schema()

    @app.post("/v1/images/generations", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}})
    async def generations(request: Request) -> Response:
        engine = slot.get()
        body = _parse(await _read_body(request, limits.max_body_bytes))
        kwargs = _engine_kwargs(body, engine, limits)
        upscale = _upscale(body, engine)
        if body.candidates != 1:
            if body.stream:
                raise APIError(400, f"stream needs candidates 1 (got {body.candidates}): no image is final before "
                               "the reranking", param="stream", code="invalid_value")
            handle = _submit(engine, {**kwargs, "num_images": body.n * body.candidates})
            try:
                codes = await _await_or_gone(request, _wait(handle))
                return JSONResponse(await asyncio.to_thread(_reranked_response, engine, codes, body, upscale))
            except _ClientGone:
                return Response(status_code=499)
            except Exception as e:
                raise _request_error(e) from e
        if not body.stream:
            handle = _submit(engine, kwargs)
            try:
                codes = await _await_or_gone(request, _wait(handle))
                return JSONResponse(await asyncio.to_thread(_response, engine, codes, upscale))
            except _ClientGone:
                return Response(status_code=499)  # nginx's "client closed request": no one reads it
            except Exception as e:
                raise _request_error(e) from e
        return _stream(request, engine, kwargs, upscale)

    return app if api_key is None else _KeyRequired(app, api_key)


# ---------------------------------------------------------------------------------- the request


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read to at most ``limit`` bytes (413 past it, by Content-Length or by count)."""
    too_big = APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"Content-Length must be a number of bytes, got {length!r}")
        if int(length) > limit:
            raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise APIError(400, "the client disconnected before its request body was whole", code="incomplete_body") from e
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse(raw: bytes) -> ImageGenerationRequest:
    """The request body, validated (400 naming the field)."""
    try:
        # NaN and Infinity are not JSON (Python's parser takes them by default).
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body must be a JSON object: {e}", code="invalid_json") from e
    except RecursionError as e:
        raise APIError(400, "the request body must be a JSON object, not arrays or objects nested this deep",
                       code="invalid_json") from e
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(data), "null")
        raise APIError(400, f"the request body must be a JSON object, got a JSON {kind}", code="invalid_json")
    try:
        return ImageGenerationRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_api_error(e.errors()) from e


def _validation_api_error(errors: list) -> APIError:
    """A pydantic error list as one 400 naming its first field."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        allowed = ", ".join(ImageGenerationRequest.model_fields)
        message = f"unknown field {param!r}; the fields are {allowed}"
    elif err.get("type") == "missing":
        message = f"{param} is required"
    else:
        message = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
    return APIError(400, message, param=param, code="invalid_value")


def _engine_kwargs(body: ImageGenerationRequest, engine, limits: Limits) -> dict:
    """``Engine.submit``'s arguments of a request; the limits and the fields the engine does not
    know (size, response_format, model) are checked here."""
    sizes = list(_sizes(engine))
    if body.size is not None and body.size not in sizes:
        raise APIError(400, f"size must be one of {sizes} (the model's own, and upscaled where the model has a "
                       f"super-resolution module), got {body.size!r}", param="size", code="invalid_value")
    if body.response_format != "b64_json":
        raise APIError(400, f"response_format must be 'b64_json' (images are returned inline; none are hosted), "
                       f"got {body.response_format!r}", param="response_format", code="invalid_value")
    if body.model is not None and body.model != engine.cfg.name:
        raise APIError(400, f"model must be {engine.cfg.name!r} (the model served here), got {body.model!r}",
                       param="model", code="model_not_found")
    # More images than the engine's queue holds would be refused (429) however long the client waited.
    max_n = min(limits.max_n, engine.max_queue)
    if not 1 <= body.n <= max_n:
        raise APIError(400, f"n must be in [1, {max_n}], got {body.n}", param="n", code="invalid_value")
    if body.candidates != 1:
        # Each candidate is a whole image drawn: the cap, and the queue, count them.
        most = min(limits.max_candidates, engine.max_queue // body.n)
        if not 1 <= body.candidates <= most:
            raise APIError(400, f"candidates must be in [1, {most}] (at most {limits.max_candidates}, and n * "
                           f"candidates at most the queue's {engine.max_queue} images), got {body.candidates}",
                           param="candidates", code="invalid_value")
        if engine.model.scorer is None:
            raise APIError(400, f"candidates > 1 needs a model with a scorer (a reranker); {engine.cfg.name} has none",
                           param="candidates", code="invalid_value")
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise APIError(400, f"{name} must be at most {limits.max_prompt_chars} characters, got {len(text)}",
                           param=name, code="invalid_value")
    sampling = {"cfg_scale": body.guidance_scale, "temperature": body.temperature, "top_k": body.top_k,
                "top_p": body.top_p, "min_p": body.min_p}
    return {**_condition(body, engine), "num_images": body.n, "seed": body.seed,
            "negative_prompt": body.negative_prompt, "timeout": limits.timeout, "decoding": body.decoding,
            "sjd_window": body.sjd_window, **{k: v for k, v in sampling.items() if v is not None}}


def _condition(body: ImageGenerationRequest, engine) -> dict:
    """What a request draws: a text model's ``prompt``; a class-conditional model's class, from
    ``class_id`` (vqim's extension field) or from ``prompt`` holding its decimal form, so that
    clients that always send a prompt (OpenAI's) can ask for a class; an unconditional model's
    nothing."""
    cfg = engine.cfg
    if cfg.is_text_to_image:
        if body.class_id is not None:
            raise APIError(400, f"class_id is for class-conditional models; {cfg.name} takes a prompt",
                           param="class_id", code="invalid_value")
        if body.prompt is None or not body.prompt.strip():
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        return {"prompts": body.prompt}
    classes = cfg.decoder.num_classes
    if classes == 0:
        if body.class_id is not None or (body.prompt or "").strip():
            raise APIError(400, f"{cfg.name} is unconditional: leave out prompt and class_id", param="prompt",
                           code="invalid_value")
        return {"prompts": None}
    cid = body.class_id
    if body.prompt is not None and body.prompt.strip():
        text = body.prompt.strip()
        if not re.fullmatch(r"[0-9]{1,7}", text):
            raise APIError(400, f"{cfg.name} is class-conditional: give class_id (an int in [0, {classes})), or a "
                           f"prompt that is one, got prompt {body.prompt[:40]!r}", param="prompt", code="invalid_value")
        if cid is not None and cid != int(text):
            raise APIError(400, f"prompt {text!r} and class_id {cid} name different classes", param="class_id",
                           code="invalid_value")
        cid = int(text)
    if cid is None:
        raise APIError(400, f"class_id is required: {cfg.name} draws ImageNet-style classes, an int in [0, {classes})",
                       param="class_id", code="invalid_value")
    if not 0 <= cid < classes:
        raise APIError(400, f"class_id must be in [0, {classes}), got {cid}", param="class_id", code="invalid_value")
    return {"prompts": None, "class_ids": [cid]}


def _sizes(engine) -> dict[str, bool]:
    """The sizes a request may ask for, each with whether it is upscaled (``Engine.decode_codes``)."""
    side = engine.cfg.vqgan.image_size
    sizes = {f"{side}x{side}": False}
    if engine.model.superres is not None:
        big = side * engine.model.superres.cfg.scale
        sizes[f"{big}x{big}"] = True
    return sizes


def _upscale(body: ImageGenerationRequest, engine) -> bool:
    return body.size is not None and _sizes(engine)[body.size]


def _client_names(message: str) -> str:
    """An engine error message with its argument names as the request spells them."""
    return re.sub(r"\b(" + "|".join(_ENGINE_NAMES) + r")\b", lambda m: _ENGINE_NAMES[m.group(1)], message)


def _submit(engine, kwargs: dict, **extra):
    """``engine.submit``, its refusals as API errors (400 naming the field, 429 queue full)."""
    kwargs = dict(kwargs)
    prompt, n = kwargs.pop("prompts"), kwargs.pop("num_images")
    try:
        return engine.submit(prompt, n, **kwargs, **extra)
    except QueueFullError as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from e
    except (ValueError, TypeError) as e:
        raise _invalid(e) from e


def _reranked_response(engine, codes, body: ImageGenerationRequest, upscale: bool) -> dict:
    """The JSON answer of a request's candidates ``[n * N, h, w]``: the scorer's best of each image
    (``Engine.rerank``), decoded and PNG-encoded (run in a thread)."""
    _, _, pixels = engine.rerank(codes, [body.prompt], body.n, body.candidates)
    images = engine.to_images(pixels, upscale=upscale)
    return {"created": int(time.time()), "data": [{"b64_json": _png_b64(im)} for im in images]}


def _invalid(e: Exception) -> APIError:
    """A refused argument as a 400 naming the request field."""
    message = _client_names(str(e))
    named = [(message.find(p), p) for p in _PARAMS if re.search(rf"\b{p}\b", message)]
    return APIError(400, message, param=min(named)[1] if named else None, code="invalid_value")


def _request_error(e: Exception) -> APIError:
    """How a submitted request's failure is answered."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, FloatingPointError):
        return APIError(500, f"the model failed on this request: {e}", type="server_error", code="model_fault")
    if isinstance(e, TimeoutError):
        return APIError(504, f"the request ran past its timeout: {e}", type="server_error", code="timeout")
    if isinstance(e, RequestCancelled):
        return APIError(503, f"the request was cancelled: {e}", type="server_error", code="cancelled")
    return APIError(500, f"{type(e).__name__}: {e}", type="server_error", code="internal_error")


async def _wait(handle):
    return await handle


async def _await_or_gone(request: Request, aw) -> Any:
    """``aw``'s result, checking every ``_POLL_S`` that the client is still there (else
    :class:`_ClientGone`); ``aw`` is cancelled if it has not finished (a handle's wait cancels
    its request)."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone
    finally:
        task.cancel()


# ---------------------------------------------------------------------------------- the answer


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _response(engine, codes, upscale: bool) -> dict:
    """The JSON answer of finished codes ``[n, h, w]`` (decoded and PNG-encoded: run in a thread)."""
    images = engine.decode_codes(codes, upscale=upscale)
    return {"created": int(time.time()), "data": [{"b64_json": _png_b64(im)} for im in images]}


def _partial_png(engine, grid, rows: int, upscale: bool) -> str:
    """A partial image: the grid ``[h, w]`` (-1 where not drawn yet) decoded with token 0 in
    place of the tokens still to come, then the pixel rows of the grid rows not drawn yet filled
    with gray, so the client sees the drawn rows and nothing it could mistake for content below."""
    image = engine.decode_codes(grid.clamp(min=0)[None], upscale=upscale)[0]
    top = rows * image.height // grid.shape[0]
    if top < image.height:
        image.paste(_GRAY, (0, top, image.width, image.height))
    return _png_b64(image)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _stream(request: Request, engine, kwargs: dict, upscale: bool) -> StreamingResponse:
    """The server-sent events of one request; it is submitted here, so that a refusal (400, 429)
    is an HTTP status, not an event."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    finished = object()

    def on_partial(index: int, grid, rows: int) -> None:  # on the decode loop's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, grid, rows))
        except RuntimeError:
            pass  # the event loop is closed (server shutdown): no one is listening

    grid_h = engine.cfg.decoder.grid_h
    handle = _submit(engine, kwargs, on_partial=on_partial, partial_every=max(1, -(-grid_h // _PARTIALS)))
    result = asyncio.ensure_future(_wait(handle))
    result.add_done_callback(lambda _: events.put_nowait(finished))

    async def body():
        try:
            while True:
                got = [await _await_or_gone(request, events.get())]
                while not events.empty():
                    got.append(events.get_nowait())
                # Only the newest partial of each image: a slow client or decode skips stale ones.
                latest = {item[0]: item for item in got if item is not finished}
                for index, grid, rows in latest.values():
                    if rows < grid_h:  # the whole image comes with `done`
                        b64 = await asyncio.to_thread(_partial_png, engine, grid, rows, upscale)
                        yield _event("partial_image", {"index": index, "rows": rows, "b64_json": b64})
                if finished in got:
                    break
            yield _event("done", await asyncio.to_thread(_response, engine, result.result(), upscale))
        except _ClientGone:
            return
        except Exception as e:  # noqa: BLE001 (told to the client as an event: the status is already sent)
            yield _event("error", _request_error(e).body())
        finally:
            handle.cancel()
            result.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------- the command


def _engine(args: argparse.Namespace):
    """The engine of the model flags (:mod:`.factory`), with the server's queue and batch sizes."""
    eng = engine_from_args(args, max_queue=args.max_queue, max_batch_size=args.max_batch_size)
    eng.cfg.require_decoder("vqim serve")
    return eng


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, made before the model loads: a port in use fails
    here, in one line naming it, not in uvicorn after the load (nor with the load's thread still
    inside torch when the process ends)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine can bind ({e.strerror})") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (--host/--port): {e.strerror}") from e
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(args: argparse.Namespace) -> None:
    """Run the server until SIGINT/SIGTERM. A model that fails to load stops it, and its error is raised."""
    # The flags checked before anything is loaded or bound, by their flag names.
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_queue", "max_batch_size", "max_prompt_chars", "max_n", "max_body_bytes", "max_candidates"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("VQIM_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key must not be empty (leave it out to serve without a key)")
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                    timeout=args.timeout, max_candidates=args.max_candidates)
    if int(os.environ.get("RANK", "0")) != 0:
        # Tensor parallel under torchrun: rank 0 serves HTTP; this rank's decode loop runs rank 0's
        # requests in lock-step until rank 0's engine closes.
        _engine(args).join()
        return
    if api_key is None and not _loopback(args.host):
        warnings.warn(f"serving on {args.host}, beyond this machine, with no API key: anyone who can reach the port "
                      "can generate (set --api-key or VQIM_API_KEY)", stacklevel=2)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    failed: list[Exception] = []
    server: uvicorn.Server | None = None

    def stop(e: Exception) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = build_app(lambda: _engine(args), limits=limits, on_load_error=stop, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    print(f"vqim serve: loading the model; http://{args.host}:{port}/health answers 200 once it is ready",
          file=sys.stderr)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise failed[0]
