"""A soak of ``vqim serve`` over loopback (issue 25): 200 mixed requests at concurrency 16.

Two real servers on 127.0.0.1: the bundled model (it has the reranker ``candidates`` needs) and
a tiny model whose decoder head is NaN (its requests must fail as a model fault, beside the
healthy server's). The mix: plain requests, guided ones with other settings, reranked
candidates, edits (multipart, a mask), streams, requests whose client leaves (a stream closed
after its first event; a client that gives up after 50 ms) and NaN-model requests. Every
answer must be the expected one for its kind (no unexpected status or error), the healthy
server must stay healthy, give the same bytes for the same seed before and after, and its
memory must return to its level before the soak (after a warm-up of every kind, so caches that
are allocated once are counted before).
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from tests.test_serve import PROMPT, _file, _form, _mask, _png, _start, _stop

pytest.importorskip("uvicorn")

REQUESTS, CONCURRENCY = 200, 16
KINDS = ("plain", "guided", "candidates", "edit", "stream", "left", "gave_up", "nan")
PROMPTS = ["a large red circle in the center", "a small blue square in the top left",
           "a large green triangle at the bottom", "a small yellow circle on the right"]
IMAGE = _file("in.png", Image.new("RGB", (64, 64), (200, 30, 30)))[1]
MASK = _file("m.png", _mask((64, 64), (0, 32, 64, 64)))[1]


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _post(url: str, path: str, body: bytes, headers: dict, timeout: float = 300) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body, headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _one(kind: str, i: int, healthy: str, nan: str) -> str:
    """Send request ``i`` of ``kind``; return "" when the answer is the one expected, else what went wrong."""
    rng = random.Random(i)
    prompt = rng.choice(PROMPTS)
    js = {"Content-Type": "application/json"}
    if kind in ("plain", "guided", "candidates"):
        body = {"prompt": prompt, "seed": i, "n": rng.choice((1, 2))}
        if kind == "guided":
            body |= {"guidance_scale": rng.choice((1.0, 3.0)), "temperature": rng.choice((0.7, 1.0)), "top_k": 50}
        if kind == "candidates":
            body |= {"candidates": 2, "n": 1}
        status, raw = _post(healthy, "/v1/images/generations", json.dumps(body).encode(), js)
        if status != 200:
            return f"{kind}: {status} {raw[:200]!r}"
        answer = json.loads(raw)
        if len(answer["data"]) != body["n"] or any(_png(d["b64_json"]).size != (64, 64) for d in answer["data"]):
            return f"{kind}: wrong images"
        return "" if answer["usage"]["output_tokens"] >= 256 * body["n"] else f"{kind}: usage {answer['usage']}"
    if kind == "edit":
        form, headers = _form([("image", IMAGE, "in.png"), ("mask", MASK, "m.png"), ("prompt", prompt, None),
                               ("seed", str(i), None)])
        status, raw = _post(healthy, "/v1/images/edits", form, headers)
        if status != 200:
            return f"edit: {status} {raw[:200]!r}"
        return "" if json.loads(raw)["usage"]["output_tokens"] == 128 else "edit: usage"
    if kind == "stream":
        body = {"prompt": prompt, "seed": i, "stream": True, "partial_images": 1}
        status, raw = _post(healthy, "/v1/images/generations", json.dumps(body).encode(), js)
        events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
        done = [e for e in events if e.get("type") == "image_generation.completed"]
        if status != 200 or len(done) != 1 or not base64.b64decode(done[0]["b64_json"]).startswith(b"\x89PNG"):
            return f"stream: {status} {[e.get('type') for e in events]}"
        return ""
    if kind == "left":
        # A stream whose client reads one event and goes away: the server must cancel it.
        host, port = healthy.removeprefix("http://").split(":")
        body = json.dumps({"prompt": prompt, "seed": i, "stream": True, "partial_images": 3}).encode()
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            first = s.recv(4096)
        return "" if first.startswith(b"HTTP/1.1 200") else f"left: {first[:100]!r}"
    if kind == "gave_up":
        try:
            _post(healthy, "/v1/images/generations", json.dumps({"prompt": prompt, "seed": i, "n": 2}).encode(), js,
                  timeout=0.05)
        except (TimeoutError, socket.timeout, ConnectionError):
            return ""
        return ""  # answered within 50 ms: also fine
    status, raw = _post(nan, "/v1/images/generations", json.dumps({"prompt": prompt, "seed": i}).encode(), js)
    code = json.loads(raw).get("error", {}).get("code") if status == 500 else None
    return "" if code == "model_fault" else f"nan: {status} {raw[:200]!r}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from vqim.engine import Engine

    eng = Engine.from_preset("tiny-t2i", device="cpu")
    with torch.no_grad():
        eng.model.decoder.head.weight.fill_(float("nan"))
    nan_dir = eng.save_pretrained(tmp_path_factory.mktemp("soak") / "nan")
    eng.close()
    healthy = _start("--max-batch-size", "8", "--max-queue", "256")
    try:
        nan = _start("--model", str(nan_dir))
    except BaseException:
        _stop(healthy)
        raise
    yield healthy, nan
    _stop(healthy)
    _stop(nan)


def test_soak_mixed_requests_at_concurrency_16(servers):
    healthy, nan = servers
    status, _, before = healthy.generate(prompt=PROMPT, seed=11)
    assert status == 200, before
    with ThreadPoolExecutor(CONCURRENCY) as pool:  # warm-up: every kind once, then memory's level
        assert list(pool.map(lambda k: _one(k[1], 10_000 + k[0], healthy.url, nan.url), enumerate(KINDS))) == \
            [""] * len(KINDS)
    level = _rss_kb(healthy.proc.pid)

    kinds = [KINDS[i % len(KINDS)] for i in range(REQUESTS)]
    random.Random(0).shuffle(kinds)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        problems = [p for p in pool.map(lambda a: _one(a[1], a[0], healthy.url, nan.url), enumerate(kinds)) if p]
    assert not problems, problems[:10]

    for s in (healthy, nan):
        assert s.request("GET", "/health")[0] == 200 and s.proc.poll() is None
    status, _, after = healthy.generate(prompt=PROMPT, seed=11)
    assert status == 200 and json.loads(after)["data"] == json.loads(before)["data"]
    # Back to the level: what the soak allocated is freed (the allocator may keep a little).
    grown = _rss_kb(healthy.proc.pid) - level
    assert grown < 0.15 * level, (level, grown)
