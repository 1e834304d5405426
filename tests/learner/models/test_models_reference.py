"""Batched fast paths against a plain reference: one ``nn.Linear`` per expert, gate and tower, and
Python loops over experts, tasks and pools, written from the papers' block diagrams."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learner.models import BatchedMLP, ExpertBank, GateBank, StackedLinear, TaskTowers
from learner.models.layers import SMALL_SOFTMAX, ZERO_EPS, Blocks, get_activation, softmax_lastdim, zero_frac

from .zoo_testkit import TASKS, assert_close, make_batch, make_model

# ---------------------------------------------------------------- plain building blocks


def plain_linear(stacked: StackedLinear, i: int) -> nn.Linear:
    layer = nn.Linear(stacked.d_in, stacked.d_out)
    with torch.no_grad():
        layer.weight.copy_(stacked.weight[i].T)
        layer.bias.copy_(stacked.bias[i])
    return layer


def plain_mlp(mlp: BatchedMLP, i: int):
    layers = [plain_linear(layer, i) for layer in mlp.layers]
    act = get_activation(mlp.activation)

    def run(x):
        for depth, layer in enumerate(layers):
            x = layer(x)
            if depth < len(layers) - 1 or mlp.last_activation:
                x = act(x)
        return x

    return run


def plain_expert(bank: ExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of an eval-mode bank on its own input ``x (B, d_in)``."""
    if bank.feature_gate is not None:
        a, b = bank.feature_gate.down[e], bank.feature_gate.up[e]
        x = x * 2 * torch.sigmoid(x @ a @ b)
    h = plain_mlp(bank.mlp, e)(x)
    if bank.norm is not None:
        width = h.shape[1]
        part = slice(e * width, (e + 1) * width)
        bn = bank.norm
        h = (h - bn.running_mean[part]) / torch.sqrt(bn.running_var[part] + bn.eps) * bn.weight[part] + bn.bias[part]
        h = F.silu(h)
    return h


def plain_gate(bank: GateBank, g: int, x: torch.Tensor) -> torch.Tensor:
    """Gate ``g`` over all experts, 0 where it cannot see."""
    logits = plain_linear(bank.proj, g)(x)
    w = torch.softmax(logits, dim=-1) if logits.shape[1] > 1 else torch.sigmoid(logits)
    full = torch.zeros(x.shape[0], bank.n_experts)
    for slot, expert in enumerate(bank.index[g].tolist()):
        full[:, expert] = w[:, slot]
    return full


def plain_mix(gate: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    return sum(gate[:, e : e + 1] * h for e, h in enumerate(experts))


def plain_towers(towers: TaskTowers, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [plain_mlp(towers.mlp, t)(v).squeeze(-1) for t, v in enumerate(inputs)]


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("wide", [True, False], ids=["one-wide-gemm", "member-major"])
def test_stacked_linear_equals_one_linear_per_member(monkeypatch, wide):
    if not wide:  # shared inputs of narrow members normally run as one wide GEMM; force the batched one
        monkeypatch.setattr("learner.models.layers.WIDE_OUTPUTS", 0)
    torch.manual_seed(0)
    stacked = StackedLinear(4, 5, 3)
    shared, per_member = torch.randn(6, 5), torch.randn(6, 4, 5)
    y_shared, y_member = stacked(shared), stacked(per_member)
    for i in range(4):
        layer = plain_linear(stacked, i)
        assert_close(y_shared[:, i], layer(shared))
        assert_close(y_member[:, i], layer(per_member[:, i]))


def block_layout(counts: list[int], capacity: int) -> tuple[Blocks, list[torch.Tensor]]:
    """A ``Blocks`` layout for members with ``counts`` rows each, and where each member's rows sit."""
    spill = [m for m, c in enumerate(counts) if c > capacity]
    spill_capacity = max(counts) - capacity if spill else 0
    blocks = Blocks(len(counts), capacity, torch.tensor(spill, dtype=torch.long), spill_capacity)
    where = []
    for m, c in enumerate(counts):
        first = [m * capacity + i for i in range(min(c, capacity))]
        rest = [len(counts) * capacity + spill.index(m) * spill_capacity + i for i in range(c - capacity)] if c > capacity else []
        where.append(torch.tensor(first + rest, dtype=torch.long))
    return blocks, where


@pytest.mark.parametrize("capacity", [0, 2, 5], ids=["all-spilled", "some-spill", "no-spill"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_blocks_equal_one_mlp_per_member_with_gradients(capacity, activation):
    """Each member on its own rows through first and spill blocks: outputs and every gradient (weights,
    biases, inputs) equal one plain MLP per member; padding rows get no gradient."""
    torch.manual_seed(0)
    counts = [5, 1, 0, 3]  # member 2 runs on no rows
    mlp = BatchedMLP(4, 6, [7, 3], activation=activation)
    blocks, where = block_layout(counts, capacity)
    x = torch.randn(blocks.rows, 6, requires_grad=True)
    out = mlp.forward_blocks(x, blocks)
    assert out.shape == (blocks.rows, 3)
    loss = sum(out[w].square().sum() for w in where)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    x_grad = x.grad.clone()
    mlp.zero_grad()
    x_ref = x.detach().clone().requires_grad_(True)
    reference = []
    for m, w in enumerate(where):
        if len(w):
            y = plain_mlp(mlp, m)(x_ref[w])
            assert_close(out[w], y, atol=1e-6)
            reference.append(y.square().sum())
    sum(reference).backward()  # through the plain layers' copies: gradients land on x_ref only
    assert_close(x_grad, x_ref.grad, atol=1e-6)
    padding = torch.ones(blocks.rows, dtype=torch.bool)
    padding[torch.cat(where)] = False
    assert torch.count_nonzero(x_grad[padding]) == 0
    expected = torch.autograd.grad(  # the parameter gradients against autograd on the stacked parameters
        sum(stacked_mlp_rows(mlp, m, x.detach()[w]).square().sum() for m, w in enumerate(where) if len(w)),
        list(mlp.parameters()),
    )
    for (name, got), want in zip(grads.items(), expected):
        assert_close(got, want, atol=1e-5)
    for depth in range(len(mlp.layers)):  # the member that ran on no rows gets no gradient
        assert torch.count_nonzero(grads[f"layers.{depth}.weight"][2]) == 0
        assert torch.count_nonzero(grads[f"layers.{depth}.weight"][0]) > 0


def stacked_mlp_rows(mlp: BatchedMLP, m: int, x: torch.Tensor) -> torch.Tensor:
    """Member ``m`` of ``mlp`` on rows ``x``, differentiable in the stacked parameters themselves."""
    act = get_activation(mlp.activation)
    for depth, layer in enumerate(mlp.layers):
        x = x @ layer.weight[m] + layer.bias[m]
        if depth < len(mlp.layers) - 1 or mlp.last_activation:
            x = act(x)
    return x


def test_blocks_under_bf16_autocast_compute_in_bf16_and_keep_fp32_gradients():
    torch.manual_seed(0)
    mlp = BatchedMLP(3, 8, [16, 4])
    blocks, where = block_layout([4, 2, 6], 3)
    x = torch.randn(blocks.rows, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp.forward_blocks(x, blocks)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in mlp.parameters())
    assert_close(out.float(), mlp.forward_blocks(x.detach(), blocks), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("classes", sorted({2, 4, 8, SMALL_SOFTMAX - 1, SMALL_SOFTMAX, 40}))
def test_softmax_lastdim_equals_torch_softmax_with_gradients(classes):
    torch.manual_seed(classes)
    x = (torch.randn(64, 6, classes, dtype=torch.float64) * 4).requires_grad_()
    # gradcheck builds the full (n, n) Jacobian numerically: on all 64 * 6 rows that is 15360^2 entries at 40
    # classes. Rows are independent, so a few rows of the same tensor check the same backward.
    assert torch.autograd.gradcheck(softmax_lastdim, (x[:4, :3].detach().requires_grad_(),))
    y = x.detach().float().requires_grad_()
    ref = y.detach().clone().requires_grad_()
    grad = torch.randn(y.shape)
    softmax_lastdim(y).backward(grad)
    torch.softmax(ref, dim=-1).backward(grad)
    torch.testing.assert_close(softmax_lastdim(y.detach()), torch.softmax(ref.detach(), dim=-1))
    torch.testing.assert_close(y.grad, ref.grad)
    half = y.detach().bfloat16()
    assert softmax_lastdim(half).dtype == torch.bfloat16
    torch.testing.assert_close(softmax_lastdim(half).float(), torch.softmax(half.float(), dim=-1), atol=4e-3, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("per_member_input", [False, True])
def test_cache_sized_member_groups_give_the_same_outputs_and_gradients(monkeypatch, activation, per_member_input):
    torch.manual_seed(0)
    mlp = BatchedMLP(5, 4, [6, 3], activation=activation)
    x = torch.randn(8, 5, 4) if per_member_input else torch.randn(8, 4)
    whole = mlp(x)
    whole.square().sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    monkeypatch.setattr("learner.models.layers.CHUNK_BYTES", 8 * 6 * 4 * 2)  # two members per group
    assert mlp.chunk_size(8) == 2
    grouped = mlp(x)
    grouped.square().sum().backward()
    assert_close(grouped, whole)
    for p, g in zip(mlp.parameters(), grads):
        assert_close(p.grad, g)
    for i in range(5):
        assert_close(grouped[:, i], plain_mlp(mlp, i)(x[:, i] if per_member_input else x))


def test_expert_bank_with_norm_and_feature_gate_equals_plain_experts():
    torch.manual_seed(0)
    bank = ExpertBank(3, 5, [6], norm=True, feature_gate_rank=2, member_input=[0, 1, 1])
    with torch.no_grad():
        bank.feature_gate.up.normal_()  # leave the identity start so the gate matters
    paths = torch.randn(8, 2, 5)
    bank(paths)  # train-mode pass updates the running statistics
    bank.eval()
    h = bank(paths)
    for e, path in enumerate([0, 1, 1]):
        assert_close(h[:, e], plain_expert(bank, e, paths[:, path]), atol=1e-5)


def test_gate_bank_equals_one_gate_per_task():
    torch.manual_seed(0)
    bank = GateBank(5, 4, [[0, 1, 4], [2, 3, 4]])
    x = torch.randn(6, 4)
    g = bank(x)
    for i in range(2):
        assert_close(g[:, i], plain_gate(bank, i, x))


# ---------------------------------------------------------------- whole families


def reference_forward(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-task logits of an eval-mode model, computed the plain way."""
    family, n_tasks = model.family, len(model.tasks)
    if family == "shared_bottom":
        h = plain_expert(model.bottom, 0, x)
        return plain_towers(model.towers, [h] * n_tasks)
    if family in ("omoe", "mmoe"):
        hs = [plain_expert(model.experts, e, x) for e in range(model.n_gate_experts)]
        gates = [plain_gate(model.gates, 0 if family == "omoe" else t, x) for t in range(n_tasks)]
        return plain_towers(model.towers, [plain_mix(g, hs) for g in gates])
    if family == "ple":
        return reference_ple(model, x)
    if family == "home":
        return reference_home(model, x)
    if family == "smes":
        raise AssertionError("SMES is compared with its dense reference below")
    raise AssertionError(family)


def reference_ple(model, x):
    n_tasks = len(model.tasks)
    n = model.n_gate_experts // (n_tasks + 1)
    paths = [x] * (n_tasks + 1)  # task paths, then the shared path
    for level in model.levels:
        hs = [plain_expert(level.experts, e, paths[e // n]) for e in range(model.n_gate_experts)]
        new = [plain_mix(plain_gate(level.task_gates, t, paths[t]), hs) for t in range(n_tasks)]
        for t in range(n_tasks):  # a task gate sees its own pool and the shared pool only
            visible = set(range(t * n, (t + 1) * n)) | set(range(n_tasks * n, (n_tasks + 1) * n))
            assert set(level.task_gates.index[t].tolist()) == visible
        if level.shared_gate is not None:
            new.append(plain_mix(plain_gate(level.shared_gate, 0, paths[n_tasks]), hs))
        paths = new
    return plain_towers(model.towers, paths)


def reference_home(model, x):
    if model.hierarchy:
        groups = list(model.groups)
        group_of = {t: next(i for i, g in enumerate(groups) if t in model.groups[g]) for t in model.tasks}
        meta = model.meta
        hs = [plain_expert(meta.experts, e, x) for e in range(meta.experts.n)]
        group_paths = [plain_mix(plain_gate(meta.group_gates, g, x), hs) for g in range(len(groups))]
        global_path = plain_mix(plain_gate(meta.global_gate, 0, x), hs)
        pool_input = {"global": global_path}
        pool_input |= {f"group:{g}": group_paths[i] for i, g in enumerate(groups)}
        pool_input |= {f"task:{t}": group_paths[group_of[t]] for t in model.tasks}
        gate_input = [group_paths[group_of[t]] for t in model.tasks]
    else:
        pool_input = {name: x for name in model.pools}
        gate_input = [x] * len(model.tasks)
    expert_input = {e: pool_input[name] for name, pool in model.pools.items() for e in pool}
    hs = [plain_expert(model.task_experts, e, expert_input[e]) for e in range(model.n_gate_experts)]
    mixed = []
    for t, task in enumerate(model.tasks):
        weights = plain_gate(model.task_gates, t, gate_input[t])
        if model.self_gates is not None:
            weights = weights + plain_gate(model.self_gates, t, gate_input[t])
        mixed.append(plain_mix(weights, hs))
    return plain_towers(model.towers, mixed)


HOME_VARIANTS = [
    {},
    {"hierarchy": False},
    {"expert_norm": False, "feature_gate": False, "self_gate": False},
    {"n_experts": 1},
]


@pytest.mark.parametrize(
    "family, overrides",
    [("shared_bottom", {}), ("omoe", {}), ("mmoe", {}), ("ple", {}), ("ple", {"n_levels": 3}), ("ple", {"n_levels": 1})]
    + [("home", v) for v in HOME_VARIANTS],
)
def test_family_equals_its_plain_reference(family, overrides):
    model = make_model(family, **overrides)
    if family == "home" and model.task_experts.feature_gate is not None:
        with torch.no_grad():  # move the feature gates off their identity start
            banks = [model.task_experts] + ([model.meta.experts] if model.meta is not None else [])
            for bank in banks:
                bank.feature_gate.up.normal_(std=0.5)
    x, _, _ = make_batch(10)
    model(x)  # train-mode pass for BatchNorm statistics
    model.eval()
    out = model(x)
    for task, expected in zip(TASKS, reference_forward(model, x)):
        assert_close(out.logits[task], expected, atol=1e-5)


@pytest.mark.parametrize("capacity", [None, 0, 10**9], ids=["planned", "all-spilled", "all-padded"])
@pytest.mark.parametrize("k_shared, k_private", [(1, 1), (2, 0), (0, 2), (2, 1)])
def test_smes_sparse_dispatch_equals_dense_reference(k_shared, k_private, capacity):
    """Running only the routed experts (in blocks as planned, every row spilled, or every block padded
    to the busiest expert) equals running every expert and mixing with the gates."""
    model = make_model("smes", n_experts=6, k_shared=k_shared, k_private=k_private).eval()
    model.capacity = capacity
    x, _, _ = make_batch(20)
    out = model(x)
    hs = [plain_mlp(model.experts, e)(x) for e in range(6)]
    expected = plain_towers(model.towers, [plain_mix(out.gates[t], hs) for t in TASKS])
    for task, value in zip(TASKS, expected):
        assert_close(out.logits[task], value, atol=1e-5)


def test_zero_frac_counts_magnitudes_up_to_the_tolerance() -> None:
    values = torch.tensor([0.0, -0.0, 5e-7, -5e-7, 1e-6, 2e-6, -2e-6, 0.3, float("nan"), float("inf")])
    h = values.repeat(4, 3, 1)  # (B=4, E=3, H=10)
    h[:, 1] = 1.0  # expert 1: nothing near zero
    h[:, 2, :5] = 0.0  # expert 2: half zero
    expected = torch.tensor([5 / 10, 0.0, 5 / 10])  # 0, -0, +-5e-7 and exactly 1e-6 are "zero"; NaN and inf are not
    before = h.clone()
    assert_close(zero_frac(h), expected)
    assert torch.equal(h.nan_to_num(), before.nan_to_num())  # the activations are left as they were
    low = zero_frac(h.to(torch.bfloat16))
    assert low.dtype == torch.float32 and torch.equal(low, zero_frac(h.to(torch.bfloat16).float()))


def test_smes_zero_frac_is_over_the_rows_each_expert_ran_on() -> None:
    model = make_model("smes", n_experts=8, k_shared=1, k_private=1)
    x, _, _ = make_batch(64)
    with torch.no_grad():
        out = model(x)
        executed = torch.stack([out.gates[t] > 0 for t in TASKS], dim=1).any(dim=1)  # (B, E)
        expected = torch.zeros(8)
        for e in range(8):
            h = x[executed[:, e]]
            for layer in model.experts.layers:
                h = torch.relu(h @ layer.weight[e] + layer.bias[e])
            if h.shape[0]:
                expected[e] = (h.abs() <= ZERO_EPS).float().mean()
    assert 0 < expected.max() and expected.min() < 1  # ReLU experts: some zeros, not all
    assert_close(out.expert_zero_frac, expected, atol=1e-6, rtol=0)
