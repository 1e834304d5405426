"""The step log keeps the latest steps whole, phase by phase, and reads them back in order."""

import threading

import numpy as np
import pytest

from learner.step_log import COLUMNS, PHASES, StepLog


def _step(log: StepLog, rows: int, phases=PHASES) -> None:
    log.start()
    for name in phases:
        log.phase(name)
    log.end(rows)


def test_rows_in_order_with_phases_summing_to_the_step():
    log = StepLog(capacity=8)
    for rows in range(5):
        _step(log, rows)
    got = log.since()
    assert list(got) == list(COLUMNS)
    assert got["rows"] == [0, 1, 2, 3, 4]
    assert np.all(np.diff(got["at"]) >= 0)
    phases = np.array([got[p] for p in PHASES]).sum(axis=0)
    assert np.all(phases <= np.array(got["total"]) + 1e-9)
    assert got["waited"][0] == 0.0 and all(w >= 0 for w in got["waited"])


def test_the_ring_keeps_the_latest_and_since_filters_by_start():
    log = StepLog(capacity=4)
    for rows in range(10):
        _step(log, rows)
    got = log.since()
    assert got["rows"] == [6, 7, 8, 9]
    assert log.since(got["at"][2])["rows"] == [8, 9]
    assert log.since(got["at"][-1] + 3600)["rows"] == []


def test_a_phase_named_twice_adds_up_and_a_step_not_started_is_not_kept():
    log = StepLog(capacity=4)
    log.phase("read")  # no step started: nothing to add to
    log.end(3)
    assert len(log) == 0
    log.start()
    log.phase("publish")
    log.phase("publish")
    log.end(7)
    got = log.since()
    assert got["rows"] == [7] and got["publish"][0] <= got["total"][0]
    with pytest.raises(ValueError):
        log.start(), log.phase("nap")
    with pytest.raises(ValueError, match="capacity"):
        StepLog(capacity=0)


def test_reads_beside_the_writer_see_whole_rows():
    log, done = StepLog(capacity=16), threading.Event()

    def write() -> None:
        for rows in range(1, 3001):
            _step(log, rows)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set():
        got = log.since()
        assert all(r > 0 for r in got["rows"]) and got["rows"] == sorted(got["rows"])
    writer.join()
    assert log.since()["rows"] == list(range(2985, 3001))


def test_the_loop_logs_every_step_with_its_publish(tmp_path):
    from dataclasses import replace

    from features.memory import InMemoryFeatures
    from learner.loop import TrainingLoop
    from learner.snapshots import SnapshotStore
    from tests.learner.test_distributed import _batch
    from tests.learner.test_read_ahead import CONFIG

    config = replace(CONFIG, cadence=replace(CONFIG.cadence, snapshot_every_steps=2))
    loop = TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(tmp_path / "snapshots"), batch_size=32)
    for _ in range(4):
        loop.step(_batch(loop.learner.step, 0, 32))
    got = loop.steps()
    assert got["rows"] == [32] * 4
    assert all(t > 0 for t in got["learn"])
    assert all(min(got[p]) >= 0 for p in PHASES) and len(loop.reporter.published) == 2
    assert np.all(np.array([got[p] for p in PHASES]).sum(axis=0) <= np.array(got["total"]) + 1e-9)
    assert loop.steps(got["at"][3])["rows"] == [32]
