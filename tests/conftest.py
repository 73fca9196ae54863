"""Test harness shared by every test file.

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on
before ``triton`` is first imported, so it is set here, at the top of the first file pytest
loads. A GPU run opts out with ``TRITON_INTERPRET=0 pytest -m gpu``.
Nothing here touches the GPU at import or collection time: the ``gpu`` marker is checked
when a test is about to run.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    """Each test starts from the same seeds, so a failure reproduces exactly."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
