from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream.replay as replay_module
from stream.events import decode_batch, encode, impression
from stream.joiner import JoinerConfig, LabelJoiner
from stream.logfile import EVENT_SCHEMA, sort_events, write_log
from stream.replay import (
    KUAIRAND_MAX_DELAY_MS,
    PACE_TICK_S,
    ReplayConfig,
    ReplayPosition,
    ReplaySource,
    iter_events,
    merge_runs,
    replay,
)
from tests.stream.test_logfile import T0, kuairand_table, save, sim_events

FORMATS = ["parquet", "csv"]


def run(path: Path, **options) -> tuple[list[dict], replay_module.ReplayResult]:
    got: list[dict] = []
    result = replay(ReplayConfig(path, progress=False, **options), got.extend)
    return got, result


def kuairand_reference(table: pa.Table, cap_ms: int = KUAIRAND_MAX_DELAY_MS) -> list[tuple]:
    """(type, request_id, ts_ms) in event-time order, then impression before its feedback, then file row."""
    keyed = []
    for i, r in enumerate(table.to_pylist()):
        request_id = f"kr-{r['user_id']}-{r['time_ms']}-{r['video_id']}"
        keyed.append((r["time_ms"], 2 * i, "impression", request_id))
        keyed.append((r["time_ms"] + min(r["play_time_ms"], cap_ms), 2 * i + 1, "feedback", request_id))
    return [(kind, rid, ts) for ts, _, kind, rid in sorted(keyed)]


def shuffled_log(path: Path, seed: int = 0) -> list[dict]:
    """A moestream log of simulator events in shuffled order; returns them in the order replay must give."""
    events = sim_events()
    order = list(range(len(events)))
    random.Random(seed).shuffle(order)
    written = [events[i] for i in order]
    write_log(written, path)
    return [written[i] for i in sorted(range(len(written)), key=lambda i: (written[i]["ts_ms"], i))]


def summary(events: list[dict]) -> list[tuple]:
    return [(e["type"], e["request_id"], e["ts_ms"]) for e in events]


def assert_valid(events: list[dict]) -> None:
    out = decode_batch([encode(e) for e in events])
    assert out.rejects == [] and out.n_valid == len(events)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_unsorted_kuairand_log_replays_valid_events_in_event_time_order(tmp_path: Path, fmt: str) -> None:
    table = kuairand_table(300, seed=1)
    got, result = run(save(table, tmp_path / f"kr.{fmt}"), chunk_rows=1_000)
    assert summary(got) == kuairand_reference(table)
    assert_valid(got)
    assert (result.schema, result.emitted, result.position.emitted) == ("kuairand", 600, 600)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_unsorted_moestream_log_replays_in_event_time_order_ties_in_file_order(tmp_path: Path, fmt: str) -> None:
    expected = shuffled_log(tmp_path / f"log.{fmt}")
    got, result = run(tmp_path / f"log.{fmt}", chunk_rows=64)
    assert got == expected and result.spilled_runs > 1
    assert_valid(got)


@pytest.mark.parametrize("fmt", FORMATS)
def test_external_sort_with_tiny_chunks_equals_the_in_memory_sort(tmp_path: Path, fmt: str) -> None:
    path = save(kuairand_table(200, seed=2), tmp_path / f"kr.{fmt}")
    tiny, spilled = run(path, chunk_rows=7)
    whole, in_memory = run(path, chunk_rows=1_000_000)
    assert (spilled.spilled_runs, in_memory.spilled_runs) == (29, 0)
    assert tiny == whole


def test_ties_put_an_impression_before_its_feedback_then_follow_the_file(tmp_path: Path) -> None:
    n = 4
    table = kuairand_table(n, time_ms=[T0 + 5] * n, play_time_ms=[0] * n, user_id=list(range(n)))
    got, _ = run(save(table, tmp_path / "kr.parquet"), chunk_rows=3)
    assert [(e["type"], e["user_id"]) for e in got] == [(k, u) for u in range(n) for k in ("impression", "feedback")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("assume_sorted", [None, False])
def test_a_simulator_run_written_and_replayed_round_trips(tmp_path: Path, fmt: str, assume_sorted: bool | None) -> None:
    events = sim_events()
    path = tmp_path / f"sim.{fmt}"
    write_log(events, path, chunk_rows=100)
    got, result = run(path, chunk_rows=50, batch_size=64, assume_sorted=assume_sorted)
    assert [encode(e) for e in got] == [encode(e) for e in events]  # same events, same order, same bytes
    assert (result.spilled_runs == 0) == (assume_sorted is None)  # a sorted file is streamed, not spilled


def test_assume_sorted_on_an_unsorted_file_is_an_error_not_a_wrong_order(tmp_path: Path) -> None:
    shuffled_log(tmp_path / "log.parquet")
    with pytest.raises(ValueError, match="not in event-time order at data row"):
        run(tmp_path / "log.parquet", assume_sorted=True)


@pytest.mark.parametrize("kind", ["kuairand", "moestream"])
def test_stopping_anywhere_and_resuming_gives_the_exact_remaining_sequence(tmp_path: Path, kind: str) -> None:
    if kind == "kuairand":
        path = save(kuairand_table(150, seed=3), tmp_path / "kr.csv")  # 300 events, spilled and merged
    else:
        path = tmp_path / "log.parquet"  # 320 events, sorted: streamed
        write_log(sim_events(40), path)
    options = {"chunk_rows": 32, "batch_size": 10}
    full, _ = run(path, **options)
    for n in (0, 1, 37, len(full) // 2, len(full) - 1, len(full)):
        head, stopped = run(path, limit=n, **options)
        assert stopped.position.emitted == n and head == full[:n]
        by_count, _ = run(path, start=n, **options)
        by_key, resumed = run(path, start=stopped.position, **options)
        assert head + by_count == full and head + by_key == full
        assert resumed.position.emitted == len(full)


def test_a_sink_that_fails_resumes_from_the_last_persisted_position(tmp_path: Path) -> None:
    path = save(kuairand_table(120, seed=4), tmp_path / "kr.parquet")
    full, _ = run(path, chunk_rows=20)
    delivered: list[dict] = []
    saved: list[bytes] = []

    def flaky(batch: list[dict]) -> None:
        if len(delivered) >= 90:
            raise ConnectionError("broker went away")
        delivered.extend(batch)

    config = ReplayConfig(path, chunk_rows=20, batch_size=25, progress=False)
    with pytest.raises(ConnectionError):
        replay(config, flaky, on_position=lambda p: saved.append(orjson.dumps(dataclasses.asdict(p))))
    position = ReplayPosition(**orjson.loads(saved[-1]))
    assert position.emitted == len(delivered) == 100
    rest, _ = run(path, chunk_rows=20, batch_size=25, start=position)
    assert delivered + rest == full


def test_a_position_from_a_different_log_is_refused(tmp_path: Path) -> None:
    table = kuairand_table(100, seed=5)
    _, stopped = run(save(table, tmp_path / "a.parquet"), limit=50)
    earlier = kuairand_table(3, seed=6, time_ms=[T0 - 10_000] * 3)  # three more views before the position
    other = save(pa.concat_tables([table, earlier]), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="cannot resume from"):
        run(other, start=stopped.position)


def test_an_unknown_schema_fails_before_anything_is_emitted(tmp_path: Path) -> None:
    path = save(pa.table({"uid": [1], "vid": [2], "ts": [3]}), tmp_path / "x.csv")
    with pytest.raises(ValueError, match=r"unknown log schema \(kuairand lacks \['user_id', 'video_id'"):
        iter_events(ReplayConfig(path, progress=False))


def test_batches_respect_batch_size_and_limit(tmp_path: Path) -> None:
    path = save(kuairand_table(100), tmp_path / "kr.parquet")
    batches = list(iter_events(ReplayConfig(path, batch_size=16, limit=75, progress=False, chunk_rows=30)))
    assert max(map(len, batches)) <= 16 and sum(map(len, batches)) == 75


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def test_speed_paces_events_by_their_event_time_gaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(replay_module, "time", clock)
    path = tmp_path / "log.parquet"
    write_log(sim_events(), path)
    speed = 4.0
    sent: list[tuple[float, int]] = []
    replay(ReplayConfig(path, speed=speed, progress=False), lambda b: sent.extend((clock.now, e["ts_ms"]) for e in b))
    wall0, ts0 = sent[0]
    lateness = np.array([now - (wall0 + (ts - ts0) / 1000 / speed) for now, ts in sent])
    assert lateness.min() >= -PACE_TICK_S - 1e-9 and lateness.max() <= 1e-9  # never late, at most a tick early
    assert clock.now - wall0 == pytest.approx((sent[-1][1] - ts0) / 1000 / speed, abs=PACE_TICK_S)


def test_speed_zero_never_sleeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    clock.sleep = lambda s: pytest.fail("slept at speed 0")  # type: ignore[method-assign]
    monkeypatch.setattr(replay_module, "time", clock)
    got, _ = run(save(kuairand_table(50), tmp_path / "kr.parquet"))
    assert len(got) == 100


def test_restamp_moves_the_first_event_to_now_and_keeps_the_gaps(tmp_path: Path) -> None:
    path = save(kuairand_table(80), tmp_path / "kr.parquet")
    original, _ = run(path)
    before = replay_module.time.time() * 1000
    restamped, result = run(path, restamp=True)
    after = replay_module.time.time() * 1000
    assert before - 1 <= restamped[0]["ts_ms"] <= after + 1
    assert np.array_equal(np.diff([e["ts_ms"] for e in restamped]), np.diff([e["ts_ms"] for e in original]))
    assert result.position.ts_ms == original[-1]["ts_ms"]  # positions keep the file's own timestamps
    assert decode_batch([encode(e) for e in restamped], now_ms=int(after)).rejects == []


def test_progress_bar_counts_the_events(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = save(kuairand_table(60), tmp_path / "kr.csv")
    assert ReplaySource(ReplayConfig(path)).total == 120
    assert ReplaySource(ReplayConfig(path, start=100)).total == 20
    replay(ReplayConfig(path, progress=True, chunk_rows=25), lambda b: None)
    assert "replaying" in capsys.readouterr().err


def test_replayed_kuairand_feedback_joins_inside_the_attribution_window(tmp_path: Path) -> None:
    assert KUAIRAND_MAX_DELAY_MS < JoinerConfig().window_ms
    table = kuairand_table(300, seed=7, span_ms=600_000)
    joiner = LabelJoiner(JoinerConfig())
    for batch in iter_events(ReplayConfig(save(table, tmp_path / "kr.parquet"), batch_size=64, progress=False)):
        joiner.add(decode_batch([encode(e) for e in batch]))
        joiner.emit()
    joiner.flush()
    s = joiner.stats
    assert (s.impressions, s.joined_feedback, s.late_feedback, s.orphan_feedback) == (300, 300, 0, 0)


def test_config_is_checked() -> None:
    for bad in ({"speed": -1}, {"start": -1}, {"chunk_rows": 0}, {"limit": -2}):
        with pytest.raises(ValueError):
            ReplayConfig(Path("x.parquet"), **bad)


def _run_table(keys: list[tuple[int, int]]) -> pa.Table:
    ts, seq = (np.array(c, dtype=np.int64) for c in zip(*keys)) if keys else (np.array([], np.int64),) * 2
    n = len(ts)
    arrays = {"ts_ms": ts, "seq": seq, "kind": np.zeros(n, np.int8), "request_id": [f"r{s}" for s in seq],
              "user_id": np.zeros(n, np.int64), "item_id": np.zeros(n, np.int64)}
    return pa.table({f.name: pa.array(arrays.get(f.name, [None] * n), f.type) for f in EVENT_SCHEMA})


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), max_size=25), max_size=6), st.integers(1, 8))
def test_merge_of_sorted_runs_equals_one_sort(run_times: list[list[int]], batch: int) -> None:
    seqs = iter(range(10**6))
    runs = [sort_events(_run_table([(t, next(seqs)) for t in times])) for times in run_times]
    merged = list(merge_runs([r.to_batches(max_chunksize=batch) for r in runs]))
    got = [(r["ts_ms"], r["seq"]) for t in merged for r in t.select(["ts_ms", "seq"]).to_pylist()]
    assert got == sorted((t, s) for r in runs for t, s in zip(r["ts_ms"].to_pylist(), r["seq"].to_pylist()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 50), min_size=1, max_size=60), st.integers(1, 15), st.sampled_from(FORMATS))
def test_replay_of_any_order_and_chunking_is_the_stable_sort(times: list[int], chunk_rows: int, fmt: str) -> None:
    events = [impression(f"r{i}", i % 7, i, T0 + t) for i, t in enumerate(times)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"log.{fmt}"
        write_log(events, path)
        got, _ = run(path, chunk_rows=chunk_rows, batch_size=4)
    assert got == sorted(events, key=lambda e: e["ts_ms"])  # Python's sort is stable: ties keep file order
