"""FeatureEncoder: ID hashing (range, stability, field salts, collision rate), dense normalisation, and the
published maps' overlay (updates in place, lookups, folds) against a dict."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import learner.models.encoder
from learner.models import FeatureEncoder, hash_ids
from learner.models.encoder import field_salt

from .zoo_testkit import assert_close

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(INT64, min_size=1, max_size=20), n_buckets=st.integers(1, 2**32))
def test_buckets_are_in_range_and_deterministic(ids, n_buckets):
    t = torch.tensor(ids, dtype=torch.int64).unsqueeze(-1)  # (B, 1)
    salts = torch.tensor([field_salt("user")])
    b = hash_ids(t, salts, n_buckets)
    assert ((b >= 0) & (b < n_buckets)).all()
    assert torch.equal(b, hash_ids(t.clone(), salts, n_buckets))


def test_hash_is_pinned():
    """Snapshots depend on the hash: changing it silently re-maps every trained embedding."""
    ids = torch.tensor([[0, 0], [1, 1], [2**40 + 7, 2**40 + 7], [-1, -1]])
    salts = torch.tensor([field_salt("user_id"), field_salt("item_id")])
    assert hash_ids(ids, salts, 2**18).tolist() == PINNED


PINNED = [[184919, 227926], [158294, 53884], [181443, 136296], [38472, 81871]]


def test_fields_are_salted_apart():
    enc = FeatureEncoder(["user", "item"], n_dense=0, n_buckets=2**20, emb_dim=1)
    ids = torch.arange(10_000)
    b = enc.buckets({"user": ids, "item": ids})
    assert (b[:, 0] != b[:, 1]).float().mean() > 0.99


def test_collision_rate_matches_the_documented_formula():
    n_keys, n_buckets = 5000, 4096
    enc = FeatureEncoder(["item"], n_dense=0, n_buckets=n_buckets, emb_dim=1)
    ids = torch.randint(-(2**62), 2**62, (n_keys,), generator=torch.Generator().manual_seed(0)).unique()
    b = enc.buckets({"item": ids})[:, 0]
    per_bucket = torch.bincount(b, minlength=n_buckets)
    colliding = (per_bucket[b] > 1).float().mean().item()
    expected = 1 - (1 - 1 / n_buckets) ** (len(ids) - 1)
    assert abs(colliding - expected) < 0.03
    occupied = (per_bucket > 0).sum().item()
    assert abs(occupied - n_buckets * (1 - math.exp(-len(ids) / n_buckets))) < 0.03 * n_buckets


def test_output_layout_and_dense_normalisation():
    torch.manual_seed(0)
    enc = FeatureEncoder(["user", "item"], n_dense=3, n_buckets=64, emb_dim=4)
    assert enc.n_outputs == 2 * 4 + 3
    ids = {"user": torch.tensor([1, 2]), "item": torch.tensor([3, 4]), "unused": torch.tensor([0, 0])}
    dense = torch.tensor([[0.0, 1e9, -3.0], [float("nan"), float("inf"), 2.0]])
    out = enc(ids, dense)
    assert out.shape == (2, 11) and torch.isfinite(out).all()
    assert_close(out[0, 8:], torch.tensor([0.0, math.log1p(1e9), -math.log1p(3.0)]))
    assert out[1, 8] == 0.0  # NaN reads as missing -> 0
    # rows are independent: no batch statistics
    assert_close(enc({k: v[1:] for k, v in ids.items()}, dense[1:])[0], out[1])


def test_the_dense_transform_is_the_signed_log_scaled_and_shifted_with_its_gradients_and_the_input_untouched():
    """The in-place form (abs, log1p_, copysign_, addcmul) against the formula it computes, values and gradients."""
    torch.manual_seed(0)
    enc = FeatureEncoder(["user"], n_dense=5, n_buckets=8, emb_dim=2)
    with torch.no_grad():
        enc.dense_scale.normal_()
        enc.dense_shift.normal_()
    dense = torch.tensor([[0.0, -0.0, 2.5, -7.0, 1e30], [float("nan"), float("-inf"), -1e-3, 3.0, 0.5]],
                         requires_grad=True)
    before = dense.detach().clone()
    out = enc({"user": torch.tensor([1, 2])}, dense)[:, 2:]
    x = torch.nan_to_num(dense, nan=0.0)
    expected = torch.sign(x) * torch.log1p(x.abs()) * enc.dense_scale + enc.dense_shift
    assert_close(out, expected)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (dense, enc.dense_scale, enc.dense_shift))
    want = torch.autograd.grad((expected * weights).sum(), (dense, enc.dense_scale, enc.dense_shift))
    for g, w in zip(got, want):
        assert_close(g, w)
    assert torch.equal(dense.detach().nan_to_num(nan=7.0), before.nan_to_num(nan=7.0))  # the caller's is not written


def test_missing_field_is_an_error():
    enc = FeatureEncoder(["user", "item"], n_dense=1, n_buckets=8)
    with pytest.raises(ValueError, match="item"):
        enc({"user": torch.tensor([1])}, torch.zeros(1, 1))


@pytest.mark.parametrize("kwargs", [dict(n_buckets=0), dict(n_buckets=2**33), dict(emb_dim=0)])
def test_bad_sizes_are_rejected(kwargs):
    with pytest.raises(ValueError):
        FeatureEncoder(["user"], n_dense=1, **kwargs)


# ---- the published maps: an overlay updated in place ----------------------------------------------------------

def _mapped() -> FeatureEncoder:
    return FeatureEncoder(["user"], n_dense=0, emb_dim=2, tables={"user": {"capacity": 1000}})


def _random_update(g: torch.Generator, reference: dict[int, int]) -> tuple[torch.Tensor, ...]:
    """Upserts and tombstones over ids 0..59 (some held, some not), applied to ``reference`` too."""
    ids = torch.unique(torch.randint(0, 60, (int(torch.randint(0, 12, (), generator=g)),), generator=g))
    tombstones = torch.unique(torch.randint(0, 60, (int(torch.randint(0, 12, (), generator=g)),), generator=g))
    tombstones = tombstones[~torch.isin(tombstones, ids)]
    rows = torch.randint(1, 999, ids.shape, generator=g)
    reference.update(zip(ids.tolist(), rows.tolist()))
    for i in tombstones.tolist():
        reference.pop(i, None)
    return ids, rows, tombstones


def _check(enc: FeatureEncoder, reference: dict[int, int]) -> None:
    queries = torch.arange(-2, 64)
    assert enc.map_rows("user", queries).tolist() == [reference.get(i, 0) for i in queries.tolist()]
    state = enc.state_dict()  # the plain map, whatever the overlay holds
    assert state["map_ids_user"].tolist() == sorted(reference)
    assert state["map_rows_user"].tolist() == [reference[i] for i in sorted(reference)]
    assert "map_overlay_user" not in state


def test_map_updates_read_like_the_map_they_make_through_overlays_and_folds():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        enc, reference = _mapped(), {}
        ids, rows, _ = _random_update(g, reference)
        enc.set_map("user", ids, rows)
        for step in range(8):
            enc.update_map("user", *_random_update(g, reference))
            _check(enc, reference)
            if step % 3 == 2:
                enc.fold_maps()
                assert enc.overlay_entries() == {"user": 0}
                _check(enc, reference)
    assert enc.overlay_entries()["user"] > 0  # the last updates are still in the overlay


def test_a_fold_planned_beside_updates_keeps_the_updates_made_since():
    g = torch.Generator().manual_seed(1)
    enc, reference = _mapped(), {}
    enc.set_map("user", *_random_update(g, reference)[:2])
    for _ in range(3):
        enc.update_map("user", *_random_update(g, reference))
    plan = enc.plan_fold()
    held = {i: r for i, r in reference.items()}
    _check(enc, reference)
    for _ in range(2):  # applied between the plan and its install: stay in the overlay, win over the fold
        enc.update_map("user", *_random_update(g, reference))
    assert reference != held
    assert enc.install_fold(plan)
    _check(enc, reference)
    assert 0 < enc.overlay_entries()["user"]
    assert not enc.install_fold(plan)  # the map it folded is gone: refused, nothing changed
    _check(enc, reference)
    stale = enc.plan_fold()
    enc.set_map("user", torch.tensor([3]), torch.tensor([4]))
    assert not enc.install_fold(stale) and enc.map_rows("user", torch.tensor([3, 5])).tolist() == [4, 0]


def test_a_loaded_map_drops_the_overlay_and_a_fold_falls_due_past_its_bound(monkeypatch):
    monkeypatch.setattr(learner.models.encoder, "OVERLAY_MIN", 4)
    enc = _mapped()
    enc.set_map("user", torch.arange(0, 64, 2), torch.arange(1, 33))  # 32 ids: due past max(4, 32 // 16) = 4
    enc.update_map("user", torch.tensor([1, 3]), torch.tensor([40, 41]), torch.tensor([0, 2]))
    assert enc.overlay_entries() == {"user": 4} and not enc.fold_due()
    enc.update_map("user", torch.tensor([5]), torch.tensor([42]), torch.zeros(0, dtype=torch.int64))
    assert enc.fold_due() and not enc.fold_due(slack=2)
    loaded = _mapped()
    loaded.update_map("user", torch.tensor([7]), torch.tensor([9]), torch.zeros(0, dtype=torch.int64))
    loaded.load_state_dict(enc.state_dict())
    assert loaded.overlay_entries() == {"user": 0}
    queries = torch.arange(0, 10)
    assert torch.equal(loaded.map_rows("user", queries), enc.map_rows("user", queries))
    assert loaded.map_rows("user", torch.tensor([0, 1, 2, 7])).tolist() == [0, 40, 0, 0]
