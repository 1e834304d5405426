"""Tiny configurations and batches shared by the model-zoo tests (imported by them, not a test)."""

from __future__ import annotations

import torch

from learner.models import FAMILIES, build

N_INPUTS = 12
# click/like are interaction tasks, play_time a watch-time task: HoME gets two meta groups, and
# the regression head is exercised by every family.
TASKS = ("click", "like", "play_time")
TASK_TYPES = {"play_time": "regression"}

TINY = {
    "shared_bottom": dict(expert_dims=(8,), tower_dims=(4,)),
    "omoe": dict(n_experts=3, expert_dims=(8,), tower_dims=(4,)),
    "mmoe": dict(n_experts=3, expert_dims=(8,), tower_dims=(4,)),
    "ple": dict(n_experts=2, n_levels=2, expert_dims=(8,), tower_dims=(4,)),
    "home": dict(n_experts=2, expert_dims=(8,), tower_dims=(4,), feature_gate_rank=2),
    "smes": dict(n_experts=6, k_shared=1, k_private=1, expert_dims=(8,), tower_dims=(4,)),
}
assert set(TINY) == set(FAMILIES)


def make_model(family: str, seed: int = 0, tasks=TASKS, **overrides):
    torch.manual_seed(seed)
    types = {t: v for t, v in TASK_TYPES.items() if t in tasks}
    return build(family, n_inputs=N_INPUTS, tasks=list(tasks), task_types=types, **{**TINY[family], **overrides})


def make_batch(n_rows: int = 32, seed: int = 1, tasks=TASKS):
    """Features, labels for every task, and an all-present mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, N_INPUTS, generator=g)
    labels = {
        t: torch.randn(n_rows, generator=g) if TASK_TYPES.get(t) == "regression"
        else torch.randint(0, 2, (n_rows,), generator=g).float()
        for t in tasks
    }
    mask = {t: torch.ones(n_rows) for t in tasks}
    return x, labels, mask


def check_declared_layout(model) -> None:
    """``pools`` cover ``range(n_gate_experts)`` exactly once and name real tasks and groups;
    ``groups`` hold every task exactly once; a task's gate is exactly 0 on experts its pools hide."""
    members = [e for pool in model.pools.values() for e in pool]
    if model.pools:
        assert sorted(members) == list(range(model.n_gate_experts)), model.pools
        assert all(isinstance(pool, tuple) for pool in model.pools.values())
    if model.groups:
        grouped = [t for tasks in model.groups.values() for t in tasks]
        assert sorted(grouped) == sorted(model.tasks), model.groups
        assert all(isinstance(tasks, tuple) for tasks in model.groups.values())
    kinds = [name.partition(":") for name in model.pools]
    assert {name for kind, _, name in kinds if kind == "task"} <= set(model.tasks)
    assert {name for kind, _, name in kinds if kind == "group"} <= set(model.groups)
    out = model(make_batch(16)[0])
    for task, g in out.gates.items():
        hidden = [e for name, pool in model.pools.items() for e in pool
                  if (name.startswith("task:") and name != f"task:{task}")
                  or (name.startswith("group:") and task not in model.groups[name.partition(":")[2]])]
        assert (g[:, hidden] == 0).all(), (task, hidden)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """``torch.allclose`` with a useful message (``torch.testing`` costs seconds to import)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"max abs diff {(actual - expected).abs().max().item():.3g}"
    )


def sgd_step(model: torch.nn.Module, lr: float) -> None:
    """Plain SGD (``torch.optim`` pulls in torch._dynamo: seconds of import for a unit test)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
