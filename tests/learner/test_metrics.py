from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from learner.metrics import ProgressiveValidation, TaskMetric, binary_auc, group_auc


def _brute_gauc(p: np.ndarray, y: np.ndarray, users: np.ndarray) -> tuple[float, float]:
    """Reference: a loop over users with scikit-learn, one-class users skipped; (weighted sum, weight)."""
    num = den = 0.0
    for u in np.unique(users):
        sel = users == u
        if 0 < y[sel].sum() < sel.sum():
            num += sel.sum() * roc_auc_score(y[sel], p[sel])
            den += sel.sum()
    return num, den


def _stream(rng: np.random.Generator, n: int, n_users: int, rate: float = 0.3):
    users = rng.integers(0, n_users, n)
    y = (rng.random(n) < rate).astype(float)
    p = rate + 0.2 * (y - rate) + rng.normal(0, 0.15, n)
    return np.clip(np.round(p, 2), 0.01, 0.99), y, users  # rounding makes ties, which must count one half


def test_group_auc_matches_a_per_user_sklearn_loop_with_ties_and_one_class_users() -> None:
    rng = np.random.default_rng(1)
    p, y, users = _stream(rng, 3_000, 200)
    users[:5] = 10_000  # a user with only negatives: skipped
    y[:5] = 0.0
    num, den = _brute_gauc(p, y, users)
    assert group_auc(p, y, users) == pytest.approx(num / den, abs=1e-12)
    assert group_auc(p, y, np.zeros(len(p), dtype=np.int64)) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(group_auc(p[:3], np.zeros(3), users[:3]))


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    p = np.round(rng.random(n), int(rng.integers(1, 4))).astype(np.float32)  # coarse scores: many ties
    y = (rng.random(n) < rng.uniform(0.01, 0.6)).astype(np.float32)
    y[0], y[1] = 0.0, 1.0
    assert binary_auc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(binary_auc(p, np.zeros(n, np.float32)))


def test_window_and_cumulative_figures_match_brute_force_references() -> None:
    rng = np.random.default_rng(0)
    window = 1_000
    metric = TaskMetric(window)
    ps, ys, us = [], [], []
    for _ in range(9):  # 4500 examples: four full GAUC chunks and a half-filled one
        p, y, u = _stream(rng, 500, 60)
        metric.update(p, y, u)
        ps.append(p), ys.append(y), us.append(u)
    p, y, u = (np.concatenate(a) for a in (ps, ys, us))
    s = metric.summary()

    assert s["auc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)  # histogram AUC
    assert s["logloss"] == pytest.approx(log_loss(y, p), rel=1e-9)
    assert s["calibration"] == pytest.approx(p.mean() / y.mean(), rel=1e-9)
    assert s["positive_rate"] == pytest.approx(y.mean())
    chunks = [_brute_gauc(p[i : i + window], y[i : i + window], u[i : i + window]) for i in range(0, len(p), window)]
    assert s["gauc"] == pytest.approx(sum(c[0] for c in chunks) / sum(c[1] for c in chunks), abs=1e-12)

    w = slice(-window, None)
    num, den = _brute_gauc(p[w], y[w], u[w])
    assert s["window_n"] == window
    assert s["window_auc"] == pytest.approx(roc_auc_score(y[w], p[w]), abs=1e-12)
    assert s["window_gauc"] == pytest.approx(num / den, abs=1e-12)
    assert s["window_logloss"] == pytest.approx(log_loss(y[w], p[w]), rel=1e-9)
    assert s["window_calibration"] == pytest.approx(p[w].mean() / y[w].mean(), rel=1e-9)
    assert s["window_positives"] == y[w].sum()


def test_unlabelled_examples_are_left_out() -> None:
    metric = TaskMetric(100)
    metric.update(np.array([0.9, 0.2, 0.7, 0.4]), np.array([1.0, np.nan, 0.0, np.nan]), np.array([1, 1, 1, 2]))
    s = metric.summary()
    assert s["n"] == 2 and s["auc"] == 1.0 and s["window_auc"] == 1.0
    assert s["gauc"] == 1.0 and s["window_gauc_users"] == 1


def test_state_round_trip_keeps_the_cumulative_figures() -> None:
    rng = np.random.default_rng(3)
    pv = ProgressiveValidation(("click", "like"), window=500)
    for _ in range(5):
        p, y, u = _stream(rng, 400, 30)
        pv.update({"click": p, "like": p[::-1].copy()}, {"click": y, "like": y}, u)
    pv.update({"click": p, "like": p}, {"click": y, "like": y}, u)  # leaves a half-filled GAUC chunk
    restored = ProgressiveValidation(("click", "like"), window=500)
    restored.load_state(pv.state())
    before, after = pv.summary(), restored.summary()
    for task in ("click", "like"):
        for key in ("auc", "logloss", "calibration", "n"):
            assert after[task][key] == before[task][key]
        assert after[task]["gauc"] == pytest.approx(before[task]["gauc"], abs=0.05)  # the open chunk is not kept


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
    assert np.isnan(s["gauc"]) and np.isnan(s["window_gauc"])  # no users given


def test_auc_is_nan_until_both_classes_are_seen() -> None:
    pv = ProgressiveValidation(("like",))
    pv.update({"like": np.array([0.2, 0.4])}, {"like": np.array([0.0, 0.0])})
    assert np.isnan(pv.summary()["like"]["auc"])
