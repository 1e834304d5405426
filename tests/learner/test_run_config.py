"""What the trainer logs as its W&B run config: the whole config, never a credential."""

from __future__ import annotations

from dataclasses import replace

from features.config import FeatureStoreConfig
from learner.config import WorkerConfig
from learner.worker import run_config


def test_a_redis_password_never_reaches_the_run_config() -> None:
    config = replace(WorkerConfig(), features=FeatureStoreConfig(redis_connection="10.0.0.5:6379,password=s3cret,ssl=true"))
    logged = run_config(config)
    assert logged["features"]["redis_connection"] == "10.0.0.5:6379,password=***,ssl=true"
    assert "s3cret" not in repr(logged)
    assert logged["batch_size"] == config.batch_size and isinstance(logged["snapshot_dir"], str)
