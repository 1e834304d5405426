"""The start-up disk check: the need is estimated from the configuration, and a warning names the path and
the bytes free against the bytes needed only when they do not fit."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from infra import disk
from infra.config import MoestreamConfig, PathsConfig
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.config import LearnerConfig, PublishConfig, WideConfig
from learner.step import Learner
from learner.snapshots import SnapshotStore

Usage = namedtuple("Usage", "total used free")


def _config(root: Path, **learner) -> MoestreamConfig:
    return MoestreamConfig(paths=PathsConfig(data_root=root), learner=LearnerConfig(**learner))


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free + 1, 0, free))


def test_the_snapshot_need_is_the_models_bytes_times_the_chains_kept(tmp_path: Path) -> None:
    config = _config(tmp_path)
    weights, dense = disk.model_bytes(config)
    learner = config.learner
    # at most every row of each field's table, its row-wise state and its id map
    embeddings = sum(t["capacity"] * ((t["dim"] + 1) * 4 + 16) for t in learner.tables.values())
    assert weights > embeddings > dense  # the embedding tables are most of it, the experts and towers the rest
    hashed, _ = disk.model_bytes(_config(tmp_path, tables=None))
    assert hashed > learner.n_buckets * (learner.emb_dim + 1) * 4  # the shared hashed table instead
    snapshots, checkpoints = disk.disk_needs(config)
    assert snapshots.path == config.layout().snapshots and checkpoints.path == config.layout().checkpoints
    publish = learner.publish  # keep_bases chains and the one being written, each a base and deltas up to a fraction
    assert snapshots.bytes == int((publish.keep_bases + 1) * (weights + disk.MANIFEST_BYTES)
                                  * (1 + publish.max_delta_fraction))
    whole, _ = disk.disk_needs(_config(tmp_path, publish=PublishConfig(max_deltas=0)))  # every version a base, as before chains
    assert whole.bytes == 11 * (weights + disk.MANIFEST_BYTES)
    assert checkpoints.bytes == 3 * (weights + 2 * dense + disk.CHECKPOINT_ARRAYS_BYTES)  # Adam: dense only


@pytest.mark.parametrize("wide", [WideConfig(dim=0), WideConfig(dim=4, shared=True), WideConfig(dim=4, shared=False)])
def test_the_estimate_is_the_state_of_the_trained_model_with_every_row_held(tmp_path: Path, wide: WideConfig) -> None:
    tables = {"user_id": {"capacity": 300, "dim": 8}, "item_id": {"capacity": 500, "dim": 4}}
    config = _config(tmp_path, tables=tables, wide=wide)
    learner = Learner(config.learner, list(ID_FIELDS), len(FEATURE_COLUMNS))  # what the trainer builds
    for field, table in tables.items():
        for rows in learner.model.field_tables(field):
            rows.ensure_rows(table["capacity"])  # every live id a row
    held = sum(t.numel() * t.element_size() for t in learner.model.state_dict().values())
    weights, dense = disk.model_bytes(config)
    assert weights == held + 16 * (300 + 500)  # and each id map's entries
    assert dense == sum(p.numel() * p.element_size() for p in learner.model.parameters())


def test_enough_space_warns_of_nothing_and_too_little_names_the_paths_and_bytes(tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path, n_buckets=1024, emb_dim=4)
    needed = sum(n.bytes for n in disk.disk_needs(config))
    _free(monkeypatch, needed)
    assert disk.free_space_warnings(config) == []
    _free(monkeypatch, needed - 1)
    [warning] = disk.free_space_warnings(config)  # one file system: one warning for both stores
    assert str(config.layout().snapshots) in warning and str(config.layout().checkpoints) in warning
    assert f"{needed - 1:,} bytes" in warning and f"needs about {needed:,} bytes" in warning


def test_what_the_stores_already_hold_counts_as_reusable(tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path, n_buckets=1024, emb_dim=4)
    needed = sum(n.bytes for n in disk.disk_needs(config))
    SnapshotStore(config.layout().snapshots).publish({"w": torch.zeros(1000)}, {})
    held = sum(f.stat().st_size for f in config.layout().snapshots.iterdir())
    _free(monkeypatch, needed - held)
    assert disk.free_space_warnings(config) == []
    _free(monkeypatch, needed - held - 1)
    assert len(disk.free_space_warnings(config)) == 1


@pytest.mark.parametrize("family", ["mmoe", "ple", "home", "smes"])
def test_every_family_is_sized_without_building_real_tensors(tmp_path: Path, family: str) -> None:
    weights, dense = disk.model_bytes(_config(tmp_path, family=family, n_buckets=256, emb_dim=4))
    assert weights > 256 * 4 * 4 and 0 < dense < weights
