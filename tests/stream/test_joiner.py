from __future__ import annotations

import random

import pytest

from stream.events import LABELS, TASKS, decode_batch, encode, feedback, impression
from stream.joiner import JoinerConfig, LabelJoiner


def _batch(events: list[dict], first_offset: int = 0):
    return decode_batch([encode(e) for e in events], [0] * len(events), range(first_offset, first_offset + len(events)))


def test_feedback_inside_the_window_is_joined_and_missing_labels_are_negatives() -> None:
    j = LabelJoiner(JoinerConfig(window_ms=1_000))
    j.add(_batch([impression("a", 1, 10, 0), feedback("a", 1, 10, 500, {"click": 1, "play_time": 900.0})]))
    assert j.emit().num_rows == 0  # window still open
    j.add(_batch([impression("b", 2, 11, 1_000)], 2))  # watermark reaches 1000: window of "a" closes
    rows = j.emit().to_pylist()
    assert [(r["request_id"], r["click"], r["like"], r["play_time"]) for r in rows] == [("a", 1.0, 0.0, 900.0)]


def test_late_duplicate_and_orphan_feedback_are_counted_not_joined() -> None:
    j = LabelJoiner(JoinerConfig(window_ms=1_000))
    j.add(_batch([impression("a", 1, 10, 0), feedback("a", 1, 10, 100, {"like": 1}), feedback("a", 1, 10, 200, {"like": 1})]))
    j.add(_batch([feedback("zz", 1, 10, 300, {"click": 1})], 3))
    j.add(_batch([impression("b", 1, 11, 2_000)], 4))
    assert j.emit().to_pylist()[0]["like"] == 1.0
    j.add(_batch([feedback("a", 1, 10, 2_100, {"click": 1})], 5))
    s = j.stats
    assert (s.joined_feedback, s.duplicate_feedback, s.orphan_feedback, s.late_feedback) == (1, 1, 1, 1)


def test_pending_impressions_hold_back_the_commit_offset() -> None:
    j = LabelJoiner(JoinerConfig(window_ms=1_000))
    j.add(_batch([impression("a", 1, 10, 0), impression("b", 1, 11, 50)], first_offset=100))
    assert j.safe_offsets({0: 102}) == {0: 100}
    j.add(_batch([impression("c", 1, 12, 1_020)], first_offset=102))
    assert j.emit().num_rows == 1  # only "a" closed
    assert j.safe_offsets({0: 103}) == {0: 101}
    j.flush()
    assert j.safe_offsets({0: 103}) == {0: 103}


def test_cap_evicts_the_oldest_and_counts_it() -> None:
    j = LabelJoiner(JoinerConfig(window_ms=10_000, max_pending=2))
    j.add(_batch([impression(f"r{i}", 1, i, i) for i in range(5)]))
    out = j.emit()
    assert out.column("request_id").to_pylist() == ["r0", "r1", "r2"]
    assert (j.stats.evicted, j.n_pending) == (3, 2)


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_brute_force_reference_on_random_interleavings(seed: int) -> None:
    rng = random.Random(seed)
    window = 1_000
    events, truth = [], {}
    for i in range(30):
        t = i * 100
        key = (f"r{i}", i % 7)
        events.append((t, impression(key[0], 1, key[1], t)))
        truth[key] = dict.fromkeys(LABELS, 0.0)
        for _ in range(rng.randint(0, 3)):
            delay = rng.randint(0, 1_500)
            label = rng.choice(LABELS)
            value = round(rng.uniform(1, 9000), 1) if label == "play_time" else 1
            events.append((t + delay, feedback(key[0], 1, key[1], t + delay, {label: value})))
            if delay <= window:
                truth[key][label] = max(truth[key][label], float(value))
    events.sort(key=lambda e: e[0])  # arrival in event-time order, impressions before their feedback
    j = LabelJoiner(JoinerConfig(window_ms=window))
    got = {}
    pos = 0
    while pos < len(events):
        size = rng.randint(1, 6)
        j.add(_batch([e for _, e in events[pos : pos + size]], pos))
        pos += size
        for row in j.emit().to_pylist():
            got[(row["request_id"], row["item_id"])] = {k: row[k] for k in LABELS}
    for row in j.flush().to_pylist():
        got[(row["request_id"], row["item_id"])] = {k: row[k] for k in LABELS}
    assert got.keys() == truth.keys()
    for key in truth:
        assert got[key] == pytest.approx(truth[key], rel=1e-6), key
    assert set(TASKS) < set(LABELS)


def test_a_partition_running_ahead_does_not_close_windows_of_a_slower_one() -> None:
    j = LabelJoiner(JoinerConfig(window_ms=1_000))
    slow = decode_batch([encode(impression("a", 1, 10, 0))], [0], [0])
    fast = decode_batch([encode(impression("b", 2, 20, 0)), encode(impression("c", 2, 21, 5_000))], [1, 1], [0, 1])
    j.add(slow)
    j.add(fast)
    assert j.emit().column("request_id").to_pylist() == ["b"]  # partition 1 has moved on, partition 0 has not
    j.add(decode_batch([encode(feedback("a", 1, 10, 800, {"click": 1}))], [0], [1]))
    assert j.stats.joined_feedback == 1 and j.stats.orphan_feedback == 0
    assert j.watermark_ms == 800


def test_late_feedback_becomes_a_correction_when_configured() -> None:
    j = LabelJoiner(JoinerConfig(window_ms=1_000, late_policy="correct"))
    j.add(_batch([impression("a", 1, 10, 0), impression("b", 1, 11, 1_500)]))
    first = j.emit().to_pylist()
    assert [(r["request_id"], r["click"], r["is_correction"]) for r in first] == [("a", 0.0, False)]
    j.add(_batch([feedback("a", 1, 10, 1_600, {"click": 1})], 2))
    j.add(_batch([feedback("a", 1, 10, 1_700, {"click": 1})], 3))  # a duplicate of the late label: no new correction
    again = j.emit().to_pylist()
    assert [(r["request_id"], r["click"], r["is_correction"], r["offset"]) for r in again] == [("a", 1.0, True, 0)]
    assert (j.stats.late_feedback, j.stats.corrections) == (2, 1)


def test_drop_policy_counts_late_feedback_and_emits_nothing() -> None:
    j = LabelJoiner(JoinerConfig(window_ms=1_000))
    j.add(_batch([impression("a", 1, 10, 0), impression("b", 1, 11, 1_500)]))
    j.emit()
    j.add(_batch([feedback("a", 1, 10, 1_600, {"click": 1})], 2))
    assert j.emit().num_rows == 0 and j.stats.late_feedback == 1


def test_bad_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="late_policy"):
        JoinerConfig(late_policy="keep")


@pytest.mark.parametrize("cut", [5, 15, 40])  # on batch boundaries: emission timing depends on them
def test_state_round_trip_resumes_exactly(cut: int) -> None:
    """Stopping after `cut` events and restoring from the state gives the same examples as never stopping."""
    rng = random.Random(cut)
    events = []
    for i in range(30):
        events.append(impression(f"r{i}", i % 3, i, i * 100))
        events.append(feedback(f"r{i}", i % 3, i, i * 100 + rng.randint(0, 1_400), {rng.choice(TASKS): 1}))
    events.sort(key=lambda e: e["ts_ms"])
    config = JoinerConfig(window_ms=1_000, late_policy="correct")

    def run(joiner: LabelJoiner, chunk: list[dict], first: int) -> list[dict]:
        out = []
        for k in range(0, len(chunk), 5):
            joiner.add(_batch(chunk[k : k + 5], first + k))
            out += joiner.emit().to_pylist()
        return out

    straight = LabelJoiner(config)
    expected = run(straight, events, 0) + straight.flush().to_pylist()
    before = LabelJoiner(config)
    got = run(before, events[:cut], 0)
    restored = LabelJoiner.from_state(config, before.state())
    got += run(restored, events[cut:], cut) + restored.flush().to_pylist()
    key = lambda r: (r["request_id"], r["is_correction"])  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    assert restored.stats.late_feedback == straight.stats.late_feedback
