"""Event logs on disk: moestream's own log and the KuaiRand-1K interaction log, read in bounded chunks.

Two schemas, told apart by their column names (:func:`detect_schema`), each in Parquet or CSV:

``moestream``  what :func:`write_log` writes: one row per event, ``type, request_id, user_id, item_id, ts_ms``
               and one nullable column per label (null: the event does not carry that label).
``kuairand``   the KuaiRand-1K ``log_*.csv`` files: one row per video view, which becomes an impression at
               ``time_ms`` and its feedback ``min(play_time_ms, max_delay_ms)`` later (``docs/replay.md``).

Whatever the schema, a chunk of rows is read as stored (``stream.logread``), checked (``stream.logcheck``:
each bad row goes to the rejects with one reason, the others go on) and becomes one *event table*
(``EVENT_SCHEMA``) in file order, with ``seq``, the event's position in the file, as the tie-break of the
event-time order: an impression and its feedback from KuaiRand row ``r`` get ``2r`` and ``2r + 1``. Row
indexes count rejected rows too, so a reject never moves the events after it. :func:`to_dicts` turns an
event table into the event dicts of the contract, :func:`decoded_batch` into the joiner's input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stream.events import (
    FEEDBACK, FEEDBACK_SCHEMA, IMPRESSION, IMPRESSION_SCHEMA, LABELS, MAX_ID, MAX_PLAY_MS, PLAY_TIME, TASKS,
    DecodedBatch,
)
from stream.logcheck import MAX_TS_MS, Duplicates, RejectLog, RowChecks, parse_number
from stream.logread import FORMATS, LogError, column_names, count_rows, log_format, read_raw

__all__ = ["EVENT_SCHEMA", "FORMATS", "KUAIRAND_COLUMNS", "LOG_SCHEMA", "SCHEMAS", "LogError", "LogSchema",
           "column_names", "count_rows", "decoded_batch", "detect_schema", "log_format", "read_event_times",
           "read_events", "sort_events", "to_dicts", "unknown_columns", "write_log"]

LOG_SCHEMA = pa.schema(
    [
        ("type", pa.string()),
        ("request_id", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts_ms", pa.int64()),
        *[(name, pa.int8()) for name in TASKS],
        (PLAY_TIME, pa.float64()),  # float64, not 32: a play time written as 8300.1 reads back as 8300.1
    ]
)
"""moestream's log: one row per event; label columns are null where the event does not carry the label."""

EVENT_SCHEMA = pa.schema(
    [
        ("ts_ms", pa.int64()),
        ("seq", pa.int64()),  # position in the file: the tie-break of the event-time order
        ("kind", pa.int8()),  # 0 impression, 1 feedback
        ("request_id", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        *[(name, pa.int8()) for name in TASKS],
        (PLAY_TIME, pa.float64()),
    ]
)
"""Events of any schema, columnar: what the replay sorts, spills and merges."""

KUAIRAND_COLUMNS: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "video_id": pa.int64(),
    "time_ms": pa.int64(),
    # float64 parses both "1" and "1.0"; the values are checked to be 0/1 before they become int8.
    "is_click": pa.float64(),
    "long_view": pa.float64(),
    "is_like": pa.float64(),
    "is_comment": pa.float64(),
    "is_follow": pa.float64(),
    "is_forward": pa.float64(),
    "play_time_ms": pa.float64(),
}
"""The KuaiRand-1K columns replay reads."""
KUAIRAND_DROPPED = ("date", "hourmin", "is_hate", "duration_ms", "profile_stay_time", "comment_stay_time",
                    "is_profile_enter", "is_rand", "tab")
"""KuaiRand-1K columns replay knows and drops (``docs/replay.md`` says why); any other column is unknown."""
KUAIRAND_LABELS: dict[str, str] = {
    "click": "is_click", "long_view": "long_view", "like": "is_like", "comment": "is_comment",
    "follow": "is_follow", "forward": "is_forward", PLAY_TIME: "play_time_ms",
}
"""Contract label -> KuaiRand column."""

_SORT_KEY = [("ts_ms", "ascending"), ("seq", "ascending")]


# ---------------------------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class LogSchema:
    """What a log schema reads, how its rows are checked and how they become events."""

    name: str
    columns: dict[str, pa.DataType]
    """The columns replay reads; a file has this schema when it has all of them."""
    known: tuple[str, ...]
    """Every column the schema knows: a file's other columns are reported as unknown and ignored."""
    time_columns: dict[str, pa.DataType]
    """Enough columns to compute the event times (the cheap sortedness scan reads only these)."""
    events_per_row: int
    check: Callable[[RowChecks, Duplicates], pa.Table]
    """Flags the bad rows of a chunk; returns its columns typed (bad values null, rows still all there)."""
    to_events: Callable[[pa.Table, np.ndarray, int], pa.Table]
    """(checked rows, their row indexes, max_delay_ms) -> event table in file order."""
    event_times: Callable[[pa.Table, int], np.ndarray]
    """(typed ``time_columns``, max_delay_ms) -> ``ts_ms`` of their events in file order (NaN: unknown)."""


def _check_ids(checks: RowChecks, ids: dict[str, pa.ChunkedArray]) -> None:
    for name, col in ids.items():
        checks.flag(pc.invert(pc.and_(pc.greater_equal(col, 0), pc.less(col, MAX_ID))), "bad_id",
                    "must be in [0, 2**62)", name)


def _check_time(checks: RowChecks, name: str, col: pa.ChunkedArray) -> None:
    checks.flag(pc.invert(pc.and_(pc.greater_equal(col, 0), pc.less(col, MAX_TS_MS))), "bad_timestamp",
                "must be in [0, 2100-01-01) as milliseconds since 1970", name)


def _check_labels(checks: RowChecks, columns: dict[str, str], labels: dict[str, pa.ChunkedArray]) -> pa.ChunkedArray:
    """Labels may be null (absent); present ones must be 0/1, play time finite and in [0, a week].

    ``columns`` maps each contract label to its column, ``labels`` each column to its values; returns which
    rows carry at least one label."""
    zero_one = pa.array([0.0, 1.0])
    for label, column in columns.items():
        col = labels[column]
        if label == PLAY_TIME:
            ok = pc.and_(pc.is_finite(col), pc.and_(pc.greater_equal(col, 0), pc.less_equal(col, MAX_PLAY_MS)))
            checks.flag(pc.invert(ok), "bad_label", "must be a finite number of ms in [0, a week]", column)
        else:
            checks.flag(pc.and_(pc.is_valid(col), pc.invert(pc.is_in(col, zero_one))), "bad_label", "must be 0 or 1", column)
    present = [pc.is_valid(col) for col in labels.values()]
    any_present = present[0]
    for p in present[1:]:
        any_present = pc.or_(any_present, p)
    return any_present


def _event_table(ts, seq, kind, request_id, user, item, labels: dict[str, pa.Array]) -> pa.Table:
    arrays = [ts, seq, kind, request_id, user, item, *[labels[name] for name in LABELS]]
    return pa.Table.from_arrays([pa.array(a) if isinstance(a, np.ndarray) else a for a in arrays],
                                schema=EVENT_SCHEMA)


def _event_labels(table: pa.Table, columns: dict[str, str]) -> dict[str, pa.ChunkedArray]:
    return {name: pc.cast(table[column], EVENT_SCHEMA.field(name).type) for name, column in columns.items()}


def _kuairand_check(checks: RowChecks, duplicates: Duplicates) -> pa.Table:
    ids = {name: checks.number(name, pa.int64()) for name in ("user_id", "video_id", "time_ms")}
    labels = {column: checks.number(column, pa.float64()) for column in KUAIRAND_LABELS.values()}
    checks.missing(ids)
    _check_ids(checks, {"user_id": ids["user_id"], "video_id": ids["video_id"]})
    _check_time(checks, "time_ms", ids["time_ms"])
    any_label = _check_labels(checks, KUAIRAND_LABELS, labels)
    checks.flag(pc.invert(any_label), "missing_value", "a view needs at least one label")
    duplicates.flag(checks, ids, "repeats the user, video and time of an earlier row")
    return pa.table(ids | labels)


def _kuairand_delay(play_time: pa.ChunkedArray, max_delay_ms: int) -> np.ndarray:
    play = play_time.to_numpy(zero_copy_only=False)  # null -> NaN
    return np.clip(np.nan_to_num(play, nan=0.0), 0, max_delay_ms).astype(np.int64)


def _kuairand_times(chunk: pa.Table, max_delay_ms: int) -> np.ndarray:
    t = chunk["time_ms"].to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where null
    out = np.empty(2 * len(t), dtype=np.float64)
    out[0::2] = t
    out[1::2] = t + _kuairand_delay(chunk["play_time_ms"], max_delay_ms)
    return out


def _kuairand_events(chunk: pa.Table, rows: np.ndarray, max_delay_ms: int) -> pa.Table:
    n = chunk.num_rows
    user, video, t = chunk["user_id"], chunk["video_id"], chunk["time_ms"]
    request_id = pc.binary_join_element_wise(
        "kr", pc.cast(user, pa.string()), pc.cast(t, pa.string()), pc.cast(video, pa.string()), "-"
    )
    t_np = t.to_numpy()
    seq = 2 * rows
    imp = _event_table(t_np, seq, np.zeros(n, np.int8), request_id, user, video,
                       {name: pa.nulls(n, EVENT_SCHEMA.field(name).type) for name in LABELS})
    fb = _event_table(t_np + _kuairand_delay(chunk["play_time_ms"], max_delay_ms), seq + 1, np.ones(n, np.int8),
                      request_id, user, video, _event_labels(chunk, KUAIRAND_LABELS))
    order = np.empty(2 * n, dtype=np.int64)  # interleave: row i's impression, then its feedback
    order[0::2] = np.arange(n)
    order[1::2] = np.arange(n, 2 * n)
    return pa.concat_tables([imp, fb]).take(order)


def _moestream_check(checks: RowChecks, duplicates: Duplicates) -> pa.Table:
    kind, request_id = checks.text("type"), checks.text("request_id")
    ids = {name: checks.number(name, pa.int64()) for name in ("user_id", "item_id", "ts_ms")}
    labels = {name: checks.number(name, pa.float64()) for name in LABELS}
    checks.missing({"type": kind, "request_id": request_id, **ids})
    checks.flag(pc.invert(pc.is_in(kind, pa.array([IMPRESSION, FEEDBACK]))), "bad_type",
                f"must be {IMPRESSION!r} or {FEEDBACK!r}", "type")
    _check_ids(checks, {"user_id": ids["user_id"], "item_id": ids["item_id"]})
    _check_time(checks, "ts_ms", ids["ts_ms"])
    length = pc.utf8_length(request_id)
    checks.flag(pc.invert(pc.and_(pc.greater(length, 0), pc.less_equal(length, 128))), "bad_request_id",
                "must be a non-empty string of at most 128 characters", "request_id")
    any_label = _check_labels(checks, {name: name for name in LABELS}, labels)
    checks.flag(pc.and_(pc.equal(kind, FEEDBACK), pc.invert(any_label)), "missing_value",
                "feedback needs at least one label")
    columns = {"type": kind, "request_id": request_id, **ids, **labels}
    duplicates.flag(checks, columns, "repeats an earlier row")
    return pa.table(columns)


def _moestream_times(chunk: pa.Table, max_delay_ms: int) -> np.ndarray:
    return chunk["ts_ms"].to_numpy(zero_copy_only=False)


def _moestream_events(chunk: pa.Table, rows: np.ndarray, max_delay_ms: int) -> pa.Table:
    return _event_table(
        chunk["ts_ms"], rows, pc.cast(pc.equal(chunk["type"], FEEDBACK), pa.int8()), chunk["request_id"],
        chunk["user_id"], chunk["item_id"], _event_labels(chunk, {name: name for name in LABELS}),
    )


SCHEMAS: dict[str, LogSchema] = {
    "kuairand": LogSchema(
        name="kuairand",
        columns=KUAIRAND_COLUMNS,
        known=(*KUAIRAND_COLUMNS, *KUAIRAND_DROPPED),
        time_columns={"time_ms": pa.int64(), "play_time_ms": pa.float64()},
        events_per_row=2,
        check=_kuairand_check,
        to_events=_kuairand_events,
        event_times=_kuairand_times,
    ),
    "moestream": LogSchema(
        name="moestream",
        columns={f.name: f.type for f in LOG_SCHEMA},
        known=tuple(LOG_SCHEMA.names),
        time_columns={"ts_ms": pa.int64()},
        events_per_row=1,
        check=_moestream_check,
        to_events=_moestream_events,
        event_times=_moestream_times,
    ),
}


def detect_schema(path: Path | str) -> str:
    """``"kuairand"`` or ``"moestream"``, from the column names; otherwise a ``LogError`` saying which
    columns each schema misses (or why the file cannot be read)."""
    names = set(column_names(path))
    missing = {s.name: [c for c in s.columns if c not in names] for s in SCHEMAS.values()}
    matches = [name for name, cols in missing.items() if not cols]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise LogError(f"{path}: has the columns of several log schemas {matches}; cannot tell which it is")
    detail = "; ".join(f"{name} lacks {cols}" for name, cols in missing.items())
    raise LogError(f"{path}: unknown log schema ({detail})")


def unknown_columns(path: Path | str, schema: LogSchema) -> list[str]:
    """Columns of the file the schema does not know: ignored, and reported once."""
    return [c for c in column_names(path) if c not in schema.known]


def read_events(path: Path | str, schema: LogSchema, chunk_rows: int, max_delay_ms: int,
                rejects: RejectLog | None = None) -> Iterator[pa.Table]:
    """Event tables (``EVENT_SCHEMA``) in file order, one per chunk of ``chunk_rows`` rows; bad rows go to
    ``rejects`` (counted there, and written where it has a path)."""
    rejects = rejects if rejects is not None else RejectLog(None, path, log_format(path))
    duplicates = Duplicates()
    for raw in read_raw(path, list(schema.columns), chunk_rows):
        checks = RowChecks(raw.table, raw.rows)
        try:
            typed = schema.check(checks, duplicates)
        except LogError as exc:
            raise LogError(f"{path}: {exc}") from None
        rejects.add(raw.bad_lines, checks)
        ok = checks.ok
        if ok.all():
            yield schema.to_events(typed, raw.rows, max_delay_ms)
        elif ok.any():
            yield schema.to_events(typed.filter(pa.array(ok)), raw.rows[ok], max_delay_ms)


def read_event_times(path: Path | str, schema: LogSchema, chunk_rows: int, max_delay_ms: int) -> Iterator[np.ndarray]:
    """Event times in file order, one array per chunk, reading only the time columns.

    Values that are not numbers are left out: those rows are rejected when the events are read. Rows
    rejected for other reasons are kept, which can only make the order check stricter."""
    for raw in read_raw(path, list(schema.time_columns), chunk_rows):
        typed = pa.table({c: parse_number(raw.table[c], t)[0] for c, t in schema.time_columns.items()})
        ts = schema.event_times(typed, max_delay_ms)
        yield ts[~np.isnan(ts)] if ts.dtype.kind == "f" else ts


def sort_events(events: pa.Table) -> pa.Table:
    """Event-time order; ``seq`` breaks ties, so the order is total and the same on every run."""
    return events.sort_by(_SORT_KEY)


def decoded_batch(events: pa.Table, first_offset: int) -> DecodedBatch:
    """The joiner's input for an event table, as ``decode_batch`` gives it for the same events' JSON.

    Partition 0; the offset of event ``i`` is ``first_offset + i`` (its position in the replay's sorted
    sequence); labels float32, NaN where the event does not carry them. Columnar: no dicts, no JSON.
    """
    n = events.num_rows
    offsets = pa.array(np.arange(first_offset, first_offset + n, dtype=np.int64))
    with_offsets = events.append_column("offset", offsets)
    is_feedback = pc.equal(events["kind"], 1)
    keys = ["request_id", "user_id", "item_id", "ts_ms"]
    imp = with_offsets.filter(pc.invert(is_feedback))
    fb = with_offsets.filter(is_feedback)
    nan = pa.scalar(float("nan"), pa.float32())
    impressions = pa.Table.from_arrays(
        [*(imp[k] for k in keys), pa.array(np.zeros(imp.num_rows, np.int32)), imp["offset"]],
        schema=IMPRESSION_SCHEMA)
    feedback = pa.Table.from_arrays(
        [*(fb[k] for k in keys), *(pc.fill_null(pc.cast(fb[name], pa.float32()), nan) for name in LABELS),
         pa.array(np.zeros(fb.num_rows, np.int32)), fb["offset"]],
        schema=FEEDBACK_SCHEMA)
    return DecodedBatch(impressions, feedback, [])


# ---------------------------------------------------------------------------------------------- events


def to_dicts(events: pa.Table, shift_ms: int = 0) -> list[dict]:
    """The contract's event dicts (keys in the order of ``stream.events.impression``/``feedback``).

    Columns become Python lists once; each event is then one dict display. ``shift_ms`` is added to ``ts_ms``.
    """
    kinds = events["kind"].to_numpy()
    ts = (events["ts_ms"].to_numpy() + shift_ms).tolist()
    request_ids, users, items = (events[name].to_pylist() for name in ("request_id", "user_id", "item_id"))
    feedback = events.filter(pa.array(kinds == 1))
    values = [feedback[name].to_pylist() for name in LABELS]
    if any(feedback[name].null_count for name in LABELS):  # a null is a label the event does not carry
        labels = iter([{k: v for k, v in zip(LABELS, row) if v is not None} for row in zip(*values)])
    else:
        labels = iter([dict(zip(LABELS, row)) for row in zip(*values)])
    return [
        {"type": IMPRESSION, "request_id": r, "user_id": u, "item_id": i, "ts_ms": t} if k == 0 else
        {"type": FEEDBACK, "request_id": r, "user_id": u, "item_id": i, "ts_ms": t, "labels": next(labels)}
        for k, r, u, i, t in zip(kinds.tolist(), request_ids, users, items, ts)
    ]


def _log_batch(events: list[dict]) -> pa.RecordBatch:
    kinds = [e.get("type") for e in events]
    unknown_kinds = set(kinds) - {IMPRESSION, FEEDBACK}
    if unknown_kinds:
        raise ValueError(f"cannot log events of type {sorted(map(repr, unknown_kinds))}")
    labels = [(e.get("labels") or {}) if k == FEEDBACK else {} for e, k in zip(events, kinds)]
    unknown_labels = set().union(*labels) - set(LABELS)
    if unknown_labels:
        raise ValueError(f"cannot log unknown labels {sorted(unknown_labels)}; the contract has {list(LABELS)}")
    try:
        columns = {name: [e[name] for e in events] for name in ("request_id", "user_id", "item_id", "ts_ms")}
    except KeyError as exc:
        raise ValueError(f"an event lacks the field {exc.args[0]!r}") from None
    columns |= {"type": kinds} | {name: [d.get(name) for d in labels] for name in LABELS}
    # from_arrays: from_pydict(schema=...) is ~100x slower on small batches.
    return pa.RecordBatch.from_arrays([pa.array(columns[f.name], f.type) for f in LOG_SCHEMA], schema=LOG_SCHEMA)


def write_log(events: Iterable[dict], path: Path | str, format: str | None = None, chunk_rows: int = 100_000) -> int:
    """Write events, in the order given, as a moestream log; returns how many. Holds one chunk in memory."""
    fmt = format or log_format(path)
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    writer = pq.ParquetWriter(str(path), LOG_SCHEMA) if fmt == "parquet" else pacsv.CSVWriter(str(path), LOG_SCHEMA)
    written = 0
    try:
        chunk: list[dict] = []
        for event in events:
            chunk.append(event)
            if len(chunk) == chunk_rows:
                writer.write_batch(_log_batch(chunk))
                written, chunk = written + len(chunk), []
        if chunk:
            writer.write_batch(_log_batch(chunk))
            written += len(chunk)
    finally:
        writer.close()
    return written
