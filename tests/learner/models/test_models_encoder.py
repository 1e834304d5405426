"""FeatureEncoder: ID hashing (range, stability, field salts, collision rate) and dense normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_missing_field_is_an_error():
    enc = FeatureEncoder(["user", "item"], n_dense=1, n_buckets=8)
    with pytest.raises(ValueError, match="item"):
        enc({"user": torch.tensor([1])}, torch.zeros(1, 1))


@pytest.mark.parametrize("kwargs", [dict(n_buckets=0), dict(n_buckets=2**33), dict(emb_dim=0)])
def test_bad_sizes_are_rejected(kwargs):
    with pytest.raises(ValueError):
        FeatureEncoder(["user"], n_dense=1, **kwargs)
