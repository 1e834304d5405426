"""The event contract: what travels on Kafka, and how a batch of raw messages is decoded.

Two kinds of events share one topic, keyed by ``user_id`` so that a user's impressions and the feedback on
them land in the same partition (the joiner relies on it):

``impression``  ``{"type": "impression", "request_id": str, "user_id": int, "item_id": int, "ts_ms": int}``
                one item shown to one user in one ranking request.
``feedback``    ``{"type": "feedback", "request_id": str, "user_id": int, "item_id": int, "ts_ms": int,
                "labels": {"click": 1, "play_time": 8300.0, ...}}``
                one or more behaviours observed on an impression, usually seconds after it.

Binary labels (``TASKS``) are 0 or 1; ``play_time`` is milliseconds, >= 0. Decoding happens on whole batches:
every message either becomes a row of one of two Arrow tables or a :class:`Reject` with a reason, so a
malformed message can be dead-lettered and never stops the consumer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat

import numpy as np
import orjson
import pyarrow as pa

TASKS: tuple[str, ...] = ("click", "long_view", "like", "comment", "follow", "forward")
"""Binary behaviours, in the order models and metrics use."""
TYPICAL_POSITIVE_RATES: dict[str, float] = {
    "click": 0.35, "long_view": 0.20, "like": 0.02, "comment": 0.004, "follow": 0.003, "forward": 0.002
}
"""Base rates of a short-video feed: the simulator's targets, the aggregates' priors, the models' start."""
PLAY_TIME = "play_time"
LABELS: tuple[str, ...] = (*TASKS, PLAY_TIME)

IMPRESSION = "impression"
FEEDBACK = "feedback"

MAX_MESSAGE_BYTES = 64 * 1024
MAX_ID = 2**62
MAX_PLAY_MS = 7 * 24 * 3600 * 1000
"""A play time above a week is not a view."""

_KEY_FIELDS = [("request_id", pa.string()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("ts_ms", pa.int64())]
_LABEL_FIELDS = [(name, pa.float32()) for name in LABELS]
_POSITION_FIELDS = [("partition", pa.int32()), ("offset", pa.int64())]  # where in Kafka the row came from

IMPRESSION_SCHEMA = pa.schema([*_KEY_FIELDS, *_POSITION_FIELDS])
FEEDBACK_SCHEMA = pa.schema([*_KEY_FIELDS, *_LABEL_FIELDS, *_POSITION_FIELDS])
"""Feedback labels are NaN where the event does not carry that label."""
EXAMPLE_SCHEMA = pa.schema(
    [
        *_KEY_FIELDS,
        *_LABEL_FIELDS,  # joined labels; a binary task never seen is 0 (negative)
        *_POSITION_FIELDS,
        ("is_correction", pa.bool_()),  # re-emitted with labels that arrived after the window closed
    ]
)
"""A joined training example: an impression with the feedback that arrived inside the attribution window."""


REJECT_CODES = (
    "empty", "oversized", "not_json", "not_object", "unknown_type", "missing_field", "wrong_type",
    "unknown_label", "bad_label", "clock_skew",
)
"""Short, stable categories of rejection: counters and dead-letter headers group by these."""


@dataclass(frozen=True)
class Reject:
    """A message that failed validation: its position in the batch, a category and a readable reason."""

    index: int
    reason: str
    code: str = "invalid"


@dataclass
class DecodedBatch:
    impressions: pa.Table
    feedback: pa.Table
    rejects: list[Reject] = field(default_factory=list)

    @property
    def n_valid(self) -> int:
        return self.impressions.num_rows + self.feedback.num_rows


class _Invalid(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


_COMMON = ("request_id", "user_id", "item_id", "ts_ms")


def _id(value: object, name: str) -> int:
    # bool is an int subclass: a JSON true must not pass as user 1.
    if type(value) is not int or not 0 <= value < MAX_ID:
        raise _Invalid("wrong_type", f"{name} must be a non-negative integer, got {value!r:.40}")
    return value


def _check(obj: object, now_ms: int | None, max_skew_ms: int) -> tuple[str, tuple]:
    if type(obj) is not dict:
        raise _Invalid("not_object", "not a JSON object")
    kind = obj.get("type")
    if kind not in (IMPRESSION, FEEDBACK):
        raise _Invalid("unknown_type", f"type must be 'impression' or 'feedback', got {kind!r:.40}")
    missing = [k for k in _COMMON if k not in obj]
    if missing:
        raise _Invalid("missing_field", f"missing field {missing[0]}")
    request_id = obj["request_id"]
    if type(request_id) is not str or not 0 < len(request_id) <= 128:
        raise _Invalid("wrong_type", "request_id must be a non-empty string of at most 128 characters")
    user_id = _id(obj["user_id"], "user_id")
    item_id = _id(obj["item_id"], "item_id")
    ts_ms = _id(obj["ts_ms"], "ts_ms")
    if now_ms is not None and ts_ms > now_ms + max_skew_ms:
        raise _Invalid("clock_skew", f"ts_ms {ts_ms} is more than {max_skew_ms} ms in the future")
    if kind == IMPRESSION:
        return kind, (request_id, user_id, item_id, ts_ms)
    labels = obj.get("labels")
    if type(labels) is not dict or not labels:
        raise _Invalid("missing_field", "feedback needs a non-empty labels object")
    values = dict.fromkeys(LABELS, math.nan)
    for name, value in labels.items():
        if name not in values:
            raise _Invalid("unknown_label", f"unknown label {name!r:.40}")
        if type(value) not in (int, float) or (type(value) is float and not math.isfinite(value)):
            raise _Invalid("bad_label", f"label {name} must be a finite number, got {value!r:.40}")
        if name == PLAY_TIME:
            if not 0 <= value <= MAX_PLAY_MS:
                raise _Invalid("bad_label", f"label play_time must be in [0, {MAX_PLAY_MS}] ms")
        elif value not in (0, 1):
            raise _Invalid("bad_label", f"label {name} must be 0 or 1, got {value!r:.40}")
        values[name] = float(value)
    return kind, (request_id, user_id, item_id, ts_ms, *values.values())


def decode_batch(
    values: Sequence[bytes],
    partitions: Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
    *,
    now_ms: int | None = None,
    max_skew_ms: int = 5 * 60 * 1000,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> DecodedBatch:
    """Decode raw Kafka message values into impression and feedback tables plus rejects.

    ``partitions``/``offsets`` are carried into the tables so that downstream stages know which source
    positions a row covers. ``now_ms`` enables the clock-skew check (events stamped too far in the future).
    Never raises on message content.
    """
    n = len(values)
    partitions = partitions if partitions is not None else [0] * n
    offsets = offsets if offsets is not None else range(n)
    fast = _decode_columnar(values, partitions, offsets, now_ms, max_skew_ms, max_bytes)
    if fast is not None:
        return fast
    return _decode_rows(values, partitions, offsets, now_ms, max_skew_ms, max_bytes)


def _decode_rows(values, partitions, offsets, now_ms, max_skew_ms, max_bytes) -> DecodedBatch:
    """Message by message, with a reason for each reject: the path for batches holding bad messages."""
    rows: dict[str, list[tuple]] = {IMPRESSION: [], FEEDBACK: []}
    rejects: list[Reject] = []
    for i, raw in enumerate(values):
        try:
            if not raw:  # a tombstone (None) or a zero-byte value
                raise _Invalid("empty", "empty message")
            if len(raw) > max_bytes:
                raise _Invalid("oversized", f"message of {len(raw)} bytes exceeds {max_bytes}")
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise _Invalid("not_json", f"not JSON: {exc}") from None
            kind, row = _check(obj, now_ms, max_skew_ms)
        except _Invalid as exc:
            rejects.append(Reject(i, str(exc), exc.code))
            continue
        rows[kind].append((*row, partitions[i], offsets[i]))
    return DecodedBatch(
        impressions=_table(rows[IMPRESSION], IMPRESSION_SCHEMA),
        feedback=_table(rows[FEEDBACK], FEEDBACK_SCHEMA),
        rejects=rejects,
    )


class _Dirty(Exception):
    """The batch holds at least one bad message: decode it row by row instead."""


def _column(objs: list[dict], key: str) -> list:
    return list(map(dict.get, objs, repeat(key)))


def _only(column: list, *types: type) -> list:
    if set(map(type, column)) - set(types):
        raise _Dirty
    return column


def _ints(column: list) -> np.ndarray:
    try:
        arr = np.fromiter(_only(column, int), dtype=np.int64, count=len(column))
    except OverflowError:
        raise _Dirty from None
    if len(arr) and (arr.min() < 0 or arr.max() >= MAX_ID):
        raise _Dirty
    return arr


def _decode_columnar(values, partitions, offsets, now_ms, max_skew_ms, max_bytes) -> DecodedBatch | None:
    """The whole batch column by column (C-level map, numpy checks); None if any message is bad.

    Accepts exactly what :func:`_check` accepts (a property test holds the two paths together), but costs a
    fraction of it on the clean batches that make up nearly all traffic.
    """
    try:
        if max(map(len, values), default=0) > max_bytes:
            return None
        objs = _only(list(map(orjson.loads, values)), dict)
        kinds = _only(_column(objs, "type"), str)
        request_ids = _only(_column(objs, "request_id"), str)
        lengths = list(map(len, request_ids))
        if lengths and (min(lengths) < 1 or max(lengths) > 128):
            return None
        users, items, ts = (_ints(_column(objs, k)) for k in ("user_id", "item_id", "ts_ms"))
        if now_ms is not None and len(ts) and ts.max() > now_ms + max_skew_ms:
            return None
        kind = np.array(kinds)
        is_imp, is_fb = kind == IMPRESSION, kind == FEEDBACK
        if not (is_imp | is_fb).all():
            return None
        fb = np.flatnonzero(is_fb)
        labels = _only([objs[i].get("labels") for i in fb], dict)
        if labels and min(map(len, labels)) < 1:
            return None
        if set().union(*map(dict.keys, labels)) - set(LABELS):
            return None
        _only(list(chain.from_iterable(map(dict.values, labels))), int, float)
        label_columns = {}
        for name in LABELS:
            col = np.array(_column(labels, name), dtype=np.float64)  # absent -> nan
            present = ~np.isnan(col)
            if name == PLAY_TIME:
                bad = present & ~((col >= 0) & (col <= MAX_PLAY_MS))
            else:
                bad = present & (col != 0) & (col != 1)
            if bad.any() or np.isinf(col).any():
                return None
            label_columns[name] = col.astype(np.float32)
    except (TypeError, ValueError, OverflowError, orjson.JSONDecodeError, _Dirty):
        return None
    parts = np.asarray(partitions, dtype=np.int32)
    offs = np.asarray(offsets, dtype=np.int64)
    rid = np.array(request_ids, dtype=object)
    imp = np.flatnonzero(is_imp)
    impressions = pa.Table.from_arrays(
        [pa.array(rid[imp], pa.string()), users[imp], items[imp], ts[imp], parts[imp], offs[imp]],
        schema=IMPRESSION_SCHEMA,
    )
    feedback_table = pa.Table.from_arrays(
        [pa.array(rid[fb], pa.string()), users[fb], items[fb], ts[fb], *label_columns.values(), parts[fb], offs[fb]],
        schema=FEEDBACK_SCHEMA,
    )
    return DecodedBatch(impressions, feedback_table, [])


def _table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[] for _ in schema]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema=schema)


def impression(request_id: str, user_id: int, item_id: int, ts_ms: int) -> dict:
    return {"type": IMPRESSION, "request_id": request_id, "user_id": user_id, "item_id": item_id, "ts_ms": ts_ms}


def feedback(request_id: str, user_id: int, item_id: int, ts_ms: int, labels: dict[str, float]) -> dict:
    return {
        "type": FEEDBACK,
        "request_id": request_id,
        "user_id": user_id,
        "item_id": item_id,
        "ts_ms": ts_ms,
        "labels": labels,
    }


def encode(event: dict) -> bytes:
    return orjson.dumps(event)
