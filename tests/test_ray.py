"""Past one machine on Ray: ``vqim serve --ray`` (engine/entrypoints/ray_serve.py) and ``vqim batch
--ray`` (engine/entrypoints/batch.py) as real processes joining a local Ray cluster the module
starts and stops: ``ray.init(num_cpus=2)`` on 127.0.0.1, no dashboard, no usage stats, token
authentication off (``RAY_AUTH_MODE=disabled``: no token is written to the home folder), Ray's
temporary files in a fresh temporary folder; the processes it starts run with a temporary
``HOME`` too.

- ``vqim serve --ray --replicas 2`` of the bundled model, driven by the official ``openai``
  client: requests with one seed get the same image bytes from either replica, both replicas
  answer (each response names its replica), and the image is the in-process engine's.
- ``vqim serve --ray --tp 2``: a tensor-parallel replica (rank 1 an actor of its placement
  group) draws the tp=1 engine's images.
- ``vqim batch --ray --actors 2`` over 100 rows: every image present and equal to what
  ``vqim generate`` draws for its row (the in-process engine, one call per row, and the command
  itself for two rows), with an actor killed mid-shard and its shard drawn again.
- :func:`deployment`'s Ray Serve options (no cluster needed).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("ray.data")
pytest.importorskip("fastapi")

from vqim.engine import Engine
from vqim.engine.entrypoints import ray_serve
from vqim.engine.entrypoints.serve import Limits
from vqim.train.eval_shapes import GRID_PROMPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a large red circle in the center"
# Ray's settings for everything this module starts.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
           # A tensor-parallel replica's ranks (Ray workers, which inherit this) meet over the loopback.
           "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster on 127.0.0.1 with 2 CPUs: its GCS address, and the environment of the
    processes that join it."""
    # A short folder of its own: Ray's socket paths inside it must fit in 107 bytes, which a
    # pytest tmp_path does not leave room for.
    tmp = Path(tempfile.mkdtemp(prefix="vqim-ray-"))
    home = tmp / "home"
    home.mkdir()
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(tmp / "ray"),
                 logging_level="WARNING", log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        env = {**os.environ, **RAY_ENV, "HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        yield address, env
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def engine():
    eng = Engine.from_pretrained(device="cpu")
    yield eng
    eng.close()


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vqim(*args: str) -> list[str]:
    return [sys.executable, "-m", "vqim.train.main", *args]


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM (the command deletes its app and leaves the cluster), then the process group's
    SIGKILL if it has not ended."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


# ---------------------------------------------------------------------------------- serve --ray


def test_serve_ray_two_replicas_same_seed_same_bytes(cluster, engine, tmp_path):
    openai = pytest.importorskip("openai")
    address, env = cluster
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_vqim("serve", "--ray", "--replicas", "2", "--ray-address", address, "--host",
                                      "127.0.0.1", "--port", str(port), "--device", "cpu", "--max-batch-size", "4"),
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while "ready at http://127.0.0.1" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"vqim serve --ray exited with {proc.returncode}:\n{_log(log)}"
            assert time.monotonic() < deadline, f"vqim serve --ray was not ready within 150 s:\n{_log(log)}"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)

        def ask(_) -> tuple[str, bytes]:
            raw = client.images.with_raw_response.generate(prompt=PROMPT, n=1, size="64x64", extra_body={"seed": 11})
            return raw.headers["x-vqim-replica"], base64.b64decode(raw.parse().data[0].b64_json)

        answers: list[tuple[str, bytes]] = []
        with ThreadPoolExecutor(8) as pool:
            for _ in range(4):  # waves of 8 concurrent requests until both replicas have answered
                answers += pool.map(ask, range(8))
                if len({r for r, _ in answers}) == 2:
                    break
        replicas = {r for r, _ in answers}
        assert len(replicas) == 2, f"one replica answered all {len(answers)} requests: {replicas}"
        images = {b for _, b in answers}
        assert len(images) == 1, "one seed gave different bytes"
        got = np.asarray(Image.open(io.BytesIO(images.pop())).convert("RGB"))
        want = np.asarray(engine.generate([PROMPT], seed=11)[0])
        assert np.array_equal(got, want)
        models = client.models.list()
        assert [m.id for m in models.data] == [engine.cfg.name]
    finally:
        _stop(proc)
    assert proc.returncode == 0, _log(log)
    assert "Deleting app" in log.read_text(errors="replace")
    assert "vqim" not in ray.serve.status().applications  # the command took its app with it


def test_serve_ray_tensor_parallel_replica(cluster, tmp_path):
    """``--tp 2``: a replica whose rank 1 is an actor in the second bundle of its placement
    group (gloo on the CPUs); it answers with the tp=1 engine's images."""
    address, env = cluster
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_vqim("serve", "--ray", "--tp", "2", "--preset", "tiny-t2i", "--ray-address", address,
                                      "--host", "127.0.0.1", "--port", str(_free_port()), "--device", "cpu",
                                      "--max-batch-size", "2"),
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while (m := re.search(r"ready at (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))) is None:
            assert proc.poll() is None, f"vqim serve --ray --tp 2 exited with {proc.returncode}:\n{_log(log)}"
            assert time.monotonic() < deadline, f"vqim serve --ray --tp 2 was not ready within 150 s:\n{_log(log)}"
            time.sleep(0.5)
        body = json.dumps({"prompt": "a red circle", "n": 2, "seed": 3}).encode()
        req = urllib.request.Request(m.group(1) + "/v1/images/generations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            data = json.loads(r.read())["data"]
    finally:
        _stop(proc)
    assert proc.returncode == 0, _log(log)
    want = Engine.from_preset("tiny-t2i", device="cpu").generate("a red circle", 2, seed=3)
    for i, (d, w) in enumerate(zip(data, want)):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB"))
        assert np.array_equal(got, np.asarray(w)), f"image {i}"


# ---------------------------------------------------------------------------------- batch --ray


def _rows(n: int) -> list[dict]:
    """``n`` rows over the shapes prompts; every third row its own settings, every seventh
    without a seed (``--seed`` + its index), a few with a negative prompt."""
    rows = []
    for i in range(n):
        row = {"prompt": GRID_PROMPTS[i % len(GRID_PROMPTS)]}
        if i % 7:
            row["seed"] = 1000 + 13 * i
        if i % 3 == 0:
            row.update(cfg_scale=(1.0, 2.0, 2.5, 1.5)[i % 4], temperature=(0.5, 0.7)[i % 2], top_k=0 if i % 2 else 50)
        if i % 11 == 5:
            row["negative_prompt"] = "a small green triangle"
        rows.append(row)
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _reference(engine: Engine, rows: list[dict], base_seed: int) -> list[bytes]:
    """What ``vqim generate`` draws for each row: one call per row, each alone in the decode loop
    (as the command's is), saved as PNG. Not concurrent calls: another batch composition may
    round a logit's last bits otherwise (docs/design.md, batch invariance), and a guidance of 4
    turned that into another token in one row of 100."""
    out = []
    for i, row in enumerate(rows):
        settings = {k: v for k, v in row.items() if k not in ("prompt", "seed", "negative_prompt")}
        image = engine.generate([row["prompt"]], seed=row.get("seed", base_seed + i),
                                negative_prompt=row.get("negative_prompt"), **settings)[0]
        out.append(_png_bytes(image))
    return out


def _kill_an_actor_mid_shard(out: Path, proc: subprocess.Popen, killed: list, stop: threading.Event) -> None:
    """Watch OUTDIR for a shard being drawn (its hidden folder names the actor's pid) and SIGKILL
    that actor; again if the shard turned out finished just before the kill (its folder renamed
    into place), until one actor died holding an unfinished shard."""
    tried = set()
    while not stop.is_set() and proc.poll() is None:
        for tmp in out.glob(".shard-*.tmp-*"):
            shard = tmp.name.split(".tmp-")[0].lstrip(".")
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
            if pid in tried or (out / shard).exists():
                continue
            tried.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if not (out / shard).exists():
                killed.append((shard, pid))
                return
        time.sleep(0.05)


def test_batch_ray_100_rows_two_actors_a_killed_actor_retried(cluster, engine, tmp_path):
    address, env = cluster
    rows = _rows(100)
    prompts, out = tmp_path / "rows.jsonl", tmp_path / "out"
    _write_rows(prompts, rows)
    out.mkdir()
    log = tmp_path / "batch.log"
    killed: list = []
    stop = threading.Event()
    with open(log, "wb") as f:
        proc = subprocess.Popen(_vqim("batch", str(prompts), str(out), "--ray", "--actors", "2", "--shard-size",
                                      "10", "--seed", "5", "--ray-address", address, "--device", "cpu"),
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    watcher = threading.Thread(target=_kill_an_actor_mid_shard, args=(out, proc, killed, stop))
    watcher.start()
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"vqim batch --ray did not end within 240 s:\n{_log(log)}")
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, _log(log)
    assert killed, "no actor was killed while it drew a shard"
    meta = [json.loads(line) for k in range(10) for line in (out / f"shard-{k:06d}" / "metadata.jsonl").open()]
    assert [m["index"] for m in meta] == list(range(100))  # the killed actor's shard among them, drawn again
    assert not list(out.glob(".shard-*"))  # no leftover of the killed try
    want = _reference(engine, rows, base_seed=5)
    for m in meta:
        got = (out / f"shard-{m['index'] // 10:06d}" / m["file"]).read_bytes()
        assert got == want[m["index"]], f"row {m['index']}"
        assert m["seed"] == rows[m["index"]].get("seed", 5 + m["index"])
    # The command itself, for a row with its own settings and one with the model's.
    for i in (3, 8):
        png = tmp_path / f"gen{i}.png"
        r = rows[i]
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in r.items() if k not in ("prompt", "seed")]
        subprocess.run(_vqim("generate", r["prompt"], "--seed", str(r["seed"]), *flags, "--device", "cpu", "-q",
                             "-o", str(png)), env=env, check=True, capture_output=True, timeout=120)
        assert png.read_bytes() == (out / f"shard-{i // 10:06d}" / f"{i:08d}.png").read_bytes()


# ---------------------------------------------------------------------------------- the Python entry point


def _config(app) -> dict:
    """The deployment options of an application made by :func:`ray_serve.deployment`."""
    dep = app._bound_deployment
    return {"max_ongoing_requests": dep.max_ongoing_requests, "num_replicas": dep.num_replicas,
            "autoscaling": dep._deployment_config.autoscaling_config, "actor": dep.ray_actor_options,
            "bundles": dep._replica_config.placement_group_bundles,
            "strategy": dep._replica_config.placement_group_strategy}


def test_deployment_options():
    c = _config(ray_serve.deployment(replicas=3, max_queue=100, max_batch_size=8))
    assert c["max_ongoing_requests"] == 108  # the engine's queue and batch, not Ray's 5
    assert c["num_replicas"] == 3
    assert c["actor"]["num_gpus"] == 1 and c["actor"]["num_cpus"] == 1  # one GPU per replica by default
    assert c["bundles"] is None
    c = _config(ray_serve.deployment(replicas=(1, 4), device="cpu", max_batch_size=8))
    assert (c["autoscaling"].min_replicas, c["autoscaling"].max_replicas) == (1, 4)
    assert c["autoscaling"].target_ongoing_requests == 8  # a replica's batch
    assert c["actor"]["num_gpus"] == 0
    c = _config(ray_serve.deployment(preset="parti-350m", tp=4, num_gpus=1, limits=Limits(max_n=2)))
    assert c["bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 4 and c["strategy"] == "STRICT_PACK"


@pytest.mark.parametrize("kwargs, match", [
    ({"replicas": 0}, "replicas must be an int >= 1"),
    ({"replicas": (3, 2)}, r"0 <= MIN <= MAX"),
    ({"tp": 0}, "tp must be an int >= 1"),
    ({"num_gpus": -1}, "num_gpus must be >= 0"),
    ({"target_ongoing_requests": 4}, "target_ongoing_requests is for autoscaling"),
    ({"model": "x", "preset": "tiny-t2i"}, "not both"),
])
def test_deployment_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ray_serve.deployment(**kwargs)


def test_deployment_unknown_model_option():
    with pytest.raises(TypeError, match="unknown model option 'modle'"):
        ray_serve.deployment(modle="x")
