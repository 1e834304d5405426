"""The item-row cache (``features.cache``) against a plain dict of what was filled when, and the lookup through
it against the lookup without it: the same batch for the same rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregates import StreamAggregator
from features.cache import WAYS, RowCache
from features.definitions import FEATURE_COLUMNS
from features.rows import StoredRows
from features.store import FeatureStoreConfig, OnlineFeatures
from stream.events import TASKS

MS = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns


def rows_of(ids: np.ndarray, stamp: int) -> StoredRows:
    """Rows whose every value says which id and which fill they are."""
    n = len(ids)
    ids_f = ids.astype(np.float32)
    return StoredRows(np.column_stack([ids_f, np.full(n, stamp, np.float32)]), ids * 10 + stamp,
                      ids_f[:, None] + 0.5, np.column_stack([ids, np.full(n, stamp)]).astype(np.int64))


def small_cache(capacity: int = 16, ttl_ms: float = 100) -> tuple[RowCache, FakeClock]:
    clock = FakeClock()
    return RowCache(capacity, ttl_ms, stats_width=2, static_width=1, n_cats=2, clock_ns=clock), clock


def test_a_filled_row_is_served_until_its_ttl_then_read_again() -> None:
    cache, clock = small_cache(ttl_ms=100)
    ids = np.array([3, 7, 11], np.int64)
    hit, _ = cache.lookup(ids)
    assert not hit.any() and cache.misses == 3
    cache.fill(ids, rows_of(ids, 1), cache.now_ns())
    clock.ns += 100 * MS  # exactly the TTL: still served
    hit, got = cache.lookup(np.array([7, 99, 3], np.int64))
    assert hit.tolist() == [True, False, True]
    assert got.cats[:, 0].tolist() == [7, 3] and got.updated.tolist() == [71, 31]
    assert cache.figures()["max_staleness_served_ms"] == 100.0
    clock.ns += 1  # past the TTL: gone
    hit, _ = cache.lookup(ids)
    assert not hit.any()
    figures = cache.figures()
    assert (figures["hits"], figures["misses"], figures["entries"]) == (2, 7, 0)
    assert figures["hit_rate"] == pytest.approx(2 / 9)


def test_report_hands_over_counts_once() -> None:
    cache, clock = small_cache()
    ids = np.arange(5, dtype=np.int64)
    cache.lookup(ids)
    cache.fill(ids, rows_of(ids, 1), cache.now_ns())
    clock.ns += 30 * MS
    cache.lookup(ids[:3])
    assert cache.report() == (3, 5, 30.0)
    assert cache.report() == (0, 0, None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 40), min_size=1, max_size=25, unique=True),
                          st.integers(0, 60), st.booleans()), min_size=1, max_size=30),
       st.sampled_from([1, 4, 8, 13]))
def test_every_hit_is_the_last_fill_of_that_id_within_the_ttl(steps, capacity: int) -> None:
    """Against a dict of each id's last fill: a hit returns exactly that fill's row, never one older than the
    TTL; no more entries than the capacity; the counts add up."""
    cache, clock = small_cache(capacity=capacity, ttl_ms=50)
    filled: dict[int, tuple[int, int]] = {}  # id -> (fill number, read time)
    looked_up = 0
    for n, (ids, advance_ms, fill) in enumerate(steps):
        clock.ns += advance_ms * MS
        ids = np.array(ids, np.int64)
        hit, got = cache.lookup(ids)
        looked_up += len(ids)
        for row, i in enumerate(ids[hit].tolist()):
            stamp, read_ns = filled[i]
            assert clock.ns - read_ns <= 50 * MS
            assert got.cats[row].tolist() == [i, stamp] and got.updated[row] == i * 10 + stamp
        if fill:
            missed = ids[~hit]
            cache.fill(missed, rows_of(missed, n), clock.ns)
            filled |= {i: (n, clock.ns) for i in missed.tolist()}
        assert cache.figures()["entries"] <= cache.capacity
    assert cache.hits + cache.misses == looked_up
    assert cache.capacity == -(-capacity // WAYS) * WAYS


def test_a_full_cache_keeps_at_most_its_capacity_and_the_newest() -> None:
    cache, clock = small_cache(capacity=64, ttl_ms=10_000)
    for start in range(0, 1000, 100):
        ids = np.arange(start, start + 100, dtype=np.int64)
        cache.fill(ids, rows_of(ids, 0), cache.now_ns())
        clock.ns += 1
    assert cache.figures()["entries"] <= 64 and cache.occupied <= 64
    hit, _ = cache.lookup(np.arange(900, 1000, dtype=np.int64))
    assert hit.sum() > 32, "the last fill should mostly be kept"


def test_refuses_a_cache_that_is_off() -> None:
    with pytest.raises(ValueError, match="ttl_ms > 0"):
        RowCache(10, 0, 1, 1, 1)


def _push_items(config: FeatureStoreConfig, items: list[int], ts_ms: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 8 * len(items)
    store = OnlineFeatures(config, apply=False)
    store.push(*StreamAggregator().update(pa.table({
        "user_id": rng.integers(1, 4, n), "item_id": np.repeat(items, 8),
        "ts_ms": np.full(n, ts_ms, dtype=np.int64),
        **{t: (rng.random(n) < 0.5).astype(np.float32) for t in TASKS},
        "play_time": rng.random(n).astype(np.float32) * 10_000,
    })))


def test_lookup_through_the_cache_is_the_lookup_without_it(tmp_path: Path) -> None:
    """Hits, misses and a mix give the batch the store gives, windows expired per lookup (a cached row
    expires as the stored one does); a cached row is what was read, until the TTL."""
    config = FeatureStoreConfig(data_dir=tmp_path, clock="wall")
    now_ms = 1_764_000_000_000
    store = OnlineFeatures(config)
    _push_items(config, [10, 11, 12], now_ms, seed=0)
    cache = store.item_cache(capacity=64, ttl_ms=60_000)
    users = np.array([1, 2, 1, 5, 2, 3])
    for items in ([10, 11, 99, 12, 10, 98], [11, 10, 12, 97, 98, 11], [12, 12, 12, 10, 11, 99]):
        for as_of in (now_ms + 1, now_ms + 2 * 86_400_000):  # the later one is past some windows
            plain = store.lookup_batch(users, np.array(items), as_of_ms=as_of)
            cached = store.lookup_batch(users, np.array(items), as_of_ms=as_of, item_cache=cache)
            assert np.array_equal(plain.dense, cached.dense)
            assert plain.ids.keys() == cached.ids.keys()
            assert all(np.array_equal(plain.ids[k], cached.ids[k]) for k in plain.ids)
    assert cache.hits > 0 and cache.misses > 0
    item_columns = [i for i, c in enumerate(FEATURE_COLUMNS) if c.startswith("i_")]
    ten = np.array([10] * 6)
    before = store.lookup_batch(users, ten, as_of_ms=now_ms + 1, item_cache=cache).dense[:, item_columns]
    _push_items(config, [10], now_ms + 5, seed=1)
    served = store.lookup_batch(users, ten, as_of_ms=now_ms + 6, item_cache=cache).dense[:, item_columns]
    assert np.array_equal(served, before), "within the TTL the cached row is served"
    assert not np.array_equal(store.lookup_batch(users, ten, as_of_ms=now_ms + 6).dense[:, item_columns], before)
