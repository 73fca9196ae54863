"""vqim without the triton package (macOS, Windows): everything imports, the torch references
serve every op, and asking for the Triton backend says what is missing.

Triton cannot be uninstalled for one test, so each check runs in a subprocess where
``sys.modules["triton"] = None`` makes ``import triton`` raise ImportError, as on a machine
that never had it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HIDE_TRITON = """
import sys
sys.modules["triton"] = None
sys.modules["triton.language"] = None
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = HIDE_TRITON + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_hiding_triton_really_hides_it():
    r = _run("import triton")
    assert r.returncode != 0 and "import of triton halted" in r.stderr


def test_package_imports_and_generates_without_triton():
    r = _run("""
        import torch
        import vqim.engine, vqim.kernels, vqim.train
        from vqim.kernels import _triton
        assert not _triton.AVAILABLE
        from vqim.engine import Engine
        torch.set_num_threads(1)
        eng = Engine.from_preset("tiny-t2i", device="cpu")
        codes = eng.generate_codes(["a red circle"], seed=0)
        assert codes.shape == (1, 8, 8)
        img = eng.decode_codes(codes)[0]
        assert img.size == (64, 64)
        assert eng.encode_images([img]).shape == (1, 8, 8)
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_every_op_defaults_to_the_reference_and_triton_backend_says_why():
    r = _run("""
        import torch
        from vqim import kernels as K
        from vqim.kernels import _registry

        # CUDA tensors default to the reference too (resolving touches no GPU).
        assert _registry.resolve_backend(None, torch.device("cuda", 0)) == "torch"
        assert _registry.resolve_backend(None, torch.device("cpu")) == "torch"

        z, cb = torch.randn(5, 8), torch.randn(16, 8)
        assert torch.equal(K.codebook_lookup(z, cb), K.codebook_lookup_ref(z, cb))
        logits = torch.randn(3, 32)
        K.cfg_sample(logits, None, cfg_scale=1.0, seed=0, step=0)
        q = torch.randn(1, 2, 1 + 9, 8)
        K.conv_attention(q, q, q, grid=3, kernel=(3, 3), prefix=1)
        p = torch.nn.Parameter(torch.randn(4, 6))
        p.grad = torch.randn(4, 6)
        K.Adafactor8bit([p], lr=1e-2).step()

        calls = {
            "codebook_lookup": lambda: K.codebook_lookup(z, cb, backend="triton"),
            "cfg_sample": lambda: K.cfg_sample(logits, None, cfg_scale=1.0, seed=0, step=0, backend="triton"),
            "conv_attention": lambda: K.conv_attention(q, q, q, grid=3, kernel=(3, 3), prefix=1, backend="triton"),
            "Adafactor8bit": lambda: K.Adafactor8bit([p], lr=1e-2, backend="triton").step(),
        }
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as e:
                assert "needs the triton package" in str(e), (name, e)
            else:
                raise AssertionError(f"{name}: backend='triton' ran without triton")
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
