"""Features read ahead on the push thread: the next step gets exactly what it would have read itself."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import pyarrow as pa
import torch

from features.aggregates import StreamAggregator
from features.config import FeatureStoreConfig
from features.memory import InMemoryFeatures
from features.store import OnlineFeatures
from learner.config import LearnerConfig
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from tests.learner.test_distributed import _batch

CONFIG = LearnerConfig(family="mmoe", hparams={"n_experts": 2, "expert_dims": (8,), "tower_dims": (4,)},
                       n_buckets=256, emb_dim=4, lr=0.05)
BATCHES = [_batch(step, 0, 48) for step in range(5)]
"""Overlapping users and items from step to step: each step's features depend on the previous one's push."""


class _Recording(InMemoryFeatures):
    """The in-memory store, keeping every feature matrix a lookup returned."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list = []

    def lookup(self, user_ids, item_ids):
        dense = super().lookup(user_ids, item_ids)
        self.reads.append(dense.copy())
        return dense


def _run(tmp: Path, upcoming) -> tuple[TrainingLoop, list]:
    features = _Recording()
    loop = TrainingLoop.local(CONFIG, features, SnapshotStore(tmp / "snapshots"))
    for step, batch in enumerate(BATCHES):
        loop.step(batch, upcoming=upcoming(step))
    loop.close()
    return loop, features.reads


def test_read_ahead_features_equal_a_read_at_the_start_of_the_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain, plain_reads = _run(tmp_path / "plain", lambda step: None)
    torch.manual_seed(0)
    ahead, ahead_reads = _run(tmp_path / "ahead", lambda step: BATCHES[step + 1] if step + 1 < len(BATCHES) else None)
    assert plain.features.read_ahead == 0 and ahead.features.read_ahead == len(BATCHES) - 1
    assert len(plain_reads) == len(ahead_reads) == len(BATCHES)
    for got, expected in zip(ahead_reads, plain_reads):
        assert (got == expected).all()
    assert any((a != b).any() for a, b in zip(plain_reads, plain_reads[1:]))  # the pushes did change features
    for name, value in plain.learner.model.state_dict().items():
        assert torch.equal(ahead.learner.model.state_dict()[name], value), name


def test_a_step_that_gets_other_examples_than_announced_reads_its_own(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain, _ = _run(tmp_path / "plain", lambda step: None)
    wrong = [pa.concat_tables([b.slice(1), b.slice(0, 1)]) for b in BATCHES]  # same rows, another order
    torch.manual_seed(0)
    misled, reads = _run(tmp_path / "misled", lambda step: wrong[step + 1] if step + 1 < len(BATCHES) else None)
    assert misled.features.read_ahead == 0
    assert len(reads) == 2 * len(BATCHES) - 1  # every read ahead went unused and each step read its own
    for name, value in plain.learner.model.state_dict().items():
        assert torch.equal(misled.learner.model.state_dict()[name], value), name


def test_a_read_ahead_the_next_step_did_not_use_is_never_used_later(tmp_path: Path) -> None:
    """A step on nothing (a worker whose partitions were idle, or whose buffer a rebalance dropped) leaves
    the read ahead unused; meanwhile other workers push (their owned entities folded from its batch), so a
    later step must read anew, even for the very examples that were announced."""
    features = _Recording()
    loop = TrainingLoop.local(CONFIG, features, SnapshotStore(tmp_path / "snapshots"))
    loop.step(BATCHES[0], upcoming=BATCHES[1])  # reads BATCHES[1]'s features ahead
    loop.step(BATCHES[0].slice(0, 0))  # the next step gets nothing
    features.push(*StreamAggregator().update(BATCHES[2]))  # another worker's push: BATCHES[1]'s features change
    loop.step(BATCHES[1])
    loop.close()
    assert loop.features.read_ahead == 0
    assert len(features.reads) == 3  # BATCHES[0], the read ahead (unused), BATCHES[1] read anew
    assert (features.reads[2] != features.reads[1]).any()  # the old read would have given other features


def test_a_checkpoint_waits_until_every_push_is_in_the_offline_history(tmp_path: Path) -> None:
    """The history a checkpoint covers is in the store when the checkpoint is taken, however many rows the
    store still collects for its next offline part."""
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "features", offline_part_rows=1_000_000))
    loop = TrainingLoop.local(CONFIG, store, SnapshotStore(tmp_path / "snapshots"))
    for batch in BATCHES[:2]:
        loop.step(batch)
    assert loop.features.state()
    pushed = set(BATCHES[0]["user_id"].to_pylist()) | set(BATCHES[1]["user_id"].to_pylist())
    history = pd.read_parquet(tmp_path / "features" / "offline" / "user_stream")
    assert set(history["user_id"]) == pushed
    loop.close()


class _RecordingSqlite(OnlineFeatures):
    """The real SQLite store, keeping every feature matrix a lookup returned."""

    def __init__(self, config: FeatureStoreConfig) -> None:
        super().__init__(config)
        self.reads: list = []

    def lookup(self, user_ids, item_ids):
        dense = super().lookup(user_ids, item_ids)
        self.reads.append(dense.copy())
        return dense


def test_a_read_ahead_inside_the_pushs_sqlite_transaction_equals_a_read_after_its_commit(tmp_path: Path) -> None:
    """On SQLite the next batch is read inside the push's transaction, before the commit (the step does not wait
    for the commit's page writes): it must read what a read after the commit reads."""
    runs = {}
    for name, upcoming in (("plain", lambda step: None),
                           ("ahead", lambda step: BATCHES[step + 1] if step + 1 < len(BATCHES) else None)):
        torch.manual_seed(0)
        store = _RecordingSqlite(FeatureStoreConfig(data_dir=tmp_path / name / "features"))
        loop = TrainingLoop.local(CONFIG, store, SnapshotStore(tmp_path / name / "snapshots"))
        for step, batch in enumerate(BATCHES):
            loop.step(batch, upcoming=upcoming(step))
        loop.close()
        runs[name] = (loop, store.reads)
    (plain, plain_reads), (ahead, ahead_reads) = runs["plain"], runs["ahead"]
    assert plain.features.read_ahead == 0 and ahead.features.read_ahead == len(BATCHES) - 1
    for got, expected in zip(ahead_reads, plain_reads, strict=True):
        assert (got == expected).all()
    assert any((a != b).any() for a, b in zip(plain_reads, plain_reads[1:]))  # the pushes did change features


class _FailingCommit(InMemoryFeatures):
    """Rows readable (the read ahead runs), then the commit fails: a full disk, say."""

    def push(self, users, items, before_commit=None):
        super().push(users, items, before_commit)
        raise OSError("database or disk is full")


def test_a_push_whose_commit_fails_after_the_read_ahead_is_raised_not_lost(tmp_path: Path) -> None:
    loop = TrainingLoop.local(CONFIG, _FailingCommit(), SnapshotStore(tmp_path / "snapshots"))
    loop.step(BATCHES[0], upcoming=BATCHES[1])
    with pytest.raises(OSError, match="disk is full"):
        loop.step(BATCHES[1], upcoming=BATCHES[2])  # raised by this read, or by its fold at the latest
        loop.features.wait()
