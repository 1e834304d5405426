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
