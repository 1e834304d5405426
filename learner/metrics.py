"""Progressive validation: every batch is scored before the model learns from it (river's recipe).

Per task, over a sliding window of recent examples and cumulatively: AUC, logloss and calibration
(mean predicted / observed rate). The cumulative AUC comes from fixed-width score histograms, so memory
stays bounded however long the stream runs; the windowed figures use scikit-learn on the raw window.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

_BINS = 2048


def _histogram_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin positive/negative counts (ties inside a bin count one half)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


class TaskMetric:
    def __init__(self, window: int) -> None:
        self.window = window
        self._recent: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._recent_n = 0
        self._pos = np.zeros(_BINS)
        self._neg = np.zeros(_BINS)
        self._sum_p = 0.0
        self._sum_y = 0.0
        self._sum_ll = 0.0
        self.n = 0

    def update(self, p: np.ndarray, y: np.ndarray) -> None:
        p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        y = y.astype(np.float64)
        bins = np.minimum((p * _BINS).astype(np.int64), _BINS - 1)
        self._pos += np.bincount(bins, weights=y, minlength=_BINS)
        self._neg += np.bincount(bins, weights=1 - y, minlength=_BINS)
        self._sum_p += p.sum()
        self._sum_y += y.sum()
        self._sum_ll += -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum()
        self.n += len(p)
        self._recent.append((p, y))
        self._recent_n += len(p)
        while self._recent_n - len(self._recent[0][0]) >= self.window:
            self._recent_n -= len(self._recent.popleft()[0])

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """The cumulative figures (the sliding window is not kept: it refills within one window)."""
        sums = np.array([self._sum_p, self._sum_y, self._sum_ll, self.n], dtype=np.float64)
        return {f"{prefix}.pos": self._pos, f"{prefix}.neg": self._neg, f"{prefix}.sums": sums}

    def load_state(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        self._pos, self._neg = arrays[f"{prefix}.pos"].copy(), arrays[f"{prefix}.neg"].copy()
        self._sum_p, self._sum_y, self._sum_ll, n = arrays[f"{prefix}.sums"].tolist()
        self.n = int(n)

    def summary(self) -> dict[str, float]:
        out = {
            "auc": _histogram_auc(self._pos, self._neg),
            "logloss": self._sum_ll / self.n if self.n else float("nan"),
            "calibration": self._sum_p / self._sum_y if self._sum_y else float("nan"),
            "positive_rate": self._sum_y / self.n if self.n else float("nan"),
            "n": float(self.n),
        }
        if self._recent:
            p = np.concatenate([r[0] for r in self._recent])
            y = np.concatenate([r[1] for r in self._recent])
            both = 0 < y.sum() < len(y)
            out["window_auc"] = float(roc_auc_score(y, p)) if both else float("nan")
            out["window_logloss"] = float(log_loss(y, p, labels=[0, 1]))
            out["window_calibration"] = float(p.mean() / y.mean()) if y.sum() else float("nan")
        return out


class ProgressiveValidation:
    def __init__(self, tasks: tuple[str, ...], window: int = 20_000) -> None:
        self.tasks = {t: TaskMetric(window) for t in tasks}

    def update(self, probs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
        for task, metric in self.tasks.items():
            metric.update(probs[task], labels[task])

    def summary(self) -> dict[str, dict[str, float]]:
        return {task: metric.summary() for task, metric in self.tasks.items()}

    def state(self) -> dict[str, np.ndarray]:
        return {k: v for task, m in self.tasks.items() for k, v in m.state(f"metrics.{task}").items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for task, metric in self.tasks.items():
            metric.load_state(f"metrics.{task}", arrays)
