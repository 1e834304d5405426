"""Log files as stored: which format a file is, its columns, and its rows read raw, in bounded chunks.

Reading is forgiving where a row is bad and strict where the file is. A CSV line with more or fewer fields
than the header is skipped by Arrow's parser (``invalid_row_handler``) and handed back as a :class:`BadLine`
with its line number and text; a value that is not what its column holds is left for ``stream.logcheck``
to find, because CSV columns are read as text. A file that cannot be read at all (missing, a directory,
empty, not CSV or Parquet, unreadable) raises :class:`LogError`, one line naming the file and why.

Every row keeps its *row index*: its position among the data rows of the file, rejected rows included
(CSV: line number - 2, as line 1 is the header; Parquet: the row number). Rejecting a row therefore never
moves another, which keeps replay positions the same from run to run. CSV line numbers assume no field holds
a quoted newline, which neither log schema has.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_PARQUET_MAGIC = b"PAR1"


class LogError(ValueError):
    """A log file that cannot be read at all; the message is one line naming the file and why."""


@dataclass(frozen=True)
class BadLine:
    """A CSV line the parser skipped: it has more or fewer fields than the header."""

    row: int
    text: str
    fields: int
    expected: int


@dataclass
class RawChunk:
    table: pa.Table
    """The columns as stored: text for CSV (null where empty), the file's own types for Parquet."""
    rows: np.ndarray
    """Row index in the file of each row of ``table``."""
    bad_lines: list[BadLine] = field(default_factory=list)
    """CSV lines skipped since the previous chunk, up to this chunk's last row."""


def log_format(path: Path | str) -> str:
    """``"parquet"`` or ``"csv"``, from the file name."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise LogError(f"{path}: neither a CSV nor a Parquet file by its name; expected one of {sorted(FORMATS)}")
    return fmt


def check_readable(path: Path | str) -> str:
    """The file's format, once it is known to exist, to be a non-empty file, and to hold what its name says."""
    fmt = log_format(path)
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LogError(f"{path}: is a directory, not a log file") from None
    except OSError as exc:
        raise LogError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise LogError(f"{path}: empty file (not even a header)")
    if fmt == "csv" and head == _PARQUET_MAGIC:
        raise LogError(f"{path}: is a Parquet file named .csv")
    return fmt


@contextmanager
def _as_log_error(path: Path | str, what: str) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise LogError(f"{path}: {what} ({message})") from None


def column_names(path: Path | str) -> list[str]:
    fmt = check_readable(path)
    if fmt == "parquet":
        with _as_log_error(path, "not a readable Parquet file"):
            return pq.read_schema(path).names
    with _as_log_error(path, "not a readable CSV text file"), open(path, newline="", encoding="utf-8-sig") as f:
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


def read_raw(path: Path | str, columns: list[str], chunk_rows: int) -> Iterator[RawChunk]:
    """``columns`` of the file as stored, ``chunk_rows`` rows at a time (the last may be short).

    Only one chunk and one reader block are in memory at a time, whatever the size of the file.
    """
    with _as_log_error(path, "cannot be read"):
        if check_readable(path) == "parquet":
            yield from _read_parquet(path, columns, chunk_rows)
        else:
            yield from _read_csv(path, columns, chunk_rows)


def _read_parquet(path: Path | str, columns: list[str], chunk_rows: int) -> Iterator[RawChunk]:
    first = 0
    with pq.ParquetFile(path) as reader:
        for table in _rebatch(reader.iter_batches(batch_size=chunk_rows, columns=columns), chunk_rows):
            yield RawChunk(table.select(columns), np.arange(first, first + table.num_rows, dtype=np.int64))
            first += table.num_rows


def _read_csv(path: Path | str, columns: list[str], chunk_rows: int) -> Iterator[RawChunk]:
    skipped: list[BadLine] = []

    def skip(row: pacsv.InvalidRow) -> str:
        # Serial parsing (use_threads=False) is what gives the handler the line number.
        skipped.append(BadLine(row.number - 2, row.text, row.actual_columns, row.expected_columns))
        return "skip"

    parsed = 0  # rows the parser has produced so far
    pending = 0  # skipped lines already in bad_rows but after the last chunk
    bad_rows = np.empty(0, np.int64)  # row index of every skipped line so far, ascending
    with pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=min(max(chunk_rows * 64, 1 << 20), 64 << 20), use_threads=False),
        # A blank line is a row (of nulls) rather than nothing, so that it keeps its line number.
        parse_options=pacsv.ParseOptions(invalid_row_handler=skip, ignore_empty_lines=False),
        # Text, not numbers: a conversion error would end the whole block; logcheck finds the bad values.
        # Quoted strings stay strings, so a request id written "NA" is not taken for a null.
        convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.string()),
                                             strings_can_be_null=True, quoted_strings_can_be_null=False),
    ) as reader:
        for table in _rebatch(reader, chunk_rows):
            if len(skipped) > pending:  # lines skipped while the parser read ahead of this chunk
                bad_rows = np.concatenate([bad_rows, [b.row for b in skipped[pending:]]])
            rows = np.arange(parsed, parsed + table.num_rows, dtype=np.int64)
            parsed += table.num_rows
            if len(bad_rows):
                # The k-th parsed row comes after every skipped line whose count of parsed rows before it is <= k.
                rows += np.searchsorted(bad_rows - np.arange(len(bad_rows)), rows, "right")
            done = [b for b in skipped if b.row <= rows[-1]]
            skipped[:] = skipped[len(done):]
            pending = len(skipped)
            yield RawChunk(table.select(columns), rows, done)
    if skipped:
        yield RawChunk(pa.table({c: pa.array([], pa.string()) for c in columns}), np.empty(0, np.int64), skipped)


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


class LineText:
    """The text of CSV lines by row index, for rejects: one forward pass, so rows must be asked in order.

    Reads the file again only as far as the last row asked for, counting line ends a block at a time.
    """

    def __init__(self, path: Path | str) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close(), after the last reject
        self.buffer = b""
        self.ends = np.empty(0, np.int64)  # offsets of the line ends in ``buffer``
        self.first_row = -1  # row index of the line that starts ``buffer`` (-1: the header)

    def get(self, rows: Iterable[int]) -> list[str]:
        out = []
        for row in rows:
            k = row - self.first_row
            while k >= len(self.ends):
                if len(self.ends):  # drop the whole lines before the one asked for
                    self.buffer, self.first_row = self.buffer[self.ends[-1] + 1:], self.first_row + len(self.ends)
                    k -= len(self.ends)
                    self.ends = self.ends[:0]
                block = self.file.read(1 << 22)
                if not block:  # the last line has no line end
                    out.append(_decode(self.buffer) if k == 0 else "")
                    break
                self.buffer += block
                self.ends = np.flatnonzero(np.frombuffer(self.buffer, np.uint8) == 10)
            else:
                out.append(_decode(self.buffer[self.ends[k - 1] + 1 if k else 0:self.ends[k]]))
        return out

    def close(self) -> None:
        self.file.close()


def _decode(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")
