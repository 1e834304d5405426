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
    loss_weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and the per-task losses.

    Per task: BCE-with-logits (binary) or squared error (regression), averaged over the rows whose
    label is present (``mask`` 1; no mask = all present) and 0 when none is. A task missing from
    ``labels`` counts as having no label in the batch, which is the normal case for delayed or
    sparse feedback in a stream. Labels under a 0 mask may hold anything, NaN included: they never
    reach the arithmetic. Total = ``Σ_t w_t · loss_t + output.aux_loss``, ``w_t`` from ``loss_weights``
    (1 for a task left out; the learner's ``loss_weights``, not serving's fused-score ``task_weights``).
    """
    tasks = list(output.logits)
    for name, given in (("labels", labels), ("mask", mask or {}), ("loss_weights", loss_weights or {})):
        stray = sorted(set(given) - set(tasks))
        if stray:
            raise ValueError(f"{name} names unknown task(s) {stray}; tasks are {tasks}")
    logits = torch.stack([output.logits[t] for t in tasks], dim=1)  # (B, T)
    n_rows = logits.shape[0]
    y = torch.stack([labels[t].to(logits.dtype) if t in labels else logits.new_zeros(n_rows) for t in tasks], dim=1)
    # The common case, every task labelled and nothing masked, skips the masking arithmetic (a training
    # step of the streaming-sized MMoE spent a tenth of its time in this function's small ops).
    present: Tensor | None = None
    if mask is not None or len(labels) < len(tasks):
        everywhere = torch.ones(n_rows, dtype=torch.bool, device=logits.device)
        present = torch.stack(
            [
                (mask[t].to(torch.bool) if mask is not None and t in mask else everywhere)
                if t in labels else torch.zeros_like(everywhere)
                for t in tasks
            ],
            dim=1,
        )  # (B, T)
        y = torch.where(present, y, 0.0)  # keep NaN placeholders out of the graph
    kinds = [output.task_types[t] for t in tasks]
    if all(k == "binary" for k in kinds):
        per_row = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # (B, T)
    elif all(k == "regression" for k in kinds):
        per_row = (logits - y).square()
    else:
        binary = torch.tensor([k == "binary" for k in kinds], device=logits.device)  # (T,)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        per_row = torch.where(binary, bce, (logits - y).square())
    if present is None:
        per_task = per_row.mean(dim=0)  # (T,)
    else:
        present_f = present.to(logits.dtype)
        per_task = (per_row * present_f).sum(dim=0) / present_f.sum(dim=0).clamp_min(1.0)  # (T,)
    if loss_weights:
        weights = logits.new_tensor([float(loss_weights.get(t, 1.0)) for t in tasks])  # (T,)
        total = (weights * per_task).sum() + output.aux_loss
    else:
        total = per_task.sum() + output.aux_loss
    return total, {t: per_task[i] for i, t in enumerate(tasks)}


def loss(
    output: ModelOutput,
    labels: Mapping[str, Tensor],
    mask: Mapping[str, Tensor] | None = None,
    loss_weights: Mapping[str, float] | None = None,
) -> Tensor:
    """Total loss; see ``loss_terms``."""
    return loss_terms(output, labels, mask, loss_weights)[0]
