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


class _Oracle:
    """Collects what the simulator hands its oracle sink."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, np.ndarray, np.ndarray]] = []

    def __call__(self, request_id: str, user: int, items: np.ndarray, probs: np.ndarray) -> None:
        self.calls.append((request_id, user, items, probs))


def test_the_oracle_sink_changes_no_event_and_sees_every_impression() -> None:
    plain = list(Simulator(SimulatorConfig(seed=4)).events(0, 500))
    oracle = _Oracle()
    recorded = list(Simulator(SimulatorConfig(seed=4), oracle=oracle).events(0, 500))
    assert recorded == plain  # the same seed draws the same stream with a sink or without
    impressions = [(e["request_id"], e["user_id"], e["item_id"]) for e in plain if e["type"] == "impression"]
    told = [(r, u, int(i)) for r, u, items, _ in oracle.calls for i in items]
    assert told == impressions
    assert all(p.shape == (len(items), len(TASKS)) and ((p > 0) & (p < 1)).all() for _, _, items, p in oracle.calls)
    fields = {"type", "request_id", "user_id", "item_id", "ts_ms", "labels"}
    assert all(set(e) <= fields for e in plain)  # nothing of the oracle in an event


def test_the_oracle_probabilities_are_the_label_rates() -> None:
    """Over many draws each task's positives match the sum of the oracle's probabilities (to a few standard
    deviations of the Poisson-binomial count), and labels rise with the probability."""
    oracle = _Oracle()
    events = list(Simulator(SimulatorConfig(seed=2), oracle=oracle).events(0, 3_000))
    got = {(e["request_id"], e["item_id"]): e["labels"] for e in events if e["type"] == "feedback"}
    probs = np.concatenate([p for *_, p in oracle.calls])  # (N, T)
    labels = np.array([[got[r, int(i)].get(t, 0) for t in TASKS] for r, _, items, _ in oracle.calls for i in items])
    expected, sd = probs.sum(axis=0), np.sqrt((probs * (1 - probs)).sum(axis=0))
    assert (np.abs(labels.sum(axis=0) - expected) < 5 * sd + 1).all()
    high = probs[:, 0] > np.median(probs[:, 0])
    assert labels[high, 0].mean() > labels[~high, 0].mean() + 0.1  # click: the probability ranks the labels


def test_users_are_drawn_as_rng_choice_with_the_zipf_weights_would_draw_them() -> None:
    # The inverted CDF replaced ``rng.choice(n_users, p=...)``, whose O(n_users) pass per request made populations
    # of 10^7 unusable: the same uniform draws must give the same users, so a seed's stream is unchanged.
    n = 1_000
    sim = Simulator(SimulatorConfig(seed=2, n_users=n))
    weights = 1.0 / np.arange(1, n + 1) ** 0.8
    fast_rng, reference_rng = np.random.default_rng(7), np.random.default_rng(7)
    fast = [int(sim.user_cdf.searchsorted(fast_rng.random(), side="right")) for _ in range(5_000)]
    reference = [int(reference_rng.choice(n, p=weights / weights.sum())) for _ in range(5_000)]
    assert fast == reference
    assert len(set(fast)) > 100  # Zipf-like, not one heavy user
