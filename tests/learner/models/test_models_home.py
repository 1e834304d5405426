"""HoME: meta-task groups, the hierarchy mask, and each mechanism's switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learner.models import FeatureGate, build, loss
from learner.models.home import resolve_groups

from .zoo_testkit import N_INPUTS, TASKS, check_declared_layout, make_batch, make_model

# TASKS under the paper's split: click and like interact, play_time measures watch time.
DEFAULT_GROUPS = {"watch_time": ["play_time"], "interaction": ["click", "like"]}


def test_default_groups_follow_the_papers_split():
    assert resolve_groups(["click", "long_view", "like", "play_time"], None) == {
        "watch_time": ("long_view", "play_time"),
        "interaction": ("click", "like"),
    }
    assert resolve_groups(["click", "like"], None) == {"all": ("click", "like")}
    assert resolve_groups(["long_view"], None) == {"all": ("long_view",)}


@pytest.mark.parametrize(
    "groups",
    [
        {"a": ["click", "like"]},  # play_time ungrouped
        {"a": ["click", "like"], "b": ["play_time", "click"]},  # click twice
        {"a": ["click", "like", "play_time", "share"]},  # unknown task
        {"a": [], "b": list(TASKS)},  # empty group
    ],
)
def test_bad_groups_are_rejected(groups):
    with pytest.raises(ValueError):
        build("home", n_inputs=N_INPUTS, tasks=list(TASKS), groups=groups)


def _visible(model, task):
    """Expert indices task ``task``'s gate may weigh: global, its group's, its own."""
    names = ["global", f"task:{task}"]
    if model.hierarchy:
        names += [f"group:{g}" for g, members in model.groups.items() if task in members]
    return sorted(e for name in names for e in model.pools[name])


@pytest.mark.parametrize(
    "overrides", [{}, {"groups": {"x": ["click"], "y": ["like", "play_time"]}}, {"hierarchy": False}]
)
def test_gates_are_exactly_zero_outside_the_hierarchy_mask(overrides):
    model = make_model("home", **overrides)
    x, _, _ = make_batch(16)
    out = model(x)
    for task in TASKS:
        visible = torch.zeros(model.n_gate_experts, dtype=torch.bool)
        visible[_visible(model, task)] = True
        g = out.gates[task]
        assert (g[:, ~visible] == 0).all(), task
        assert (g[:, visible] > 0).all(), task
        assert visible.sum() < model.n_gate_experts  # the mask hides something
        self_gate = out.extras["self_gates"][:, TASKS.index(task)]
        own = torch.zeros_like(visible)
        own[list(model.pools[f"task:{task}"])] = True
        assert (self_gate[:, ~own] == 0).all() and (self_gate[:, own] > 0).all()


def test_meta_gates_see_the_global_pool_and_their_group_only():
    model = make_model("home", n_experts=2)
    out = model(make_batch(8)[0])
    meta = out.extras["meta_gates"]  # (B, G + 1, E_meta): groups, then the global meta gate
    n_groups = len(model.groups)
    assert meta.shape == (8, n_groups + 1, (n_groups + 1) * 2)
    for g in range(n_groups):
        visible = torch.zeros(meta.shape[2], dtype=torch.bool)
        visible[[0, 1, 2 * (g + 1), 2 * (g + 1) + 1]] = True
        assert (meta[:, g, ~visible] == 0).all() and (meta[:, g, visible] > 0).all()
    assert (meta[:, n_groups] > 0).all()


def _has(model, kind):
    return any(isinstance(m, kind) for m in model.modules())


def test_each_mechanism_switches_off():
    full = make_model("home")
    assert _has(full, nn.BatchNorm1d) and _has(full, FeatureGate)
    assert full.self_gates is not None and full.meta is not None

    assert not _has(make_model("home", expert_norm=False), nn.BatchNorm1d)
    assert not _has(make_model("home", feature_gate=False), FeatureGate)
    no_self = make_model("home", self_gate=False)
    assert no_self.self_gates is None
    assert "self_gates" not in no_self(make_batch(4)[0]).extras
    flat = make_model("home", hierarchy=False)
    assert flat.meta is None and "meta_gates" not in flat(make_batch(4)[0]).extras
    assert set(flat.pools) == {"global", *(f"task:{t}" for t in TASKS)}


@pytest.mark.parametrize(
    "overrides", [{}, {"groups": {"x": ["click"], "y": ["like", "play_time"]}}, {"hierarchy": False}, {"n_experts": 1}]
)
def test_declared_pools_and_groups_follow_the_variant(overrides):
    model = make_model("home", **overrides)
    check_declared_layout(model)
    if model.hierarchy:
        assert model.groups == {g: tuple(ts) for g, ts in overrides.get("groups", DEFAULT_GROUPS).items()}
        assert {p for p in model.pools if p.startswith("group:")} == {f"group:{g}" for g in model.groups}
    else:  # no meta level, so no groups
        assert model.groups == {}


@pytest.mark.parametrize("switch", ["expert_norm", "feature_gate", "self_gate", "hierarchy"])
def test_switched_off_variant_trains(switch):
    model = make_model("home", **{switch: False})
    x, labels, mask = make_batch(32)
    loss(model(x), labels, mask).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_expert_normalisation_removes_dead_activations():
    """The symptom HoME targets: ReLU experts emit many exact zeros; BatchNorm + Swish none."""
    x, _, _ = make_batch(64)
    relu = make_model("home", expert_norm=False)(x).expert_zero_frac
    normed = make_model("home", expert_norm=True)(x).expert_zero_frac
    assert relu.mean() > 0.2
    assert normed.max() < 0.01


def test_single_expert_pools_use_a_sigmoid_self_gate():
    model = make_model("home", n_experts=1)
    out = model(make_batch(8)[0])
    own = out.extras["self_gates"].sum(dim=2)  # one non-zero entry per task
    assert ((own > 0) & (own < 1)).all()


def test_a_one_row_training_batch_uses_the_running_statistics() -> None:
    """BatchNorm cannot normalise one row by its own variance: HoME trains on it with the running
    statistics (as in eval) instead of failing, and leaves them as they were."""
    model = make_model("home")
    model.train()
    model(torch.randn(16, model.n_inputs))  # running statistics move off their initial values
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    row = torch.randn(1, model.n_inputs)
    out = model(row)
    sum(out.logits.values()).sum().backward()
    assert all(torch.isfinite(v).all() for v in out.logits.values())
    assert all(torch.equal(m.running_mean, a) and torch.equal(m.running_var, b) for m, (a, b) in zip(norms, before))
    model.eval()
    expected = model(row)
    for task, logit in out.logits.items():
        torch.testing.assert_close(logit, expected.logits[task])
