"""Does bf16 autocast cost accuracy? Train the same model from the same seed on the same simulated
click stream in fp32 and under bf16 autocast, and compare progressive AUC (each batch is scored
before the model learns from it, river's progressive validation).

The stream: ``x ~ N(0, I)``; a fixed random teacher, a shared ReLU layer then one linear read-out
per task (read-outs partly shared, so tasks correlate), gives each task's logit; labels are
Bernoulli draws. Nonlinear enough that an MMoE has something to learn, cheap to generate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from benchmarks.peers import Contender
from benchmarks.timing import autocast as cast


@dataclass(frozen=True)
class ClickStream:
    """A seeded stream of ``(x (B, n_inputs), y (B, n_tasks))`` batches with binary labels."""

    n_inputs: int
    n_tasks: int = 2
    hidden: int = 32
    task_overlap: float = 0.6  # share of each task's read-out that all tasks have in common
    seed: int = 0

    def batches(self, batch: int, count: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        w_in = torch.randn(self.n_inputs, self.hidden, generator=g) / self.n_inputs**0.5  # (D, H)
        shared = torch.randn(self.hidden, 1, generator=g)
        own = torch.randn(self.hidden, self.n_tasks, generator=g)
        a = self.task_overlap
        read_out = (a**0.5 * shared + (1 - a) ** 0.5 * own) * 2.0 / self.hidden**0.5  # (H, T)
        bias = torch.linspace(-1.5, -0.5, self.n_tasks)  # positive rates around 20-35%
        for _ in range(count):
            x = torch.randn(batch, self.n_inputs, generator=g)
            logits = torch.relu(x @ w_in) @ read_out + bias  # (B, T)
            y = torch.bernoulli(torch.sigmoid(logits), generator=g)
            yield x, y


def progressive_auc(
    make: Callable[[], Contender],
    stream: ClickStream,
    *,
    batch: int,
    n_batches: int,
    autocast: torch.dtype | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    tick: Callable[[], None] | None = None,
) -> list[float]:
    """Per-task AUC of scores made before each step, over the whole stream. ``make`` builds the
    model; it is called under ``torch.manual_seed(seed)`` so two calls start from the same weights."""
    torch.manual_seed(seed)
    contender = make()
    model = contender.model
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scores, labels = [], []
    for x, y in stream.batches(batch, n_batches):
        with torch.no_grad(), cast(autocast):
            out = model(x)
            scores.append(torch.stack(list(out.logits.values()), dim=1).float())  # (B, T), before learning
        labels.append(y)
        optimizer.zero_grad(set_to_none=True)
        with cast(autocast):
            loss = contender.loss(x, y)
        loss.backward()
        optimizer.step()
        if tick is not None:
            tick()
    scored, truth = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    return [float(roc_auc_score(truth[:, t], scored[:, t])) for t in range(truth.shape[1]) if 0 < truth[:, t].mean() < 1]


def auc_gap(fp32: list[float], other: list[float]) -> float:
    """Largest per-task AUC difference."""
    return float(np.max(np.abs(np.asarray(fp32) - np.asarray(other))))
