"""Replay straight into the learner (no Kafka): a simulator log file -> replay -> joiner -> Feast SQLite -> model."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.pipeline import RunLayout, worker_config
from learner.snapshots import SnapshotStore
from learner.worker import DirectTrainer
from stream.logfile import write_log
from stream.replay import ReplayConfig, replay
from stream.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.integration


def test_a_replayed_log_trains_every_impression_once_and_publishes(tmp_path: Path) -> None:
    events = list(Simulator(SimulatorConfig(seed=4, max_delay_s=2.0)).events(1_700_000_000_000, 300))
    log = tmp_path / "log.parquet"
    write_log(events, log)
    config = worker_config(RunLayout(tmp_path / "run"), bootstrap="unused", topic="replay",
                           snapshot_every_steps=2, batch_size=128, wandb_mode="disabled")
    trainer = DirectTrainer(config)
    first = replay(ReplayConfig(path=log, progress=False, limit=700), trainer.learn_events)
    rest = replay(ReplayConfig(path=log, progress=False, start=first.position), trainer.learn_events)
    stats = trainer.finish()

    impressions = sum(e["type"] == "impression" for e in events)
    assert first.emitted + rest.emitted == len(events)
    assert stats["rejected"] == 0 and stats["joiner"]["orphan_feedback"] == 0
    assert stats["examples_trained"] == impressions
    assert len(stats["snapshots"]) >= 2
    assert SnapshotStore(config.snapshot_dir).load()[0].version == stats["snapshots"][-1]
