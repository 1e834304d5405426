from __future__ import annotations

import numpy as np

from stream.events import TASKS, decode_batch, encode
from stream.simulator import Simulator, SimulatorConfig


def _labels(events: list[dict]) -> np.ndarray:
    fb = [e["labels"] for e in events if e["type"] == "feedback"]
    return np.array([[f.get(t, 0) for t in TASKS] for f in fb], dtype=float)


def test_same_seed_same_stream_and_every_event_is_valid() -> None:
    a = list(Simulator(SimulatorConfig(seed=3)).events(0, 300))
    b = list(Simulator(SimulatorConfig(seed=3)).events(0, 300))
    assert a == b
    out = decode_batch([encode(e) for e in a])
    assert out.rejects == [] and out.n_valid == len(a)


def test_event_time_order_and_label_sparsity_near_targets() -> None:
    sim = Simulator(SimulatorConfig(seed=1))
    events = list(sim.events(0, 4_000))
    ts = [e["ts_ms"] for e in events]
    assert ts == sorted(ts)
    rates = _labels(events).mean(axis=0)
    assert 0.25 < rates[0] < 0.45  # click
    assert 0.12 < rates[1] < 0.30  # long view
    assert 0.005 < rates[2] < 0.05  # like
    assert (rates[3:] < 0.01).all()  # comment, follow, forward


def test_a_request_shows_distinct_items() -> None:
    events = list(Simulator(SimulatorConfig(seed=5, n_items=40, items_per_request=8)).events(0, 200))
    shown: dict[str, list[int]] = {}
    for e in events:
        if e["type"] == "impression":
            shown.setdefault(e["request_id"], []).append(e["item_id"])
    assert all(len(items) == len(set(items)) for items in shown.values())
