"""Registry of model families and the base class they share (timm's ``@register_model``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .output import TASK_TYPES, ModelOutput

_REGISTRY: dict[str, type[MultiTaskModel]] = {}
_STRUCTURAL = ("n_inputs", "tasks", "task_types")


def register(name: str) -> Callable[[type[MultiTaskModel]], type[MultiTaskModel]]:
    """Class decorator: make a family buildable as ``build(name, ...)``."""

    def wrap(cls: type[MultiTaskModel]) -> type[MultiTaskModel]:
        if name in _REGISTRY:
            raise ValueError(f"family {name!r} registered twice")
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def families() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _family(name: str) -> type[MultiTaskModel]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose from {families()}") from None


def default_hparams(family: str) -> dict[str, Any]:
    """Every hparam of ``family`` with its default, read off the constructor's signature."""
    params = inspect.signature(_family(family).__init__).parameters
    return {
        k: p.default
        for k, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _STRUCTURAL
    }


def build(
    family: str,
    *,
    n_inputs: int,
    tasks: Sequence[str],
    task_types: Mapping[str, str] | None = None,
    **hparams: Any,
) -> MultiTaskModel:
    """Build a model of ``family`` for ``n_inputs`` features and the named ``tasks``.

    Unknown hparams are an error that names them, so a typo in a config never silently
    falls back to a default.
    """
    cls = _family(family)
    unknown = sorted(set(hparams) - set(default_hparams(family)))
    if unknown:
        raise TypeError(
            f"unknown hparam(s) {unknown} for family {family!r}; "
            f"accepted: {sorted(default_hparams(family))}"
        )
    return cls(n_inputs=n_inputs, tasks=tasks, task_types=task_types, **hparams)


def resolve_task_types(tasks: Sequence[str], task_types: Mapping[str, str] | None) -> dict[str, str]:
    task_types = dict(task_types or {})
    stray = sorted(set(task_types) - set(tasks))
    if stray:
        raise ValueError(f"task_types names unknown task(s) {stray}; tasks are {list(tasks)}")
    resolved = {t: task_types.get(t, "binary") for t in tasks}
    bad = {t: v for t, v in resolved.items() if v not in TASK_TYPES}
    if bad:
        raise ValueError(f"task type(s) {bad} not in {TASK_TYPES}")
    return resolved


class MultiTaskModel(nn.Module):
    """Base of every family: validates the task list and assembles the ``ModelOutput``.

    Besides ``forward``, a family declares what training and telemetry need to know about it, so
    that no caller probes attributes or runs a forward pass to find out:

    - ``n_gate_experts``: the number ``E`` of experts that ``gates`` and ``expert_zero_frac`` range
      over. Every family sets it.
    - ``lb_experts``: the length of each vector in ``ModelOutput.lb_stats`` (a worker with no rows
      still contributes statistics of that shape to the all-reduce); ``None`` for families that
      report no ``lb_stats`` (the dense ones).
    - ``lb_coef``: the coefficient of the global load-balancing regulariser on ``lb_stats``
      (``lb_coef · load_balance_loss(*lb_stats, lb_experts)`` is the ``aux_loss`` of one batch);
      0.0 where ``lb_experts`` is None.
    - ``pools``: pool name -> the indices (into the ``E`` gate experts) of that pool's experts.
      Names are ``"task:<task>"`` (that task's own experts), ``"group:<group>"`` (a meta-task
      group's, see ``groups``) or anything else (experts every task may see). The pools cover
      ``range(E)`` exactly once; empty for families without pools (every task sees every expert).
    - ``groups``: meta-task group name -> its tasks; empty for families without groups.
    """

    family: str = ""
    n_gate_experts: int
    lb_experts: int | None = None
    lb_coef: float = 0.0
    pools: dict[str, tuple[int, ...]]
    groups: dict[str, tuple[str, ...]]

    def __init__(self, n_inputs: int, tasks: Sequence[str], task_types: Mapping[str, str] | None) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise TypeError("tasks must be a sequence of task names, not one string")
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"tasks must be distinct non-empty names, got {list(tasks)}")
        if n_inputs < 1:
            raise ValueError(f"n_inputs must be positive, got {n_inputs}")
        self.n_inputs = n_inputs
        self.tasks = tasks
        self.task_types = resolve_task_types(tasks, task_types)
        self.pools = {}
        self.groups = {}

    @torch.no_grad()
    def init_output_bias(self, base_rates: Mapping[str, float]) -> None:
        """Start each named binary task at its base rate: final tower bias = logit(rate).

        With rare tasks (likes at 2%, follows at 0.3%) a tower starting at p = 0.5 spends its first
        hundreds of steps only walking the bias down; starting at the base rate skips that.
        """
        for i, task in enumerate(self.tasks):
            if task in base_rates and self.task_types[task] == "binary":
                rate = min(max(float(base_rates[task]), 1e-6), 1 - 1e-6)
                self.towers.mlp.layers[-1].bias[i].fill_(math.log(rate / (1 - rate)))

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"{self.family}: expected input (B, {self.n_inputs}), got {tuple(x.shape)}")

    def output(
        self,
        logits: Tensor,
        gates: Tensor,
        expert_zero_frac: Tensor,
        aux_loss: Tensor | None = None,
        lb_stats: tuple[Tensor, Tensor, Tensor] | None = None,
        extras: dict[str, Any] | None = None,
    ) -> ModelOutput:
        """Split ``logits (B, T)`` and ``gates (B, T, E)`` per task into the contract's dicts."""
        if aux_loss is None:
            aux_loss = torch.zeros((), dtype=logits.dtype, device=logits.device)
        return ModelOutput(
            logits={t: logits[:, i] for i, t in enumerate(self.tasks)},
            aux_loss=aux_loss,
            gates={t: gates[:, i] for i, t in enumerate(self.tasks)},
            expert_zero_frac=expert_zero_frac,
            task_types=dict(self.task_types),
            lb_stats=lb_stats,
            extras=extras or {},
        )


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_dims(name: str, dims: Sequence[int], *, allow_empty: bool = False) -> tuple[int, ...]:
    """Layer sizes as a tuple; ``tower_dims=()`` (a linear tower) is the one empty case allowed."""
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise ValueError(f"{name} must be a sequence of layer sizes, got {dims!r}")
    dims = tuple(dims)
    if (not dims and not allow_empty) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        kind = "sequence" if allow_empty else "non-empty sequence"
        raise ValueError(f"{name} must be a {kind} of positive sizes, got {dims!r}")
    return dims
