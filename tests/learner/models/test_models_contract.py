"""The contract every registered family honours (timm's ``list_models()`` suite)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import learner.models as models
from learner.models import FAMILIES, ModelOutput, build, default_hparams, load_balance_loss, loss, loss_terms
from .zoo_testkit import N_INPUTS, TASKS, assert_close, check_declared_layout, make_batch, make_model, sgd_step

pytestmark = pytest.mark.parametrize("family", FAMILIES)


def test_families_are_the_contract(family):
    assert models.FAMILIES == ("shared_bottom", "omoe", "mmoe", "ple", "home", "smes")
    assert build(family, n_inputs=N_INPUTS, tasks=["a"]).family == family


def test_defaults_build_and_run(family):
    model = build(family, n_inputs=100, tasks=["a", "b"])
    out = model(torch.randn(4, 100))
    assert set(out.logits) == {"a", "b"}
    assert set(default_hparams(family)) >= {"expert_dims", "tower_dims"}


def test_output_shapes(family):
    model = make_model(family)
    x, _, _ = make_batch(5)
    out = model(x)
    n_experts = model.n_gate_experts
    assert isinstance(out, ModelOutput)
    assert list(out.logits) == list(TASKS) == list(out.gates)
    assert all(v.shape == (5,) for v in out.logits.values())
    assert all(g.shape == (5, n_experts) for g in out.gates.values())
    assert out.expert_zero_frac.shape == (n_experts,)
    assert out.aux_loss.shape == ()
    assert out.task_types == {"click": "binary", "like": "binary", "play_time": "regression"}


def test_declared_lb_experts_is_the_length_of_the_lb_stats_it_reports(family):
    model = make_model(family)
    out = model(make_batch(8)[0])
    assert (model.lb_experts is None) == (out.lb_stats is None)
    if out.lb_stats is not None:
        counts, prob_sums, n_slots = out.lb_stats
        assert model.lb_experts == counts.numel() == prob_sums.numel()
        assert n_slots.shape == ()


def test_declared_lb_coef_is_the_regulariser_coefficient(family):
    """Families without load-balancing statistics declare 0.0; SMES declares its hparam, and its
    ``aux_loss`` is exactly that regulariser (the distributed trainer recomputes it from summed stats)."""
    if "lb_coef" not in default_hparams(family):
        model = make_model(family)
        assert model.lb_experts is None and model.lb_coef == 0.0
        return
    for coef in (0.0, 0.37):
        model = make_model(family, lb_coef=coef)
        assert model.lb_coef == coef
        out = model(make_batch(8)[0])
        assert out.lb_stats is not None and model.lb_experts is not None
        assert_close(out.aux_loss, coef * load_balance_loss(*out.lb_stats, model.lb_experts))


# The families whose gate experts come in named pools (task-specific, group, shared).
POOLED = {"ple", "home"}


def test_declared_pools_and_groups_describe_the_gate_experts(family):
    model = make_model(family)
    assert bool(model.pools) == (family in POOLED)
    check_declared_layout(model)


def test_outputs_finite(family):
    model = make_model(family)
    x, _, _ = make_batch(16)
    x[0] *= 1e3  # a wild row must not poison anything
    out = model(x)
    tensors = [*out.logits.values(), *out.gates.values(), out.aux_loss, out.expert_zero_frac]
    assert all(torch.isfinite(t).all() for t in tensors)
    assert ((out.expert_zero_frac >= 0) & (out.expert_zero_frac <= 1)).all()


def test_every_parameter_gets_a_finite_gradient(family):
    model = make_model(family)
    x, labels, mask = make_batch(64)
    out = model(x)
    if family == "smes":
        # Sparse experts only get gradient from rows routed to them; with 64 rows x 3 tasks over
        # 6 experts every expert is hit here. The unrouted case is tested in test_models_smes.
        assert (out.extras["rows_per_expert"] > 0).all()
    loss(out, labels, mask).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def test_gates_sum_to_one_over_visible_experts(family):
    model = make_model(family)
    x, _, _ = make_batch(16)
    for task, g in model(x).gates.items():
        assert (g >= 0).all(), task
        assert_close(g.sum(dim=1), torch.ones(16))


def test_safetensors_round_trip(family, tmp_path):
    model = make_model(family, seed=0)
    x, _, _ = make_batch(8)
    model.train()
    model(x)  # move BatchNorm running statistics off their initial values
    model.eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    clone = make_model(family, seed=123).eval()
    clone.load_state_dict(load_file(str(path)))
    a, b = model(x), clone(x)
    for t in TASKS:
        assert torch.equal(a.logits[t], b.logits[t])
        assert torch.equal(a.gates[t], b.gates[t])


def test_seeded_runs_reproduce(family):
    x, labels, mask = make_batch(16)
    runs = []
    for _ in range(2):
        model = make_model(family, seed=7)
        loss(model(x), labels, mask).backward()
        sgd_step(model, lr=0.1)
        runs.append(model(x))
    for t in TASKS:
        assert torch.equal(runs[0].logits[t], runs[1].logits[t])
    other = make_model(family, seed=8)(x)
    assert not torch.equal(runs[0].logits["click"], other.logits["click"])


def test_eval_row_does_not_depend_on_the_batch(family):
    model = make_model(family)
    x, _, _ = make_batch(12)
    model(x)  # train-mode pass: BatchNorm statistics become non-trivial
    model.eval()
    full = model(x)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted = model(x[perm])
    for i in (0, 5, 11):
        alone = model(x[i : i + 1])
        for t in TASKS:
            assert_close(alone.logits[t][0], full.logits[t][i], rtol=1e-5, atol=1e-6)
            assert_close(alone.gates[t][0], full.gates[t][i], rtol=1e-5, atol=1e-6)
    for t in TASKS:
        assert_close(permuted.logits[t], full.logits[t][perm], rtol=1e-5, atol=1e-6)


def test_masked_label_does_not_change_the_loss(family):
    model = make_model(family)
    x, labels, mask = make_batch(16)
    out = model(x)
    mask["click"][3] = 0.0
    mask["play_time"][:8] = 0.0
    before, terms = loss_terms(out, labels, mask)
    labels["click"][3] = 1.0 - labels["click"][3]
    labels["play_time"][:8] = float("nan")  # placeholders for absent labels may be anything
    after, terms_after = loss_terms(out, labels, mask)
    assert torch.equal(before, after)
    assert all(torch.equal(terms[t], terms_after[t]) for t in TASKS)
    mask["like"][:] = 0.0
    _, terms = loss_terms(out, labels, mask)
    assert terms["like"].item() == 0.0


def test_unknown_hparam_is_rejected_by_name(family):
    with pytest.raises(TypeError, match="n_expertz"):
        build(family, n_inputs=N_INPUTS, tasks=["a"], n_expertz=3)


def test_single_task_works(family):
    model = make_model(family, tasks=("click",))
    x, labels, _ = make_batch(8, tasks=("click",))
    out = model(x)
    assert list(out.logits) == ["click"] and torch.isfinite(loss(out, labels)).all()


def test_a_gradient_step_lowers_the_loss(family):
    """The logits, gates, aux loss and loss are wired to the parameters the right way round."""
    model = make_model(family)
    x, labels, mask = make_batch(64)
    before = loss(model(x), labels, mask)
    before.backward()
    sgd_step(model, lr=0.05)
    after = loss(model(x), labels, mask)
    assert after.item() < before.item()
