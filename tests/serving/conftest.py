"""Fixtures of the serving tests: a real Feast store (SQLite) and real snapshots written by learner.snapshots."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from features.aggregates import StreamAggregator
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from features.store import FeatureStoreConfig, OnlineFeatures
from learner.models import MultiTaskRanker
from learner.snapshots import Manifest, SnapshotStore
from stream.events import TASKS

KNOWN_USERS = (1, 2, 3)
KNOWN_ITEMS = (10, 11, 12, 13)


def tiny_ranker(seed: int, family: str = "mmoe") -> MultiTaskRanker:
    torch.manual_seed(seed)
    return MultiTaskRanker(family, tasks=list(TASKS), id_fields=list(ID_FIELDS), n_dense=len(FEATURE_COLUMNS),
                           n_buckets=256, emb_dim=4, n_experts=2, expert_dims=(8,), tower_dims=(4,))


def publish(store: SnapshotStore, seed: int, **data) -> Manifest:
    """A real snapshot of a tiny model, as the learner publishes it (family, model config, offsets, ...)."""
    model = tiny_ranker(seed)
    return store.publish(model.state_dict(), {"family": "mmoe", "model_config": model.config, "step": seed,
                                              "examples": 10 * seed, "offsets": {"0": seed}, "event_time_hwm_ms":
                                              1_763_900_000_000 + seed, **data})


def feature_store(directory: Path) -> FeatureStoreConfig:
    """A Feast repo with streaming aggregates for a few known users and items (the rest are unknown)."""
    config = FeatureStoreConfig(data_dir=directory, clock="wall")
    store = OnlineFeatures(config)
    n = 64
    rng = np.random.default_rng(0)
    examples = pa.table({
        "user_id": rng.choice(KNOWN_USERS, n), "item_id": rng.choice(KNOWN_ITEMS, n),
        "ts_ms": np.full(n, int(time.time() * 1000), dtype=np.int64),
        **{t: (rng.random(n) < 0.3).astype(np.float32) for t in TASKS},
        "play_time": rng.random(n).astype(np.float32) * 10_000,
    })
    store.push(*StreamAggregator().update(examples))
    return config


@pytest.fixture
def feature_config(tmp_path: Path) -> FeatureStoreConfig:
    return feature_store(tmp_path / "features")


@pytest.fixture
def snapshot_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "snapshots"
    publish(SnapshotStore(directory), seed=1)
    return directory
