"""Tensor parallelism across machines: ``torchrun --nnodes 2``, one rank per node, the two "nodes"
being two torchrun launchers on this machine that meet at 127.0.0.1 (static rendezvous, gloo over
the loopback). The engine reads torchrun's variables, so nothing in vqim knows it spans nodes:
node 0's rank writes the images, which are the tp=1 engine's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from vqim.engine import Engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a red circle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_tp2_on_loopback_equal_tp1(tmp_path):
    port = _free_port()
    out = tmp_path / "img.png"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", "--local-addr=127.0.0.1",
               "-m", "vqim.engine.entrypoints.cli", "generate", PROMPT, "--preset", "tiny-t2i", "-n", "2", "--seed",
               "7", "--device", "cpu", "-q", "-o", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node}:\n{log[-3000:]}"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["img-0.png", "img-1.png"]
    assert str(tmp_path / "img-0.png") in logs[0] and "img-0.png" not in logs[1]  # node 0's rank writes
    want = Engine.from_preset("tiny-t2i", device="cpu").generate(PROMPT, 2, seed=7)
    for i, w in enumerate(want):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"img-{i}.png")), np.asarray(w)), f"image {i}"
