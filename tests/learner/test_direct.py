"""Replay straight into the learner (no Kafka): a simulator log file -> replay -> joiner -> Feast SQLite -> model,
through the same training loop as Kafka."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.pipeline import RunLayout, worker_config
from learner.replay_source import train_replay
from learner.snapshots import SnapshotStore
from stream.logfile import write_log
from stream.replay import ReplayConfig
from stream.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.integration


def _log_and_config(tmp_path: Path, seed: int, requests: int, snapshot_every_steps: int, batch_size: int):
    events = list(Simulator(SimulatorConfig(seed=seed, max_delay_s=2.0)).events(1_700_000_000_000, requests))
    log = tmp_path / "log.parquet"
    write_log(events, log)
    config = worker_config(RunLayout(tmp_path / "run"), bootstrap="unused", topic="replay",
                           snapshot_every_steps=snapshot_every_steps, batch_size=batch_size, wandb_mode="disabled")
    return events, log, config


def test_a_replayed_log_trains_every_impression_once_and_publishes(tmp_path: Path) -> None:
    events, log, config = _log_and_config(tmp_path, seed=4, requests=300, snapshot_every_steps=2, batch_size=128)
    result, stats = train_replay(config, ReplayConfig(path=log, progress=False))

    impressions = sum(e["type"] == "impression" for e in events)
    assert result.emitted == len(events) and result.rejected == {}
    assert stats["joiner"]["orphan_feedback"] == 0 and stats["joiner"]["impressions"] == impressions
    assert stats["examples_trained"] == impressions
    assert stats["steps"] == -(-impressions // 128)  # full batches, then the rest at the end
    assert len(stats["snapshots"]) >= 2
    manifest, _ = SnapshotStore(config.snapshot_dir).load()
    assert manifest.version == stats["snapshots"][-1]
    assert manifest.data["offsets"] == {"0": len(events)}  # the last snapshot covers the whole log


def test_a_limited_replay_trains_what_it_read_and_reports_where_to_resume(tmp_path: Path) -> None:
    _, log, config = _log_and_config(tmp_path, seed=5, requests=200, snapshot_every_steps=1_000, batch_size=64)
    result, stats = train_replay(config, ReplayConfig(path=log, progress=False, limit=300))
    assert result.emitted == 300 and result.position.emitted == 300
    assert stats["examples_trained"] == stats["joiner"]["impressions"] > 0
