"""A worker alone writes the checkpoints its cadence makes due beside training (``learner.beside.CheckpointBeside``):
the checkpoint holds the state of the step it was taken at, however far training went on while it was written; its
offsets are committed only once it is durable; one that fails commits nothing and training goes on; one due while
another is being written is taken once that one is durable."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from features.memory import InMemoryFeatures
from learner.beside import CheckpointBeside
from learner.checkpoint import CheckpointStore
from learner.intake import ExamplesSource
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from tests.learner.test_distributed import _batch
from tests.learner.test_read_ahead import CONFIG

BATCH = 48
EVERY = 2


class _Commits(ExamplesSource):
    """The caller's examples, with offsets of their own: what the loop commits, and when."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: list[dict[int, int]] = []
        self.offset = 0

    def safe_offsets(self) -> dict[int, int]:
        return {0: self.offset}

    def commit(self, offsets: dict[int, int]) -> None:
        self.committed.append(dict(offsets))


def _loop(tmp_path: Path, beside: bool, checkpoints: Path | None = None,
          features: InMemoryFeatures | None = None, share: float = 1.0) -> TrainingLoop:
    """``share``: ``learner.cadence.checkpoint_max_share``; 1 (no bound) unless a test is about it."""
    config = replace(CONFIG, cadence=replace(CONFIG.cadence, checkpoint_every_steps=EVERY, snapshot_every_steps=10**6,
                                             checkpoint_beside=beside, checkpoint_max_share=share))
    local = TrainingLoop.local(config, features or InMemoryFeatures(), SnapshotStore(tmp_path / "snapshots"),
                               batch_size=BATCH)
    return TrainingLoop(local.learner, local.features, local.reporter, _Commits(),
                        CheckpointStore(checkpoints or tmp_path / "checkpoints"), config.cadence, BATCH)


def _step(loop: TrainingLoop) -> None:
    loop.source.offset = (loop.learner.step + 1) * BATCH  # what the step's batch covers
    loop.step(_batch(loop.learner.step, 0, BATCH))


class _Gate:
    """Holds the checkpoint's writing thread until opened, before it copies anything: training goes on writing the
    rows, the optimizer's moments and the maps while the checkpoint of an earlier step is still to be copied."""

    def __init__(self, beside: CheckpointBeside, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open, self.waiting = threading.Event(), threading.Event()
        write = beside._write

        def held(*args):
            self.waiting.set()
            assert self.open.wait(60), "the gate was never opened"
            return write(*args)
        monkeypatch.setattr(beside, "_write", held)


def _same(a, b) -> None:
    assert a.step == b.step
    assert set(a.model) == set(b.model)
    for key in a.model:
        assert torch.equal(a.model[key], b.model[key]), key
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    assert set(a.optimizer["state"]) == set(b.optimizer["state"])
    for index, slots in a.optimizer["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, b.optimizer["state"][index][name]), (index, name)
    assert set(a.arrays) == set(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    assert a.meta["counters"] == b.meta["counters"] and a.meta["offsets"] == b.meta["offsets"]
    assert a.joiner == b.joiner and a.buffer.equals(b.buffer)


def test_a_checkpoint_written_beside_training_holds_its_step_s_state_and_commits_only_once_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = _loop(tmp_path / "beside", beside=True)
    gate = _Gate(loop.checkpoint_beside, monkeypatch)
    for _ in range(EVERY):
        _step(loop)
    assert gate.waiting.wait(60)  # the step-2 checkpoint is being written: the loop went on without waiting
    for _ in range(3 * EVERY):  # training writes the rows, the optimizer's moments and the maps meanwhile
        _step(loop)
    assert loop.source.committed == []  # nothing is committed before the checkpoint is durable
    assert loop.checkpoint_beside.running and loop._checkpoint_owed  # the checkpoints due meanwhile wait for it
    gate.open.set()
    loop.checkpoint_beside._job.result(timeout=60)
    _step(loop)  # the next step commits what the durable checkpoint covers, then takes the one owed
    assert loop.source.committed == [{0: EVERY * BATCH}]
    assert loop.checkpoint_beside.running and not loop._checkpoint_owed
    assert loop.checkpoint()  # waits for the one beside (its offsets committed), then writes one now
    assert loop.source.committed == [{0: EVERY * BATCH}, {0: (4 * EVERY + 1) * BATCH}, {0: (4 * EVERY + 1) * BATCH}]

    # The same steps with every checkpoint written on the training thread: the step-2 checkpoints are equal.
    reference = _loop(tmp_path / "inline", beside=False)
    assert reference.checkpoint_beside is None
    for _ in range(EVERY):
        _step(reference)
    _same(loop.checkpoints.load(EVERY), reference.checkpoints.load(EVERY))
    for _ in range(3 * EVERY + 1):
        _step(reference)
    assert reference.checkpoint()
    _same(loop.checkpoints.load(4 * EVERY + 1), reference.checkpoints.load(4 * EVERY + 1))


def test_a_checkpoint_beside_training_streams_the_tables_into_its_file(tmp_path: Path, monkeypatch) -> None:
    """No copy of the whole tables is held while one is written: its file is written from their snapshots a chunk at
    a time (``Learner.capture_state``, ``RowSnapshot.stream``); the rest of the weights are copies."""
    from learner.delta import row_tables
    from learner.snapshots import Streamed

    loop = _loop(tmp_path, beside=True)
    streamed: dict[str, bool] = {}
    write = loop.checkpoints.write

    def recording(ckpt):
        streamed.update({k: isinstance(v, Streamed) for k, v in ckpt.model.items()})
        return write(ckpt)
    monkeypatch.setattr(loop.checkpoints, "write", recording)
    for _ in range(EVERY):
        _step(loop)
    loop.checkpoint_beside._job.result(timeout=60)
    tables = {f"{prefix}{name}" for prefix in row_tables(loop.learner.model) for name in ("weight", "sum_sq")}
    assert tables and {k for k, v in streamed.items() if v} == tables
    restored = loop.checkpoints.load(EVERY)
    assert all(restored.model[k].shape == loop.learner.model.state_dict()[k].shape for k in tables)


def test_restored_from_a_checkpoint_written_beside_training_a_worker_resumes_exactly(tmp_path: Path) -> None:
    store = InMemoryFeatures()  # the online store outlives the worker, as Feast's does
    loop = _loop(tmp_path / "first", beside=True, features=store)
    for _ in range(EVERY):
        _step(loop)
    loop.checkpoint_beside._job.result(timeout=60)  # the worker stops here, its checkpoint durable
    restored = _loop(tmp_path / "second", beside=True, checkpoints=tmp_path / "first" / "checkpoints", features=store)
    restored.resume(restored.checkpoints.latest())
    assert restored.learner.step == EVERY
    twin = _loop(tmp_path / "twin", beside=False)
    for _ in range(EVERY):
        _step(twin)
    for _ in range(2):  # the next steps after a restore are those the worker would have taken
        _step(restored)
        _step(twin)
    expected, got = twin.learner.weights(), restored.learner.weights()  # the ID maps as serving would read them
    assert set(expected) == set(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def _failed_once(tmp_path: Path) -> tuple[TrainingLoop, Path]:
    """A loop whose checkpoint directory is a file: its first checkpoint, written beside training, has failed."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    loop = _loop(tmp_path, beside=True, checkpoints=blocked)
    for _ in range(EVERY):
        _step(loop)
    assert loop.checkpoint_beside._job.exception(timeout=60) is not None
    return loop, blocked


def test_a_checkpoint_that_fails_beside_training_commits_nothing_and_training_goes_on(tmp_path: Path) -> None:
    loop, _ = _failed_once(tmp_path)
    for _ in range(EVERY):
        _step(loop)
    assert loop.checkpoint_failures >= 1 and "not a directory" in loop.last_checkpoint_error
    assert loop.source.committed == []
    assert loop.learner.step == 2 * EVERY


def test_a_group_writes_its_checkpoints_on_the_training_thread(tmp_path: Path) -> None:
    local = _loop(tmp_path, beside=True)
    group = TrainingLoop(local.learner, local.features, local.reporter, _Commits(), local.checkpoints, local.cadence,
                         BATCH, group_dir=tmp_path / "checkpoints")
    assert local.checkpoint_beside is not None and group.checkpoint_beside is None


def test_checkpoints_written_beside_training_take_at_most_their_share_of_the_time(tmp_path: Path) -> None:
    loop = _loop(tmp_path, beside=True, share=0.25)
    for _ in range(EVERY):
        _step(loop)
    loop.checkpoint_beside._job.result(timeout=60)
    loop.checkpoint_beside.seconds = 3600.0  # as if that one had taken an hour to write
    _step(loop)  # collected: the next may start three hours after it (a quarter of the time writing)
    assert loop.source.committed == [{0: EVERY * BATCH}]
    for _ in range(3 * EVERY):
        _step(loop)
    assert not loop.checkpoint_beside.running and loop._checkpoint_owed  # due, and waiting for its time
    loop._checkpoint_ready_at = 0.0  # three hours later
    _step(loop)
    assert loop.checkpoint_beside.running and not loop._checkpoint_owed
    assert loop.checkpoint()
    assert loop.source.committed[-1] == {0: loop.learner.step * BATCH}


def test_a_worker_waiting_for_input_commits_a_durable_checkpoint_and_takes_the_one_owed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = _loop(tmp_path, beside=True)
    gate = _Gate(loop.checkpoint_beside, monkeypatch)
    for _ in range(2 * EVERY):  # the step-2 checkpoint held in its write; the step-4 one owed
        _step(loop)
    assert gate.waiting.wait(60) and loop._checkpoint_owed
    gate.open.set()
    loop.checkpoint_beside._job.result(timeout=60)
    loop._between_steps()  # the input paused: no step comes, the durable checkpoint is committed all the same
    assert loop.source.committed == [{0: EVERY * BATCH}]
    assert loop.checkpoint_beside.running and not loop._checkpoint_owed  # and the owed one is under way
    loop.checkpoint_beside._job.result(timeout=60)
    loop._between_steps()
    assert loop.source.committed == [{0: EVERY * BATCH}, {0: 2 * EVERY * BATCH}]


def test_a_failed_checkpoint_is_tried_again_while_the_worker_waits(tmp_path: Path) -> None:
    loop, blocked = _failed_once(tmp_path)
    loop._between_steps()
    assert loop.checkpoint_failures == 1 and loop._checkpoint_owed  # owed, after a pause
    blocked.unlink()  # the directory can be made again
    loop._checkpoint_ready_at = 0.0  # the pause over
    loop._between_steps()
    loop.checkpoint_beside._job.result(timeout=60)
    loop._between_steps()
    assert loop.source.committed == [{0: EVERY * BATCH}] and loop.checkpoint_failures == 1


def test_a_checkpoint_written_beside_training_records_when_its_write_began_and_ended(tmp_path: Path) -> None:
    import time

    from learner.beside import Captured, CheckpointBeside
    from learner.checkpoint import CheckpointStore
    from tests.learner.test_checkpoint_store import _checkpoint

    beside = CheckpointBeside(CheckpointStore(tmp_path / "checkpoints"))
    before = time.time()
    for step in (1, 2):
        beside.start(Captured(lambda: step, lambda: None), _checkpoint, {0: step})
        assert beside.done(wait=True) == {0: step}
    (began, ended), (began2, ended2) = beside.spans
    assert before <= began <= ended <= began2 <= ended2 <= time.time()
    beside.close()
