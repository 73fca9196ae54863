"""``vqim serve`` (engine/serve.py): a real uvicorn process on a free port of 127.0.0.1, driven
over HTTP with the standard library, serving the bundled demo model (64x64 images).

What a client sees: images equal to what ``Engine.generate`` draws in-process for the same seed,
the stream's partial images and its final images in OpenAI's event shapes, every kind of bad input
as a 400 (404 for a model not served, 413 for a body over the limit) in OpenAI's error shape, 429
when the queue is full, 503 while the model loads, and a server that goes on after a client walks
away mid-request. The official ``openai`` client against the same server: its generate, edit and
stream calls, every standard field, its own types parsing every answer and event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPT = "a large red circle in the center"
SEED = 7
# The server's limits in these tests (small, so the limit cases are cheap to send).
MAX_N, MAX_PROMPT, MAX_BODY = 4, 50, 2048
# An edit's upload and image limits on the test server, and the names it serves.
MAX_UPLOAD, MAX_PIXELS = 64 * 1024, 512 * 512
NAMES = ("shapes-demo", "gpt-image-1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # One intra-op thread: the server's many small ops on a shared 2-core machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _serve_cmd(*flags: str) -> list[str]:
    return [sys.executable, "-m", "vqim.train.main", "serve", *flags]


class Server:
    def __init__(self, port: int, proc: subprocess.Popen | None, log=None):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = proc
        self._log = log  # the server's output (a file: a pipe no one reads would block it once full)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def request(self, method: str, path: str, body=None, *, timeout: float = 60, headers: dict | None = None):
        """``(status, headers, body bytes)``; an HTTP error status is returned, not raised."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def generate(self, **body):
        return self.request("POST", "/v1/images/generations", body)


def _start(*flags: str) -> Server:
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(_serve_cmd("--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *flags),
                            env=_env(), stdout=log, stderr=subprocess.STDOUT)
    server = Server(port, proc, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vqim serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if server.request("GET", "/health", timeout=5)[0] == 200:
                return server
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    _stop(server)
    raise AssertionError("vqim serve did not answer /health with 200 within 90 s")


def _stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    if server._log is not None:
        server._log.close()
    elif server.proc.stdout is not None:
        server.proc.stdout.close()


@pytest.fixture(scope="module")
def server():
    s = _start("--max-batch-size", "2", "--max-n", str(MAX_N), "--max-prompt-chars", str(MAX_PROMPT),
               "--max-body-bytes", str(MAX_BODY), "--max-upload-bytes", str(MAX_UPLOAD), "--max-image-pixels",
               str(MAX_PIXELS), "--served-model-name", *NAMES)
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def generated(server):
    """The answer to the reference request (n=2, seed SEED)."""
    status, headers, body = server.generate(prompt=PROMPT, n=2, seed=SEED, size="64x64")
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    return json.loads(body)


def _png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def _assert_error(status: int, body: bytes, want_status: int, param=None) -> dict:
    assert status == want_status, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param in err["message"], err
    return err


def test_health_and_models(server):
    status, _, body = server.request("GET", "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200
    models = json.loads(body)
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == list(NAMES)
    assert all(m["object"] == "model" for m in models["data"])


def test_generation_matches_the_engine(server, generated, one_torch_thread):
    from vqim.engine import Engine

    assert isinstance(generated["created"], int) and abs(generated["created"] - time.time()) < 600
    assert (generated["output_format"], generated["size"], generated["background"]) == ("png", "64x64", "opaque")
    # 8 text token ids (the demo's tokenizer), 16 x 16 image tokens drawn per image.
    assert generated["usage"] == {"input_tokens": 8, "input_tokens_details": {"text_tokens": 8, "image_tokens": 0},
                                  "output_tokens": 512, "total_tokens": 520,
                                  "output_tokens_details": {"image_tokens": 512, "text_tokens": 0}}
    images = [_png(d["b64_json"]) for d in generated["data"]]
    assert len(images) == 2
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert images[0].tobytes() != images[1].tobytes()

    status, _, body = server.generate(prompt=PROMPT, n=2, seed=SEED)
    assert status == 200
    assert json.loads(body)["data"] == generated["data"]  # the same seed: the same bytes

    # The same settings in-process (the server's batch size: the same rows per step).
    eng = Engine.from_pretrained(device="cpu", max_batch_size=2)
    try:
        want = eng.generate(PROMPT, 2, seed=SEED)
    finally:
        eng.close()
    for got, exp in zip(images, want):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))


def test_parallel_decodings(server, generated):
    # The bundled model has fully causal layers: a wavefront request decodes in raster order (the
    # server logs why) and gets the raster images.
    status, _, body = server.generate(prompt=PROMPT, n=2, seed=SEED, decoding="wavefront")
    assert status == 200, body
    assert json.loads(body)["data"] == generated["data"]
    status, _, body = server.generate(prompt=PROMPT, n=2, seed=SEED, decoding="sjd", sjd_window=8)
    assert status == 200, body
    sjd = json.loads(body)["data"]
    assert len(sjd) == 2 and all(_png(d["b64_json"]).size == (64, 64) for d in sjd)
    status, _, again = server.generate(prompt=PROMPT, n=2, seed=SEED, decoding="sjd", sjd_window=8)
    assert json.loads(again)["data"] == sjd  # the same seed: the same images
    # In the decode loop like any request: it streams.
    status, _, raw = server.generate(prompt=PROMPT, n=2, seed=SEED, decoding="sjd", sjd_window=8, stream=True,
                                     partial_images=3)
    events = _events(raw)
    assert status == 200 and _completed(events) == [d["b64_json"] for d in sjd]
    assert any(name == "image_generation.partial_image" for name, _ in events)


def test_reranked_candidates(server, one_torch_thread):
    """candidates: the reranker's best of N, as ``Engine.generate(..., candidates=N)`` picks it."""
    from vqim.engine import Engine

    status, _, body = server.generate(prompt=PROMPT, n=2, seed=SEED, candidates=3)
    assert status == 200, body
    got = [np.asarray(_png(d["b64_json"])) for d in json.loads(body)["data"]]
    eng = Engine.from_pretrained(device="cpu", max_batch_size=2)
    try:
        want = eng.generate(PROMPT, 2, seed=SEED, candidates=3)
    finally:
        eng.close()
    assert len(got) == 2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w))


def test_upscaled_size(server, one_torch_thread):
    """size 256x256: the bundled model's images through its super-resolution module, as
    ``Engine.generate(upscale=True)`` draws them in-process."""
    from vqim.engine import Engine

    status, _, body = server.generate(prompt=PROMPT, n=2, seed=SEED, size="256x256")
    assert status == 200, body
    images = [_png(d["b64_json"]) for d in json.loads(body)["data"]]
    assert all(im.size == (256, 256) for im in images)
    eng = Engine.from_pretrained(device="cpu", max_batch_size=2)
    try:
        want = eng.generate(PROMPT, 2, seed=SEED, upscale=True)
    finally:
        eng.close()
    for got, exp in zip(images, want):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
    status, _, raw = server.generate(prompt=PROMPT, seed=SEED, size="256x256", stream=True, partial_images=1)
    events = _events(raw)
    assert [name for name, _ in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert all(_png(data["b64_json"]).size == (256, 256) and data["size"] == "256x256" for _, data in events)


def _events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(fields["data"])
        assert data["type"] == fields["event"]  # OpenAI's client reads the type from the data
        out.append((fields["event"], data))
    return out


def _completed(events, kind: str = "image_generation") -> list[str]:
    """The completed images of a stream (its last events, one per image, in order)."""
    done = [data for name, data in events if name == f"{kind}.completed"]
    assert [d["index"] for d in done] == list(range(len(done)))
    assert [name for name, _ in events[-len(done):]] == [f"{kind}.completed"] * len(done)
    return [d["b64_json"] for d in done]


def test_stream(server, generated):
    status, headers, raw = server.generate(prompt=PROMPT, n=2, seed=SEED, stream=True, partial_images=3)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = _events(raw)
    assert _completed(events) == [d["b64_json"] for d in generated["data"]]
    partials = [data for name, data in events if name == "image_generation.partial_image"]
    assert partials and len(partials) == len(events) - 2
    for i in (0, 1):
        mine = [p for p in partials if p["index"] == i]
        # At most 3 (the newest of each image only), numbered in order, evenly spaced: rows 4, 8, 12.
        assert [p["partial_image_index"] for p in mine] == list(range(len(mine))) and len(mine) <= 3
        assert {p["rows"] for p in mine} <= {4, 8, 12}
    for p in partials:
        assert (p["size"], p["quality"], p["background"], p["output_format"]) == ("64x64", "auto", "auto", "png")
        assert abs(p["created_at"] - time.time()) < 600
        im = np.asarray(_png(p["b64_json"]))
        assert im.shape == (64, 64, 3)
        assert (im[p["rows"] * 4:] == 128).all()  # rows not drawn yet: gray
    for _, data in events[-2:]:
        assert data["usage"] == {"input_tokens": 8, "input_tokens_details": {"text_tokens": 8, "image_tokens": 0},
                                 "output_tokens": 256, "total_tokens": 264}
    # OpenAI's default: no partial image, the images alone.
    status, _, raw = server.generate(prompt=PROMPT, n=2, seed=SEED, stream=True)
    assert [name for name, _ in _events(raw)] == ["image_generation.completed"] * 2


def test_stream_refusal_is_a_status(server):
    status, _, raw = server.request("POST", "/v1/images/generations", {"prompt": PROMPT, "stream": True, "top_k": -1})
    _assert_error(status, raw, 400, "top_k")  # refused before the stream starts: a status, not an event


BAD = [
    ({"prompt": PROMPT, "size": "32x32"}, "size"),
    ({"prompt": PROMPT, "size": "1024x1024"}, "size"),
    ({"prompt": PROMPT, "response_format": "url"}, "response_format"),
    ({"prompt": PROMPT, "quality": "hd"}, "quality"),
    ({"prompt": PROMPT, "quality": "high"}, "quality"),
    ({"prompt": PROMPT, "background": "transparent"}, "background"),
    ({"prompt": PROMPT, "background": "white"}, "background"),
    ({"prompt": PROMPT, "output_format": "gif"}, "output_format"),
    ({"prompt": PROMPT, "output_compression": 101}, "output_compression"),
    ({"prompt": PROMPT, "output_compression": "50"}, "output_compression"),
    ({"prompt": PROMPT, "partial_images": 4}, "partial_images"),
    ({"prompt": PROMPT, "partial_images": -1}, "partial_images"),
    ({"prompt": PROMPT, "moderation": "none"}, "moderation"),
    ({"prompt": PROMPT, "style": "bold"}, "style"),
    ({"prompt": PROMPT, "user": 7}, "user"),
    ({"prompt": PROMPT, "input_fidelity": "high"}, "input_fidelity"),  # an edit's field
    ({"prompt": PROMPT, "size": "64X64"}, "size"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "n": MAX_N + 1}, "n"),
    ({"prompt": "x" * (MAX_PROMPT + 1)}, "prompt"),
    ({"prompt": PROMPT, "negative_prompt": "x" * (MAX_PROMPT + 1)}, "negative_prompt"),
    ({"prompt": ""}, "prompt"),
    ({"n": 1}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": PROMPT, "n": "2"}, "n"),
    ({"prompt": PROMPT, "n": 1.5}, "n"),
    ({"prompt": PROMPT, "n": True}, "n"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "seed": "1"}, "seed"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
    ({"prompt": PROMPT, "seed": 2**64}, "seed"),
    ({"prompt": PROMPT, "seed": 2**63 - 1, "n": 2}, "seed"),  # image 1 would draw with seed 2**63
    ({"prompt": PROMPT, "top_k": 1.5}, "top_k"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "guidance_scale": 1e39}, "guidance_scale"),
    ({"prompt": PROMPT, "guidance_scale": [1]}, "guidance_scale"),
    ({"prompt": PROMPT, "decoding": "jacobi"}, "decoding"),
    ({"prompt": PROMPT, "decoding": "sjd", "sjd_window": 0}, "sjd_window"),
    ({"prompt": PROMPT, "decoding": "sjd", "sjd_window": "4"}, "sjd_window"),
    ({"prompt": PROMPT, "candidates": 0}, "candidates"),
    ({"prompt": PROMPT, "candidates": 2, "stream": True}, "stream"),
    # Capped like n (the default --max-candidates is 8), before anything is allocated.
    ({"prompt": PROMPT, "candidates": 10**12}, "candidates"),
    ({"prompt": PROMPT, "candidates": 9}, "candidates"),
    # Lone surrogates (JSON's "\ud800") never reach the tokenizer.
    ({"prompt": "a red \ud800 circle"}, "prompt"),
    ({"prompt": PROMPT, "negative_prompt": "blue \ud800"}, "negative_prompt"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_request(server, body, param):
    status, _, raw = server.generate(**body)
    _assert_error(status, raw, 400, param)


def test_standard_fields_are_accepted(server, generated):
    """Every field of OpenAI's generate call, with the values vqim honours (``null``: left out)."""
    for body in ({"model": "gpt-image-1", "quality": "auto", "background": "opaque", "moderation": "low",
                  "output_format": "png", "output_compression": 100, "partial_images": 2, "response_format": "b64_json",
                  "size": "auto", "stream": False, "style": "vivid", "user": "user-1"},
                 {"model": "shapes-demo", "quality": "standard", "background": "auto", "style": "natural",
                  "safety_identifier": "user-2"},
                 {"model": None, "quality": None, "background": None, "moderation": None, "size": None,
                  "output_format": None, "output_compression": None, "partial_images": None, "style": None,
                  "stream": None, "response_format": None, "user": None}):
        status, _, raw = server.generate(prompt=PROMPT, n=2, seed=SEED, **body)
        assert status == 200, (body, raw)
        assert json.loads(raw)["data"] == generated["data"], body
    status, _, raw = server.generate(prompt=PROMPT, n=None, seed=SEED)  # OpenAI's default, 1
    assert status == 200 and json.loads(raw)["data"] == generated["data"][:1]


def test_unknown_model_is_404(server):
    status, _, raw = server.generate(prompt=PROMPT, model="dall-e-3")
    err = _assert_error(status, raw, 404, "model")
    assert err["code"] == "model_not_found" and "gpt-image-1" in err["message"]


@pytest.mark.parametrize("raw", [b"not json", b"", b"[1, 2]", b'"a prompt"', b'{"prompt": "x", "seed": NaN}',
                                 b"\xff\xfe", b'{"prompt": "x"',
                                 b"[" * 1000 + b"]" * 1000])
def test_body_not_a_json_object(server, raw):
    status, _, body = server.request("POST", "/v1/images/generations", raw,
                                     headers={"Content-Type": "application/json"})
    _assert_error(status, body, 400)


def test_body_over_the_limit(server):
    big = json.dumps({"prompt": "x", "negative_prompt": "y" * MAX_BODY}).encode()
    status, _, body = server.request("POST", "/v1/images/generations", big)  # by Content-Length
    _assert_error(status, body, 413)
    # Chunked, no Content-Length: counted as it is read.
    status, _, body = server.request("POST", "/v1/images/generations", iter([big[:1000], big[1000:]]))
    _assert_error(status, body, 413)
    assert server.request("GET", "/health")[0] == 200


def test_unknown_route_and_method(server):
    status, _, body = server.request("GET", "/v1/nothing")
    _assert_error(status, body, 404)
    status, _, body = server.request("GET", "/v1/images/generations")
    _assert_error(status, body, 405)


def _walk_away(server: Server, body: dict) -> None:
    """Send a request and close the connection before the answer is whole: a non-streamed one
    while it is drawn, a streamed one after its first partial image."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
    if body.get("stream"):
        r = conn.getresponse()
        assert r.status == 200
        assert r.readline() == b"event: image_generation.partial_image\n"
    else:
        time.sleep(0.5)
    conn.close()


def test_client_disconnect(server, generated):
    _walk_away(server, {"prompt": PROMPT, "n": MAX_N, "seed": 1})
    _walk_away(server, {"prompt": PROMPT, "n": MAX_N, "seed": 1, "stream": True, "partial_images": 3})
    status, _, body = server.generate(prompt=PROMPT, n=2, seed=SEED)
    assert status == 200
    assert json.loads(body)["data"] == generated["data"]


def test_queue_full():
    s = _start("--max-queue", "1", "--max-batch-size", "1")
    try:
        # n beyond the queue could never be queued: a bad request, not "retry later".
        _assert_error(*s.generate(prompt=PROMPT, n=2)[::2], 400, "n")
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: s.generate(prompt=PROMPT, seed=i), range(6)))
        statuses = sorted(a[0] for a in answers)
        assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}, statuses
        for status, headers, body in answers:
            if status == 429:
                assert _assert_error(status, body, 429)["code"] == "queue_full"
                assert headers["Retry-After"]
            else:
                assert len(json.loads(body)["data"]) == 1
    finally:
        _stop(s)


class _Stub:
    """An engine stand-in for the loading states (never asked to draw)."""

    closed = False

    def close(self):
        self.closed = True


@contextlib.contextmanager
def _in_process(factory):
    """A uvicorn server of ``build_app(factory)`` on a thread of this process (to reach inside it)."""
    import uvicorn

    from vqim.engine.entrypoints.serve import Limits, build_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(factory, limits=Limits()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield Server(port, None)
    finally:
        server.should_exit = True
        t.join(30)


def _wait_health(client: Server) -> None:
    deadline = time.monotonic() + 60
    while client.request("GET", "/health")[0] != 200:
        assert time.monotonic() < deadline, "no 200 from /health"
        time.sleep(0.05)


def test_loading_answers_503_then_200():
    release = threading.Event()
    stub = _Stub()

    def factory():
        release.wait(30)
        return stub

    try:
        with _in_process(factory) as client:
            for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/images/generations"),
                                 ("POST", "/v1/images/edits")]:
                status, headers, body = client.request(method, path, {"prompt": PROMPT} if method == "POST" else None)
                assert _assert_error(status, body, 503)["code"] == "model_loading"
                assert headers["Retry-After"]
            release.set()
            _wait_health(client)
    finally:
        release.set()
    assert stub.closed  # the engine is closed at shutdown


class _Recording:
    """An engine that keeps the handle of every request submitted to it; ``steps`` counts the
    decode loop's steps."""

    def __init__(self, engine):
        self.engine, self.handles = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    @property
    def steps(self) -> int:
        return self.engine.scheduler.stats.steps

    def submit(self, *args, **kwargs):
        self.handles.append(self.engine.submit(*args, **kwargs))
        return self.handles[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_the_request(stream, one_torch_thread):
    from vqim.engine import Engine
    from vqim.engine.scheduler import RequestCancelled

    # One image per step: the 8 images take far longer than the walk-away.
    engine = _Recording(Engine.from_pretrained(device="cpu", max_batch_size=1))
    with _in_process(lambda: engine) as client:
        _wait_health(client)
        _walk_away(client, {"prompt": PROMPT, "n": 8, "seed": 1, "stream": stream, "partial_images": 3})
        (handle,) = engine.handles
        deadline = time.monotonic() + 30
        while not handle.done():
            assert time.monotonic() < deadline, "the request went on after its client left"
            time.sleep(0.05)
        # Cancelled: by the awaiting task (the future) or by the handle (the loop's RequestCancelled).
        assert handle.future.cancelled() or isinstance(handle.future.exception(), RequestCancelled)
        time.sleep(0.3)  # the step in flight when it was cancelled may still count its image
        drawn = engine.steps
        time.sleep(0.5)
        # Its images left the decode loop: no step since, and far fewer than its 8 images' (one at a time).
        assert 0 < engine.steps == drawn < 8 * engine.cfg.decoder.num_tokens
        assert client.generate(prompt=PROMPT, seed=SEED)[0] == 200


class _FailingHandle:
    """A request that fails with ``error`` a moment after it is awaited."""

    def __init__(self, error: Exception):
        self.error = error

    def __await__(self):
        return self._fail().__await__()

    async def _fail(self):
        await asyncio.sleep(0.05)
        raise self.error

    def cancel(self):
        return False


class _FailingEngine:
    """An engine stand-in whose every request fails with ``error``."""

    cfg = types.SimpleNamespace(name="stub", vqgan=types.SimpleNamespace(image_size=64),
                                decoder=types.SimpleNamespace(grid_h=16, grid_w=16, num_tokens=256),
                                is_text_to_image=True)
    model = types.SimpleNamespace(superres=None)
    max_queue = 8
    kv_cache = "plain"
    tokenizer = None

    def __init__(self, error: Exception):
        self.error = error

    def submit(self, prompt, n, **kwargs):
        return _FailingHandle(self.error)

    def close(self):
        pass


@pytest.mark.parametrize("error,status,code", [
    (FloatingPointError("a decode step produced no finite logit"), 500, "model_fault"),
    (TimeoutError("the request did not finish within its timeout"), 504, "timeout"),
])
def test_request_failures(error, status, code):
    with _in_process(lambda: _FailingEngine(error)) as client:
        _wait_health(client)
        got, _, body = client.generate(prompt=PROMPT)
        err = _assert_error(got, body, status)
        assert err["code"] == code and str(error) in err["message"]
        # Streamed: the status is sent before the failure, which comes as an `error` event.
        got, _, raw = client.generate(prompt=PROMPT, stream=True)
        assert got == 200
        ((name, data),) = _events(raw)
        assert name == "error" and data["error"]["code"] == code and str(error) in data["error"]["message"]
        assert (data["code"], data["message"]) == (code, data["error"]["message"])
        # OpenAI's client raises it.
        openai = pytest.importorskip("openai")
        with pytest.raises(openai.APIError, match=str(error)):
            list(_client(client).images.generate(prompt=PROMPT, stream=True))


def test_load_failure_stops_the_server():
    """A model that fails to load: the server stops, and the command fails with one line."""
    r = subprocess.run(_serve_cmd("--port", str(_free_port()), "--model", "/nonexistent/model"), env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("vqim: error:")]
    assert len(errors) == 1 and "/nonexistent/model" in errors[0], r.stderr


@pytest.mark.parametrize("flags,error", [
    (("--max-n", "0"), "--max-n must be >= 1, got 0"),
    (("--served-model-name", "a", "a"), "--served-model-name gives a name twice: ['a', 'a']"),
])
def test_bad_flag_exits_2_before_serving(flags, error):
    r = subprocess.run(_serve_cmd("--port", str(_free_port()), *flags), env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"vqim: error: {error}"]


def test_without_the_serve_extra(tmp_path):
    """Where fastapi cannot be imported, `vqim serve` says which extra to install, in one line."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'fastapi':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(_serve_cmd("--port", str(_free_port())), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["vqim: error: vqim serve needs the serve extra: pip install 'vqim[serve]'"]


# ----------------------------------------------------------------------------- round two (issue 25)


class _FullEngine(_FailingEngine):
    """An engine stand-in whose queue is always full (and which has a reranker)."""

    model = types.SimpleNamespace(superres=None, scorer=object())

    def submit(self, prompt, n, **kwargs):
        from vqim.engine.scheduler import QueueFullError

        raise QueueFullError("the request queue is full (8 images waiting, max_queue=8); retry later")


def test_a_full_queue_is_429_on_every_path():
    with _in_process(lambda: _FullEngine(None)) as client:
        _wait_health(client)
        for body in ({"prompt": PROMPT}, {"prompt": PROMPT, "candidates": 2}, {"prompt": PROMPT, "stream": True},
                     {"prompt": PROMPT, "decoding": "sjd"}):
            status, headers, raw = client.generate(**body)
            assert _assert_error(status, raw, 429)["code"] == "queue_full", body
            assert headers["Retry-After"]


def test_nan_weights_are_a_model_fault_in_every_decoding(one_torch_thread):
    from vqim.engine import Engine

    eng = Engine.from_preset("tiny-t2i", device="cpu")
    with torch.no_grad():
        eng.model.decoder.head.weight.fill_(float("nan"))
    with _in_process(lambda: eng) as client:
        _wait_health(client)
        for decoding in ("raster", "wavefront", "sjd"):
            status, _, raw = client.generate(prompt=PROMPT, seed=1, decoding=decoding)
            err = _assert_error(status, raw, 500)
            assert err["code"] == "model_fault" and "no finite logit" in err["message"], (decoding, err)


def _reader(proc: subprocess.Popen):
    """The lines ``proc`` prints, as a queue a test can wait on with a deadline."""
    import queue

    lines: queue.Queue = queue.Queue()

    def pump():
        for line in iter(proc.stdout.readline, b""):
            lines.put(line.decode())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _line(lines, pattern: str, limit: float = 90.0) -> str:
    import queue
    import re

    deadline = time.monotonic() + limit
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


def test_port_zero_prints_the_port_it_bound_and_the_api_key_guards_every_route_but_health():
    proc = subprocess.Popen(_serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--api-key", "s3cret"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = _line(_reader(proc), r"http://127\.0\.0\.1:\d+/health")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port != 0
        server = Server(port, proc)
        deadline = time.monotonic() + 90
        while server.request("GET", "/health", timeout=5)[0] != 200:  # /health needs no key
            assert time.monotonic() < deadline
            time.sleep(0.2)
        key = {"Authorization": "Bearer s3cret"}
        for path in ("/v1/models", "/docs", "/openapi.json"):
            status, _, raw = server.request("GET", path)
            assert _assert_error(status, raw, 401)["code"] == "invalid_api_key", path
            status, _, raw = server.request("GET", path, headers={"Authorization": "Bearer wrong"})
            assert status == 401, path
            assert server.request("GET", path, headers=key)[0] == 200, path
        status, _, raw = server.request("POST", "/v1/images/generations", {"prompt": PROMPT, "seed": 1})
        assert status == 401
        status, _, raw = server.request("POST", "/v1/images/generations", {"prompt": PROMPT, "seed": 1},
                                        headers={**key, "Content-Type": "application/json"})
        assert status == 200, raw
    finally:
        _stop(Server(0, proc))


def test_a_port_in_use_is_one_error_line_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run(_serve_cmd("--host", "127.0.0.1", "--port", str(port), "--device", "cpu"), env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vqim: error: cannot listen on 127.0.0.1:{port}"), r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 60


def test_beyond_loopback_without_a_key_warns():
    """An address this machine does not have: the warning comes first, then the bind fails (the
    test listens on nothing but 127.0.0.1)."""
    r = subprocess.run(_serve_cmd("--host", "192.0.2.1", "--port", str(_free_port()), "--device", "cpu"), env=_env(),
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert lines[0].startswith("vqim: warning: serving on 192.0.2.1, beyond this machine, with no API key"), lines
    assert lines[1].startswith("vqim: error: cannot listen on 192.0.2.1:") and len(lines) == 2, lines


def test_public_model_families_are_served(one_torch_thread):
    """A Janus-shaped text model and a LlamaGen-shaped class-conditional one behind the same API:
    the images are the engine's; a class model takes ``class_id`` (or its decimal form as the
    prompt, what OpenAI's client can send), and each misuse is a 400 naming the field."""
    from vqim.engine import Engine

    for preset, body, call in (("tiny-janus", {"prompt": "a red circle"}, {"prompts": ["a red circle"]}),
                               ("tiny-llamagen", {"class_id": 3}, {"class_ids": [3]})):
        s = _start("--preset", preset)
        try:
            status, _, raw = s.generate(**body, seed=7)
            assert status == 200, raw
            got = _png(json.loads(raw)["data"][0]["b64_json"])
            eng = Engine.from_preset(preset, device="cpu")
            try:
                want = eng.generate(**call, seed=7)[0]
            finally:
                eng.close()
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            if preset == "tiny-llamagen":
                status, _, again = s.generate(prompt="3", seed=7)
                assert status == 200 and json.loads(again)["data"] == json.loads(raw)["data"]
                for bad, param in (({"prompt": "a dog"}, "prompt"), ({"class_id": 10}, "class_id"), ({}, "class_id"),
                                   ({"prompt": "4", "class_id": 3}, "class_id"),
                                   ({"class_id": 3, "negative_prompt": "x"}, "negative_prompt")):
                    status, _, raw = s.generate(**bad)
                    _assert_error(status, raw, 400, param)
            else:
                status, _, raw = s.generate(prompt="a red circle", class_id=3)
                _assert_error(status, raw, 400, "class_id")
        finally:
            _stop(s)


# ------------------------------------------------------------- OpenAI's client, and edits (issue 27)


def _client(server: Server):
    """The official ``openai`` client, pointed at ``server``."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0, timeout=120)


def _file(name: str, image: Image.Image, fmt: str = "PNG") -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return name, buf.getvalue(), f"image/{fmt.lower()}"


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """OpenAI's mask: opaque, with ``box`` fully transparent (to redraw)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def test_openai_generate(server, generated):
    """``images.generate`` with every standard field: the client's own types, the images of the
    reference request, each output format, and the user in the server's log."""
    from openai.types import ImagesResponse

    client = _client(server)
    r = client.images.generate(prompt=PROMPT, model="gpt-image-1", n=2, size="64x64", quality="auto",
                               background="opaque", moderation="auto", output_format="png", output_compression=100,
                               partial_images=0, response_format="b64_json", style="natural", stream=False,
                               user="openai-test-user", extra_body={"seed": SEED})
    assert isinstance(r, ImagesResponse)
    assert [d.b64_json for d in r.data] == [d["b64_json"] for d in generated["data"]]
    assert (r.output_format, r.size, r.background) == ("png", "64x64", "opaque")
    u = r.usage
    assert (u.input_tokens, u.input_tokens_details.text_tokens, u.input_tokens_details.image_tokens) == (8, 8, 0)
    assert (u.output_tokens, u.total_tokens, u.output_tokens_details.image_tokens) == (512, 520, 512)
    assert "image_generation: 2 image(s) for user 'openai-test-user'" in server.log()
    png = np.asarray(_png(r.data[0].b64_json))
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        sizes = []
        for compression in (100, 10):
            r = client.images.generate(prompt=PROMPT, size="auto", output_format=fmt, output_compression=compression,
                                       extra_body={"seed": SEED})
            assert r.output_format == fmt
            raw = base64.b64decode(r.data[0].b64_json)
            assert raw.startswith(magic)
            with Image.open(io.BytesIO(raw)) as im:
                assert im.format == fmt.upper() and im.size == (64, 64)
                pixels = np.asarray(im.convert("RGB"))
            if fmt == "webp" and compression == 100:
                np.testing.assert_array_equal(pixels, png)  # lossless
            sizes.append(len(raw))
        assert sizes[1] < sizes[0], (fmt, sizes)  # compressed harder: fewer bytes


def test_openai_stream(server, generated):
    """``images.generate(stream=True)``: every event parses as the client's own type, and the
    completed events carry the images of the reference request."""
    from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent

    events = list(_client(server).images.generate(prompt=PROMPT, model="gpt-image-1", n=2, stream=True,
                                                  partial_images=2, extra_body={"seed": SEED}))
    partials = [e for e in events if isinstance(e, ImageGenPartialImageEvent)]
    done = [e for e in events if isinstance(e, ImageGenCompletedEvent)]
    assert len(partials) + len(done) == len(events) and 2 <= len(partials) <= 4
    assert all(e.type == "image_generation.partial_image" and e.partial_image_index in (0, 1) for e in partials)
    assert all(e.type == "image_generation.completed" and e.usage.output_tokens == 256 for e in done)
    assert [e.b64_json for e in done] == [d["b64_json"] for d in generated["data"]]
    assert all(_png(e.b64_json).size == (64, 64) and e.size == "64x64" for e in events)


def test_openai_edit(server, generated, one_torch_thread):
    """``images.edit`` with a mask (its transparent bottom half redrawn): the engine's
    ``generate(image=, keep=)`` in-process, and the same images streamed as OpenAI's edit events."""
    from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent, ImagesResponse

    from vqim.engine import Engine

    client = _client(server)
    image = _png(generated["data"][0]["b64_json"])
    files = {"image": _file("in.png", image), "mask": _file("mask.png", _mask((64, 64), (0, 32, 64, 64)))}
    r = client.images.edit(**files, prompt=PROMPT, model="gpt-image-1", n=2, size="64x64", output_format="png",
                           input_fidelity="high", user="editor", extra_body={"seed": 3})
    assert isinstance(r, ImagesResponse) and len(r.data) == 2
    # The image's 256 tokens in, the 128 of the bottom half drawn per image.
    assert (r.usage.input_tokens_details.image_tokens, r.usage.output_tokens) == (256, 256)
    got = [np.asarray(_png(d.b64_json)) for d in r.data]
    eng = Engine.from_pretrained(device="cpu", max_batch_size=2)
    try:
        want = eng.generate(PROMPT, 2, seed=3, image=image, keep=8)  # the top 8 grid rows kept
    finally:
        eng.close()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w))

    events = list(client.images.edit(**files, prompt=PROMPT, n=2, stream=True, partial_images=1,
                                     extra_body={"seed": 3}))
    partials = [e for e in events if isinstance(e, ImageEditPartialImageEvent)]
    done = [e for e in events if isinstance(e, ImageEditCompletedEvent)]
    assert len(partials) + len(done) == len(events) and len(partials) <= 2
    assert all(e.type == "image_edit.partial_image" for e in partials)
    assert all(e.type == "image_edit.completed" and e.usage.output_tokens == 128 for e in done)
    assert [e.b64_json for e in done] == [d.b64_json for d in r.data]


def _form(parts: list[tuple[str, bytes | str, str | None]]) -> tuple[bytes, dict]:
    """A multipart/form-data body of ``(name, value, filename)`` parts, and its header."""
    boundary = "vqim-test-boundary"
    out = []
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        value = value.encode() if isinstance(value, str) else value
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _edit(server: Server, parts: list) -> tuple[int, bytes]:
    body, headers = _form(parts)
    status, _, raw = server.request("POST", "/v1/images/edits", body, headers=headers)
    return status, raw


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_edit_masks_map_onto_token_cells(server):
    """A cell is redrawn when any mask pixel over it is transparent; an image of another size (not
    square here) is stretched to the model's; without a mask the image's own alpha is the mask."""
    image = Image.new("RGB", (100, 80), (200, 30, 30))
    for pixel, cells in (((5, 5), 1), ((6, 5), 2)):  # x = 6 lies over columns 0 and 1 (100 / 16 px each)
        status, raw = _edit(server, [("image", _file("a.png", image)[1], "a.png"),
                                     ("mask", _file("m.png", _mask((100, 80), (*pixel, pixel[0] + 1, pixel[1] + 1)))[1],
                                      "m.png"),
                                     ("prompt", PROMPT, None), ("seed", "1", None), ("n", "", None)])
        assert status == 200, raw
        answer = json.loads(raw)
        assert answer["usage"]["output_tokens"] == cells and _png(answer["data"][0]["b64_json"]).size == (64, 64)
    rgba = Image.new("RGBA", (64, 64), (30, 30, 200, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 64))  # the left 4 columns of cells transparent
    status, raw = _edit(server, [("image[]", _file("a.png", rgba)[1], "a.png"), ("prompt", PROMPT, None),
                                 ("seed", "1", None), ("output_format", "jpeg", None), ("stream", "false", None)])
    assert status == 200, raw
    assert json.loads(raw)["usage"]["output_tokens"] == 4 * 16
    assert base64.b64decode(json.loads(raw)["data"][0]["b64_json"]).startswith(b"\xff\xd8\xff")


OPAQUE = _file("o.png", Image.new("RGB", (64, 64), (10, 200, 10)))[1]
MASK = _file("m.png", _mask((64, 64), (0, 0, 64, 8)))[1]
BAD_EDITS = [
    ([("prompt", PROMPT, None)], "image"),
    ([("image[]", OPAQUE, "a.png"), ("image[]", OPAQUE, "b.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None)],
     "image"),
    ([("image", b"not an image", "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None)], "image"),
    ([("image", _file("a.gif", Image.new("RGB", (64, 64)), "GIF")[1], "a.gif"), ("mask", MASK, "m.png"),
      ("prompt", PROMPT, None)], "image"),
    # Over the server's --max-image-pixels, and over PIL's own decompression-bomb limit: never decoded.
    ([("image", _png_claiming(1000, 1000), "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None)], "image"),
    ([("image", _png_claiming(20000, 20000), "a.png"), ("prompt", PROMPT, None)], "image"),
    ([("image", OPAQUE, "a.png"), ("prompt", PROMPT, None)], "mask"),  # nothing marked to redraw
    ([("image", OPAQUE, "a.png"), ("mask", _file("m.png", _mask((32, 32), (0, 0, 8, 8)))[1], "m.png"),
      ("prompt", PROMPT, None)], "mask"),
    ([("image", OPAQUE, "a.png"), ("mask", OPAQUE, "m.png"), ("prompt", PROMPT, None)], "mask"),  # no alpha
    ([("image", OPAQUE, "a.png"), ("mask", _file("m.png", Image.new("RGBA", (64, 64), (0, 0, 0, 255)))[1], "m.png"),
      ("prompt", PROMPT, None)], "mask"),  # fully opaque: nothing to redraw
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("mask", MASK, "n.png"), ("prompt", PROMPT, None)], "mask"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png")], "prompt"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("prompt", "x", None)], "prompt"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, "p.txt")], "prompt"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", b"\xff\xfe", None)], "prompt"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("n", "two", None)], "n"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("n", "5", None)], "n"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("stream", "yes", None)],
     "stream"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("top_p", "nan", None)],
     "top_p"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("top_p", "0", None)], "top_p"),
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("style", "vivid", None)],
     "style"),  # a generation's field
    ([("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None), ("size", "1024x1024", None)],
     "size"),
]


@pytest.mark.parametrize("parts,param", BAD_EDITS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_EDITS)])
def test_bad_edit(server, parts, param):
    status, raw = _edit(server, parts)
    _assert_error(status, raw, 400, param)


def test_edit_request_refusals(server):
    ok = [("image", OPAQUE, "a.png"), ("mask", MASK, "m.png"), ("prompt", PROMPT, None)]
    status, raw = _edit(server, [*ok, ("model", "dall-e-2", None)])
    assert _assert_error(status, raw, 404, "model")["code"] == "model_not_found"
    # Not a form: what OpenAI's client sends is multipart.
    status, _, raw = server.request("POST", "/v1/images/edits", {"prompt": PROMPT},
                                    headers={"Content-Type": "application/json"})
    _assert_error(status, raw, 400)
    body, headers = _form(ok)
    status, _, raw = server.request("POST", "/v1/images/edits", body[:-10], headers=headers)  # no closing boundary
    _assert_error(status, raw, 400)
    # An upload over --max-upload-bytes, by Content-Length and read chunked.
    big, headers = _form([*ok, ("user", "u" * MAX_UPLOAD, None)])
    for data in (big, iter([big[:1000], big[1000:]])):
        status, _, raw = server.request("POST", "/v1/images/edits", data, headers=headers)
        _assert_error(status, raw, 413)
    assert server.request("GET", "/health")[0] == 200
