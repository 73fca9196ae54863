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


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    they run thousands of small ops, where intra-op threads only add spin-wait contention on a
    shared 2-core machine (10x slower under load), so use one, then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
