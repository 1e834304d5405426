"""Progressive validation: every batch is scored before the model learns from it (river's recipe).

Per task, over a sliding window of recent examples (``window_*``) and cumulatively:

- **AUC**. Windowed: exact, on the raw window, from mid-ranks (the Mann-Whitney statistic, computed as the
  GAUC of one user, without the grouping; equal to scikit-learn's ``roc_auc_score``, which the tests check,
  and several times faster: its input validation costs more than the sort, and the trainer computes six of
  these every report). Cumulative: from fixed-width
  score histograms (2048 bins, ties inside a bin count one half), so memory stays bounded however long
  the stream runs; it agrees with the exact AUC to about 1e-3.
- **GAUC**: per-user AUC weighted by the user's impressions, ``Σ_u n_u·AUC_u / Σ_u n_u``. Users whose
  examples are all of one class have no AUC and are skipped (neither in the sum nor in the weights);
  ``gauc_users`` says how many users counted. Windowed: on the raw window. Cumulative: the exact GAUC
  of each consecutive chunk of ``window`` examples, combined with the same impression weights (plus the
  chunk being filled). Exact GAUC over all time would need every user's scores forever; chunking keeps
  memory bounded and only drops pairs of one user's examples that fall in different chunks.
- **logloss** (probabilities clipped to [1e-7, 1 - 1e-7]) and **calibration**: mean predicted / observed
  positive rate (1 is calibrated, > 1 over-predicts), and the observed **positive_rate**.

Examples without a label for a task (a non-finite label) are left out of that task's metrics.
"""

from __future__ import annotations

from collections import deque

import numpy as np

_BINS = 2048
_EPS = 1e-7


def _histogram_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin positive/negative counts (ties inside a bin count one half)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def group_auc_terms(p: np.ndarray, y: np.ndarray, users: np.ndarray) -> tuple[float, float, int]:
    """``(Σ_u n_u·AUC_u, Σ_u n_u, users counted)`` over users with both classes; GAUC is the ratio.

    All users at once, no loop: within each user, the Mann-Whitney statistic from mid-ranks (tied scores
    share their average rank, which counts a tied positive/negative pair one half, as ``roc_auc_score``).
    """
    if len(p) == 0:
        return 0.0, 0.0, 0
    order = np.lexsort((p, users))  # by user, then score
    grouped, s, lab = users[order], p[order], y[order]
    n = len(grouped)
    pos = np.arange(n)
    user_start_flag = np.r_[True, grouped[1:] != grouped[:-1]]
    u = np.cumsum(user_start_flag) - 1  # (N,) dense user index, in sorted order
    user_start = np.maximum.accumulate(np.where(user_start_flag, pos, 0))  # (N,) first index of the row's user
    tie_start_flag = user_start_flag | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(tie_start_flag) - 1
    tie_first = np.flatnonzero(tie_start_flag)
    tie_last = np.r_[tie_first[1:] - 1, n - 1]
    mid_rank = (tie_first[tie_id] + tie_last[tie_id]) / 2.0 - user_start + 1.0  # 1-based, within the user
    n_rows = np.bincount(u).astype(np.float64)
    n_pos = np.bincount(u, weights=lab)
    n_neg = n_rows - n_pos
    rank_pos = np.bincount(u, weights=mid_rank * lab)
    both = (n_pos > 0) & (n_neg > 0)
    auc = (rank_pos[both] - n_pos[both] * (n_pos[both] + 1) / 2) / (n_pos[both] * n_neg[both])
    return float((n_rows[both] * auc).sum()), float(n_rows[both].sum()), int(both.sum())


def group_auc(p: np.ndarray, y: np.ndarray, users: np.ndarray) -> float:
    """GAUC (see the module docstring); NaN when no user has both classes."""
    num, den, _ = group_auc_terms(p, y, users)
    return num / den if den else float("nan")


def binary_auc(p: np.ndarray, y: np.ndarray) -> float:
    """Exact AUC of scores ``p`` for 0/1 labels ``y`` from mid-ranks: the GAUC of one user without the grouping
    (tied scores share their mid-rank, so a tied positive/negative pair counts one half, as in
    ``roc_auc_score``). NaN without both classes."""
    n = len(p)
    n_pos = float(np.sum(y))
    if n_pos == 0 or n_pos == n:
        return float("nan")
    order = np.argsort(p)  # any order within ties: tied scores share their mid-rank
    s, lab = p[order], y[order]
    tie_start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    tie_end = np.r_[tie_start[1:], n]
    mid_rank = (tie_start + tie_end + 1) / 2.0  # 1-based: (first + last) / 2 + 1
    rank_pos = float(np.dot(np.repeat(mid_rank, tie_end - tie_start), lab))
    return (rank_pos - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))


def _concat(parts: deque | list, n: int = 3) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([part[i] for part in parts]) for i in range(n))


class TaskMetric:
    def __init__(self, window: int) -> None:
        self.window = window
        self._recent: deque[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = deque()
        self._recent_n = 0
        self._chunk: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._chunk_n = 0
        self._pos = np.zeros(_BINS)
        self._neg = np.zeros(_BINS)
        self._sum_p = 0.0
        self._sum_y = 0.0
        self._sum_ll = 0.0
        self._gauc_num = 0.0
        self._gauc_den = 0.0
        self.n = 0

    def update(self, p: np.ndarray, y: np.ndarray, users: np.ndarray | None = None) -> None:
        y = np.asarray(y, dtype=np.float64)
        labelled = np.isfinite(y)
        p = np.clip(np.asarray(p, dtype=np.float64)[labelled], _EPS, 1 - _EPS)
        y = y[labelled]
        u = None if users is None else np.asarray(users)[labelled]
        if len(p) == 0:
            return
        bins = np.minimum((p * _BINS).astype(np.int64), _BINS - 1)
        self._pos += np.bincount(bins, weights=y, minlength=_BINS)
        self._neg += np.bincount(bins, weights=1 - y, minlength=_BINS)
        self._sum_p += p.sum()
        self._sum_y += y.sum()
        self._sum_ll += -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum()
        self.n += len(p)
        self._recent.append((p, y, u))
        self._recent_n += len(p)
        while self._recent_n - len(self._recent[0][0]) >= self.window:
            self._recent_n -= len(self._recent.popleft()[0])
        if u is not None:
            self._chunk.append((p, y, u))
            self._chunk_n += len(p)
            if self._chunk_n >= self.window:
                num, den, _ = group_auc_terms(*_concat(self._chunk))
                self._gauc_num += num
                self._gauc_den += den
                self._chunk, self._chunk_n = [], 0

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """The cumulative figures (the sliding window and the open GAUC chunk are not kept: they refill
        within one window)."""
        sums = np.array(
            [self._sum_p, self._sum_y, self._sum_ll, self.n, self._gauc_num, self._gauc_den], dtype=np.float64
        )
        return {f"{prefix}.pos": self._pos, f"{prefix}.neg": self._neg, f"{prefix}.sums": sums}

    def load_state(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        self._pos, self._neg = arrays[f"{prefix}.pos"].copy(), arrays[f"{prefix}.neg"].copy()
        sums = arrays[f"{prefix}.sums"].tolist()
        sums += [0.0] * (6 - len(sums))  # checkpoints written before GAUC was kept
        self._sum_p, self._sum_y, self._sum_ll, n, self._gauc_num, self._gauc_den = sums
        self.n = int(n)

    def summary(self) -> dict[str, float]:
        num, den = self._gauc_num, self._gauc_den
        if self._chunk:
            chunk_num, chunk_den, _ = group_auc_terms(*_concat(self._chunk))
            num, den = num + chunk_num, den + chunk_den
        out = {
            "auc": _histogram_auc(self._pos, self._neg),
            "gauc": num / den if den else float("nan"),
            "logloss": float(self._sum_ll / self.n) if self.n else float("nan"),
            "calibration": float(self._sum_p / self._sum_y) if self._sum_y else float("nan"),
            "positive_rate": float(self._sum_y / self.n) if self.n else float("nan"),
            "n": float(self.n),
        }
        if self._recent:
            p, y = _concat(self._recent, 2)
            both = 0 < y.sum() < len(y)
            w_num, w_den, w_users = 0.0, 0.0, 0
            if all(part[2] is not None for part in self._recent):
                w_num, w_den, w_users = group_auc_terms(p, y, np.concatenate([part[2] for part in self._recent]))
            out.update(
                window_auc=binary_auc(p, y) if both else float("nan"),
                window_gauc=w_num / w_den if w_den else float("nan"),
                window_gauc_users=float(w_users),
                window_logloss=float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
                window_calibration=float(p.mean() / y.mean()) if y.sum() else float("nan"),
                window_positives=float(y.sum()),
                window_n=float(len(y)),
            )
        return out


class ProgressiveValidation:
    def __init__(self, tasks: tuple[str, ...], window: int = 20_000) -> None:
        self.tasks = {t: TaskMetric(window) for t in tasks}

    def update(
        self, probs: dict[str, np.ndarray], labels: dict[str, np.ndarray], users: np.ndarray | None = None
    ) -> None:
        """Fold in one batch scored *before* the model learned from it; ``users`` enables GAUC."""
        for task, metric in self.tasks.items():
            metric.update(probs[task], labels[task], users)

    def summary(self) -> dict[str, dict[str, float]]:
        return {task: metric.summary() for task, metric in self.tasks.items()}

    def positive_rates(self) -> dict[str, float]:
        """Cumulative observed positive rate per task (cheap: no AUC)."""
        return {task: m._sum_y / m.n if m.n else float("nan") for task, m in self.tasks.items()}

    def state(self) -> dict[str, np.ndarray]:
        return {k: v for task, m in self.tasks.items() for k, v in m.state(f"metrics.{task}").items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for task, metric in self.tasks.items():
            metric.load_state(f"metrics.{task}", arrays)
