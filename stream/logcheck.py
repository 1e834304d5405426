"""Validation of log rows, a chunk at a time: each bad row gets one reason, and goes to the rejects.

A chunk is checked column by column with pyarrow.compute and numpy. Each check flags the rows it finds bad
among those no earlier check flagged, so every rejected row carries exactly one reason: the first in the
order the schema checks them (``REASONS`` lists them in that order). Only rejected rows are ever touched one
by one (to write their detail); a clean chunk costs a handful of vectorised passes.

Rejects are JSON lines (``RejectLog``), one per row, in file order within each chunk:
``{"line": 12, "reason": "not_a_number", "detail": "is_click 'yes': not a number", "raw": "<the line>"}`` for
CSV (``line`` 1-based, the header is line 1), ``{"row": 7, ..., "raw": {"user_id": 1, ...}}`` for Parquet
(``row`` 0-based, ``raw`` the values of the columns replay reads).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from stream.logread import BadLine, LineText, LogError

REASONS: dict[str, str] = {
    "field_count": "a CSV line with more or fewer fields than the header (a blank line is a row of empty values)",
    "not_a_number": "text, or a fraction in an integer column, where a number is expected",
    "missing_value": "a required value is empty, or an event that must carry a label carries none",
    "bad_type": "moestream's type is neither impression nor feedback",
    "bad_id": "an id outside [0, 2**62)",
    "bad_timestamp": "a time before 1970 (negative) or from 2100 on",
    "bad_request_id": "an empty request id, or one over 128 characters",
    "bad_label": "a task label other than 0 or 1, a play time outside [0 ms, a week] or not finite",
    "duplicate": "the same row (KuaiRand: the same user, video and time) within the 100 000 rows before it",
}
"""Reason codes of rejected rows, in the order they are checked, with what each means."""
MAX_TS_MS = 4_102_444_800_000
"""2100-01-01T00:00:00Z: a log time at or after it is not a time but a unit error or garbage."""
DUPLICATE_WINDOW_ROWS = 100_000
"""How far back a duplicate is looked for: the repeated writes of a dirty log are close together, and a
fixed window (not the chunk) keeps the rejects, and so the positions, the same whatever ``chunk_rows``."""

_INTEGER = r"^[+-]?[0-9]+$"
_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_INT64_DIGITS = 18  # every integer of up to 18 digits fits int64


class RowChecks:
    """The verdict on each row of one chunk: none yet, or the first reason it failed."""

    def __init__(self, raw: pa.Table, rows: np.ndarray) -> None:
        self.raw, self.rows = raw, rows
        self.reason = np.full(raw.num_rows, -1, np.int16)  # index into self.found, -1: fine so far
        self.found: list[tuple[str, str | None, str]] = []

    @property
    def ok(self) -> np.ndarray:
        return self.reason < 0

    def flag(self, bad: np.ndarray | pa.Array | pa.ChunkedArray, reason: str, message: str,
             column: str | None = None) -> None:
        """Reject the rows where ``bad`` is true (null counts as false) that no earlier check rejected."""
        if not isinstance(bad, np.ndarray):
            bad = np.asarray(pc.fill_null(bad, False))
        new = bad & self.ok
        if new.any():
            self.reason[new] = len(self.found)
            self.found.append((reason, column, message))

    def number(self, column: str, to: pa.DataType) -> pa.ChunkedArray:
        """``column`` as ``to``; values that are not numbers of that kind are flagged and become null."""
        parsed, bad = parse_number(self.raw[column], to)
        if bad is not None:
            self.flag(bad, "not_a_number", "not an integer" if pa.types.is_integer(to) else "not a number", column)
        return parsed

    def text(self, column: str) -> pa.ChunkedArray:
        col = self.raw[column]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            return col
        try:
            return pc.cast(col, pa.string())
        except pa.ArrowException:
            raise LogError(f"column {column} is {col.type}, not text") from None

    def missing(self, columns: dict[str, pa.ChunkedArray]) -> None:
        for name, col in columns.items():
            self.flag(pc.is_null(col), "missing_value", "missing", name)

    def rejects(self) -> list[tuple[int, str, str, int]]:
        """(row index, reason, detail, position in the chunk) of each rejected row, in file order."""
        out = []
        for i in np.flatnonzero(~self.ok):
            reason, column, message = self.found[self.reason[i]]
            detail = message if column is None else f"{column} {self.raw[column][int(i)].as_py()!r}: {message}"
            out.append((int(self.rows[i]), reason, detail, int(i)))
        return out


def parse_number(col: pa.ChunkedArray, to: pa.DataType) -> tuple[pa.ChunkedArray, np.ndarray | None]:
    """``col`` cast to ``to``, and which values could not be (None: all could); those become null.

    The cast is tried on the whole column first (the clean case: one C++ pass); only if it fails are the
    bad values found, by a pattern for text and by value for fractions in an integer column.
    """
    if col.type == to:
        return col, None
    try:
        return pc.cast(col, to), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    integer = pa.types.is_integer(to)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        fits = pc.match_substring_regex(col, _INTEGER if integer else _NUMBER)
        if integer:
            fits = np.asarray(pc.fill_null(fits, False))
            long = np.flatnonzero(fits & (np.asarray(pc.fill_null(pc.utf8_length(col), 0)) > _INT64_DIGITS))
            for i in long:  # rare: check the few long ones by value
                fits[i] = -(2**63) <= int(col[int(i)].as_py()) < 2**63
    elif pa.types.is_floating(col.type) and integer:
        fits = pc.and_(pc.is_finite(col), pc.equal(pc.floor(col), col))
        fits = pc.and_(fits, pc.less(pc.abs(col), 2.0**63))
    else:
        raise LogError(f"a column is {col.type}, which cannot hold {to} values")
    if not isinstance(fits, np.ndarray):
        fits = np.asarray(pc.fill_null(fits, False))
    parsed = pc.cast(pc.if_else(pa.array(fits), col, pa.scalar(None, col.type)), to)
    return parsed, np.asarray(pc.is_valid(col)) & ~fits


class Duplicates:
    """Rows that repeat a key seen within the ``window`` rows before them, across chunks.

    Keeps the keys of the last ``window`` rows. A hash aggregation finds the keys seen more than once in the
    window and this chunk; only the rows holding those keys are compared one by one.
    """

    def __init__(self, window: int = DUPLICATE_WINDOW_ROWS) -> None:
        self.window = window
        self.tail: pa.Table | None = None

    def flag(self, checks: RowChecks, keys: dict[str, pa.ChunkedArray], message: str) -> None:
        ok = checks.ok
        # Nulls (absent labels) compare equal here, as they do for the eye: fill them with a value no valid
        # row can hold.
        table = pa.table({name: col if pa.types.is_string(col.type) else pc.fill_null(col, -1)
                          for name, col in keys.items()}
                         | {"_row": checks.rows, "_at": np.arange(len(ok))})
        table = table if ok.all() else table.filter(pa.array(ok))
        both = table if self.tail is None else pa.concat_tables([self.tail, table])
        names = list(keys)
        counts = both.group_by(names, use_threads=False).aggregate([([], "count_all")])
        repeated = counts.filter(pc.greater(counts["count_all"], 1))
        if repeated.num_rows:
            members = both.join(repeated.select(names), names, join_type="left semi").sort_by([("_row", "ascending")])
            last: dict[tuple, int] = {}
            bad = np.zeros(len(ok), bool)
            for row in members.to_pylist():
                key = tuple(row[n] for n in names)
                if key in last and row["_row"] - last[key] <= self.window and row["_at"] >= 0:
                    bad[row["_at"]] = True
                last[key] = row["_row"]
            checks.flag(bad, "duplicate", message)
        last_row = int(checks.rows[-1]) if len(checks.rows) else 0
        tail = both.filter(pc.greater(both["_row"], last_row - self.window))
        self.tail = tail.set_column(tail.schema.get_field_index("_at"), "_at",
                                    pa.array(np.full(tail.num_rows, -1, np.int64)))


class RejectLog:
    """Rejected rows: counted by reason, and written as JSON lines to ``path`` when one is given."""

    def __init__(self, path: Path | str | None, source: Path | str, fmt: str,
                 on_count: Callable[[int], None] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: dict[str, int] = {}
        self.csv = fmt == "csv"
        self.on_count = on_count
        self._out = open(self.path, "wb") if self.path is not None else None  # noqa: SIM115 - closed by close()
        self._lines = LineText(source) if self.csv and self._out is not None else None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, bad_lines: list[BadLine], checks: RowChecks) -> None:
        found = checks.rejects()
        if not bad_lines and not found:
            return
        records = [(b.row, "field_count", f"{b.fields} fields, the header has {b.expected}", b.text)
                   for b in bad_lines]
        if self._out is not None:
            raw = self._raw_texts([r for r, *_ in found], [at for *_, at in found], checks.raw)
            records += [(row, reason, detail, text) for (row, reason, detail, _), text in zip(found, raw)]
            records.sort(key=lambda r: r[0])
            where = "line" if self.csv else "row"
            self._out.write(b"".join(
                orjson.dumps({where: row + 2 if self.csv else row, "reason": reason, "detail": detail, "raw": raw},
                             default=str)
                + b"\n" for row, reason, detail, raw in records))
        else:
            records += [(row, reason, detail, None) for row, reason, detail, _ in found]
        for _, reason, _, _ in records:
            self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.on_count is not None:
            self.on_count(self.total)

    def _raw_texts(self, rows: list[int], at: list[int], raw: pa.Table) -> list:
        if self._lines is not None:
            return self._lines.get(rows)
        return raw.take(at).to_pylist()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        if self._lines is not None:
            self._lines.close()
