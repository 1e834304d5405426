from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from learner.metrics import ProgressiveValidation


def test_histogram_auc_matches_sklearn_and_window_is_bounded() -> None:
    rng = np.random.default_rng(0)
    pv = ProgressiveValidation(("click",), window=1_000)
    ps, ys = [], []
    for _ in range(10):
        y = (rng.random(500) < 0.3).astype(float)
        p = np.clip(0.3 + 0.2 * (y - 0.3) + rng.normal(0, 0.15, 500), 0.001, 0.999)
        pv.update({"click": p}, {"click": y})
        ps.append(p)
        ys.append(y)
    s = pv.summary()["click"]
    p, y = np.concatenate(ps), np.concatenate(ys)
    assert s["auc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    assert s["window_auc"] == pytest.approx(roc_auc_score(y[-1000:], p[-1000:]), abs=1e-9)
    assert s["calibration"] == pytest.approx(p.mean() / y.mean())
    assert s["n"] == 5000


def test_auc_is_nan_until_both_classes_are_seen() -> None:
    pv = ProgressiveValidation(("like",))
    pv.update({"like": np.array([0.2, 0.4])}, {"like": np.array([0.0, 0.0])})
    assert np.isnan(pv.summary()["like"]["auc"])
