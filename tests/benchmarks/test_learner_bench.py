"""``bench learner``'s traffic at tiny sizes: today's rows keep the simulator's defaults, the large traffic is the
same simulator with populations of 10^7, and the events it generates are valid, recent and mostly new IDs.
No broker, no Ray and no timing here: ``moestream bench learner`` is the benchmark run."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from benchmarks import BENCHMARKS
from benchmarks.learner import FAMILIES, LARGE, TODAY, TRAFFIC, id_tables_note, run, traffic_events
from stream.events import decode_batch
from stream.simulator import SimulatorConfig


def test_todays_traffic_is_the_simulators_default_and_the_large_one_differs_only_in_populations() -> None:
    assert BENCHMARKS["learner"] == "benchmarks.learner"
    assert TRAFFIC == {"today": TODAY, "10^7": LARGE}
    assert TODAY == SimulatorConfig(seed=3)
    assert (LARGE.n_users, LARGE.n_items) == (10**7, 10**7)
    assert replace(LARGE, n_users=TODAY.n_users, n_items=TODAY.n_items) == TODAY


def test_large_population_traffic_is_valid_recent_and_mostly_new_ids() -> None:
    # The large traffic's generation path (Zipf-like users by the inverted CDF, items drawn without replacement
    # from millions) at a population small enough for a unit test, and a few requests.
    config = replace(LARGE, n_users=200_000, n_items=200_000)
    before_ms = int(time.time() * 1000)
    events, seen = traffic_events(config, n_requests=50)
    decoded = decode_batch(events)
    assert decoded.rejects == [] and decoded.n_valid == len(events) == seen["events"]
    impressions = decoded.impressions
    assert impressions.num_rows == seen["impressions"] == 50 * config.items_per_request
    users, items = impressions["user_id"].to_pylist(), impressions["item_id"].to_pylist()
    assert seen["users"] == len(set(users)) and seen["items"] == len(set(items))
    assert seen["items"] >= 0.95 * len(items)  # among millions of items nearly every impression shows a new one
    assert max(users) < config.n_users and max(items) < config.n_items
    newest = max(impressions["ts_ms"].to_pylist() + decoded.feedback["ts_ms"].to_pylist())
    assert before_ms - 1000 <= newest <= int(time.time() * 1000)  # ends a second ago: not refused as clock skew


def test_id_tables_note_names_live_ids_and_evictions_per_field() -> None:
    tables = {"user_id": {"capacity": 8, "live": 8, "admitted": 11, "expired": 0, "evicted": 3, "overflow": 1},
              "item_id": {"capacity": 2**20, "live": 118_594, "admitted": 118_594, "expired": 0, "evicted": 0,
                          "overflow": 0}}
    assert id_tables_note(tables) == ("user_id 8 live of 8, 11 admitted, 3 evicted, 1 overflow; "
                                      "item_id 118,594 live of 1,048,576, 118,594 admitted, 0 evicted, 0 overflow")


@pytest.mark.parametrize("kwargs", [{"families": ("MMoE-4",)}, {"traffic": ("10^9",)}])
def test_an_unknown_family_or_traffic_is_refused_before_anything_starts(kwargs) -> None:
    with pytest.raises(KeyError, match="choose from"):
        run(quick=True, **kwargs)
    assert "MMoE-8" in FAMILIES
