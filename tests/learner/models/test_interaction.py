"""Explicit interactions in front of the experts (learner.models.interaction): DCN-v2 cross layers and the
products of field embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from learner.config import FIELD_PRODUCTS as config_field_products
from learner.models import MultiTaskRanker
from learner.models.interaction import FIELD_PRODUCTS, CrossNetwork, FieldProducts


@pytest.mark.parametrize("rank", [0, 3])
def test_a_fresh_cross_network_is_the_identity_and_every_weight_gets_a_gradient(rank: int) -> None:
    torch.manual_seed(0)
    cross = CrossNetwork(8, layers=2, rank=rank)
    x = torch.randn(5, 8)
    torch.testing.assert_close(cross(x), x)
    cross(x).pow(2).sum().backward()
    trained = [p for p in (cross.weight, cross.up, cross.bias) if p is not None]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_no_layers_hold_no_parameters_so_earlier_snapshots_still_load() -> None:
    assert list(CrossNetwork(8, layers=0).parameters()) == []
    plain = MultiTaskRanker("mmoe", tasks=["click"], id_fields=["user_id"], n_dense=2, emb_dim=4,
                            tables={"user_id": {"capacity": 8, "dim": 4}}, n_experts=2, expert_dims=(4,), tower_dims=(2,))
    assert not any(k.startswith("cross.") for k in plain.state_dict())


def test_one_cross_layer_and_a_linear_readout_fit_a_bilinear_form_an_mlp_of_the_same_size_does_not() -> None:
    """y = uᵀ M v from x = [u, v]: exactly representable after one cross layer (the readout sums x0 ⊙ (W x0))."""
    torch.manual_seed(0)
    d = 4
    m = torch.randn(d, d)
    x = torch.randn(4096, 2 * d)
    y = torch.einsum("bi,ij,bj->b", x[:, :d], m, x[:, d:])

    def fit(model: torch.nn.Module) -> float:
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(600):
            opt.zero_grad()
            loss = (model(x).squeeze(1) - y).pow(2).mean()
            loss.backward()
            opt.step()
        return loss.item() / y.var().item()

    cross = fit(torch.nn.Sequential(CrossNetwork(2 * d, layers=1), torch.nn.Linear(2 * d, 1)))
    width = 2 * d  # as many weights as the cross layer has, in a hidden layer
    mlp = fit(torch.nn.Sequential(torch.nn.Linear(2 * d, width), torch.nn.ReLU(), torch.nn.Linear(width, 1)))
    assert cross < 0.05 < mlp  # fraction of the variance left unexplained


def test_the_ranker_rebuilds_its_cross_layers_from_its_config() -> None:
    ranker = MultiTaskRanker("mmoe", tasks=["click"], id_fields=["user_id"], n_dense=2, emb_dim=4,
                             tables={"user_id": {"capacity": 8, "dim": 4}}, cross_layers=2, cross_rank=3,
                             n_experts=2, expert_dims=(4,), tower_dims=(2,))
    rebuilt = MultiTaskRanker.from_config(ranker.config)
    assert rebuilt.cross.layers == 2 and rebuilt.cross.rank == 3
    rebuilt.load_state_dict(ranker.state_dict())


def reference_products(x: torch.Tensor, dims: list[int], mode: str) -> torch.Tensor:
    """The products written pair by pair, as DLRM and GMF describe them (widths ascending, field order within)."""
    starts = [sum(dims[:i]) for i in range(len(dims))]
    fields = [x[:, s:s + d] for s, d in zip(starts, dims)]
    extra = []
    for w in sorted({d for d in dims if dims.count(d) > 1}):
        same = [f for f, d in enumerate(dims) if d == w]
        for i, a in enumerate(same):
            for b in same[i + 1:]:
                p = fields[a] * fields[b]
                extra.append(p.sum(1, keepdim=True) if mode == "dot" else p)
    return torch.cat([x, *extra], dim=1)


@pytest.mark.parametrize("mode", ["dot", "product"])
def test_field_products_match_the_pair_by_pair_reference_and_pass_gradients(mode: str) -> None:
    dims = [4, 4, 2, 4, 2, 3]  # three fields of width 4, two of 2, one alone; then 5 dense features
    products = FieldProducts(dims, mode)
    x = torch.randn(7, sum(dims) + 5, requires_grad=True)
    y = products(x)
    want = reference_products(x, dims, mode)
    assert y.shape == (7, sum(dims) + 5 + products.n_outputs) == want.shape
    assert products.n_outputs == (3 + 1 if mode == "dot" else 3 * 4 + 1 * 2)
    torch.testing.assert_close(y, want)
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, :sum(dims)] != 0).all()


def test_no_field_products_is_the_identity_and_products_need_two_fields_of_one_width() -> None:
    x = torch.randn(3, 9)
    none = FieldProducts([4, 4], "none")
    assert none(x) is x and none.n_outputs == 0 and list(none.buffers()) == []
    with pytest.raises(ValueError, match="equal width"):
        FieldProducts([4, 2], "product")
    with pytest.raises(ValueError, match="must be one of"):
        FieldProducts([4, 4], "outer")


def test_a_product_and_a_linear_readout_fit_a_dot_product_an_mlp_of_the_same_size_does_not() -> None:
    """y = u · v from [u, v]: one linear layer after the products, where an MLP must approximate the product."""
    torch.manual_seed(0)
    d = 4
    x = torch.randn(4096, 2 * d)
    y = (x[:, :d] * x[:, d:]).sum(1)

    def fit(model: torch.nn.Module) -> float:
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(300):
            opt.zero_grad()
            loss = (model(x).squeeze(1) - y).pow(2).mean()
            loss.backward()
            opt.step()
        return loss.item() / y.var().item()

    products = fit(torch.nn.Sequential(FieldProducts([d, d], "product"), torch.nn.Linear(3 * d, 1)))
    mlp = fit(torch.nn.Sequential(torch.nn.Linear(2 * d, 3 * d), torch.nn.ReLU(), torch.nn.Linear(3 * d, 1)))
    assert products < 0.01 < 0.05 < mlp


@pytest.mark.parametrize("mode", ["dot", "product"])
def test_the_ranker_with_field_products_round_trips_through_its_config_and_state(mode: str) -> None:
    torch.manual_seed(0)
    tables = {"user_id": {"capacity": 8, "dim": 4}, "item_id": {"capacity": 8, "dim": 4}}
    ranker = MultiTaskRanker("home", tasks=["click", "like"], id_fields=["user_id", "item_id"], n_dense=2, emb_dim=4,
                             tables=tables, field_products=mode, emb_accumulator=1e-4, cross_layers=1,
                             n_experts=2, expert_dims=(4,), tower_dims=(2,))
    assert ranker.model.n_inputs == 4 + 4 + 2 + (1 if mode == "dot" else 4)
    assert ranker.config["field_products"] == mode and ranker.config["emb_accumulator"] == 1e-4
    rows = {"user_id": torch.tensor([1, 2, 3]), "item_id": torch.tensor([3, 1, 1])}
    for table in ranker.encoder.row_tables().values():
        table.ensure_rows(3)
    out = ranker({}, torch.randn(3, 2), rows)
    sum(v.sum() for v in out.logits.values()).backward()
    assert all(p.grad is not None for p in ranker.parameters() if p.requires_grad and p.numel())
    rebuilt = MultiTaskRanker.from_config(json.loads(json.dumps(ranker.config)))  # what a manifest holds
    rebuilt.load_state_dict(ranker.state_dict())
    assert rebuilt.products.n_outputs == ranker.products.n_outputs
    assert all(t.initial_accumulator == 1e-4 for t in rebuilt.encoder.row_tables().values())


def test_a_config_from_before_field_products_still_builds_the_model_it_described() -> None:
    ranker = MultiTaskRanker("mmoe", tasks=["click"], id_fields=["user_id", "item_id"], n_dense=2, emb_dim=4,
                             n_buckets=64, n_experts=2, expert_dims=(4,), tower_dims=(2,))
    older = {k: v for k, v in ranker.config.items() if k not in ("field_products", "emb_accumulator")}
    rebuilt = MultiTaskRanker.from_config(older)
    assert rebuilt.products.mode == "none" and rebuilt.model.n_inputs == ranker.model.n_inputs
    rebuilt.load_state_dict(ranker.state_dict())


def test_the_config_names_the_same_products_as_the_models() -> None:
    assert FIELD_PRODUCTS == config_field_products
