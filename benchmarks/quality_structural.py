"""``bench quality``'s achievable estimate: an online learner told the simulator's generating form.

The simulator draws ``logit_t = bias_t + activity_u + quality_i + 0.8 sin(2π t / 600 s + phase_i)
+ 3 u·v + 2 uᵀ M_t v`` with dim-8 user and item vectors (``stream.simulator``). This learner fits exactly that
form, online, from the same ids and labels the floor and the models get:

    z_t = b_t + a_u + c_i + s_i · [sin ωt, cos ωt] + p_uᵀ (σ I + W_t) q_i

one ``p_u``, ``a_u`` per user and ``q_i``, ``c_i``, ``s_i`` per item shared by every task (each label of a row
teaches the same vectors), the popularity period known (``ω = 2π / 600 s``), ``σ``, ``W_t`` and ``b_t`` learned.
Predict-then-update on the trainer's batches in the trainer's order, per-coordinate Adagrad on the rows a batch
touched (gradients summed over the batch, the accumulator starting at ``initial_accumulator``) and on the
global parameters. It is not a model moestream could ship (it knows the answer's shape); it says how much of
the floor-to-oracle gap is within reach of *any* online learner on this stream at this size, which is the
question the issue's 50% goal (#21, item 4) raises. docs/quality.md, "Learning better (item 4)", has the
figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StructuralConfig:
    lr: float = 0.3
    """Adagrad's step for the per-user and per-item rows."""
    dense_lr: float = 0.02
    """Adagrad's step for ``σ``, ``W_t`` and ``b_t``."""
    dim: int = 8
    initial_accumulator: float = 1.0
    init_std: float = 0.1
    period_s: float = 600.0
    seed: int = 0


def structural_scores(users: np.ndarray, items: np.ndarray, ts_ms: np.ndarray, labels: np.ndarray, batch: int,
                      base_rates: np.ndarray, config: StructuralConfig = StructuralConfig()) -> np.ndarray:
    """Every example's progressive score (logit, (N, T)), each batch scored before the update that learns from
    it. Raw ids are numbered densely first (a new id starts from its initial row)."""
    c = config
    g = torch.Generator().manual_seed(c.seed)
    user_rows = torch.from_numpy(np.unique(users, return_inverse=True)[1])
    item_rows = torch.from_numpy(np.unique(items, return_inverse=True)[1])
    n_users, n_items, n_tasks = int(user_rows.max()) + 1, int(item_rows.max()) + 1, labels.shape[1]
    rows = {"p": torch.randn(n_users, c.dim, generator=g) * c.init_std, "a": torch.zeros(n_users, 1),
            "q": torch.randn(n_items, c.dim, generator=g) * c.init_std, "c": torch.zeros(n_items, 1),
            "s": torch.zeros(n_items, 2)}
    owner = {"p": user_rows, "a": user_rows, "q": item_rows, "c": item_rows, "s": item_rows}
    rate = np.asarray(base_rates, np.float64)
    dense = [torch.zeros(n_tasks, c.dim, c.dim, requires_grad=True), torch.ones((), requires_grad=True),
             torch.tensor(np.log(rate / (1 - rate)), dtype=torch.float32, requires_grad=True)]
    row_state = {k: torch.full_like(v, c.initial_accumulator) for k, v in rows.items()}
    dense_state = [torch.full_like(x, c.initial_accumulator) for x in dense]
    y_all = torch.from_numpy(np.asarray(labels, np.float32))
    phase = torch.from_numpy(2 * np.pi * (ts_ms - ts_ms[0]) / 1000.0 / c.period_s).float()
    scores = np.empty(labels.shape, np.float32)
    eye = torch.eye(c.dim)
    for start in range(0, len(labels), batch):
        at = slice(start, start + batch)
        leaf = {k: v[owner[k][at]].requires_grad_(True) for k, v in rows.items()}  # (B, ·) copies
        w, scale, bias = dense
        cycle = torch.stack([torch.sin(phase[at]), torch.cos(phase[at])], 1)  # (B, 2)
        affinity = torch.einsum("bd,tde,be->bt", leaf["p"], scale * eye + w, leaf["q"])  # (B, T)
        z = bias + leaf["a"] + leaf["c"] + (leaf["s"] * cycle).sum(1, keepdim=True) + affinity
        scores[at] = z.detach().numpy()
        torch.nn.functional.binary_cross_entropy_with_logits(z, y_all[at], reduction="sum").backward()
        with torch.no_grad():
            for k, table in rows.items():
                unique, inverse = torch.unique(owner[k][at], return_inverse=True)
                got = leaf[k].grad
                grad = got if got is not None else torch.zeros_like(leaf[k])  # (B, ·)
                summed = torch.zeros(len(unique), table.shape[1]).index_add_(0, inverse, grad)  # (U, ·)
                row_state[k][unique] += summed**2
                table[unique] -= c.lr * summed / (row_state[k][unique].sqrt() + 1e-8)
            for x, state in zip(dense, dense_state):
                got = x.grad
                grad = got if got is not None else torch.zeros_like(x)
                state += grad**2
                x -= c.dense_lr * grad / (state.sqrt() + 1e-8)
                x.grad = None
    return scores


__all__ = ["StructuralConfig", "structural_scores"]
