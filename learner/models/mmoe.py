"""Shared-Bottom, OMoE and MMoE, as in Ma et al., "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018.

- Shared-Bottom: one bottom MLP feeds every task tower. Reported as one expert with gate 1.0.
- OMoE: ``n_experts`` shared experts mixed by one softmax gate that all tasks share.
- MMoE: the same experts, one softmax gate per task (all gates from one stacked projection).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from .layers import ExpertBank, GateBank, TaskTowers, mix, zero_frac
from .output import ModelOutput
from .registry import MultiTaskModel, check_dims, check_positive, register


@register("shared_bottom")
class SharedBottom(MultiTaskModel):
    """Hard parameter sharing. hparams: ``expert_dims`` (the bottom's layer sizes),
    ``tower_dims``, ``activation``."""

    def __init__(
        self,
        *,
        n_inputs: int,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        expert_dims: Sequence[int] = (64, 32),
        tower_dims: Sequence[int] = (32,),
        activation: str = "relu",
    ) -> None:
        super().__init__(n_inputs, tasks, task_types)
        expert_dims = check_dims("expert_dims", expert_dims)
        tower_dims = check_dims("tower_dims", tower_dims, allow_empty=True)
        self.n_gate_experts = 1
        self.bottom = ExpertBank(1, n_inputs, expert_dims, activation)
        self.towers = TaskTowers(len(self.tasks), expert_dims[-1], tower_dims, activation)

    def forward(self, x: Tensor) -> ModelOutput:
        self.check_input(x)
        h = self.bottom(x)  # (B, 1, H)
        logits = self.towers(h.expand(-1, len(self.tasks), -1))  # (B, T)
        gates = h.new_ones(x.shape[0], len(self.tasks), 1)  # (B, T, 1)
        return self.output(logits, gates, zero_frac(h))


class _MixtureOfExperts(MultiTaskModel):
    """OMoE and MMoE differ only in how many gates mix the shared experts."""

    def __init__(
        self,
        n_inputs: int,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None,
        n_gates: int | None,
        n_experts: int,
        expert_dims: Sequence[int],
        tower_dims: Sequence[int],
        activation: str,
    ) -> None:
        super().__init__(n_inputs, tasks, task_types)
        check_positive(n_experts=n_experts)
        expert_dims = check_dims("expert_dims", expert_dims)
        tower_dims = check_dims("tower_dims", tower_dims, allow_empty=True)
        n_tasks = len(self.tasks)
        self.n_gate_experts = n_experts
        self.experts = ExpertBank(n_experts, n_inputs, expert_dims, activation)
        every_expert = list(range(n_experts))
        self.gates = GateBank(n_experts, n_inputs, [every_expert] * (n_gates or n_tasks))
        self.towers = TaskTowers(n_tasks, expert_dims[-1], tower_dims, activation)

    def forward(self, x: Tensor) -> ModelOutput:
        self.check_input(x)
        n_tasks = len(self.tasks)
        h = self.experts(x)  # (B, E, H)
        g = self.gates(x)  # (B, G, E), G = 1 (OMoE) or T (MMoE)
        task_in = mix(g, h).expand(-1, n_tasks, -1)  # (B, T, H)
        logits = self.towers(task_in)  # (B, T)
        return self.output(logits, g.expand(-1, n_tasks, -1), zero_frac(h))


@register("omoe")
class OMoE(_MixtureOfExperts):
    """One-gate MoE. hparams: ``n_experts``, ``expert_dims``, ``tower_dims``, ``activation``."""

    def __init__(
        self,
        *,
        n_inputs: int,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        n_experts: int = 4,
        expert_dims: Sequence[int] = (64, 32),
        tower_dims: Sequence[int] = (32,),
        activation: str = "relu",
    ) -> None:
        super().__init__(n_inputs, tasks, task_types, 1, n_experts, expert_dims, tower_dims, activation)


@register("mmoe")
class MMoE(_MixtureOfExperts):
    """Multi-gate MoE. hparams: ``n_experts``, ``expert_dims``, ``tower_dims``, ``activation``."""

    def __init__(
        self,
        *,
        n_inputs: int,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        n_experts: int = 4,
        expert_dims: Sequence[int] = (64, 32),
        tower_dims: Sequence[int] = (32,),
        activation: str = "relu",
    ) -> None:
        super().__init__(n_inputs, tasks, task_types, None, n_experts, expert_dims, tower_dims, activation)


__all__ = ["MMoE", "OMoE", "SharedBottom"]
