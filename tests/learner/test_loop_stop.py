"""A trainer behind its input (publishing a large model takes longer than the traffic between two versions)
still stops when asked: within a step, training on what it holds with one version at the end."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from features.memory import InMemoryFeatures
from infra.pipeline import wait_for
from learner.intake import ExamplesSource
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from tests.learner.test_distributed import _batch
from tests.learner.test_read_ahead import CONFIG

BATCH = 48
HELD = 20
"""Batches the source holds at most: what the loop still trains on once asked to stop."""


class _Endless(ExamplesSource):
    """Input that never ends and always holds more than a batch: traffic a trainer does not keep up with."""

    def __init__(self, batch: pa.Table) -> None:
        super().__init__(max_buffered=HELD * BATCH)
        self.batch = batch

    def _fetch(self) -> pa.Table:
        return self.batch


def test_a_trainer_behind_its_input_stops_within_a_step_and_publishes_once_on_the_way_out(tmp_path: Path) -> None:
    config = replace(CONFIG, cadence=replace(CONFIG.cadence, snapshot_every_steps=1))  # a version every step
    store = SnapshotStore(tmp_path / "snapshots")
    loop = TrainingLoop.local(config, InMemoryFeatures(), store, batch_size=BATCH)
    loop.source = _Endless(_batch(0, 0, BATCH))
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: loop.learner.step >= 3 and loop.source.buffered() >= BATCH, 60, "a few steps, a backlog")
        loop.stop()
        asked_at, stopped_at = store.latest_version(), loop.learner.step
        runner.join(timeout=120)
        assert not runner.is_alive(), "the loop did not stop: its input never drops below a batch"
    finally:
        loop.stop()
        if not runner.is_alive():
            loop.close()
    # The step in flight when asked may still publish on its cadence; the steps on what the source held do not;
    # then one version covers everything trained. A base written beside training goes out with its catch-up delta
    # in one publish (two version numbers, the base holding an earlier version's state): counted once.
    after = [store.manifest(v) for v in store.versions() if v > asked_at]
    publishes = [m for m in after if "same_as" not in m.data]
    assert 1 <= len(publishes) <= 2, [(m.version, m.kind, "same_as" in m.data) for m in after]
    assert store.latest_manifest().data["step"] == loop.learner.step
    assert loop.learner.step <= stopped_at + 2 + HELD  # the step in flight, what was held, one fetch more
