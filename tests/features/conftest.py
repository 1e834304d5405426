"""The store configurations the feature tests run against: SQLite (default) and a real redis-server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from features.store import FeatureStoreConfig


@pytest.fixture(params=["sqlite", "redis"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> FeatureStoreConfig:
    if request.param == "sqlite":
        return FeatureStoreConfig(data_dir=tmp_path)
    connection = request.getfixturevalue("redis_server")
    # One Feast project per test: the Redis keys are prefixed by it, so tests sharing the server stay apart.
    return FeatureStoreConfig(data_dir=tmp_path, online_store="redis", redis_connection=connection,
                              project=f"t{uuid.uuid4().hex[:12]}")
