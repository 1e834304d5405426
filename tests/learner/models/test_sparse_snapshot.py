"""A table's weights copied beside training (``RowwiseTable.snapshot``): the copy is the weights of the moment it
was taken, whatever the table learns, resets or grows by while the copy is under way."""

from __future__ import annotations

import threading

import torch

import learner.models.row_snapshot
from learner.models.sparse import RowwiseTable


def test_a_snapshot_copied_while_the_table_trains_is_the_table_of_its_moment(monkeypatch) -> None:
    monkeypatch.setattr(learner.models.row_snapshot, "CHUNK_ROWS", 16)  # many chunks, so writes land between them
    torch.manual_seed(0)
    table = RowwiseTable(n_rows=200, dim=4, lr=0.5, seed=3, allocated=120)
    expected = table.weight.clone(), table.sum_sq.clone()
    snapshot = table.snapshot()
    reached, go = threading.Event(), threading.Event()

    def pause(rows: int) -> None:  # copy the first chunks, then let the table train, then copy the rest
        if rows == 48:
            reached.set()
            assert go.wait(30)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=snapshot.copy(pause)))
    thread.start()
    assert reached.wait(30)
    for step in range(5):  # rows behind the copy, ahead of it and across it; twice for some
        rows = torch.tensor([1, 5, 40, 41, 100, 119, 7 * step + 60])
        table.update(rows, torch.randn(len(rows), 4))
    table.reset_rows(torch.tensor([3, 90, 110]))
    table.ensure_rows(180)  # a growth: the table's tensors are new ones from here
    table.update(torch.tensor([100, 150]), torch.randn(2, 4))
    go.set()
    thread.join(30)
    weight, sum_sq = result["out"]
    assert torch.equal(weight, expected[0]) and torch.equal(sum_sq, expected[1])
    assert not torch.equal(table.weight[:121], expected[0])  # the table did move
    assert not torch.equal(table.sum_sq[:121], expected[1])
    assert table.snapshot().copy()[0].shape == table.weight.shape  # and a new snapshot is of the table now


def test_a_snapshot_released_without_a_copy_stops_keeping_rows() -> None:
    table = RowwiseTable(n_rows=50, dim=4, lr=0.5, seed=3)
    snapshot = table.snapshot()
    table.update(torch.tensor([1, 2]), torch.randn(2, 4))
    assert snapshot._undo
    snapshot.release()  # the base's write failed before it reached this table
    table.update(torch.tensor([3]), torch.randn(1, 4))
    assert not snapshot._undo and not table._snapshots


def test_column_snapshots_streamed_one_after_the_other_are_the_table_of_their_moment(monkeypatch) -> None:
    """A checkpoint lays each tensor out whole: the weights are streamed to the end, then the accumulators, while
    the table trains between every chunk of either; each chunk is dropped once read."""
    monkeypatch.setattr(learner.models.row_snapshot, "CHUNK_ROWS", 16)
    torch.manual_seed(1)
    table = RowwiseTable(n_rows=200, dim=4, lr=0.5, seed=3, allocated=120)
    expected = table.weight.clone(), table.sum_sq.clone()
    weight_snap, sum_sq_snap = table.column_snapshots()
    streamed = []
    for step, snap in enumerate((weight_snap, sum_sq_snap)):
        chunks = []
        for n, (start, (chunk,)) in enumerate(snap.stream()):
            assert start == sum(len(c) for c in chunks) and chunk.data_ptr() != snap.sources[0].data_ptr()
            chunks.append(chunk.clone())
            rows = torch.tensor([1, 5, 40, 41, 100, 119, (7 * n + 13 * step) % 120])  # behind, ahead and across
            table.update(rows, torch.randn(len(rows), 4))
            if n == 3:
                table.reset_rows(torch.tensor([3, 90, 110]))
        assert snap.done and not snap._undo
        streamed.append(torch.cat(chunks))
    assert torch.equal(streamed[0], expected[0]) and torch.equal(streamed[1], expected[1])
    assert not torch.equal(table.weight, expected[0]) and not torch.equal(table.sum_sq, expected[1])
    table.update(torch.tensor([2]), torch.randn(1, 4))
    assert not weight_snap._undo and not sum_sq_snap._undo  # streamed: nothing kept for them any more


def test_a_stream_left_before_its_end_stops_keeping_rows(monkeypatch) -> None:
    monkeypatch.setattr(learner.models.row_snapshot, "CHUNK_ROWS", 16)
    table = RowwiseTable(n_rows=100, dim=4, lr=0.5, seed=3)
    snap, _ = table.column_snapshots()
    stream = snap.stream()
    next(stream)
    table.update(torch.tensor([60, 70]), torch.randn(2, 4))
    assert snap._undo
    stream.close()  # the checkpoint's write failed halfway
    assert snap.done and not snap._undo
    table.update(torch.tensor([80]), torch.randn(1, 4))
    assert not snap._undo
