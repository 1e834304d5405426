"""HoME, as in Wang et al., "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou" (arXiv 2408.05430).

Block diagram (``hierarchy=True``), ``n = n_experts`` experts per pool, ``G`` meta-task groups:

    meta level   pools [global | group_1 .. group_G], all read x
                 group gate g sees [global, group_g] -> meta_g      (one per group)
                 global gate sees every meta expert  -> meta_global
    task level   pools [global | group_1 .. group_G | task_1 .. task_T]
                 global pool reads meta_global, group pool g reads meta_g,
                 task pool t reads meta_{group(t)}
                 task gate t (input meta_{group(t)}) sees [global, group(t), task t]
                 self gate t (input meta_{group(t)}) sees [task t]; added to the task gate
    towers       one per task on sum_e (gate_te + self_gate_te) · expert_e

Mechanisms and their switches (for ablations):

- ``expert_norm``: each expert's last layer is linear, then BatchNorm (per expert and feature),
  then Swish, so all experts emit comparably distributed outputs (against "expert collapse").
  Off: the last layer uses ``activation`` like any other expert. BatchNorm needs ``B > 1`` in
  training and uses running statistics in eval mode.
- ``hierarchy``: the meta level and the group pools above. Off: one level with a global pool and
  one pool per task, task gate over [global, own] (CGC with HoME's other mechanisms).
- ``feature_gate``: each expert multiplies its input by its own ``2·sigmoid(v·A·B)``, rank
  ``feature_gate_rank``, initialised to exactly 1.
- ``self_gate``: a residual gate over the task's own experts only (softmax, or sigmoid when the
  pool has one expert), added to the task gate's weights: it guarantees sparse tasks a path to
  their own experts (against "expert underfitting").

Groups: ``groups`` maps a meta-task name to its tasks; each task in exactly one group. By default,
tasks among ``WATCH_TIME_TASKS`` form ``"watch_time"`` and the others ``"interaction"`` (the
paper's split); when the task list does not have both kinds, all tasks form one group ``"all"``
rather than an arbitrary split.

``ModelOutput.gates`` reports the task gates over the task level's experts (exactly 0 outside the
hierarchy mask; the self gate is in ``extras["self_gates"]``), ``expert_zero_frac`` the task
level's experts. ``extras["meta_gates"]`` ``(B, G + 1, E_meta)`` and
``extras["meta_expert_zero_frac"]`` cover the meta level. ``pools`` names the expert index range
of each task-level pool; ``groups`` holds the meta-task groups (empty without the hierarchy, which
has no group pools).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import ExpertBank, GateBank, TaskTowers, mix, zero_frac
from .output import ModelOutput
from .registry import MultiTaskModel, check_dims, check_positive, register

WATCH_TIME_TASKS = ("long_view", "play_time", "effective_view")


def resolve_groups(tasks: Sequence[str], groups: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """Meta-task groups, defaulted or checked: every task in exactly one non-empty group."""
    if groups is None:
        watch = tuple(t for t in tasks if t in WATCH_TIME_TASKS)
        other = tuple(t for t in tasks if t not in WATCH_TIME_TASKS)
        return {"watch_time": watch, "interaction": other} if watch and other else {"all": tuple(tasks)}
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"groups must map group names to task lists, got {groups!r}")
    resolved: dict[str, tuple[str, ...]] = {}
    seen: list[str] = []
    for name, members in groups.items():
        if isinstance(members, str) or not members:
            raise ValueError(f"group {name!r} must list at least one task, got {members!r}")
        resolved[str(name)] = tuple(members)
        seen.extend(members)
    unknown = sorted(set(seen) - set(tasks))
    twice = sorted({t for t in seen if seen.count(t) > 1})
    missing = [t for t in tasks if t not in seen]
    if unknown or twice or missing:
        raise ValueError(f"groups: unknown tasks {unknown}, tasks in several groups {twice}, ungrouped tasks {missing}")
    return resolved


def _pool(p: int, n: int) -> list[int]:
    return list(range(p * n, (p + 1) * n))


class MetaLevel(nn.Module):
    """Pools ``[global | group_1 .. group_G]`` on the input; group gate ``g`` sees
    ``[global, group_g]``, the global meta gate sees every meta expert."""

    def __init__(
        self,
        n_groups: int,
        n: int,
        d_in: int,
        expert_dims: Sequence[int],
        activation: str,
        *,
        norm: bool,
        feature_gate_rank: int,
    ) -> None:
        super().__init__()
        n_meta = (1 + n_groups) * n
        self.experts = ExpertBank(
            n_meta, d_in, expert_dims, activation, norm=norm, feature_gate_rank=feature_gate_rank
        )
        self.group_gates = GateBank(n_meta, d_in, [_pool(0, n) + _pool(1 + g, n) for g in range(n_groups)])
        self.global_gate = GateBank(n_meta, d_in, [list(range(n_meta))])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Meta paths ``(B, G + 1, H)``, meta gates ``(B, G + 1, E_meta)``, experts ``(B, E_meta, H)``."""
        h = self.experts(x)  # (B, E_meta, H)
        gates = torch.cat([self.group_gates(x), self.global_gate(x)], dim=1)  # (B, G + 1, E_meta)
        return mix(gates, h), gates, h


@register("home")
class HoME(MultiTaskModel):
    """Hierarchy of Multi-gate Experts. hparams: ``n_experts`` (experts per pool), ``expert_dims``,
    ``tower_dims``, ``activation``, ``groups``, ``expert_norm``, ``hierarchy``, ``feature_gate``,
    ``feature_gate_rank``, ``self_gate`` (see the module docstring)."""

    def __init__(
        self,
        *,
        n_inputs: int,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        n_experts: int = 2,
        expert_dims: Sequence[int] = (64, 32),
        tower_dims: Sequence[int] = (32,),
        activation: str = "relu",
        groups: Mapping[str, Sequence[str]] | None = None,
        expert_norm: bool = True,
        hierarchy: bool = True,
        feature_gate: bool = True,
        feature_gate_rank: int = 4,
        self_gate: bool = True,
    ) -> None:
        super().__init__(n_inputs, tasks, task_types)
        check_positive(n_experts=n_experts, feature_gate_rank=feature_gate_rank)
        expert_dims = check_dims("expert_dims", expert_dims)
        tower_dims = check_dims("tower_dims", tower_dims, allow_empty=True)
        n, n_tasks = n_experts, len(self.tasks)
        meta_groups = resolve_groups(self.tasks, groups)  # checked even where the flat variant ignores them
        self.hierarchy = hierarchy
        rank = feature_gate_rank if feature_gate else 0
        hidden = expert_dims[-1]

        if hierarchy:
            self.groups = meta_groups
            n_groups = len(self.groups)
            group_of = [next(g for g, ts in enumerate(self.groups.values()) if t in ts) for t in self.tasks]
            self.meta: MetaLevel | None = MetaLevel(
                n_groups, n, n_inputs, expert_dims, activation, norm=expert_norm, feature_gate_rank=rank
            )
            # Task level: pools [global | groups | tasks]; meta paths are [groups..., global].
            task_pool = [1 + n_groups + t for t in range(n_tasks)]
            pool_input = [n_groups, *range(n_groups), *group_of]
            visible = [_pool(0, n) + _pool(1 + group_of[t], n) + _pool(task_pool[t], n) for t in range(n_tasks)]
            gate_input, d_task = group_of, hidden
            names = ["global", *(f"group:{g}" for g in self.groups)]
        else:
            self.meta = None
            task_pool = [1 + t for t in range(n_tasks)]
            pool_input = None
            visible = [_pool(0, n) + _pool(task_pool[t], n) for t in range(n_tasks)]
            gate_input, d_task = None, n_inputs
            names = ["global"]
        names += [f"task:{t}" for t in self.tasks]
        self.pools = {name: tuple(_pool(p, n)) for p, name in enumerate(names)}
        self.n_gate_experts = len(names) * n

        member_input = None if pool_input is None else [p for p in pool_input for _ in range(n)]
        self.task_experts = ExpertBank(
            self.n_gate_experts,
            d_task,
            expert_dims,
            activation,
            norm=expert_norm,
            feature_gate_rank=rank,
            member_input=member_input,
        )
        self.task_gates = GateBank(self.n_gate_experts, d_task, visible, gate_input)
        self.self_gates = (
            GateBank(self.n_gate_experts, d_task, [_pool(task_pool[t], n) for t in range(n_tasks)], gate_input)
            if self_gate
            else None
        )
        self.towers = TaskTowers(n_tasks, hidden, tower_dims, activation)

    def forward(self, x: Tensor) -> ModelOutput:
        self.check_input(x)
        paths, extras = x, {}  # (B, n_inputs)
        if self.meta is not None:
            paths, meta_gates, h_meta = self.meta(x)  # (B, G + 1, H): group paths, then the global path
            extras = {"meta_gates": meta_gates, "meta_expert_zero_frac": zero_frac(h_meta)}
        h = self.task_experts(paths)  # (B, E, H)
        g = self.task_gates(paths)  # (B, T, E)
        weights = g
        if self.self_gates is not None:
            extras["self_gates"] = self.self_gates(paths)  # (B, T, E)
            weights = g + extras["self_gates"]
        logits = self.towers(mix(weights, h))  # (B, T)
        return self.output(logits, g, zero_frac(h), extras=extras)
