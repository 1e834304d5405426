"""``bench quality``'s floor: online logistic matrix factorisation on user × item, one per task.

Per task ``t``: ``p(y_t = 1) = sigmoid(b_t + b_{u,t} + b_{i,t} + p_{u,t} · q_{i,t})``, trained by predict-then-update
on the trainer's batches in the trainer's order (progressive: each batch is scored before its update), with
FBGEMM's row-wise Adagrad on every row a batch touched (each row's gradient summed over the batch,
``state += mean(g**2)``, ``w -= lr * g / (sqrt(state) + eps)``) and plain Adagrad on the biases; the state starts
at ``initial_accumulator`` (TensorFlow's Adagrad starts at 0.1: with 0, a row's first step is ``lr`` whatever its
gradient, and a rare task's first negative moves a row as far as a positive). It sees user and item ids and
nothing else: no features, no other task. It is the floor any learner of this stream should clear.

Tuned honestly: :func:`tune` picks each task's ``(lr, dim, initial_accumulator)`` from :data:`GRID` by progressive
AUC on a stream of its own seed (``QualityPlan.tuning_seed``), never one of the reported seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from learner.metrics import binary_auc

GRID_LR = (0.03, 0.1, 0.3, 1.0)
GRID_DIM = (4, 8, 16, 32)
GRID_ACCUMULATOR = (0.0, 1.0)
GRID: tuple[tuple[float, int, float], ...] = tuple(itertools.product(GRID_LR, GRID_DIM, GRID_ACCUMULATOR))
"""(lr, dim, initial_accumulator) points."""
EPS = 1e-8
INIT_STD = 0.1
"""Factor entries start at N(0, INIT_STD² / dim): small, but not zero (zero is a saddle of p · q)."""


@dataclass(frozen=True)
class FloorConfig:
    lr: float = 0.1
    dim: int = 16
    initial_accumulator: float = 0.0
    seed: int = 0


def _rowwise_adagrad(weight: np.ndarray, state: np.ndarray, rows: np.ndarray, grads: np.ndarray, lr: float) -> None:
    """Row-wise Adagrad on ``weight[rows]`` (rows repeat: their gradients are summed first).
    ``weight`` (R, T, D) with ``state`` (R, T), or (R, T) with ``state`` (R, T) (a bias: one entry per row)."""
    order = np.argsort(rows, kind="stable")
    rows, grads = rows[order], grads[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    unique, summed = rows[starts], np.add.reduceat(grads, starts, axis=0)  # (U, T[, D])
    squared = summed**2 if summed.ndim == 2 else (summed**2).mean(axis=-1)  # (U, T)
    state[unique] += squared
    step = lr / (np.sqrt(state[unique]) + EPS)  # (U, T)
    weight[unique] -= (step[..., None] if summed.ndim == 3 else step) * summed


class LogisticMF:
    """The floor's model for every task at once (tasks share nothing: separate factors, biases and state)."""

    def __init__(self, n_users: int, n_items: int, base_rates: np.ndarray, config: FloorConfig = FloorConfig()) -> None:
        n_tasks = len(base_rates)
        rng = np.random.default_rng(config.seed)
        self.config = config
        std = INIT_STD / np.sqrt(config.dim)
        self.p = rng.normal(0, std, (n_users, n_tasks, config.dim)).astype(np.float32)  # (U, T, D)
        self.q = rng.normal(0, std, (n_items, n_tasks, config.dim)).astype(np.float32)  # (I, T, D)
        self.b_user, self.b_item = np.zeros((n_users, n_tasks), np.float32), np.zeros((n_items, n_tasks), np.float32)
        self.bias = np.log(base_rates / (1 - base_rates)).astype(np.float32)[None, :]  # (1, T): the models' prior too
        self._state = {name: np.full(getattr(self, name).shape[:2], config.initial_accumulator, np.float32)
                       for name in ("p", "q", "b_user", "b_item", "bias")}

    def logits(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(B, T) for user and item indexes (B,)."""
        affinity = np.einsum("btd,btd->bt", self.p[users], self.q[items])
        return self.bias + self.b_user[users] + self.b_item[items] + affinity

    def learn(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Score the batch, then one update on its log loss; returns the scores (logits, (B, T))."""
        z = self.logits(users, items)
        g = 0.5 * (1 + np.tanh(z / 2)) - labels  # (B, T): sigmoid(z) - y, d loss / d logit, without overflow
        lr = self.config.lr
        grad_p, grad_q = g[..., None] * self.q[items], g[..., None] * self.p[users]  # (B, T, D), before either moves
        _rowwise_adagrad(self.p, self._state["p"], users, grad_p, lr)
        _rowwise_adagrad(self.q, self._state["q"], items, grad_q, lr)
        _rowwise_adagrad(self.b_user, self._state["b_user"], users, g, lr)
        _rowwise_adagrad(self.b_item, self._state["b_item"], items, g, lr)
        _rowwise_adagrad(self.bias, self._state["bias"], np.zeros(len(g), np.int64), g, lr)
        return z


def progressive_scores(users: np.ndarray, items: np.ndarray, labels: np.ndarray, batch: int,
                       config: FloorConfig = FloorConfig(), base_rates: np.ndarray | None = None) -> np.ndarray:
    """Every example's floor score (logit, (N, T)) taken before the floor learned from it, batches of ``batch``
    in the given order. Raw ids are numbered densely first (a new id starts from its initial row, as it would).
    ``base_rates`` (T,): where each task's global bias starts (default 0.5), the prior the models start from."""
    base_rates = np.full(labels.shape[1], 0.5) if base_rates is None else np.asarray(base_rates, np.float64)
    user_rows = np.unique(users, return_inverse=True)[1]
    item_rows = np.unique(items, return_inverse=True)[1]
    model = LogisticMF(int(user_rows.max(initial=-1)) + 1, int(item_rows.max(initial=-1)) + 1, base_rates, config)
    scores = np.empty(labels.shape, np.float32)
    for start in range(0, len(labels), batch):
        rows = slice(start, start + batch)
        scores[rows] = model.learn(user_rows[rows], item_rows[rows], labels[rows])
    return scores


@dataclass(frozen=True)
class Tuning:
    chosen: list[FloorConfig]
    """Per task, the grid point with the best progressive AUC on the tuning stream."""
    auc: dict[tuple[float, int, float], list[float]]
    """Every grid point's AUC per task on the tuning stream."""


def tune(users: np.ndarray, items: np.ndarray, labels: np.ndarray, batch: int, base_rates: np.ndarray | None = None,
         grid: tuple[tuple[float, int, float], ...] = GRID, on_point: Callable[[], None] | None = None) -> Tuning:
    """Each task's best ``(lr, dim, initial_accumulator)`` of ``grid`` by progressive AUC on this (tuning) stream."""
    auc = {}
    for point in grid:
        scores = progressive_scores(users, items, labels, batch, FloorConfig(*point), base_rates)
        auc[point] = [binary_auc(scores[:, t], labels[:, t]) for t in range(labels.shape[1])]
        if on_point is not None:
            on_point()
    best = [max(grid, key=lambda point: np.nan_to_num(auc[point][t], nan=-1.0)) for t in range(labels.shape[1])]
    return Tuning([FloorConfig(*point) for point in best], auc)


def floor_scores(users: np.ndarray, items: np.ndarray, labels: np.ndarray, batch: int, configs: list[FloorConfig],
                 base_rates: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Progressive scores (N, T), each task's column from the floor with that task's config."""
    scores = np.empty(labels.shape, np.float32)
    for config in set(configs):
        got = progressive_scores(users, items, labels, batch, replace(config, seed=seed), base_rates)
        for t, wanted in enumerate(configs):
            if wanted == config:
                scores[:, t] = got[:, t]
    return scores


__all__ = ["GRID", "FloorConfig", "LogisticMF", "Tuning", "floor_scores", "progressive_scores", "tune"]
