from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orjson

from stream.events import FEEDBACK_SCHEMA, IMPRESSION_SCHEMA, LABELS, decode_batch, encode
from stream.logcheck import Duplicates, RejectLog, RowChecks
from stream.logfile import (
    KUAIRAND_COLUMNS,
    LOG_SCHEMA,
    SCHEMAS,
    count_rows,
    decoded_batch,
    detect_schema,
    read_events,
    sort_events,
    to_dicts,
    write_log,
)
from stream.simulator import Simulator, SimulatorConfig

KUAIRAND_HEADER = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time",
    "is_profile_enter", "is_rand", "tab",
)
"""The columns of KuaiRand-1K's log_*.csv files, in their order."""
T0 = 1_649_400_000_000


def kuairand_table(n: int, seed: int = 0, span_ms: int = 60_000, **overrides: list) -> pa.Table:
    """A KuaiRand-1K-shaped log of ``n`` views, times in random (unsorted) order."""
    rng = np.random.default_rng(seed)
    flag = lambda p: (rng.random(n) < p).astype(np.int64)  # noqa: E731
    cols = {
        "user_id": rng.integers(0, 30, n), "video_id": rng.integers(0, 400, n),
        "date": np.full(n, 20220408), "hourmin": np.full(n, 1600),
        "time_ms": T0 + rng.integers(0, span_ms, n),
        "is_click": flag(0.4), "is_like": flag(0.05), "is_follow": flag(0.01), "is_comment": flag(0.01),
        "is_forward": flag(0.01), "is_hate": flag(0.01), "long_view": flag(0.3),
        "play_time_ms": rng.integers(0, 40_000, n), "duration_ms": rng.integers(5_000, 60_000, n),
        "profile_stay_time": np.zeros(n, np.int64), "comment_stay_time": np.zeros(n, np.int64),
        "is_profile_enter": flag(0.02), "is_rand": np.zeros(n, np.int64), "tab": rng.integers(0, 4, n),
    }
    cols.update(overrides)
    assert tuple(cols) == KUAIRAND_HEADER
    return pa.table(cols)


def save(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=64)  # several row groups, as a real file has
    return path


def sim_events(n_requests: int = 120, seed: int = 0) -> list[dict]:
    return copy.deepcopy(_sim_events(n_requests, seed))


@functools.cache
def _sim_events(n_requests: int, seed: int) -> list[dict]:
    return list(Simulator(SimulatorConfig(seed=seed, n_users=50, n_items=400)).events(T0, n_requests))


def read_all(path: Path, chunk_rows: int = 1_000, max_delay_ms: int = 8_000) -> list[dict]:
    schema = SCHEMAS[detect_schema(path)]
    return [e for table in read_events(path, schema, chunk_rows, max_delay_ms) for e in to_dicts(table)]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("chunk_rows", [7, 100_000])
def test_write_log_round_trips_simulator_events_byte_for_byte(tmp_path: Path, fmt: str, chunk_rows: int) -> None:
    events = sim_events()
    path = tmp_path / f"log.{fmt}"
    assert write_log(events, path, chunk_rows=chunk_rows) == len(events)
    assert detect_schema(path) == "moestream"
    back = read_all(path, chunk_rows=13)
    assert [encode(e) for e in back] == [encode(e) for e in events]  # same values, types and key order


def test_an_empty_log_has_the_schema_and_no_events(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    assert write_log([], path) == 0
    assert pq.read_schema(path) == LOG_SCHEMA and read_all(path) == []


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"type": "click", "request_id": "r", "user_id": 1, "item_id": 2, "ts_ms": 3}, "type"),
        ({"type": "feedback", "request_id": "r", "user_id": 1, "item_id": 2, "ts_ms": 3, "labels": {"share": 1}},
         "unknown labels ['share']"),
        ({"type": "impression", "request_id": "r", "user_id": 1, "ts_ms": 3}, "lacks the field 'item_id'"),
    ],
)
def test_write_log_refuses_what_the_contract_cannot_carry(tmp_path: Path, event: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        write_log([event], tmp_path / "log.parquet")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_schemas_are_told_apart_by_column_names(tmp_path: Path, suffix: str) -> None:
    assert detect_schema(save(kuairand_table(5), tmp_path / f"kr{suffix}")) == "kuairand"
    odd = save(pa.table({"user_id": [1], "item_id": [2], "timestamp": [3]}), tmp_path / f"odd{suffix}")
    with pytest.raises(ValueError, match="unknown log schema") as err:
        detect_schema(odd)
    assert "kuairand lacks ['video_id', 'time_ms'," in str(err.value)
    assert "moestream lacks ['type', 'request_id', 'ts_ms'," in str(err.value)


def test_unsupported_file_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a CSV nor a Parquet file"):
        detect_schema(tmp_path / "log.json")


def test_a_kuairand_view_becomes_an_impression_then_its_feedback(tmp_path: Path) -> None:
    table = kuairand_table(
        2,
        user_id=[7, 8], video_id=[42, 43], time_ms=[T0 + 123, T0], play_time_ms=[3_500, 60_000],
        is_click=[1, 0], is_like=[0, 1], is_follow=[0, 0], is_comment=[1, 0], is_forward=[0, 0], long_view=[1, 0],
    )
    for path in (save(table, tmp_path / "kr.parquet"), save(table, tmp_path / "kr.csv")):
        imp, fb, imp2, fb2 = read_all(path, max_delay_ms=8_000)
        assert imp == {"type": "impression", "request_id": f"kr-7-{T0 + 123}-42", "user_id": 7, "item_id": 42,
                       "ts_ms": T0 + 123}
        assert fb == {"type": "feedback", "request_id": f"kr-7-{T0 + 123}-42", "user_id": 7, "item_id": 42,
                      "ts_ms": T0 + 123 + 3_500,  # after the view
                      "labels": {"click": 1, "long_view": 1, "like": 0, "comment": 1, "follow": 0, "forward": 0,
                                 "play_time": 3_500.0}}
        assert fb2["ts_ms"] == T0 + 8_000 and fb2["labels"]["play_time"] == 60_000.0  # delay capped, label not
        assert imp2["request_id"] == fb2["request_id"] == f"kr-8-{T0}-43"


def rejects_of(path: Path, tmp: Path) -> tuple[list[dict], list[dict]]:
    log = RejectLog(tmp / "rejects.jsonl", path, path.suffix[1:])
    events = [e for t in read_events(path, SCHEMAS[detect_schema(path)], 1_000, 8_000, log) for e in to_dicts(t)]
    log.close()
    return events, [orjson.loads(line) for line in (tmp / "rejects.jsonl").read_bytes().splitlines()]


@pytest.mark.parametrize(
    ("column", "values", "reason", "message"),
    [
        ("is_click", [0, 1, 2], "bad_label", "is_click 2: must be 0 or 1"),
        ("play_time_ms", [10, 20, -5], "bad_label", "play_time_ms -5"),
        ("user_id", [1, 2, -1], "bad_id", "user_id -1: must be in [0, 2**62)"),
        ("time_ms", [T0, T0, None], "missing_value", "time_ms None: missing"),
    ],
)
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_bad_kuairand_values_are_rejected_with_their_row(tmp_path: Path, suffix: str, column: str, values: list,
                                                         reason: str, message: str) -> None:
    path = save(kuairand_table(3, **{column: pa.array(values, pa.int64())}), tmp_path / f"kr{suffix}")
    events, rejects = rejects_of(path, tmp_path)
    assert len(events) == 4  # the two good views
    where = {"line": 4} if suffix == ".csv" else {"row": 2}  # CSV: the line, header included
    assert [{k: r[k] for k in (*where, "reason")} for r in rejects] == [{**where, "reason": reason}]
    assert rejects[0]["detail"].replace("'", "").startswith(message)  # CSV values are text, quoted


def test_bad_moestream_rows_are_rejected_with_their_row(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    write_log(sim_events(3), path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"impression"', '"view"')
    path.write_text("\n".join(lines) + "\n")
    events, rejects = rejects_of(path, tmp_path)
    assert len(events) == len(lines) - 2
    assert rejects == [{"line": 3, "reason": "bad_type", "detail": "type 'view': must be 'impression' or 'feedback'",
                        "raw": lines[2]}]
    table = pa.table({**{f.name: pa.array([None], f.type) for f in LOG_SCHEMA},
                      "type": ["feedback"], "request_id": ["r"], "user_id": [1], "item_id": [2], "ts_ms": [3]})
    pq.write_table(table, tmp_path / "nolabels.parquet")
    events, rejects = rejects_of(tmp_path / "nolabels.parquet", tmp_path)
    assert events == [] and [(r["row"], r["reason"]) for r in rejects] == [(0, "missing_value")]


def test_row_counts(tmp_path: Path) -> None:
    table = kuairand_table(10)
    assert count_rows(save(table, tmp_path / "a.parquet")) == 10
    csv = save(table, tmp_path / "a.csv")
    assert count_rows(csv) == 10
    csv.write_bytes(csv.read_bytes().rstrip(b"\n"))  # no newline after the last line
    assert count_rows(csv) == 10


label = st.one_of(st.none(), st.integers(-1, 2))
view = st.tuples(
    st.integers(-2, 2**62), st.integers(0, 10**7), st.one_of(st.integers(-1, 2**50), st.integers(2**62 - 10**5, 2**62)),
    st.lists(label, min_size=6, max_size=6), st.one_of(st.none(), st.floats(-10, 1e7), st.just(float("nan"))),
)


def checked_events(schema: str, chunk: pa.Table, max_delay_ms: int = 8_000) -> tuple[pa.Table, np.ndarray]:
    """The event table of a chunk's good rows, and which rows were good."""
    checks = RowChecks(chunk, np.arange(chunk.num_rows))
    typed = SCHEMAS[schema].check(checks, Duplicates())
    ok = checks.ok
    return SCHEMAS[schema].to_events(typed.filter(pa.array(ok)), np.flatnonzero(ok), max_delay_ms), ok


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(view, min_size=1, max_size=20), st.integers(0, 20_000))
def test_kuairand_rows_become_valid_events_or_rejects(views: list[tuple], max_delay_ms: int) -> None:
    """Whatever a KuaiRand file holds, replay never emits an event the contract rejects."""
    users, videos, times, flags, plays = zip(*views)
    task_columns = ("is_click", "long_view", "is_like", "is_comment", "is_follow", "is_forward")
    data = {"user_id": users, "video_id": videos, "time_ms": times, "play_time_ms": plays,
            **{c: [f[i] for f in flags] for i, c in enumerate(task_columns)}}
    chunk = pa.table({c: pa.array(data[c], t) for c, t in KUAIRAND_COLUMNS.items()})
    table, ok = checked_events("kuairand", chunk, max_delay_ms)
    events = to_dicts(table)
    out = decode_batch([encode(e) for e in events])
    assert out.rejects == [] and out.n_valid == 2 * int(ok.sum())
    assert all(set(e.get("labels", {})) <= set(LABELS) for e in events)


@pytest.mark.parametrize("kind", ["kuairand", "moestream"])
def test_decoded_batch_gives_what_decoding_the_json_gives(tmp_path: Path, kind: str) -> None:
    """The columnar path to the joiner equals the old one: dicts, JSON, decode_batch."""
    if kind == "kuairand":
        path = save(kuairand_table(200, seed=3), tmp_path / "kr.csv")
    else:
        path = tmp_path / "log.parquet"
        write_log(sim_events(60), path)
    events = sort_events(pa.concat_tables(list(read_events(path, SCHEMAS[kind], 64, 8_000))))
    feedback = 0
    for first, piece in ((0, events.slice(0, 37)), (37, events.slice(37))):
        new = decoded_batch(piece, first)
        n = piece.num_rows
        old = decode_batch([encode(e) for e in to_dicts(piece)], [0] * n, range(first, first + n))
        assert new.impressions.schema == IMPRESSION_SCHEMA and new.feedback.schema == FEEDBACK_SCHEMA
        assert new.impressions.equals(old.impressions)
        assert new.feedback.to_pylist() == old.feedback.to_pylist() or _same_with_nan(new.feedback, old.feedback)
        assert new.rejects == old.rejects == []
        feedback += new.feedback.num_rows
    assert feedback > 0


def _same_with_nan(a: pa.Table, b: pa.Table) -> bool:
    return all(np.array_equal(a[c].to_numpy(zero_copy_only=False), b[c].to_numpy(zero_copy_only=False),
                              equal_nan=a[c].type == pa.float32()) for c in a.column_names)
