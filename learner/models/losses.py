"""The multi-task training loss shared by every family."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .output import ModelOutput


def loss_terms(
    output: ModelOutput,
    labels: Mapping[str, Tensor],
    mask: Mapping[str, Tensor] | None = None,
    task_weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and the per-task losses.

    Per task: BCE-with-logits (binary) or squared error (regression), averaged over the rows whose
    label is present (``mask`` 1; no mask = all present) and 0 when none is. A task missing from
    ``labels`` counts as having no label in the batch, which is the normal case for delayed or
    sparse feedback in a stream. Labels under a 0 mask may hold anything, NaN included: they never
    reach the arithmetic. Total = ``Σ_t w_t · loss_t + output.aux_loss``; ``w_t`` defaults to 1.
    """
    tasks = list(output.logits)
    for name, given in (("labels", labels), ("mask", mask or {}), ("task_weights", task_weights or {})):
        stray = sorted(set(given) - set(tasks))
        if stray:
            raise ValueError(f"{name} names unknown task(s) {stray}; tasks are {tasks}")
    logits = torch.stack([output.logits[t] for t in tasks], dim=1)  # (B, T)
    present = torch.stack(
        [
            (mask[t] if mask is not None and t in mask else torch.ones_like(logits[:, i])).to(torch.bool)
            & torch.tensor(t in labels, device=logits.device)
            for i, t in enumerate(tasks)
        ],
        dim=1,
    )  # (B, T)
    y = torch.stack(
        [labels[t].to(logits.dtype) if t in labels else torch.zeros_like(logits[:, i]) for i, t in enumerate(tasks)],
        dim=1,
    )  # (B, T)
    y = torch.where(present, y, torch.zeros_like(y))  # keep NaN placeholders out of the graph
    binary = torch.tensor([output.task_types[t] == "binary" for t in tasks], device=logits.device)  # (T,)
    per_row = torch.where(
        binary,
        F.binary_cross_entropy_with_logits(logits, y, reduction="none"),
        (logits - y) ** 2,
    )  # (B, T)
    present_f = present.to(logits.dtype)
    per_task = (per_row * present_f).sum(dim=0) / present_f.sum(dim=0).clamp_min(1.0)  # (T,)
    weights = logits.new_tensor([float((task_weights or {}).get(t, 1.0)) for t in tasks])  # (T,)
    total = (weights * per_task).sum() + output.aux_loss
    return total, {t: per_task[i] for i, t in enumerate(tasks)}


def loss(
    output: ModelOutput,
    labels: Mapping[str, Tensor],
    mask: Mapping[str, Tensor] | None = None,
    task_weights: Mapping[str, float] | None = None,
) -> Tensor:
    """Total loss; see ``loss_terms``."""
    return loss_terms(output, labels, mask, task_weights)[0]
