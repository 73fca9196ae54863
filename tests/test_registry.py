"""The backend registry and the compiled extension."""

import shutil

import pytest
import torch

from vqim.kernels import _ext, _registry, _triton, codebook_lookup, registered, use_backend


def test_every_public_op_has_all_backends():
    """Every op has its reference and its Triton kernel, and a CUDA twin where csrc has one
    (conv_attention's forward/backward is Triton-only; its decode step has a twin)."""
    ops = {op: registered(op) for op in _registry._IMPLS}
    cuda_twins = {"codebook_lookup", "cfg_sample", "conv_decode_attention", "adafactor8_step", "adafactor8_sumsq",
                  "adafactor8_row_col_sums", "adafactor8_factors", "adafactor8_full_factors"}
    assert set(ops) == cuda_twins | {"conv_attention"}
    for op, backends in ops.items():
        want = ("cuda", "torch", "triton") if op in cuda_twins else ("torch", "triton")
        assert backends == want, op


def test_default_backend_by_device():
    assert _registry.resolve_backend(None, torch.device("cpu")) == "torch"
    # Where triton is not installed (macOS, Windows) the reference serves CUDA tensors too
    # (tests/test_no_triton.py runs that case on every machine).
    cuda_default = "triton" if _triton.AVAILABLE else "torch"
    assert _registry.resolve_backend(None, torch.device("cuda", 0)) == cuda_default


def test_use_backend_overrides_default_and_restores():
    with use_backend("triton"):
        assert _registry.resolve_backend(None, torch.device("cpu")) == "triton"
        with use_backend(None):
            assert _registry.resolve_backend(None, torch.device("cpu")) == "torch"
    assert _registry.resolve_backend(None, torch.device("cpu")) == "torch"


def test_override_reaches_the_op(monkeypatch):
    calls = []
    impl = _registry._IMPLS["codebook_lookup"]["triton"]
    monkeypatch.setitem(_registry._IMPLS["codebook_lookup"], "triton", lambda *a: calls.append(1) or impl(*a))
    with use_backend("triton"):
        codebook_lookup(torch.randn(3, 8), torch.randn(4, 8))
    assert calls == [1]


def test_backend_errors(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        _registry.resolve_backend("cutlass", cpu)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        codebook_lookup(torch.randn(3, 8), torch.randn(4, 8), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _registry.resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("gpu"):
            pass


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA build is skipped by design")
def test_extension_built_and_exposes_ops():
    C = _ext.load()
    assert "codebook_lookup" in C.ops
    assert hasattr(C, "codebook_lookup")
    assert C.cuda_runtime_version() >= 12000


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA build is skipped by design")
def test_extension_checks_arguments():
    C = _ext.load()
    with pytest.raises(ValueError, match="D must be in"):
        C.codebook_lookup(0, 1, 1, 0, 1, 1, 0, 4, 4, 300, 0, False, 0)
    with pytest.raises(ValueError, match="K >= 1"):
        C.codebook_lookup(0, 1, 1, 0, 1, 1, 0, 4, 0, 8, 0, False, 0)
    with pytest.raises(ValueError, match="unsupported dtype code"):
        C.codebook_lookup(0, 1, 1, 0, 1, 1, 0, 4, 4, 8, 7, False, 0)
