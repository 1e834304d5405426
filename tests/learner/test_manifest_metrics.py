"""A version published between two health reports carries the last report's progressive metrics (sorting every
task's window for each version cost a trainer publishing every step a quarter of its time at 10^7 ids); the run's
last version carries metrics taken at its step."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from features.memory import InMemoryFeatures
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from tests.learner.test_distributed import _batch
from tests.learner.test_read_ahead import CONFIG

BATCH = 32


def test_versions_between_health_reports_carry_the_last_reports_metrics_and_the_last_one_fresh(tmp_path: Path) -> None:
    config = replace(CONFIG, cadence=replace(CONFIG.cadence, snapshot_every_steps=1, health_every_steps=4))
    store = SnapshotStore(tmp_path / "snapshots", max_delta_bytes=2**40)  # no base due: every version a delta
    loop = TrainingLoop.local(config, InMemoryFeatures(), store, batch_size=BATCH)
    taken: list[int] = []
    summary = loop.learner.summary
    loop.learner.summary = lambda: (taken.append(loop.learner.step), summary())[1]
    for _ in range(9):
        loop.step(_batch(loop.learner.step, 0, BATCH))
    manifests = [store.manifest(v) for v in loop.reporter.published]
    # step 1 has no report before it: its publish takes a summary; the reports at 4 and 8 take theirs
    assert taken == [1, 4, 8]
    assert [m.data["metrics_step"] for m in manifests] == [1, 1, 1, 4, 4, 4, 4, 8, 8]
    assert manifests[4].data["metrics"] == manifests[3].data["metrics"] != manifests[2].data["metrics"]
    loop.publish(final=True)
    last = store.manifest(loop.reporter.published[-1])
    assert taken[-1] == 9 and last.data["metrics_step"] == 9
