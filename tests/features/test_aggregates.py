"""Sliding-window aggregates, without a store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.aggregates import StreamAggregator
from features.definitions import FEATURE_COLUMNS, USER_STREAM
from features.memory import InMemoryFeatures
from features.store import defaults
from tests.features.test_store import HOUR_MS, T0, examples


def test_previous_bucket_fades_linearly_and_old_events_fall_out() -> None:
    agg = StreamAggregator()
    start = (T0 // HOUR_MS) * HOUR_MS  # the start of an hour bucket
    agg.update(examples([1, 1], [10, 10], [1, 1], ts=[start, start + 10]))
    users, _ = agg.update(examples([1], [10], [0], ts=[start + HOUR_MS + HOUR_MS // 4]))  # a quarter into the next
    row = users.set_index("user_id").loc[1]
    assert row["u_log_n_1h"] == pytest.approx(np.log1p(1 + 2 * 0.75), rel=1e-4)  # previous hour weighted by 3/4
    assert row["u_log_n_1d"] == pytest.approx(np.log1p(3))
    users, _ = agg.update(examples([1], [10], [0], ts=[start + 3 * HOUR_MS]))
    assert users.set_index("user_id").loc[1, "u_log_n_1h"] == pytest.approx(np.log1p(1))  # the rest is > 1 h old


def test_stamps_are_strictly_increasing_and_after_the_newest_event() -> None:
    agg = StreamAggregator()
    first, _ = agg.update(examples([1], [1], [0], ts=[T0]))
    second, _ = agg.update(examples([2], [1], [0], ts=[T0]))  # same event time again
    assert first["event_timestamp"].iloc[0] == pd.Timestamp(T0 + 1, unit="ms", tz="UTC")
    assert second["event_timestamp"].iloc[0] > first["event_timestamp"].iloc[0]


def test_state_round_trip_resumes_exactly() -> None:
    a, b = StreamAggregator(), StreamAggregator()
    a.update(examples([1, 2, 3], [4, 5, 4], [1, 0, 1]))
    b.load_state(a.state())
    batch = examples([1, 9], [4, 4], [0, 1], ts=[T0 + HOUR_MS, T0 + HOUR_MS + 5])
    for x, y in zip(a.update(batch), b.update(batch)):
        pd.testing.assert_frame_equal(x, y)
    with pytest.raises(ValueError, match="older version"):
        StreamAggregator().load_state({"users.ids": np.zeros(0), "users.sums": np.zeros((0, 8))})


def test_in_memory_features_match_the_store_contract() -> None:
    mem = InMemoryFeatures()
    users, items = StreamAggregator().update(examples([1], [10], [1]))
    mem.push(users, items)
    got = mem.lookup(np.array([1, 2]), np.array([10, 10]))
    assert got.shape == (2, len(FEATURE_COLUMNS)) and got.dtype == np.float32
    assert got[0, : len(USER_STREAM)] == pytest.approx(users[list(USER_STREAM)].to_numpy()[0])
    assert got[1, : len(USER_STREAM)] == pytest.approx(defaults()[: len(USER_STREAM)])  # never pushed
    with pytest.raises(ValueError, match="equal length"):
        mem.lookup(np.array([1, 2]), np.array([1]))


def test_in_memory_windows_expire_by_the_event_clock_or_the_wall_clock() -> None:
    agg = StreamAggregator()
    event, wall = InMemoryFeatures(), InMemoryFeatures(clock="wall")
    for batch in (examples([1], [10], [1], ts=[T0]), examples([2], [20], [0], ts=[T0 + 2 * HOUR_MS])):
        rows = agg.update(batch)
        event.push(*rows)
        wall.push(*rows)
    got = pd.DataFrame(event.lookup(np.array([1, 2]), np.array([10, 20])), columns=FEATURE_COLUMNS)
    assert got.loc[0, "u_log_n_1h"] == 0 and got.loc[0, "u_log_n_1d"] == pytest.approx(np.log1p(1))  # 2 h later
    assert got.loc[1, "u_log_n_1h"] == pytest.approx(np.log1p(1))
    assert (wall.lookup(np.array([2]), np.array([20]))[0, : len(USER_STREAM)] == defaults()[: len(USER_STREAM)]).all()
    as_of = pd.DataFrame(wall.lookup_batch(np.array([1]), np.array([10]), as_of_ms=T0 + 10).dense, columns=FEATURE_COLUMNS)
    assert as_of.loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(1))
    with pytest.raises(ValueError, match="clock"):
        InMemoryFeatures(clock="local")  # type: ignore[arg-type]
