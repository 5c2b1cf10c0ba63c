import os

os.environ.setdefault("DGREF_PROGRESS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A fresh CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)
