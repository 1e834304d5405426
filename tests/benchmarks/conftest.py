"""Benchmark plumbing tests use tiny sizes: one intra-op thread is fastest and leaves the other core free."""

from __future__ import annotations

import pytest
from benchmarks.timing import threads


@pytest.fixture(autouse=True, scope="package")
def _one_intra_op_thread():
    with threads(1):
        yield
