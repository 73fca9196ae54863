"""``vqim serve``: one engine behind an HTTP server that OpenAI's images API clients (the official
``openai`` package among them) call unchanged.

Endpoints (every error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, its
``param`` the field the check that refused it was checking):

- ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart/form-data, as
  OpenAI's client sends it) -> ``{"created", "data": [{"b64_json"}, ...], "background": "opaque",
  "output_format", "size", "usage"}``. ``usage`` is OpenAI's: ``input_tokens`` (the prompt's and
  ``negative_prompt``'s text token ids, ``input_tokens_details.text_tokens``, plus an edit's image
  tokens, ``image_tokens``: its whole grid), ``output_tokens`` (the image tokens drawn, reranked
  candidates included; an edit's kept tokens are not drawn) and ``total_tokens``.
- OpenAI's fields, with what vqim does with them: ``prompt``; ``n`` (1 to ``--max-n``, 10 by
  default as OpenAI's, and at most the queue); ``size``: ``"auto"`` (the model's own), the model's
  own (``"64x64"`` for the demo model) or, for a model with a super-resolution module, its
  upscaled size (``"256x256"``); ``output_format`` ``png`` / ``jpeg`` / ``webp`` with
  ``output_compression`` 0-100 (PIL's ``quality`` for JPEG and WebP, 100 is lossless WebP; PNG is
  lossless and ignores it); ``background`` ``auto`` / ``opaque`` (``transparent`` is a 400: the
  image tokenizer draws opaque RGB); ``quality`` ``auto`` or ``standard`` (a model draws its one
  way; ``low`` ... ``max`` and ``hd`` are a 400 naming it); ``moderation`` (``auto`` / ``low``),
  ``style`` (``vivid`` / ``natural``) and ``input_fidelity`` (``high`` / ``low``, edits) are
  accepted and change nothing; ``user`` (or ``safety_identifier``) is logged with the request;
  ``partial_images`` 0-3 (see streams); ``response_format`` only ``b64_json`` (no files are
  hosted); ``model`` one of the served names (``--served-model-name``, several allowed; by
  default the model's own name), any other is OpenAI's 404 ``model_not_found``. A field set to
  ``null`` is a field left out.
- vqim's own fields: ``seed``, ``guidance_scale`` (the engine's ``cfg_scale``),
  ``negative_prompt``, ``temperature``, ``top_k``, ``top_p``, ``min_p`` (left out: the model's
  ``generation.json``), ``decoding`` (``auto``, the default: the wavefront where the model runs
  it, else raster; ``raster`` / ``wavefront`` / ``sjd``, with ``sjd_window``),
  ``candidates`` (N images per image, the reranker's best returned; at most ``--max-candidates``,
  ``n * N`` at most the queue; not streamed), ``class_id``. A class-conditional model (LlamaGen)
  takes ``class_id``, or a ``prompt`` that is the class id's decimal form (``"207"``).
- Edits: ``image`` (one PNG, JPEG or WebP file; OpenAI's several reference images are a 400: vqim
  keeps the tokens of one image) is resized to the model's square size (stretched if it is not
  square), encoded to tokens, and the token cells the mask marks are redrawn while the others
  keep the image's own tokens (``Engine.submit(image=, keep=)``). ``mask`` is OpenAI's: a PNG of
  the image's size whose fully transparent pixels (alpha 0) are to be redrawn; a cell is redrawn
  when any pixel over it is. Without a mask the image's own alpha is the mask (OpenAI's first
  edit endpoint's meaning); an image with no transparent pixel and no mask is a 400 (vqim cannot
  redraw a whole image guided by it). The form's text fields take the JSON fields' values as
  text (``"true"``, ``"2"``, vqim's fields included). An upload over ``--max-upload-bytes`` is a
  413, an image over ``--max-image-pixels`` (or a decompression bomb) a 400, before it is decoded.
- ``"stream": true`` answers with server-sent events in OpenAI's shapes: ``partial_images``
  (0-3, by default 0 as OpenAI's) ``image_generation.partial_image`` (``image_edit.*`` for edits)
  events per image, evenly spaced over its grid rows (a fast image may skip some: only the newest
  partial of each image is sent), then one ``image_generation.completed`` event per image with
  its ``usage`` (the request's input, that image's drawn tokens) once the request is drawn. Each
  carries OpenAI's keys (``type``, ``b64_json``, ``created_at``, ``size``, ``quality``,
  ``background``, ``output_format``, ``partial_image_index``) and vqim's ``index`` (the image
  in the request) and, for partials, ``rows`` (grid rows drawn). A partial image is its grid
  decoded with token 0 in place of the tokens not drawn yet, and the pixel rows below the drawn
  grid rows then filled with gray (128, 128, 128). A failure after the stream started is an
  ``error`` event ``{"type": "error", "code", "message", "param", "error": {...}}`` (OpenAI's
  client raises it).
- ``GET /v1/models``: the served names, in OpenAI's list shape.
- ``GET /health``: 200 ``{"status": "ok"}`` once the model is loaded, 503 while it loads.

Status codes: 400 for any bad input (a wrong type, an unknown field, a value out of range, a body
that is not a JSON object or a form, a prompt or ``n`` over the server's limits, an image that
cannot be read or is too large), 404 for a model not served, 413 for a body over the size limit
(by its Content-Length, and by the bytes read: no more than the limit is read), 429 when the
engine's queue is full (retry later), 503 while the model loads, 504 when a request runs past its
timeout, 500 when the model itself fails (no finite logit, non-finite pixels). A request whose
client goes away is cancelled: its images leave the decode loop at the next step.

The engine loads in a background thread when the server starts, so ``/health`` answers (503)
meanwhile. Requests share the engine's decode loop (continuous batching, :mod:`vqim.engine.scheduler`).
Under ``torchrun`` (tensor parallel) rank 0 serves HTTP and the other ranks' loops follow it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.message
import email.parser
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import typing
import warnings
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vqim import kernels as K

from ..parallel import check_decoding, check_window, wavefront_unsupported
from ..requests import tokenize
from ..scheduler import QueueFullError, RequestCancelled
from ..text import check_text
from .factory import engine_from_args

_log = logging.getLogger("vqim.serve")

# How often a waiting request checks whether its client went away.
_POLL_S = 0.1
# OpenAI's most partial images per image in a stream.
_MAX_PARTIALS = 3
# Where a partial image's rows are not drawn yet.
_GRAY = (128, 128, 128)
# output_format -> PIL's format name.
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# The image files an edit may upload (PIL decodes no other format from a client).
_UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
# Parts of one multipart body at most (OpenAI's edit has under 20 fields).
_MAX_PARTS = 64
# Request fields whose engine argument is named otherwise (in engine messages shown to the client).
_ENGINE_NAMES = {"cfg_scale": "guidance_scale", "num_images": "n", "prompts": "prompt", "class_ids": "class_id"}
# The sampling fields, as the request and the engine (SamplingParams) name them.
_SAMPLING = {"guidance_scale": "cfg_scale", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "min_p": "min_p"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a ``vqim serve`` flag."""

    max_prompt_chars: int = 1000
    max_n: int = 10  # OpenAI's most
    max_body_bytes: int = 64 * 1024
    timeout: float = 300.0  # seconds, the engine's per-request ``timeout``
    max_candidates: int = 8  # reranked candidates per image (each is a whole image drawn)
    max_upload_bytes: int = 16 * 1024 * 1024  # an edit's multipart body
    max_image_pixels: int = 4096 * 4096  # an uploaded image's width * height

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_n", "max_body_bytes", "max_candidates", "max_upload_bytes",
                     "max_image_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or not 0 < self.timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


class _ImageRequest(BaseModel):
    """The fields both endpoints take (strict: ``"1"`` is not an int, ``1`` is not a bool; a
    field set to ``null`` is left out, as OpenAI's nullable fields mean)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # OpenAI's fields.
    prompt: str | None = None
    model: str | None = None
    n: int = 1
    size: str = "auto"
    quality: str = "auto"
    background: str = "auto"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = Field(100, ge=0, le=100)
    response_format: str = "b64_json"
    moderation: Literal["auto", "low"] = "auto"
    partial_images: int = Field(0, ge=0, le=_MAX_PARTIALS)
    stream: bool = False
    user: str | None = None
    safety_identifier: str | None = None  # newer clients' name for `user`
    # vqim's.
    class_id: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    decoding: str = "auto"
    sjd_window: int = 16
    candidates: int = 1

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class ImageGenerationRequest(_ImageRequest):
    """The body of ``POST /v1/images/generations``."""

    style: Literal["vivid", "natural"] | None = None  # DALL-E 3's; accepted, changes nothing


class ImageEditRequest(_ImageRequest):
    """The text fields of ``POST /v1/images/edits`` (the files ``image`` and ``mask`` aside)."""

    input_fidelity: Literal["high", "low"] | None = None  # accepted, changes nothing


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


def _bad(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@contextmanager
def _field(param: str):
    """An engine check of one request field: its ValueError is a 400 naming that field."""
    try:
        yield
    except ValueError as e:
        raise _bad(param, _client_names(str(e))) from e


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


@dataclass
class _Job:
    """A checked request: what the engine is asked, and what its answer says."""

    kind: str  # "image_generation" or "image_edit": the stream events' prefix
    body: _ImageRequest
    kwargs: dict  # Engine.submit's arguments (``prompts`` and ``num_images`` among them)
    upscale: bool
    size: str  # the images' "WxH"
    drawn: int  # image tokens drawn per image
    image_tokens: int = 0  # an edit's input image tokens
    text_tokens: int = 0  # set when submitted

    def usage(self, images: int, details: bool = False) -> dict:
        """OpenAI's usage of ``images`` drawn images (and the request's input)."""
        inp, out = self.text_tokens + self.image_tokens, self.drawn * images
        usage = {"input_tokens": inp, "input_tokens_details": {"text_tokens": self.text_tokens,
                                                                "image_tokens": self.image_tokens},
                 "output_tokens": out, "total_tokens": inp + out}
        if details:
            usage["output_tokens_details"] = {"image_tokens": out, "text_tokens": 0}
        return usage


def build_app(engine_factory: Callable[[], Any], *, limits: Limits,
              on_load_error: Callable[[Exception], None] | None = None, api_key: str | None = None,
              model_names: tuple[str, ...] | None = None):
    """The server's app. ``engine_factory()`` builds the :class:`~vqim.engine.api.Engine` in a
    background thread at startup (``on_load_error(e)`` is told if it raises); the engine is
    closed at shutdown. With ``api_key`` every route but ``/health`` needs
    ``Authorization: Bearer <api_key>`` (401 in OpenAI's error shape otherwise). ``model_names``:
    the names a request's ``model`` may give (None: the model's own name)."""
    slot = _EngineSlot(engine_factory, on_load_error)

    def names(engine) -> tuple[str, ...]:
        return tuple(model_names) if model_names else (engine.cfg.name,)

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
        return _validation_api_error(e.errors(), ImageGenerationRequest).response()

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
        return {"object": "list", "data": [{"id": name, "object": "model", "created": slot.loaded_at,
                                            "owned_by": "vqim"} for name in names(engine)]}

    generation_schema = ImageGenerationRequest.model_json_schema()
    edit_schema = ImageEditRequest.model_json_schema()
    edit_schema["properties"] = {"image": {"type": "string", "format": "binary"},
                                 "mask": {"type": "string", "format": "binary"}, **edit_schema["properties"]}
    edit_schema["required"] = ["image", "prompt"]

    @app.post("/v1/images/generations", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": generation_schema}}}})
    async def generations(request: Request) -> Response:
        engine = slot.get()
        body = _parse(await _read_body(request, limits.max_body_bytes))
        _check_model(body, names(engine))
        kwargs = _engine_kwargs(body, engine, limits)
        job = _Job("image_generation", body, kwargs, _upscale(body, engine), _size(body, engine),
                   drawn=engine.cfg.decoder.num_tokens)
        return await _answer(request, engine, job)

    @app.post("/v1/images/edits", openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": edit_schema}}}})
    async def edits(request: Request) -> Response:
        engine = slot.get()
        raw = await _read_body(request, limits.max_upload_bytes)
        fields, files = _multipart(raw, request.headers.get("content-type"))
        body = _parse_form(fields, ImageEditRequest)
        _check_model(body, names(engine))
        kwargs = _engine_kwargs(body, engine, limits)
        image, mask = _edit_files(files)
        image, keep = await asyncio.to_thread(_edit_inputs, engine, image, mask, limits.max_image_pixels)
        cfg = engine.cfg.decoder
        job = _Job("image_edit", body, {**kwargs, "image": image, "keep": keep}, _upscale(body, engine),
                   _size(body, engine), drawn=int((~keep).sum()), image_tokens=cfg.grid_h * cfg.grid_w)
        return await _answer(request, engine, job)

    return app if api_key is None else _KeyRequired(app, api_key)


async def _answer(request: Request, engine, job: _Job) -> Response:
    """A checked job submitted and answered: JSON, or a stream of events."""
    body = job.body
    if body.candidates != 1:
        if body.stream:
            raise _bad("stream", f"stream needs candidates 1 (got {body.candidates}): no image is final before the "
                       "reranking")
        handle = await asyncio.to_thread(_submit, engine, job, num_images=body.n * body.candidates)
        try:
            codes = await _await_or_gone(request, _wait(handle))
            return JSONResponse(await asyncio.to_thread(_reranked_response, engine, codes, job))
        except _ClientGone:
            return Response(status_code=499)
        except Exception as e:
            raise _request_error(e) from e
    if body.stream:
        return await _stream(request, engine, job)
    handle = await asyncio.to_thread(_submit, engine, job)
    try:
        codes = await _await_or_gone(request, _wait(handle))
        return JSONResponse(await asyncio.to_thread(_response, engine, codes, job))
    except _ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": no one reads it
    except Exception as e:
        raise _request_error(e) from e


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
    return _validated(ImageGenerationRequest, data)


def _validated(model: type[_ImageRequest], data: dict) -> _ImageRequest:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_api_error(e.errors(), model) from e


def _validation_api_error(errors: list, model: type[BaseModel]) -> APIError:
    """A pydantic error list as one 400 naming its first field (the field pydantic checked)."""
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        message = f"unknown field {param!r}; the fields are {allowed}"
    elif err.get("type") == "missing":
        message = f"{param} is required"
    else:
        message = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
    return _bad(param, message)


def _multipart(raw: bytes, content_type: str | None) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """A ``multipart/form-data`` body: its text fields (UTF-8) and its files by field name
    (``image[]``, how OpenAI's client names several images, counts as ``image``)."""
    header = email.message.Message()
    header["content-type"] = content_type or ""
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise APIError(400, f"the request body must be multipart/form-data with a boundary (image and mask as "
                       f"files, the other fields as text, as OpenAI's client sends an edit), got Content-Type "
                       f"{content_type!r}", code="invalid_form")
    chunks = (b"\r\n" + raw).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise APIError(400, "the multipart body is not whole: no closing boundary", code="invalid_form")
    parts = chunks[1:-1]
    if len(parts) > _MAX_PARTS:
        raise APIError(400, f"the multipart body has {len(parts)} parts, over the {_MAX_PARTS} an edit may have",
                       code="invalid_form")
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    for part in parts:
        head, sep, content = part.lstrip(b" \t").removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            head, content = b"", head.removeprefix(b"\r\n")  # no headers: the part is unnamed
        headers = email.parser.BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if headers.get_content_disposition() != "form-data" or not isinstance(name, str) or not name:
            raise APIError(400, "every part of the multipart body must be 'Content-Disposition: form-data' with a "
                           "name", code="invalid_form")
        name = name.removesuffix("[]")
        if name in ("image", "mask"):
            files.setdefault(name, []).append(content)
            continue
        if headers.get_filename() is not None:
            raise _bad(name, f"{name} must be a text field, not a file")
        if name in fields:
            raise _bad(name, f"{name} is given twice")
        try:
            fields[name] = content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(name, f"{name} is not UTF-8 text") from e
    return fields, files


def _form_type(model: type[BaseModel], name: str) -> type:
    """The type a form field's text stands for (``str`` for an unknown field: pydantic names it)."""
    field = model.model_fields.get(name)
    if field is None:
        return str
    args = set(typing.get_args(field.annotation)) or {field.annotation}
    return next((t for t in (bool, int, float) if t in args), str)


def _parse_form(fields: dict[str, str], model: type[_ImageRequest]) -> _ImageRequest:
    """A form's text fields as the request model's values (400 naming the field); empty text is
    a field left out (what OpenAI's client sends for ``None``)."""
    data = {}
    for name, text in fields.items():
        kind = _form_type(model, name)
        if text == "":
            continue
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise _bad(name, f"{name} must be true or false, got {text[:40]!r}")
            data[name] = text.lower() == "true"
        elif kind is int:
            if not re.fullmatch(r"[+-]?[0-9]{1,30}", text):
                raise _bad(name, f"{name} must be an integer, got {text[:40]!r}")
            data[name] = int(text)
        elif kind is float:
            try:
                value = float(text)
            except ValueError as e:
                raise _bad(name, f"{name} must be a number, got {text[:40]!r}") from e
            if not math.isfinite(value):
                raise _bad(name, f"{name} must be a finite number, got {text[:40]!r}")
            data[name] = value
        else:
            data[name] = text
    return _validated(model, data)


def _check_model(body: _ImageRequest, names: tuple[str, ...]) -> None:
    if body.model is not None and body.model not in names:
        raise APIError(404, f"The model {body.model!r} does not exist here: this server serves "
                       f"{', '.join(map(repr, names))} (vqim serve --served-model-name)", param="model",
                       code="model_not_found")


def _engine_kwargs(body: _ImageRequest, engine, limits: Limits) -> dict:
    """``Engine.submit``'s arguments of a request. Every field is checked here, each by the check
    of its own (the engine's where it has one), so a refusal names the field it checked."""
    sizes = list(_sizes(engine))
    if body.size != "auto" and body.size not in sizes:
        raise _bad("size", f"size must be 'auto' or one of {sizes} (the model's own, and upscaled where the model has "
                   f"a super-resolution module), got {body.size!r}")
    if body.response_format != "b64_json":
        raise _bad("response_format", f"response_format must be 'b64_json' (images are returned inline; none are "
                   f"hosted), got {body.response_format!r}")
    if body.quality not in ("auto", "standard"):
        raise _bad("quality", f"quality must be 'auto' (or 'standard'): {engine.cfg.name} draws every image the one "
                   f"way it does, at no other quality; got {body.quality!r}", code="unsupported_value")
    if body.background not in ("auto", "opaque"):
        why = ("the image tokenizer draws opaque RGB images, with no alpha channel" if body.background == "transparent"
               else "the choices are 'auto' and 'opaque'")
        raise _bad("background", f"background must be 'auto' or 'opaque' ({why}), got {body.background!r}",
                   code="unsupported_value" if body.background == "transparent" else "invalid_value")
    # More images than the engine's queue holds would be refused (429) however long the client waited.
    max_n = min(limits.max_n, engine.max_queue)
    if not 1 <= body.n <= max_n:
        raise _bad("n", f"n must be in [1, {max_n}], got {body.n}")
    if body.candidates != 1:
        # Each candidate is a whole image drawn: the cap, and the queue, count them.
        most = min(limits.max_candidates, engine.max_queue // body.n)
        if not 1 <= body.candidates <= most:
            raise _bad("candidates", f"candidates must be in [1, {most}] (at most {limits.max_candidates}, and n * "
                       f"candidates at most the queue's {engine.max_queue} images), got {body.candidates}")
        if engine.model.scorer is None:
            raise _bad("candidates", f"candidates > 1 needs a model with a scorer (a reranker); {engine.cfg.name} has "
                       "none")
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text is not None:
            if len(text) > limits.max_prompt_chars:
                raise _bad(name, f"{name} must be at most {limits.max_prompt_chars} characters, got {len(text)}")
            with _field(name):
                check_text(name, text)
    if body.negative_prompt is not None and not engine.cfg.is_text_to_image:
        raise _bad("negative_prompt", f"negative_prompt is for text-to-image models; {engine.cfg.name} takes class ids")
    condition = _condition(body, engine)
    sampling = {}
    for field, name in _SAMPLING.items():
        value = getattr(body, field)
        if value is not None:
            with _field(field):
                K.validate_sampling_params(**{name: value})
            sampling[name] = value
    if body.seed is not None:
        with _field("seed"):
            K.validate_sampling_params(seed=body.seed)
        last = body.seed + body.n * body.candidates - 1
        if last > K.MAX_SEED:
            raise _bad("seed", f"seed must be at most 2**63 - 1 - {body.n * body.candidates - 1} (image j draws with "
                       f"seed + j), got {body.seed}")
    with _field("decoding"):
        check_decoding(body.decoding)
    if body.decoding == "sjd":
        with _field("sjd_window"):
            check_window("sjd_window", body.sjd_window, engine.cfg.decoder.num_tokens)
    if engine.kv_cache == "ring" and (body.decoding == "sjd" or (
            body.decoding == "wavefront" and wavefront_unsupported(engine.model.decoder) is None)):
        raise _bad("decoding", f"decoding {body.decoding!r} needs the plain KV cache; this server's engine keeps a "
                   "ring: use 'raster'")
    return {**condition, "num_images": body.n, "seed": body.seed, "negative_prompt": body.negative_prompt,
            "timeout": limits.timeout, "decoding": body.decoding, "sjd_window": body.sjd_window, **sampling}


def _condition(body: _ImageRequest, engine) -> dict:
    """What a request draws: a text model's ``prompt``; a class-conditional model's class, from
    ``class_id`` (vqim's extension field) or from ``prompt`` holding its decimal form, so that
    clients that always send a prompt (OpenAI's) can ask for a class; an unconditional model's
    nothing."""
    cfg = engine.cfg
    if cfg.is_text_to_image:
        if body.class_id is not None:
            raise _bad("class_id", f"class_id is for class-conditional models; {cfg.name} takes a prompt")
        if body.prompt is None or not body.prompt.strip():
            raise _bad("prompt", "prompt must not be empty")
        return {"prompts": body.prompt}
    classes = cfg.decoder.num_classes
    if classes == 0:
        if body.class_id is not None or (body.prompt or "").strip():
            raise _bad("prompt", f"{cfg.name} is unconditional: leave out prompt and class_id")
        return {"prompts": None}
    cid = body.class_id
    if body.prompt is not None and body.prompt.strip():
        text = body.prompt.strip()
        if not re.fullmatch(r"[0-9]{1,7}", text):
            raise _bad("prompt", f"{cfg.name} is class-conditional: give class_id (an int in [0, {classes})), or a "
                       f"prompt that is one, got prompt {body.prompt[:40]!r}")
        if cid is not None and cid != int(text):
            raise _bad("class_id", f"prompt {text!r} and class_id {cid} name different classes")
        cid = int(text)
    if cid is None:
        raise _bad("class_id", f"class_id is required: {cfg.name} draws ImageNet-style classes, an int in "
                   f"[0, {classes})")
    if not 0 <= cid < classes:
        raise _bad("class_id", f"class_id must be in [0, {classes}), got {cid}")
    return {"prompts": None, "class_ids": [cid]}


def _sizes(engine) -> dict[str, bool]:
    """The sizes a request may ask for, each with whether it is upscaled (``Engine.decode_codes``)."""
    side = engine.cfg.vqgan.image_size
    sizes = {f"{side}x{side}": False}
    if engine.model.superres is not None:
        big = side * engine.model.superres.cfg.scale
        sizes[f"{big}x{big}"] = True
    return sizes


def _upscale(body: _ImageRequest, engine) -> bool:
    return body.size != "auto" and _sizes(engine)[body.size]


def _size(body: _ImageRequest, engine) -> str:
    return next(iter(_sizes(engine))) if body.size == "auto" else body.size


def _client_names(message: str) -> str:
    """An engine error message with its argument names as the request spells them."""
    return re.sub(r"\b(" + "|".join(_ENGINE_NAMES) + r")\b", lambda m: _ENGINE_NAMES[m.group(1)], message)


# ---------------------------------------------------------------------------------- edits


def _edit_files(files: dict[str, list[bytes]]) -> tuple[bytes, bytes | None]:
    """An edit's one image and its mask (or None)."""
    images, masks = files.get("image", []), files.get("mask", [])
    if not images:
        raise _bad("image", "image is required: the image to edit, a PNG, JPEG or WebP file")
    if len(images) > 1:
        raise _bad("image", f"image must be one file, got {len(images)}: OpenAI's model composes several reference "
                   "images into one, while vqim redraws part of one image's tokens and keeps the rest")
    if len(masks) > 1:
        raise _bad("mask", f"mask must be one file, got {len(masks)}")
    return images[0], masks[0] if masks else None


def _open_upload(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded PNG, JPEG or WebP, decoded; its size is checked before its pixels are (a
    decompression bomb is a 400, not an out-of-memory error)."""
    try:
        im = Image.open(io.BytesIO(data), formats=_UPLOAD_FORMATS)
        w, h = im.size
        if w * h > max_pixels:
            raise _bad(name, f"{name} is {w}x{h} pixels, over the {max_pixels} this server decodes "
                       "(--max-image-pixels)", code="image_too_large")
        im.load()
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise _bad(name, f"{name} is too large to decode ({e})", code="image_too_large") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _bad(name, f"{name} is not a PNG, JPEG or WebP image PIL can read ({e})", code="invalid_image") from e
    return im


def _alpha(im: Image.Image) -> np.ndarray | None:
    """The image's alpha ``[H, W]`` (uint8), or None where it has none."""
    if "A" not in im.getbands() and "transparency" not in im.info:
        return None
    return np.asarray(im.convert("RGBA"))[..., 3]


def _rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB (16-bit grayscale scaled down, not clipped)."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def _cells(redraw: np.ndarray, grid: int) -> np.ndarray:
    """The token cells ``[grid, grid]`` over which any pixel of ``redraw [H, W]`` is set (a cell
    covers the pixels it overlaps, at least one)."""
    def spans(n: int) -> list[tuple[int, int]]:
        return [(i * n // grid, max(i * n // grid + 1, -(-(i + 1) * n // grid))) for i in range(grid)]

    rows = np.stack([redraw[a:b].any(axis=0) for a, b in spans(redraw.shape[0])])  # (grid, W)
    return np.stack([rows[:, a:b].any(axis=1) for a, b in spans(redraw.shape[1])], axis=1)  # (grid, grid)


def _edit_inputs(engine, image_data: bytes, mask_data: bytes | None, max_pixels: int):
    """The image at the model's size and the cells to keep ``[g, g]`` (True: keep; run in a thread)."""
    image = _open_upload("image", image_data, max_pixels)
    if mask_data is None:
        alpha, what = _alpha(image), "image"
        if alpha is None or not (alpha == 0).any():
            raise _bad("mask", "mask is required unless the image has fully transparent pixels (alpha 0) marking "
                       "what to redraw: vqim redraws the token cells a mask marks and keeps the others (it cannot "
                       "redraw a whole image guided by it)")
    else:
        mask, what = _open_upload("mask", mask_data, max_pixels), "mask"
        if mask.size != image.size:
            raise _bad("mask", f"mask must have the image's size, {image.width}x{image.height}, got "
                       f"{mask.width}x{mask.height}")
        alpha = _alpha(mask)
        if alpha is None:
            raise _bad("mask", f"mask must have an alpha channel (its fully transparent pixels are redrawn); it is a "
                       f"{mask.mode} image without one")
    redraw = _cells(alpha == 0, engine.cfg.decoder.grid_h)
    if not redraw.any():
        raise _bad("mask", f"the {what} has no fully transparent pixel (alpha 0): nothing to redraw (OpenAI's masks "
                   "mark the areas to redraw with alpha 0, not with black)")
    side = engine.cfg.vqgan.image_size
    rgb = _rgb(image)
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), Image.Resampling.LANCZOS)
    return rgb, torch.from_numpy(~redraw)


# ---------------------------------------------------------------------------------- the engine


def _submit(engine, job: _Job, num_images: int | None = None, **extra):
    """``engine.submit`` of a job (run in a thread: an edit's image is encoded here), its
    refusals as API errors (429 queue full; 400 for a refusal no field check caught, which
    names no field); counts the job's text tokens."""
    kwargs = dict(job.kwargs)
    prompt, n = kwargs.pop("prompts"), kwargs.pop("num_images")
    try:
        handle = engine.submit(prompt, num_images or n, **kwargs, **extra)
    except QueueFullError as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from e
    except (ValueError, TypeError) as e:
        raise _bad(None, _client_names(str(e))) from e
    job.text_tokens = _text_tokens(engine, job)
    user = job.body.safety_identifier or job.body.user
    if user:
        _log.info("%s: %d image(s) for user %r", job.kind, num_images or n, user[:200])
    return handle


def _text_tokens(engine, job: _Job) -> int:
    """The text token ids the model reads for a request: its prompt's and negative prompt's."""
    if not engine.cfg.is_text_to_image or engine.tokenizer is None:
        return 0
    texts = [t for t in (job.body.prompt, job.body.negative_prompt) if t is not None]
    return sum(int(mask.sum()) for _, mask in tokenize(engine.tokenizer, texts))


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


def _encode(image: Image.Image, body: _ImageRequest) -> str:
    """An image in the request's ``output_format``, base64."""
    buf = io.BytesIO()
    fmt = _FORMATS[body.output_format]
    if fmt == "PNG":
        image.save(buf, format=fmt)
    elif fmt == "JPEG":
        image.save(buf, format=fmt, quality=body.output_compression)
    else:
        image.save(buf, format=fmt, quality=body.output_compression, lossless=body.output_compression == 100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _answer_json(job: _Job, b64s: list[str]) -> dict:
    """OpenAI's ImagesResponse (``quality`` left out: OpenAI's response lists no ``auto``)."""
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in b64s], "background": "opaque",
            "output_format": job.body.output_format, "size": job.size,
            "usage": job.usage(len(b64s) * job.body.candidates, details=True)}


def _response(engine, codes, job: _Job) -> dict:
    """The JSON answer of finished codes ``[n, h, w]`` (decoded and encoded: run in a thread)."""
    images = engine.decode_codes(codes, upscale=job.upscale)
    return _answer_json(job, [_encode(im, job.body) for im in images])


def _reranked_response(engine, codes, job: _Job) -> dict:
    """The JSON answer of a request's candidates ``[n * N, h, w]``: the scorer's best of each image
    (``Engine.rerank``), decoded and encoded (run in a thread)."""
    body = job.body
    _, _, pixels = engine.rerank(codes, [body.prompt], body.n, body.candidates)
    images = engine.to_images(pixels, upscale=job.upscale)
    return _answer_json(job, [_encode(im, body) for im in images])


def _partial_b64(engine, grid, rows: int, job: _Job) -> str:
    """A partial image: the grid ``[h, w]`` (-1 where not drawn yet) decoded with token 0 in
    place of the tokens still to come, then the pixel rows of the grid rows not drawn yet filled
    with gray, so the client sees the drawn rows and nothing it could mistake for content below."""
    image = engine.decode_codes(grid.clamp(min=0)[None], upscale=job.upscale)[0]
    top = rows * image.height // grid.shape[0]
    if top < image.height:
        image.paste(_GRAY, (0, top, image.width, image.height))
    return _encode(image, job.body)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _event_data(job: _Job, kind: str, b64: str, index: int) -> dict:
    """OpenAI's keys of a stream event (``quality`` is ``auto``: the one quality served), and vqim's ``index``."""
    return {"type": f"{job.kind}.{kind}", "b64_json": b64, "created_at": int(time.time()), "size": job.size,
            "quality": "auto", "background": job.body.background, "output_format": job.body.output_format,
            "index": index}


async def _stream(request: Request, engine, job: _Job) -> StreamingResponse:
    """The server-sent events of one job; it is submitted here, before the response starts, so
    that a refusal (400, 429) is an HTTP status, not an event."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    finished = object()
    wanted = job.body.partial_images

    def on_partial(index: int, grid, rows: int) -> None:  # on the decode loop's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, grid, rows))
        except RuntimeError:
            pass  # the event loop is closed (server shutdown): no one is listening

    grid_h = engine.cfg.decoder.grid_h
    # `wanted` partials evenly spaced over the grid rows: every ceil(grid_h / (wanted + 1)) rows.
    extra = {"on_partial": on_partial, "partial_every": max(1, -(-grid_h // (wanted + 1)))} if wanted else {}
    handle = await asyncio.to_thread(_submit, engine, job, **extra)
    result = asyncio.ensure_future(_wait(handle))
    result.add_done_callback(lambda _: events.put_nowait(finished))

    async def body():
        sent: dict[int, int] = {}  # partial images sent per image
        try:
            while True:
                got = [await _await_or_gone(request, events.get())]
                while not events.empty():
                    got.append(events.get_nowait())
                # Only the newest partial of each image: a slow client or decode skips stale ones.
                latest = {item[0]: item for item in got if item is not finished}
                for index, grid, rows in latest.values():
                    if rows < grid_h and sent.get(index, 0) < wanted:  # the whole image comes `completed`
                        b64 = await asyncio.to_thread(_partial_b64, engine, grid, rows, job)
                        data = _event_data(job, "partial_image", b64, index)
                        yield _event(data["type"], {**data, "partial_image_index": sent.get(index, 0), "rows": rows})
                        sent[index] = sent.get(index, 0) + 1
                if finished in got:
                    break
            codes = result.result()
            images = await asyncio.to_thread(engine.decode_codes, codes, upscale=job.upscale)
            for index, image in enumerate(images):
                b64 = await asyncio.to_thread(_encode, image, job.body)
                data = _event_data(job, "completed", b64, index)
                yield _event(data["type"], {**data, "usage": job.usage(1)})
        except _ClientGone:
            return
        except Exception as e:  # noqa: BLE001 (told to the client as an event: the status is already sent)
            error = _request_error(e).body()["error"]
            # OpenAI's error event (type, code, message, param), and the `error` object its client raises.
            yield _event("error", {"type": "error", "code": error["code"], "message": error["message"],
                                   "param": error["param"], "error": error})
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


def warn_if_exposed(host: str, api_key: str | None) -> None:
    """The warning of a server bound beyond this machine with no API key."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if api_key is None and not loopback:
        warnings.warn(f"serving on {host}, beyond this machine, with no API key: anyone who can reach the port "
                      "can generate (set --api-key or VQIM_API_KEY)", stacklevel=3)


def serve_flags(args: argparse.Namespace) -> tuple[Limits, tuple[str, ...], str | None]:
    """``vqim serve``'s flags (and ``vqim serve --ray``'s), checked by their flag names before
    anything is loaded or bound: its limits, the names it serves, its API key (or None)."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_queue", "max_batch_size", "max_prompt_chars", "max_n", "max_body_bytes", "max_candidates",
                 "max_upload_bytes", "max_image_pixels"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    names = tuple(args.served_model_name or ())
    for name in names:
        if not name.strip():
            raise ValueError("--served-model-name must not be empty")
    if len(set(names)) != len(names):
        raise ValueError(f"--served-model-name gives a name twice: {list(names)}")
    if not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("VQIM_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key must not be empty (leave it out to serve without a key)")
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                    timeout=args.timeout, max_candidates=args.max_candidates, max_upload_bytes=args.max_upload_bytes,
                    max_image_pixels=args.max_image_pixels)
    return limits, names, api_key


def main(args: argparse.Namespace) -> None:
    """Run the server until SIGINT/SIGTERM. A model that fails to load stops it, and its error is raised."""
    limits, names, api_key = serve_flags(args)
    if int(os.environ.get("RANK", "0")) != 0:
        # Tensor parallel under torchrun: rank 0 serves HTTP; this rank's decode loop runs rank 0's
        # requests in lock-step until rank 0's engine closes.
        _engine(args).join()
        return
    warn_if_exposed(args.host, api_key)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    failed: list[Exception] = []
    server: uvicorn.Server | None = None

    def stop(e: Exception) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = build_app(lambda: _engine(args), limits=limits, on_load_error=stop, api_key=api_key,
                    model_names=names or None)
    if not _log.handlers:  # the requests' `user`, beside uvicorn's lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
        _log.propagate = False
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    print(f"vqim serve: loading the model; http://{args.host}:{port}/health answers 200 once it is ready",
          file=sys.stderr)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        raise failed[0]
