"""Checkpoint directories on their own: pruning keeps a group's agreed step, and the GROUP record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from learner.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from learner.checkpoint import group_step, write_group_step
from stream.events import EXAMPLE_SCHEMA


def _checkpoint(step: int) -> Checkpoint:
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([weight])
    weight.grad = torch.ones(2)
    optimizer.step()  # optimizer state to save
    return Checkpoint(step, {"w": torch.full((2,), float(step))}, optimizer.state_dict(), {"a": np.arange(3)}, b"joiner",
                      EXAMPLE_SCHEMA.empty_table(), {"counters": {"step": step}, "offsets": {"0": step}})


def test_a_pinned_step_outlives_pruning_and_loads_by_step(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    store.write(_checkpoint(10))
    store.pinned = 10  # the group agreed on step 10; later checkpoints may fail on a peer
    for step in (20, 30, 40):
        store.write(_checkpoint(step))
    kept = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert kept == ["ckpt-000000010", "ckpt-000000030", "ckpt-000000040"]
    assert store.latest().step == 40
    restored = store.load(10)
    assert restored.step == 10 and torch.equal(restored.model["w"], torch.full((2,), 10.0))
    assert restored.meta["offsets"] == {"0": 10} and isinstance(restored.buffer, pa.Table)
    with pytest.raises(CheckpointError, match="ckpt-000000020 is unreadable"):
        store.load(20)


def test_group_step_round_trip_and_refusals(tmp_path: Path) -> None:
    assert group_step(tmp_path, world_size=2) is None
    write_group_step(tmp_path, 120, world_size=2)
    assert group_step(tmp_path, world_size=2) == 120
    with pytest.raises(CheckpointError, match="written by 2 workers and cannot be resumed by 3.*--workers 2"):
        group_step(tmp_path, world_size=3)
    (tmp_path / "GROUP").write_text("{not json")
    with pytest.raises(CheckpointError, match="GROUP is unreadable"):
        group_step(tmp_path, world_size=2)


def test_a_directory_replaced_by_a_file_mid_write_is_a_checkpoint_error(tmp_path: Path, monkeypatch) -> None:
    """safetensors reports a failed write as its own error type: it must still be a CheckpointError, which
    the worker survives (offsets stay at the last durable checkpoint), not a crash of the trainer."""
    import shutil

    import learner.checkpoint as checkpoint

    directory = tmp_path / "checkpoints"
    store = CheckpointStore(directory)
    store.write(_checkpoint(1))
    save_file = checkpoint.save_file

    def directory_gone(*args, **kwargs):
        shutil.rmtree(directory)
        directory.write_text("not a directory")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", directory_gone)
    with pytest.raises(CheckpointError, match="it is not a directory"):
        store.write(_checkpoint(2))


def test_a_checkpoint_s_arrays_file_is_the_one_safetensors_writes_for_any_dtype_and_shape() -> None:
    """Streamed from the arrays' memory (``_numpy_parts``), byte for byte the file the library wrote before
    (``np.ascontiguousarray`` of each array): a dtype torch does not hold (uint64), empty, 0-d, strided, boolean and
    two-dimensional arrays included."""
    from safetensors.numpy import save

    from learner.checkpoint import _numpy_parts

    arrays = {"ids": np.arange(10, dtype=np.int64), "sums": np.ones(3, np.float64), "hist": np.zeros(4, np.float32),
              "empty": np.zeros(0, np.int64), "scalar": np.array(3.5), "strided": np.arange(10)[::2],
              "mask": np.array([True, False]), "grid": np.arange(6, dtype=np.int32).reshape(2, 3)}
    for extra in ({}, {"unsigned": np.arange(3, dtype=np.uint64)}):
        both = {**arrays, **extra}
        expected = save({k: np.ascontiguousarray(v) for k, v in both.items()})
        assert b"".join(bytes(p) for p in _numpy_parts(both)) == expected


def test_a_pruned_checkpoint_s_large_files_are_written_over_by_the_next(tmp_path: Path) -> None:
    """Deleting gigabytes stalls the machine's fsyncs on a disk that discards freed blocks: a pruned checkpoint's
    model and arrays files are kept aside and the next checkpoint is written over them, in place (same inode), each
    checkpoint whole whatever the sizes (the weights grow and shrink here)."""
    from learner.checkpoint import RECYCLED, SPARE

    store = CheckpointStore(tmp_path, keep=2)

    def sized(step: int, rows: int) -> Checkpoint:
        ckpt = _checkpoint(step)
        ckpt.model = {"w": torch.arange(rows * 1000, dtype=torch.float32) + step}
        ckpt.arrays = {"a": np.arange(rows * 700) * step}
        return ckpt
    rows = {10: 50, 20: 80, 30: 20, 40: 90, 50: 5}
    store.write(sized(10, rows[10]))
    store.write(sized(20, rows[20]))
    assert not (tmp_path / SPARE).exists()
    spare_inodes = {name: (tmp_path / "ckpt-000000010" / name).stat().st_ino for name in RECYCLED}
    store.write(sized(30, rows[30]))  # prunes 10: its large files become the spares
    assert {name: (tmp_path / SPARE / name).stat().st_ino for name in RECYCLED} == spare_inodes
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000020", "ckpt-000000030"]
    for step in (40, 50):
        store.write(sized(step, rows[step]))
        for kept in (step - 10, step):
            restored = store.load(kept)
            assert torch.equal(restored.model["w"], sized(kept, rows[kept]).model["w"])
            np.testing.assert_array_equal(restored.arrays["a"], sized(kept, rows[kept]).arrays["a"])
    assert {name: (tmp_path / "ckpt-000000040" / name).stat().st_ino for name in RECYCLED} == spare_inodes
