"""The one output contract every family honours, so training, serving and tests never branch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

TASK_TYPES = ("binary", "regression")


@dataclass
class ModelOutput:
    """What a multi-task model returns for a batch of ``B`` rows.

    - ``logits``: task -> ``(B,)`` raw outputs (a logit for binary tasks, the value for regression).
    - ``aux_loss``: scalar added to the task losses (0 for families without one).
    - ``gates``: task -> ``(B, E)``, the task's mixing weights over all ``E`` experts the family
      reports on; exactly 0 for experts the task cannot see. Multi-level families report their
      final level (see each family's docstring).
    - ``expert_zero_frac``: ``(E,)``, fraction of (near-)zero activations of each expert in the
      batch (HoME's "expert collapse" symptom); NaN, "not computed", for a forward pass run inside
      ``diagnostics.without_diagnostics`` (as ``MultiTaskRanker.predict_proba`` runs them: scoring reads the
      logits only).
    - ``task_types``: task -> "binary" | "regression"; the loss needs it.
    - ``lb_stats``: sparse families only, ``(counts (N,), prob_sums (N,), n_slots ())``: the
      sufficient statistics of the load-balancing regulariser, summable across workers. The model
      declares ``N`` as ``lb_experts`` and the regulariser's coefficient as ``lb_coef``
      (``MultiTaskModel``); ``lb_stats`` is None exactly when ``lb_experts`` is None.
    - ``extras``: family-specific diagnostics (documented per family).
    """

    logits: dict[str, Tensor]
    aux_loss: Tensor
    gates: dict[str, Tensor]
    expert_zero_frac: Tensor
    task_types: dict[str, str]
    lb_stats: tuple[Tensor, Tensor, Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
