"""SMES: progressive routing, the per-instance execution bound, sparse compute and the global
load-balancing regulariser."""

from __future__ import annotations

import pytest
import torch

from learner.models import build, load_balance_loss, loss

from .zoo_testkit import N_INPUTS, TASKS, assert_close, make_batch, make_model


@pytest.mark.parametrize("n_experts, k_shared, k_private", [(6, 1, 1), (8, 2, 1), (8, 0, 2), (5, 3, 0), (12, 2, 3)])
def test_routing_respects_the_bound_and_the_progressive_structure(n_experts, k_shared, k_private):
    model = make_model("smes", n_experts=n_experts, k_shared=k_shared, k_private=k_private)
    x, _, _ = make_batch(64)
    out = model(x)
    chosen = torch.stack([out.gates[t] > 0 for t in TASKS], dim=1)  # (B, T, E)
    executed = out.extras["executed_per_instance"]
    bound = k_shared + len(TASKS) * k_private
    assert model.max_executed == min(n_experts, bound)
    assert (executed <= bound).all() and (executed >= k_shared + k_private).all()
    assert torch.equal(executed, chosen.any(dim=1).sum(dim=1))
    # every task mixes exactly its k_shared + k_private experts ...
    assert (chosen.sum(dim=2) == k_shared + k_private).all()
    # ... of which the shared subset is the same for all tasks
    shared = out.extras["shared_experts"]  # (B, k_shared)
    assert shared.shape == (64, k_shared)
    assert chosen.gather(2, shared.unsqueeze(1).expand(-1, len(TASKS), -1)).all()
    # the shared subset is the top-k of the task-averaged router probabilities
    expected = out.extras["router_probs"].mean(dim=1).topk(k_shared, dim=-1).indices
    assert torch.equal(shared.sort(dim=1).values, expected.sort(dim=1).values)


@pytest.mark.parametrize("k_shared, k_private", [(1, 1), (2, 2), (0, 2)])
def test_each_task_adds_its_most_probable_experts_outside_the_shared_subset(k_shared, k_private):
    model = make_model("smes", n_experts=8, k_shared=k_shared, k_private=k_private)
    x, _, _ = make_batch(64)
    out = model(x)
    probs = out.extras["router_probs"]  # (B, T, E)
    shared = torch.zeros(64, 8, dtype=torch.bool).scatter(1, out.extras["shared_experts"], True)
    outside = probs.masked_fill(shared.unsqueeze(1), -1.0)
    for i, task in enumerate(TASKS):
        private = outside[:, i].topk(k_private, dim=-1).indices
        expected = shared.clone().scatter(1, private, True)
        assert torch.equal(out.gates[task] > 0, expected)
        weights = probs[:, i] * expected
        assert_close(out.gates[task], weights / weights.sum(dim=1, keepdim=True))


def test_a_private_expert_two_tasks_pick_runs_once_per_row():
    model = make_model("smes", n_experts=6, k_shared=1, k_private=1)
    with torch.no_grad():  # every task: expert 0 first, expert 3 second, whatever the input
        model.router.weight.zero_()
        model.router.bias.zero_()
        model.router.bias[:, 0] = 5.0
        model.router.bias[:, 3] = 4.0
    x, labels, mask = make_batch(32)
    out = model(x)
    assert torch.equal(out.extras["executed_per_instance"], torch.full((32,), 2))
    assert torch.equal(out.extras["rows_per_expert"], torch.tensor([32, 0, 0, 32, 0, 0]))
    counts, _, n_slots = out.lb_stats  # every (row, task) chose experts 0 and 3
    assert torch.equal(counts, torch.tensor([32.0 * len(TASKS), 0, 0, 32.0 * len(TASKS), 0, 0]))
    assert float(n_slots) == 32 * len(TASKS)
    for task in TASKS:
        assert torch.equal(out.gates[task] > 0, torch.tensor([True, False, False, True, False, False]).expand(32, -1))
    loss(out, labels, mask).backward()
    assert torch.isfinite(model.router.weight.grad).all()


def test_only_routed_rows_are_computed():
    model = make_model("smes", n_experts=8, k_shared=1, k_private=1)
    x, _, _ = make_batch(64)
    out = model(x)
    rows = out.extras["rows_per_expert"]
    assert rows.sum() == out.extras["executed_per_instance"].sum()
    assert rows.sum() <= 64 * model.max_executed < 64 * 8  # a dense pass would be 64 x 8


@pytest.mark.parametrize("capacity", [None, 0, 10**9], ids=["planned", "all-spilled", "all-padded"])
def test_an_expert_that_receives_no_rows_gets_no_gradient(capacity):
    model = make_model("smes", n_experts=6, k_shared=1, k_private=1)
    model.capacity = capacity
    with torch.no_grad():
        model.router.bias[:, 5] = -1e4  # nobody routes to expert 5
    x, labels, mask = make_batch(64)
    out = model(x)
    assert out.extras["rows_per_expert"][5] == 0
    loss(out, labels, mask).backward()
    for layer in model.experts.layers:
        assert torch.count_nonzero(layer.weight.grad[5]) == 0
        assert torch.count_nonzero(layer.weight.grad[:5]) > 0


def test_regulariser_is_one_for_uniform_routing_and_larger_when_skewed():
    model = make_model("smes", n_experts=6, k_shared=1, k_private=1, lb_coef=0.5)
    x, _, _ = make_batch(32)
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.zero_()
    uniform = model(x).aux_loss
    assert_close(uniform, torch.tensor(0.5))
    with torch.no_grad():
        model.router.bias[:, 0] = 3.0
    assert model(x).aux_loss > 0.5 + 0.1


def test_load_balance_loss_formula():
    n = 4
    assert_close(load_balance_loss(torch.full((n,), 10.0), torch.full((n,), 5.0), 20, n), torch.tensor(1.0))
    # all choices and all probability on one expert: the maximum, N
    skewed = load_balance_loss(torch.tensor([40.0, 0, 0, 0]), torch.tensor([20.0, 0, 0, 0]), 20, n)
    assert_close(skewed, torch.tensor(float(n)))


def test_lb_stats_summed_over_shards_equal_the_union():
    """What a trainer all-reduces across workers: the regulariser of the summed statistics is the
    regulariser of the concatenated batch."""
    model = make_model("smes", n_experts=6, k_shared=1, k_private=2, lb_coef=1.0).eval()
    x, _, _ = make_batch(48)
    shards = [model(part).lb_stats for part in x.split([10, 17, 21])]
    summed = [sum(parts) for parts in zip(*shards)]
    union = model(x)
    assert_close(summed[0], union.lb_stats[0])
    assert_close(summed[1], union.lb_stats[1], atol=1e-5)
    assert summed[2].item() == 48 * len(TASKS)
    assert_close(load_balance_loss(*summed, 6), union.aux_loss)


@pytest.mark.parametrize(
    "hparams",
    [dict(k_shared=0, k_private=0), dict(n_experts=4, k_shared=3, k_private=2), dict(k_shared=-1), dict(lb_coef=-0.1)],
)
def test_invalid_routing_hparams_are_rejected(hparams):
    with pytest.raises(ValueError):
        build("smes", n_inputs=N_INPUTS, tasks=list(TASKS), **hparams)


def test_every_block_layout_gives_the_same_loss_and_gradients():
    """Padding every block to the busiest expert, spilling everything, and the planned layout compute
    the same thing: padding rows are never read, so the loss and every gradient match."""
    x, labels, mask = make_batch(48)
    results = []
    for capacity in (10**9, 0, 3, None):
        torch.manual_seed(0)
        model = make_model("smes", n_experts=6, k_shared=1, k_private=1)
        model.capacity = capacity
        value = loss(model(x), labels, mask)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    reference_loss, reference = results[0]
    for value, grads in results[1:]:
        assert_close(value, reference_loss)
        assert grads.keys() == reference.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=1e-5)


def test_block_plan_pads_an_even_load_and_spills_a_skewed_one():
    model = make_model("smes", n_experts=4, k_shared=1, k_private=0)
    even = model.plan_blocks(torch.tensor([2, 2, 2, 2]))
    assert (even.capacity, even.spill.tolist(), even.rows) == (2, [], 8)  # 4 blocks of 2: no padding
    skewed = model.plan_blocks(torch.tensor([50, 1, 1, 1]))
    # padding every block to 50 rows would compute 200; one spill block for the busy expert computes 53
    assert (skewed.capacity, skewed.spill.tolist(), skewed.spill_capacity, skewed.rows) == (1, [0], 49, 53)
    model.capacity = 0
    pinned = model.plan_blocks(torch.tensor([3, 0, 2, 1]))
    assert (pinned.capacity, sorted(pinned.spill.tolist()), pinned.spill_capacity) == (0, [0, 2, 3], 3)


@pytest.mark.parametrize("capacity", [None, 0, 2, 10**9])
def test_block_positions_give_every_pair_its_own_row_in_its_experts_blocks(capacity):
    model = make_model("smes", n_experts=5, k_shared=1, k_private=1)
    model.capacity = capacity
    experts = torch.tensor([3, 0, 3, 1, 3, 3, 0, 4, 3, 1])  # pairs in row order
    counts = torch.bincount(experts, minlength=5)
    blocks = model.plan_blocks(counts)
    at = model.block_positions(experts, counts, blocks)
    assert len(set(at.tolist())) == len(at) and int(at.max()) < blocks.rows
    spill = blocks.spill.tolist()
    head = blocks.n * blocks.capacity
    for pair, e in enumerate(experts.tolist()):
        row = int(at[pair])
        if row < head:
            assert row // blocks.capacity == e
        else:
            assert spill[(row - head) // blocks.spill_capacity] == e
