"""pytest-benchmark entry points: cases marked ``gpu`` are skipped where CUDA is absent
(checked when a case runs, never at import)."""

import os

import pytest
import torch

# The benchmarks time the real kernels; the interpreter is for tests only.
os.environ.setdefault("TRITON_INTERPRET", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
