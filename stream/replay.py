"""Replay of historical logs as a stream: event-time order, pacing, resume, bounded memory.

A log file (KuaiRand-1K or moestream's own, Parquet or CSV; ``stream.logfile``) is read in chunks of
``chunk_rows`` rows and handed out as batches of event dicts in event-time order, ties broken by position in
the file (so a KuaiRand row's impression precedes its feedback). Files are rarely sorted by event time,
and a KuaiRand view's feedback lands among later views, so the order comes from an external sort: each
chunk is sorted and spilled to a temporary run file, and the runs are merged a batch at a time. A file
already in order (checked first by reading only its time columns, stopping at the first event out of order)
is streamed as it is, without spilling.

The order is total and the same on every run, so a position (events emitted so far) resumes a replay
exactly. ``speed`` paces the batches against event time; ``restamp`` shifts the timestamps so the first
event is "now". See ``docs/replay.md``.

Bad rows never stop a replay: each goes to the rejects (``config.rejects_path``, JSON lines) with one reason
from ``stream.logcheck.REASONS`` and is counted by reason, and the rest replays. Row indexes count rejected
rows too, so the same file gives the same rejects and the same positions on every run. A file that cannot
be read at all raises ``LogError`` before anything is emitted.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeRemainingColumn,
)
from rich.text import Text

from stream.logcheck import RejectLog
from stream.runs import MIN_MERGE_BATCH, merge_runs, read_run, write_run
from stream.logfile import (
    SCHEMAS, LogError, count_rows, detect_schema, log_format, read_event_times, read_events, sort_events, to_dicts,
    unknown_columns,
)

__all__ = ["LogError", "PastTheEnd", "ReplayConfig", "ReplayPosition", "ReplayResult", "ReplaySource", "detect_schema",
           "iter_events", "merge_runs", "replay", "replay_tables"]

KUAIRAND_MAX_DELAY_MS = 8_000
"""A KuaiRand view's feedback comes ``min(play_time_ms, this)`` after its impression: under the joiner's
attribution window (``JoinerConfig.window_ms``, 10 s), so replayed labels join instead of arriving late."""
PACE_TICK_S = 0.01
"""With pacing, events due within this much of now go out together rather than one sleep each."""


@dataclass(frozen=True)
class ReplayPosition:
    """How far a replay got: ``emitted`` events of the sorted sequence, the last with sort key (ts_ms, seq).

    Persist it with ``dataclasses.asdict`` and restore with ``ReplayPosition(**d)``. Resuming from one with a
    key skips the events at or before the key while reading, before any sorting, and checks that exactly
    ``emitted`` of them were skipped (the file or the ordering settings did not change). ``ts_ms`` is the
    event's original timestamp, before any restamping. Without a key (``seq < 0``) the first ``emitted``
    events of the sorted sequence are skipped.
    """

    emitted: int = 0
    ts_ms: int = -1
    seq: int = -1

    @property
    def has_key(self) -> bool:
        return self.seq >= 0


@dataclass(frozen=True)
class ReplayConfig:
    path: Path
    speed: float = 0.0
    """0: as fast as the sink takes them; s > 0: s times real time (event-time gaps divided by s)."""
    start: int | ReplayPosition = 0
    """Events of the sorted sequence already emitted by an earlier run: skipped, exactly."""
    chunk_rows: int = 100_000
    """File rows per chunk: the unit of reading, of a spilled run, and so of the memory bound."""
    batch_size: int = 10_000
    """Most events per batch handed to the sink."""
    restamp: bool = False
    """Shift every timestamp by one offset so that the first event emitted is stamped with the wall clock."""
    progress: bool = True
    limit: int | None = None
    """Stop after this many events (this run)."""
    assume_sorted: bool | None = None
    """None: check the order first (cheap, stops at the first disorder); True: trust it (an event out of order
    raises); False: always sort."""
    max_feedback_delay_ms: int = KUAIRAND_MAX_DELAY_MS
    """KuaiRand only: cap on a view's feedback delay (its play time)."""
    spill_dir: Path | None = None
    """Where sorted runs are spilled (a temporary directory inside it, removed afterwards); default: $TMPDIR."""
    rejects_path: Path | None = None
    """Where rejected rows are written, one JSON line each (created, or emptied, when the replay starts);
    None: only counted."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        start_ok = isinstance(self.start, ReplayPosition | int) and not isinstance(self.start, bool)
        if not start_ok or self.resume_from.emitted < 0:
            raise ValueError(f"start must be a count >= 0 or a ReplayPosition, got {self.start!r}")
        if not self.speed >= 0:
            raise ValueError(f"speed must be >= 0, got {self.speed}")
        for name in ("chunk_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.max_feedback_delay_ms < 0:
            raise ValueError(f"max_feedback_delay_ms must be >= 0, got {self.max_feedback_delay_ms}")

    @property
    def resume_from(self) -> ReplayPosition:
        return self.start if isinstance(self.start, ReplayPosition) else ReplayPosition(emitted=self.start)


@dataclass(frozen=True)
class ReplayResult:
    emitted: int
    """Events handed to the sink in this run."""
    position: ReplayPosition
    """Where a later run resumes (counts the events of earlier runs too)."""
    seconds: float
    schema: str
    spilled_runs: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Rows rejected in this run, by reason code (``stream.logcheck.REASONS``)."""
    rejects_path: Path | None = None
    """Where they are, one JSON line each (``config.rejects_path``)."""
    unknown_columns: tuple[str, ...] = ()
    """Columns of the file that neither schema knows: ignored."""


class PastTheEnd(LogError):
    """``start`` counts more events than the log holds: a resume against another (shorter) log, most likely."""

    def __init__(self, path: Path, start: int, events: int) -> None:
        super().__init__(f"{path}: start {start} is past the end of the log ({events} events)")
        self.path, self.start, self.events = path, start, events


# ---------------------------------------------------------------------------------------------- the source


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "-/s", style="progress.data.speed")


class ReplaySource:
    """Event tables (or batches of event dicts) from a log file, in event-time order, after ``config.start``.

    ``position`` is just past the last table handed out: persist it once that table is delivered.
    ``rejected`` counts the rows rejected so far, by reason.
    """

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.schema = detect_schema(config.path)  # LogError: the file cannot be read as a log at all
        self._schema = SCHEMAS[self.schema]
        self.unknown_columns = tuple(unknown_columns(config.path, self._schema))
        self.rejected: dict[str, int] = {}
        self.position: ReplayPosition = config.resume_from
        self.spilled_runs = 0
        self._rows: int | None = None
        self._skipped = 0  # events dropped for lying at or before the key of ``config.start``

    @property
    def rows(self) -> int:
        """Rows in the file (from Parquet metadata, or a line count for CSV)."""
        if self._rows is None:
            self._rows = count_rows(self.config.path)
        return self._rows

    @property
    def total(self) -> int:
        """Events this run will emit (an estimate for CSV files with quoted newlines)."""
        left = max(self.rows * self._schema.events_per_row - self.config.resume_from.emitted, 0)
        return left if self.config.limit is None else min(left, self.config.limit)

    def tables(self) -> Iterator[pa.Table]:
        """Event tables (``EVENT_SCHEMA``) in event-time order, at most ``batch_size`` events each, paced
        and limited by the config; ``ts_ms`` restamped if asked (``position`` keeps the file's own)."""
        with ExitStack() as stack:
            progress = self._progress(stack)
            rejects = RejectLog(self.config.rejects_path, self.config.path, log_format(self.config.path),
                                on_count=progress.rejected)
            stack.callback(rejects.close)
            self.rejected = rejects.counts
            yield from self._emit(self._sorted(stack, progress, rejects), progress)

    def batches(self) -> Iterator[list[dict]]:
        """The contract's event dicts of each table of :meth:`tables` (what a Kafka sink sends)."""
        return map(to_dicts, self.tables())

    # -- order

    def _sorted(self, stack: ExitStack, progress: _Phase, rejects: RejectLog) -> Iterator[pa.Table]:
        c, start = self.config, self.config.resume_from
        in_order = c.assume_sorted if c.assume_sorted is not None else self._in_order(progress)
        tables = read_events(c.path, self._schema, c.chunk_rows, c.max_feedback_delay_ms, rejects)
        if in_order:
            tables = self._checked(tables)
        if start.has_key:
            tables = self._after(tables, start)
        if in_order:
            return tables
        spill = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moestream-replay-", dir=c.spill_dir)))
        return self._external_sort(tables, spill, progress)

    def _in_order(self, progress: _Phase) -> bool:
        """Whether the events are already in event-time order in the file; stops at the first that is not."""
        c = self.config
        progress.phase("checking order", self.rows if c.progress else None)
        last = None
        for ts in read_event_times(c.path, self._schema, c.chunk_rows, c.max_feedback_delay_ms):
            if len(ts) and ((last is not None and ts[0] < last) or np.any(np.diff(ts) < 0)):
                return False
            last = ts[-1] if len(ts) else last
            progress.advance(len(ts) // self._schema.events_per_row)
        return True

    def _checked(self, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        last = None
        for table in tables:
            ts = table["ts_ms"].to_numpy()
            bad = [0] if len(ts) and last is not None and ts[0] < last else np.flatnonzero(np.diff(ts) < 0) + 1
            if len(bad):
                row = int(table["seq"][int(bad[0])].as_py()) // self._schema.events_per_row
                raise LogError(f"{self.config.path}: not in event-time order at data row {row}; "
                                 "replay with assume_sorted=None or False to sort it")
            last = ts[-1] if len(ts) else last
            yield table

    def _after(self, tables: Iterator[pa.Table], start: ReplayPosition) -> Iterator[pa.Table]:
        """Drop events at or before the key of ``start``; check their number once no more can come."""
        key = (start.ts_ms, start.seq)
        for table in tables:
            ts, seq = table["ts_ms"].to_numpy(), table["seq"].to_numpy()
            keep = (ts > key[0]) | ((ts == key[0]) & (seq > key[1]))
            self._skipped += len(keep) - int(keep.sum())
            yield table.filter(pa.array(keep))

    def _external_sort(self, tables: Iterator[pa.Table], spill: Path, progress: _Phase) -> Iterator[pa.Table]:
        """Sort each chunk, spill it as a run (unless it is the only one), then merge the runs."""
        c = self.config
        progress.phase("sorting", self.rows if c.progress else None)
        runs: list[Path] = []
        held: pa.Table | None = None  # the first run stays in memory until a second one shows up
        for table in tables:
            progress.advance(table.num_rows // self._schema.events_per_row)
            if table.num_rows == 0:
                continue
            run = sort_events(table)
            if held is None and not runs:
                held = run
                continue
            for r in (held, run) if held is not None else (run,):
                runs.append(spill / f"run-{len(runs):06d}.arrow")
                write_run(r, runs[-1], max(MIN_MERGE_BATCH, c.chunk_rows * self._schema.events_per_row // 64))
            held = None
        self.spilled_runs = len(runs)
        if held is not None:
            yield held
            return
        yield from merge_runs(read_run(path) for path in runs)

    # -- emission

    def _emit(self, tables: Iterator[pa.Table], progress: _Phase) -> Iterator[pa.Table]:
        c, start = self.config, self.config.resume_from
        skip = 0 if start.has_key else start.emitted
        left = c.limit if c.limit is not None else -1
        checked = not start.has_key
        clock: tuple[float, int] | None = None  # (wall time, event time) of the first event emitted
        shift = 0
        for table in itertools.chain(tables, [None]):  # None: the end
            if table is not None and table.num_rows == 0:
                continue
            if not checked:  # the first events after the key, or the end: all events before it have been read
                checked = True
                if self._skipped != start.emitted:
                    raise LogError(
                        f"{c.path}: cannot resume from {start}: {self._skipped} events come at or before its "
                        "key; the log, or the settings that order it, changed since")
            if table is None and skip:
                raise PastTheEnd(c.path, start.emitted, start.emitted - skip)
            if table is None or left == 0:
                break
            if progress.name != "replaying":
                progress.phase("replaying", self.total if c.progress else None)
            if skip:
                cut = min(skip, table.num_rows)
                self.position = ReplayPosition(start.emitted - skip + cut, int(table["ts_ms"][cut - 1].as_py()),
                                               int(table["seq"][cut - 1].as_py()))
                table, skip = table.slice(cut), skip - cut
            if left >= 0:
                table = table.slice(0, left)
            for offset in range(0, table.num_rows, c.batch_size):
                piece = table.slice(offset, c.batch_size)
                if clock is None:
                    clock = (time.monotonic(), int(piece["ts_ms"][0].as_py()))
                    shift = int(time.time() * 1000) - clock[1] if c.restamp else 0
                for due in self._paced(piece, clock):
                    self.position = self._moved(due)
                    yield due.set_column(0, "ts_ms", pc.add(due["ts_ms"], shift)) if shift else due
                    progress.advance(due.num_rows)
            if left >= 0:
                left -= table.num_rows
                if left == 0:
                    break  # now, not after reading another chunk
        progress.done()

    def _moved(self, events: pa.Table) -> ReplayPosition:
        """The position after ``events``, which follow the current position."""
        return ReplayPosition(self.position.emitted + events.num_rows, int(events["ts_ms"][-1].as_py()),
                              int(events["seq"][-1].as_py()))

    def _paced(self, events: pa.Table, clock: tuple[float, int]) -> Iterator[pa.Table]:
        """Cut ``events`` where their event time says they are due, sleeping until then (speed > 0)."""
        speed = self.config.speed
        if speed == 0:
            yield events
            return
        wall0, ts0 = clock
        due_at = wall0 + (events["ts_ms"].to_numpy() - ts0) / (1000.0 * speed)  # monotonic seconds
        i = 0
        while i < len(due_at):
            now = time.monotonic()
            j = int(np.searchsorted(due_at, now + PACE_TICK_S, "right"))
            if j <= i:
                time.sleep(due_at[i] - now)  # pacing: a rate limiter against event time, not a wait on a condition
                continue
            yield events.slice(i, j - i)
            i = j

    def _progress(self, stack: ExitStack) -> _Phase:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                       TimeRemainingColumn(), TextColumn("{task.fields[rejected]:,} rejected"),
                       console=Console(stderr=True), disable=not self.config.progress)
        return _Phase(stack.enter_context(bar))


class _Phase:
    """One progress line whose description and total follow the phase (checking order, sorting, replaying)."""

    def __init__(self, bar: Progress) -> None:
        self.bar, self.name = bar, ""
        self.task: TaskID | None = None

    def phase(self, name: str, total: int | None) -> None:
        self.name = name
        if self.task is None:
            self.task = self.bar.add_task(name, total=total, rejected=0)
        else:
            self.bar.reset(self.task, total=total, description=name)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def rejected(self, n: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, rejected=n)

    def done(self) -> None:
        if self.task is not None:  # a CSV row count is an estimate: end the bar at what was done
            self.bar.update(self.task, total=self.bar.tasks[self.task].completed)


# ---------------------------------------------------------------------------------------------- API


def iter_events(config: ReplayConfig) -> Iterator[list[dict]]:
    """Batches of event dicts in event-time order, after ``config.start``, paced by ``config.speed``."""
    return ReplaySource(config).batches()


def replay(
    config: ReplayConfig,
    sink: Callable[[list[dict]], object],
    on_position: Callable[[ReplayPosition], None] | None = None,
) -> ReplayResult:
    """Hand every batch of event dicts to ``sink``; after each, ``on_position`` gets the position to persist.

    ``sink`` is e.g. ``EventSink.send_all`` (flush before persisting a position).
    """
    return _run(config, lambda source: source.batches(), sink, on_position)


def replay_tables(
    config: ReplayConfig,
    sink: Callable[[pa.Table], object],
    on_position: Callable[[ReplayPosition], None] | None = None,
) -> ReplayResult:
    """As :func:`replay`, with event tables (``EVENT_SCHEMA``) instead of dicts: for a sink in this process,
    e.g. a trainer that takes ``stream.logfile.decoded_batch(table, first_offset)``."""
    return _run(config, lambda source: source.tables(), sink, on_position)


def _run(config: ReplayConfig, read: Callable[[ReplaySource], Iterator], sink: Callable,
         on_position: Callable[[ReplayPosition], None] | None) -> ReplayResult:
    source = ReplaySource(config)
    started = time.monotonic()
    emitted = 0
    for batch in read(source):
        sink(batch)
        emitted += len(batch)
        if on_position is not None:
            on_position(source.position)
    return ReplayResult(emitted, source.position, time.monotonic() - started, source.schema, source.spilled_runs,
                        dict(source.rejected), config.rejects_path, source.unknown_columns)
