"""CGC and PLE, as in Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task
Learning (MTL) Model for Personalized Recommendations", RecSys 2020.

Each extraction level holds ``T + 1`` pools of ``n_experts`` experts: one task-specific pool per
task and one shared pool, laid out ``[task_0 | task_1 | ... | task_{T-1} | shared]``. Task ``t``'s
gate sees its own pool and the shared pool. At every level but the last a shared gate sees all
experts of the level and feeds the shared pool of the next level; task ``t``'s output feeds task
``t``'s pool (and gate) of the next level. ``n_levels=1`` is CGC.

``ModelOutput.gates`` reports the final level's task gates over all ``E = (T + 1) · n_experts``
experts of that level (exactly 0 on other tasks' pools), and ``expert_zero_frac`` that level's
experts. ``extras["level_gates"]`` holds every level's gates ``(B, T or T + 1, E)``: task gates,
then the shared gate where the level has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import ExpertBank, GateBank, TaskTowers, mix, zero_frac
from .output import ModelOutput
from .registry import MultiTaskModel, check_dims, check_positive, register


class ExtractionLevel(nn.Module):
    """One CGC block: experts of ``T + 1`` pools, task gates, and (unless last) a shared gate."""

    def __init__(
        self,
        n_tasks: int,
        n_experts: int,
        d_in: int,
        expert_dims: Sequence[int],
        activation: str,
        *,
        first: bool,
        last: bool,
    ) -> None:
        super().__init__()
        n_pools = n_tasks + 1  # pool (and input path) T is the shared one
        pool = [list(range(p * n_experts, (p + 1) * n_experts)) for p in range(n_pools)]
        n_total = n_pools * n_experts
        # On the first level every expert and gate reads the model input; above it, path p.
        member_input = None if first else [p for p in range(n_pools) for _ in range(n_experts)]
        self.experts = ExpertBank(n_total, d_in, expert_dims, activation, member_input=member_input)
        self.task_gates = GateBank(
            n_total,
            d_in,
            [pool[t] + pool[n_tasks] for t in range(n_tasks)],
            gate_input=None if first else list(range(n_tasks)),
        )
        self.shared_gate = (
            None
            if last
            else GateBank(n_total, d_in, [list(range(n_total))], gate_input=None if first else [n_tasks])
        )

    def forward(self, paths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``paths``: ``(B, d_in)`` on the first level, else ``(B, T + 1, d_in)``.

        Returns next-level paths ``(B, T [+ 1], H)``, this level's gates ``(B, T [+ 1], E)``,
        task gates ``(B, T, E)`` and expert outputs ``(B, E, H)``.
        """
        h = self.experts(paths)  # (B, E, H)
        g = self.task_gates(paths)  # (B, T, E)
        if self.shared_gate is not None:
            g = torch.cat([g, self.shared_gate(paths)], dim=1)  # (B, T + 1, E)
        return mix(g, h), g, g[:, : self.task_gates.n_gates], h


@register("ple")
class PLE(MultiTaskModel):
    """Progressive Layered Extraction. hparams: ``n_experts`` (experts per pool, i.e. per task's
    specific pool and in the shared pool), ``n_levels`` (1 = CGC), ``expert_dims``,
    ``tower_dims``, ``activation``."""

    def __init__(
        self,
        *,
        n_inputs: int,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        n_experts: int = 2,
        n_levels: int = 2,
        expert_dims: Sequence[int] = (64, 32),
        tower_dims: Sequence[int] = (32,),
        activation: str = "relu",
    ) -> None:
        super().__init__(n_inputs, tasks, task_types)
        check_positive(n_experts=n_experts, n_levels=n_levels)
        expert_dims = check_dims("expert_dims", expert_dims)
        tower_dims = check_dims("tower_dims", tower_dims, allow_empty=True)
        n_tasks = len(self.tasks)
        self.n_gate_experts = (n_tasks + 1) * n_experts
        names = [*(f"task:{t}" for t in self.tasks), "shared"]
        self.pools = {name: tuple(range(p * n_experts, (p + 1) * n_experts)) for p, name in enumerate(names)}
        self.levels = nn.ModuleList(
            ExtractionLevel(
                n_tasks,
                n_experts,
                n_inputs if i == 0 else expert_dims[-1],
                expert_dims,
                activation,
                first=i == 0,
                last=i == n_levels - 1,
            )
            for i in range(n_levels)
        )
        self.towers = TaskTowers(n_tasks, expert_dims[-1], tower_dims, activation)

    def forward(self, x: Tensor) -> ModelOutput:
        self.check_input(x)
        paths, level_gates = x, []  # (B, n_inputs)
        for level in self.levels:
            paths, g, task_gates, h = level(paths)  # (B, T [+ 1], H)
            level_gates.append(g)
        logits = self.towers(paths)  # (B, T): the last level emits task paths only
        return self.output(logits, task_gates, zero_frac(h), extras={"level_gates": level_gates})
