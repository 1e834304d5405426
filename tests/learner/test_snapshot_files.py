"""``write_atomic``: whole or absent; a checkpoint's large files written around the page cache (``direct``) hold
the same bytes as a buffered write, at any length and however the parts are cut, and where the filesystem refuses
``O_DIRECT`` they are written buffered."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import learner.snapshot_files
from learner.snapshot_files import DIRECT_ALIGN, write_atomic


def _parts(total: int, cut: int, seed: int = 0) -> list[memoryview]:
    data = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8).tobytes()
    return [memoryview(data[i:i + cut]) for i in range(0, total, cut)] or [memoryview(b"")]


@pytest.fixture
def small_buffer(monkeypatch):
    """A buffer of a few blocks, so that files span many of them."""
    monkeypatch.setattr(learner.snapshot_files, "SYNC_EVERY_BYTES", 4 * DIRECT_ALIGN)


@pytest.mark.parametrize("total", [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, 4 * DIRECT_ALIGN, 4 * DIRECT_ALIGN + 5,
                                   37 * DIRECT_ALIGN + 1234])
@pytest.mark.parametrize("cut", [1000, 3 * DIRECT_ALIGN, 10**6])
def test_a_direct_write_holds_the_bytes_of_a_buffered_one(tmp_path: Path, small_buffer, monkeypatch, total: int,
                                                          cut: int) -> None:
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a: opened.append(flags) or real_open(path, flags, *a))
    parts = _parts(total, cut)
    write_atomic(tmp_path / "direct", iter(parts), direct=True)  # an iterator: read once, as it is written
    write_atomic(tmp_path / "buffered", parts)
    assert (tmp_path / "direct").read_bytes() == (tmp_path / "buffered").read_bytes() == b"".join(parts)
    assert any(flags & os.O_DIRECT for flags in opened)  # asked for (a filesystem without it: the next test)
    assert {p.name for p in tmp_path.iterdir()} == {"buffered", "direct"}  # no temporary file left


def test_where_o_direct_is_refused_the_file_is_written_buffered(tmp_path: Path, small_buffer, monkeypatch) -> None:
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # tmpfs
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", refusing)
    parts = _parts(10 * DIRECT_ALIGN + 7, 5000)
    write_atomic(tmp_path / "f", iter(parts), direct=True)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)


def test_a_write_that_fails_halfway_leaves_nothing(tmp_path: Path, small_buffer) -> None:
    def failing():
        yield memoryview(b"x" * (9 * DIRECT_ALIGN))
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        write_atomic(tmp_path / "f", failing(), direct=True)
    assert list(tmp_path.iterdir()) == []
