"""Model-zoo unit tests run single-threaded: on tiny tensors intra-op threads only add
synchronisation, and on a busy machine they oversubscribe the cores (10x slower here)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
