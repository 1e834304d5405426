"""DCN-v2 cross layers in front of the experts (learner.models.interaction)."""

from __future__ import annotations

import pytest
import torch

from learner.models import MultiTaskRanker
from learner.models.interaction import CrossNetwork


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
