"""Event logs on disk: moestream's own log and the KuaiRand-1K interaction log, read in bounded chunks.

Two schemas, told apart by their column names (:func:`detect_schema`), each in Parquet or CSV:

``moestream``  what :func:`write_log` writes: one row per event, ``type, request_id, user_id, item_id, ts_ms``
               and one nullable column per label (null: the event does not carry that label).
``kuairand``   the KuaiRand-1K ``log_*.csv`` files: one row per video view, which becomes an impression at
               ``time_ms`` and its feedback ``min(play_time_ms, max_delay_ms)`` later (``docs/replay.md``).

Whatever the schema, a chunk of rows becomes one *event table* (``EVENT_SCHEMA``) in file order, with
``seq``, the event's position in the file, as the tie-break of the event-time order: an impression and its
feedback from one KuaiRand row get ``2·row`` and ``2·row + 1``. :func:`to_dicts` turns an event table into
the event dicts of the contract (``stream.events``). Bad values raise ``ValueError`` naming the file and the
row (the CSV line), before anything is sent.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stream.events import FEEDBACK, IMPRESSION, LABELS, MAX_ID, PLAY_TIME, TASKS

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
"""The KuaiRand-1K columns replay reads; the others (is_hate, is_rand, tab, duration_ms, ...) are dropped."""
KUAIRAND_LABELS: dict[str, str] = {
    "click": "is_click", "long_view": "long_view", "like": "is_like", "comment": "is_comment",
    "follow": "is_follow", "forward": "is_forward", PLAY_TIME: "play_time_ms",
}
"""Contract label -> KuaiRand column."""

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_SORT_KEY = [("ts_ms", "ascending"), ("seq", "ascending")]


class _RowError(ValueError):
    def __init__(self, row: int, reason: str) -> None:
        super().__init__(reason)
        self.row, self.reason = row, reason


# ---------------------------------------------------------------------------------------------- formats


def log_format(path: Path | str) -> str:
    """``"parquet"`` or ``"csv"``, from the file name."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported log file type; expected one of {sorted(FORMATS)}")
    return fmt


def column_names(path: Path | str) -> list[str]:
    if log_format(path) == "parquet":
        return pq.read_schema(path).names
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def count_rows(path: Path | str) -> int:
    """Data rows: exact from Parquet metadata; for CSV a count of line ends (quoted newlines would count too,
    so use it for a progress bar, not for positions)."""
    if log_format(path) == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            lines += block.count(b"\n")
            last = block[-1:]
    return max(lines + (last != b"\n") - 1, 0)


def read_chunks(path: Path | str, columns: dict[str, pa.DataType], chunk_rows: int) -> Iterator[pa.Table]:
    """``columns`` of the file, cast to the given types, ``chunk_rows`` rows at a time (the last may be short).

    Only one chunk and one reader block are in memory at a time, whatever the size of the file.
    """
    schema = pa.schema(list(columns.items()))
    if log_format(path) == "parquet":
        with pq.ParquetFile(path) as reader:
            batches = reader.iter_batches(batch_size=chunk_rows, columns=list(columns))
            for table in _rebatch(batches, chunk_rows):
                yield table.select(list(columns)).cast(schema)
        return
    # Explicit types: inferring them from the first block breaks when a rare label is all-null there.
    with pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=min(max(chunk_rows * 64, 1 << 20), 64 << 20)),
        convert_options=pacsv.ConvertOptions(include_columns=list(columns), column_types=columns),
    ) as reader:
        for table in _rebatch(reader, chunk_rows):
            yield table.select(list(columns)).cast(schema)


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Re-cut reader batches (row groups, CSV blocks) into tables of exactly ``rows`` rows."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        have += batch.num_rows
        while have >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows).combine_chunks()
            rest = table.slice(rows)
            pending, have = rest.to_batches(), rest.num_rows
    if have:
        yield pa.Table.from_batches(pending).combine_chunks()


# ---------------------------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class LogSchema:
    """What a log schema reads and how its rows become events."""

    name: str
    columns: dict[str, pa.DataType]
    """The columns replay reads; a file has this schema when it has all of them."""
    time_columns: dict[str, pa.DataType]
    """Enough columns to compute the event times (the cheap sortedness scan reads only these)."""
    events_per_row: int
    to_events: Callable[[pa.Table, int, int], pa.Table]
    """(chunk, index of its first row, max_delay_ms) -> event table in file order."""
    event_times: Callable[[pa.Table, int], np.ndarray]
    """(chunk of ``time_columns``, max_delay_ms) -> ``ts_ms`` of its events in file order."""


def _check(bad: pa.ChunkedArray, first_row: int, reason: str) -> None:
    """Raise for the first row where ``bad`` is true or null (a null id or time fails every comparison)."""
    rows = np.flatnonzero(np.asarray(pc.fill_null(bad, True)))
    if len(rows):
        raise _RowError(first_row + int(rows[0]), reason)


def _check_ids(table: pa.Table, names: Iterable[str], first_row: int) -> None:
    for name in names:
        col = table[name]
        _check(pc.invert(pc.and_kleene(pc.greater_equal(col, 0), pc.less(col, MAX_ID))), first_row,
               f"{name} must be a non-negative integer below 2**62")


def _check_labels(table: pa.Table, names: dict[str, str], first_row: int) -> pa.ChunkedArray:
    """Labels may be null (absent); present ones must be 0/1, play time finite and >= 0.

    Returns which rows carry at least one label."""
    for label, column in names.items():
        col = table[column]
        ok = (pc.and_kleene(pc.is_finite(col), pc.greater_equal(col, 0)) if label == PLAY_TIME
              else pc.is_in(col, pa.array([0, 1], col.type)))
        _check(pc.and_kleene(pc.is_valid(col), pc.invert(ok)), first_row,
               f"{column} must be {'a finite number >= 0' if label == PLAY_TIME else '0 or 1'}")
    present = [pc.is_valid(table[column]) for column in names.values()]
    any_present = present[0]
    for p in present[1:]:
        any_present = pc.or_kleene(any_present, p)
    return any_present


def _event_table(ts, seq, kind, request_id, user, item, labels: dict[str, pa.Array]) -> pa.Table:
    arrays = [ts, seq, kind, request_id, user, item, *[labels[name] for name in LABELS]]
    return pa.Table.from_arrays([pa.array(a) if isinstance(a, np.ndarray) else a for a in arrays],
                                schema=EVENT_SCHEMA)


def _kuairand_delay(play_time: pa.ChunkedArray, max_delay_ms: int) -> np.ndarray:
    play = play_time.to_numpy(zero_copy_only=False)  # null -> NaN
    return np.clip(np.nan_to_num(play, nan=0.0), 0, max_delay_ms).astype(np.int64)


def _kuairand_times(chunk: pa.Table, max_delay_ms: int) -> np.ndarray:
    t = chunk["time_ms"].to_numpy(zero_copy_only=False)  # float64 with NaN where null
    out = np.empty(2 * len(t), dtype=t.dtype)
    out[0::2] = t
    out[1::2] = t + _kuairand_delay(chunk["play_time_ms"], max_delay_ms)
    return out


def _kuairand_events(chunk: pa.Table, first_row: int, max_delay_ms: int) -> pa.Table:
    n = chunk.num_rows
    _check_ids(chunk, ("user_id", "video_id", "time_ms"), first_row)
    _check(pc.greater_equal(chunk["time_ms"], MAX_ID - max_delay_ms), first_row,
           "time_ms plus the feedback delay must stay below 2**62")
    any_label = _check_labels(chunk, KUAIRAND_LABELS, first_row)
    _check(pc.invert(any_label), first_row, "a view needs at least one label")
    user, video, t = chunk["user_id"], chunk["video_id"], chunk["time_ms"]
    request_id = pc.binary_join_element_wise(
        "kr", pc.cast(user, pa.string()), pc.cast(t, pa.string()), pc.cast(video, pa.string()), "-"
    )
    t_np = t.to_numpy()
    seq = 2 * np.arange(first_row, first_row + n, dtype=np.int64)
    imp = _event_table(t_np, seq, np.zeros(n, np.int8), request_id, user, video,
                       {name: pa.nulls(n, EVENT_SCHEMA.field(name).type) for name in LABELS})
    labels = {name: pc.cast(chunk[column], EVENT_SCHEMA.field(name).type) for name, column in KUAIRAND_LABELS.items()}
    fb = _event_table(t_np + _kuairand_delay(chunk["play_time_ms"], max_delay_ms), seq + 1, np.ones(n, np.int8),
                      request_id, user, video, labels)
    order = np.empty(2 * n, dtype=np.int64)  # interleave: row i's impression, then its feedback
    order[0::2] = np.arange(n)
    order[1::2] = np.arange(n, 2 * n)
    return pa.concat_tables([imp, fb]).take(order)


def _moestream_times(chunk: pa.Table, max_delay_ms: int) -> np.ndarray:
    return chunk["ts_ms"].to_numpy(zero_copy_only=False)


def _moestream_events(chunk: pa.Table, first_row: int, max_delay_ms: int) -> pa.Table:
    n = chunk.num_rows
    kind_col = chunk["type"]
    _check(pc.invert(pc.is_in(kind_col, pa.array([IMPRESSION, FEEDBACK]))), first_row,
           f"type must be {IMPRESSION!r} or {FEEDBACK!r}")
    _check_ids(chunk, ("user_id", "item_id", "ts_ms"), first_row)
    rid_len = pc.utf8_length(chunk["request_id"])
    _check(pc.invert(pc.and_kleene(pc.greater(rid_len, 0), pc.less_equal(rid_len, 128))), first_row,
           "request_id must be a non-empty string of at most 128 characters")
    is_feedback = pc.equal(kind_col, FEEDBACK)
    any_label = _check_labels(chunk, {name: name for name in LABELS}, first_row)
    _check(pc.and_kleene(is_feedback, pc.invert(any_label)), first_row, "feedback needs at least one label")
    return _event_table(
        chunk["ts_ms"], np.arange(first_row, first_row + n, dtype=np.int64), pc.cast(is_feedback, pa.int8()),
        chunk["request_id"], chunk["user_id"], chunk["item_id"], {name: chunk[name] for name in LABELS},
    )


SCHEMAS: dict[str, LogSchema] = {
    "kuairand": LogSchema(
        name="kuairand",
        columns=KUAIRAND_COLUMNS,
        time_columns={"time_ms": pa.int64(), "play_time_ms": pa.float64()},
        events_per_row=2,
        to_events=_kuairand_events,
        event_times=_kuairand_times,
    ),
    "moestream": LogSchema(
        name="moestream",
        columns={f.name: f.type for f in LOG_SCHEMA},
        time_columns={"ts_ms": pa.int64()},
        events_per_row=1,
        to_events=_moestream_events,
        event_times=_moestream_times,
    ),
}


def detect_schema(path: Path | str) -> str:
    """``"kuairand"`` or ``"moestream"``, from the column names; otherwise a ``ValueError`` saying which
    columns each schema misses."""
    names = set(column_names(path))
    missing = {s.name: [c for c in s.columns if c not in names] for s in SCHEMAS.values()}
    matches = [name for name, cols in missing.items() if not cols]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"{path}: has the columns of several log schemas {matches}; cannot tell which it is")
    detail = "; ".join(f"{name} lacks {cols}" for name, cols in missing.items())
    raise ValueError(f"{path}: unknown log schema ({detail})")


def _where(path: Path | str, row: int) -> str:
    return f"{path}:{row + 2}" if log_format(path) == "csv" else f"{path} row {row}"  # CSV: line, after the header


def read_events(path: Path | str, schema: LogSchema, chunk_rows: int, max_delay_ms: int) -> Iterator[pa.Table]:
    """Event tables (``EVENT_SCHEMA``) in file order, one per chunk of ``chunk_rows`` rows."""
    first = 0
    for chunk in read_chunks(path, schema.columns, chunk_rows):
        try:
            yield schema.to_events(chunk, first, max_delay_ms)
        except _RowError as exc:
            raise ValueError(f"{_where(path, exc.row)}: {exc.reason}") from None
        first += chunk.num_rows


def read_event_times(path: Path | str, schema: LogSchema, chunk_rows: int, max_delay_ms: int) -> Iterator[np.ndarray]:
    """Event times in file order, one array per chunk, reading only the time columns."""
    for chunk in read_chunks(path, schema.time_columns, chunk_rows):
        yield schema.event_times(chunk, max_delay_ms)


def sort_events(events: pa.Table) -> pa.Table:
    """Event-time order; ``seq`` breaks ties, so the order is total and the same on every run."""
    return events.sort_by(_SORT_KEY)


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
