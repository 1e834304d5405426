"""Model-zoo unit tests run single-threaded: on tiny tensors intra-op threads only add
synchronisation, and on a busy machine they oversubscribe the cores (10x slower here)."""

from __future__ import annotations

import pytest
from benchmarks.timing import threads


@pytest.fixture(autouse=True, scope="package")
def _one_intra_op_thread():
    with threads(1):
        yield
