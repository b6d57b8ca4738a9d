import os

import pytest
import torch

# prune.round_to: auto rounds kept channels to onnxruntime's channel block,
# 8 on AVX2 CPUs and 16 on AVX-512 ones: the tests (and the processes they start) name 8,
# so they give the same channel counts on every CPU. tests/test_budget.py checks the probe.
os.environ.setdefault("COMPRESSOR_CHANNEL_BLOCK", "8")

from compressor.models import lenet5
from tests.helpers import random_npz


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """A random LeNet-5 state_dict (1x12x12 inputs, 10 classes) and random data for it."""
    root = tmp_path_factory.mktemp("lenet")
    torch.manual_seed(0)
    torch.save(lenet5().state_dict(), root / "lenet5.pt")
    return root / "lenet5.pt", random_npz(root / "data.npz", (1, 12, 12))
