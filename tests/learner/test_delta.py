"""Deltas between model versions (issue 22): a version is its parent plus the dense entries, the table rows
that changed and the map entries added or removed; materialising the chain gives back the trainer's state
entry for entry, and tombstoned ids leave the map."""

from __future__ import annotations

import pytest
import torch

from learner.delta import (Delta, DeltaError, MapChanges, apply_map, diff, from_tensors, materialise, split_state,
                           to_tensors)
from tests.learner.test_id_tables import _batch, _dense, _learner


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _versions(steps: int) -> list[dict[str, torch.Tensor]]:
    """The state a learner would publish after each step: ids admitted, evicted and expired on the way."""
    torch.manual_seed(0)
    learner = _learner()
    states = []
    for step in range(steps):
        learner.learn(_batch(step, 0, 64), _dense(_batch(step, 0, 64)))
        states.append({k: v.clone() for k, v in learner.weights().items()})
    return states


def test_a_chain_of_reference_deltas_materialises_every_version_exactly() -> None:
    states = _versions(6)
    parts = split_state(states[0])
    assert set(parts.tables) == {"encoder.tables.user_id.", "encoder.tables.item_id."}
    assert set(parts.maps) == {"encoder.map_ids_user_id", "encoder.map_ids_item_id"}
    state = states[0]
    for new in states[1:]:
        delta = from_tensors(to_tensors(diff(state, new)))  # through the wire format
        state = materialise(state, delta)
        _equal(state, new)
    assert any(m.tombstones.numel() for m in diff(states[0], states[-1]).maps.values()), "ttl 3 ms expires users"


def test_a_delta_carries_only_the_rows_that_moved() -> None:
    states = _versions(3)
    delta = diff(states[1], states[2])
    full = sum(v.numel() * v.element_size() for v in states[2].values())
    rows = delta.tables["encoder.tables.user_id."].rows
    assert 0 < rows.numel() < states[2]["encoder.tables.user_id.weight"].shape[0]
    assert delta.nbytes < full


def test_tombstoned_ids_leave_the_map_and_upserts_move_rows() -> None:
    ids, rows = torch.tensor([2, 5, 9, 14]), torch.tensor([1, 2, 3, 4])
    change = MapChanges(ids=torch.tensor([3, 9]), rows=torch.tensor([7, 8]), tombstones=torch.tensor([5, 14]))
    new_ids, new_rows = apply_map(ids, rows, change)
    assert new_ids.tolist() == [2, 3, 9] and new_rows.tolist() == [1, 7, 8]


def test_a_delta_that_does_not_fit_its_parent_is_refused() -> None:
    states = _versions(2)
    delta = diff(states[0], states[1])
    wrong_shape = Delta({**delta.dense, next(iter(delta.dense)): torch.zeros(3, 3, 3)}, delta.tables, delta.maps)
    with pytest.raises(DeltaError, match="shape"):
        materialise(states[0], wrong_shape)
    missing = Delta(dict(list(delta.dense.items())[1:]), delta.tables, delta.maps)
    with pytest.raises(DeltaError, match="missing"):
        materialise(states[0], missing)
    with pytest.raises(DeltaError, match="not a delta entry"):
        from_tensors({"weights/x": torch.zeros(1)})
