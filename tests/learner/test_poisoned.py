"""A poisoned batch: non-finite features and an exploding loss never reach the weights, no non-finite
snapshot is published, and training goes on from the last good weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from features.definitions import FEATURE_COLUMNS
from learner.config import LearnerConfig
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from tests.learner.test_distributed import _batch


class _Poisonable:
    """Deterministic features; ``poison`` makes the next lookups return it in every cell."""

    poison: float | None = None

    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        if self.poison is not None:
            return np.full((len(user_ids), len(FEATURE_COLUMNS)), self.poison, dtype=np.float32)
        return ((user_ids[:, None] + item_ids[:, None] + np.arange(len(FEATURE_COLUMNS))) % 7).astype(np.float32)

    def push(self, users, items, before_commit=None) -> None:
        if before_commit is not None:  # nothing kept: readable at once
            before_commit()

    def flush(self) -> None:
        return None


@pytest.mark.reliability
@pytest.mark.parametrize("family", ["mmoe", "home"])
def test_poisoned_features_and_an_exploding_step_leave_the_weights_alone(tmp_path: Path, family: str) -> None:
    features = _Poisonable()
    store = SnapshotStore(tmp_path / "snapshots")
    config = LearnerConfig(family=family, hparams={"expert_dims": (8,), "tower_dims": (4,)}, n_buckets=256,
                           emb_dim=4, lr=0.05)
    loop = TrainingLoop.local(config, features, store)
    learner = loop.learner
    loop.step(_batch(0, 0, 64))
    assert loop.publish() is not None

    features.poison = float("nan")  # NaN features: read as 0 and counted, the step is an ordinary one
    loop.step(_batch(1, 0, 32))
    assert loop.features.nonfinite == 32 * len(FEATURE_COLUMNS) and learner.skipped_steps == 0

    # An exploding step. Dense features go through symlog, so no input value makes the gradient overflow
    # here; the blow-up (a bad learning rate, a numerical bug) is injected into one layer's gradient.
    features.poison = None
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    in_use = {name: stats["live"] for name, stats in learner.id_tables().items()}  # rows 1..live, nothing freed
    tower = learner.model.model.towers.mlp.layers[-1].weight
    hook = tower.register_hook(lambda grad: grad * float("inf"))
    loop.step(_batch(2, 0, 32))
    hook.remove()
    assert learner.skipped_steps == 1
    for key, value in learner.model.state_dict().items():  # weights and BatchNorm statistics untouched
        parts = key.split(".")
        if parts[0] in ("encoder", "wide") and parts[1] in ("tables", "factors", "biases") and \
                parts[3] in ("weight", "sum_sq", "resets"):
            # The batch's ids were still read: rows handed to ids first seen in it start fresh in the field's
            # tables, its embedding's and the wide term's (each grows and counts the reset); every row in use
            # before is untouched.
            if parts[3] != "resets":
                rows = in_use[parts[2]] + 1
                assert torch.equal(value[:rows], before[key][:rows]), key
            continue
        assert torch.equal(value, before[key]), key
    assert loop.publish() is not None  # finite, so publishable

    features.poison = None
    result = loop.step(_batch(3, 0, 64))
    assert np.isfinite(result.loss) and learner.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in learner.model.state_dict().values() if v.is_floating_point())
    _, latest = store.load()
    assert all(torch.isfinite(v).all() for v in latest.values() if v.is_floating_point())
    print(f"poisoned batch ({family}): {loop.features.nonfinite} non-finite feature values read as 0 and "
          f"counted; {learner.skipped_steps} exploding step skipped with weights and buffers unchanged; "
          f"{len(loop.reporter.published)} snapshots published, every weight finite; the next step trained "
          f"(loss {result.loss:.4f})")
