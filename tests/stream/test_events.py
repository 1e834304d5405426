from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.events import LABELS, REJECT_CODES, TASKS, decode_batch, encode, feedback, impression

GOOD_IMP = impression("r1", 5, 9, 1_000)
GOOD_FB = feedback("r1", 5, 9, 1_500, {"click": 1, "play_time": 3200.0})


def test_valid_events_land_in_their_tables_with_positions() -> None:
    out = decode_batch([encode(GOOD_IMP), encode(GOOD_FB)], partitions=[2, 2], offsets=[10, 11])
    assert out.rejects == []
    assert out.impressions.to_pylist() == [
        {"request_id": "r1", "user_id": 5, "item_id": 9, "ts_ms": 1000, "partition": 2, "offset": 10}
    ]
    row = out.feedback.to_pylist()[0]
    assert (row["click"], row["play_time"], row["offset"]) == (1.0, 3200.0, 11)
    assert all(math.isnan(row[t]) for t in TASKS if t != "click")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (orjson.dumps({**GOOD_IMP, "type": "view"}), "type must be"),
        (orjson.dumps({k: v for k, v in GOOD_IMP.items() if k != "item_id"}), "missing field item_id"),
        (orjson.dumps({**GOOD_IMP, "user_id": "5"}), "user_id must be a non-negative integer"),
        (orjson.dumps({**GOOD_IMP, "user_id": True}), "user_id must be a non-negative integer"),
        (orjson.dumps({**GOOD_IMP, "user_id": -1}), "user_id must be a non-negative integer"),
        (orjson.dumps({**GOOD_IMP, "request_id": ""}), "request_id"),
        (orjson.dumps({**GOOD_FB, "labels": {"share": 1}}), "unknown label 'share'"),
        (orjson.dumps({**GOOD_FB, "labels": {"click": 2}}), "label click must be 0 or 1"),
        (orjson.dumps({**GOOD_FB, "labels": {"play_time": -3}}), "play_time must be in [0,"),
        (orjson.dumps({**GOOD_FB, "labels": {}}), "non-empty labels"),
        (b'{"type": "feedback", "request_id": "r", "user_id": 1, "item_id": 2, "ts_ms": 3, "labels": {"click": NaN}}',
         "not JSON"),
        (b'{"type":"feedback","request_id":"r","user_id":1,"item_id":2,"ts_ms":3,"labels":{"play_time":1e999}}',
         "infinity"),
        (b"x" * 70_000, "exceeds"),
        (None, "empty message"),
        (b"", "empty message"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(raw: bytes | None, reason: str) -> None:
    out = decode_batch([encode(GOOD_IMP), raw, encode(GOOD_FB)])
    assert [r.index for r in out.rejects] == [1]
    assert reason in out.rejects[0].reason
    assert out.rejects[0].code in REJECT_CODES
    assert out.n_valid == 2


def test_future_timestamps_beyond_the_skew_are_rejected() -> None:
    out = decode_batch([encode({**GOOD_IMP, "ts_ms": 10_000})], now_ms=1_000, max_skew_ms=5_000)
    assert "in the future" in out.rejects[0].reason
    assert decode_batch([encode({**GOOD_IMP, "ts_ms": 5_000})], now_ms=1_000, max_skew_ms=5_000).rejects == []


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_arbitrary_bytes_never_raise_and_every_message_is_accounted_for(values: list[bytes]) -> None:
    out = decode_batch(values)
    assert out.n_valid + len(out.rejects) == len(values)


ids = st.integers(min_value=0, max_value=2**62 - 1)
label_sets = st.dictionaries(
    st.sampled_from(LABELS), st.integers(0, 1), min_size=1
)


@given(st.text(min_size=1, max_size=128), ids, ids, ids, label_sets)
def test_valid_events_round_trip(request_id: str, user: int, item: int, ts: int, labels: dict) -> None:
    out = decode_batch([encode(impression(request_id, user, item, ts)), encode(feedback(request_id, user, item, ts, labels))])
    assert out.rejects == []
    imp, fb = out.impressions.to_pylist()[0], out.feedback.to_pylist()[0]
    assert (imp["request_id"], imp["user_id"], imp["item_id"], imp["ts_ms"]) == (request_id, user, item, ts)
    assert {k: fb[k] for k in labels} == {k: float(v) for k, v in labels.items()}


def test_huge_numbers_are_rejected_not_raised() -> None:
    big = orjson.dumps({**GOOD_FB, "labels": {"play_time": 2**64 - 1}})
    out = decode_batch([big, encode(GOOD_IMP)])
    assert [r.code for r in out.rejects] == ["bad_label"] and out.n_valid == 1
    out = decode_batch([orjson.dumps({**GOOD_IMP, "user_id": 2**63 + 1})])
    assert out.rejects[0].code == "wrong_type"
    out = decode_batch([b'{"type":"impression","request_id":"r","user_id":' + b"9" * 400 + b',"item_id":1,"ts_ms":1}'])
    assert out.rejects[0].code == "not_json"  # orjson refuses integers beyond 64 bits


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**63 + 5) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
near_valid = st.builds(
    lambda base, field, value: orjson.dumps({**base, field: value}) if field != "drop" else orjson.dumps(base),
    st.sampled_from([GOOD_IMP, GOOD_FB]),
    st.sampled_from(["type", "request_id", "user_id", "item_id", "ts_ms", "labels", "extra", "drop"]),
    json_values,
) | st.builds(
    lambda name, value: orjson.dumps({**GOOD_FB, "labels": {name: value}}),
    st.sampled_from([*LABELS, "share"]),
    json_values,
)


@given(st.lists(near_valid | st.binary(max_size=40), max_size=12))
def test_the_columnar_fast_path_accepts_exactly_what_the_row_path_accepts(values: list[bytes]) -> None:
    from stream.events import _decode_columnar, _decode_rows

    args = (values, [0] * len(values), list(range(len(values))), None, 300_000, 64 * 1024)
    rows = _decode_rows(*args)
    fast = _decode_columnar(*args)
    if rows.rejects:
        assert fast is None
    else:
        assert fast is not None
        assert fast.impressions.equals(rows.impressions)
        assert fast.feedback.schema == rows.feedback.schema
        assert fast.feedback.to_pandas().equals(rows.feedback.to_pandas())  # absent labels are NaN: NaN == NaN here
