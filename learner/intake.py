"""Joined examples read ahead of the trainer, on a thread of their own: the training loop's sources.

A training step spends most of its time in torch kernels, which release the GIL; reading input (a Kafka
fetch, a Parquet or CSV chunk) mostly waits or runs in Arrow's C++. Done one after the other, the model
idles while the next batch is read, decoded and joined. :class:`BufferedSource` overlaps them: its thread
reads, joins and appends the examples to a bounded buffer (``max_buffered`` rows; the thread stops reading
while it is full) from which the training loop (``learner.loop``) takes its batches. Two sources:

- :class:`Intake`: Kafka, through :class:`~stream.joined.JoinedStream`. Its thread owns the consumer
  (kafka-python's consumer is not thread-safe: every fetch, commit and lag query happens on that thread), or,
  by default (``kafka.consumer: process``), the link to the child process that fetches and decodes
  (``stream.consumer_process``), so that kafka-python's parsing does not hold this process's GIL.
- ``learner.replay_source.ReplayIntake``: a historical log, replayed in event-time order.

Delivery is the same for both: examples are acknowledged as they enter the buffer, the buffer is part of
every checkpoint, and offsets are committed only up to what a durable checkpoint covered. The loop captures
the buffer, the joiner state and the safe offsets under one lock (:meth:`BufferedSource.capture`), writes
the checkpoint, then hands exactly those offsets to :meth:`BufferedSource.commit`: examples that entered the
buffer after the capture are not in the checkpoint, so they must not be committed yet.

Liveness (:class:`Intake`'s watchdog, ``trainer.stall_timeout_s``): a consumer that fetches nothing for that
long while its partitions have lag, or that stays that long outside its group, re-joins the group (on the
intake thread, which owns the consumer); if that does not bring events within the same time, the intake
fails. A fetch that does not return at all for that long (kafka-python looping inside ``poll``) is caught
by :meth:`BufferedSource.check` on the training thread. Either failure ends the worker, and Ray restarts it
from its checkpoint and the committed offsets: a stalled intake is never a worker that looks alive.

Why one module of this size: the buffer, its thread and the Kafka source's commits and watchdog share one lock
and one thread's ownership of the consumer; split apart, each part would reach into the others' state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

import pyarrow as pa
from kafka.errors import KafkaError

from stream.events import EXAMPLE_SCHEMA
from stream.joined import JoinedStream
from stream.kafka_io import SourceBatch

LAG_EVERY_S = 1.0
"""How often the Kafka intake thread refreshes the consumer lag it reports (a broker round trip)."""

log = logging.getLogger(__name__)


class IntakeError(RuntimeError):
    """The intake thread failed (an input or decoding error it could not handle); its cause is chained."""


class IntakeStalled(IntakeError):
    """The intake made no progress for ``stall_timeout_s`` although there was input, and re-joining did not help
    (or a fetch never returned)."""


class BufferedSource:
    """The buffer, the thread and the delivery bookkeeping shared by every source. A subclass reads with
    :meth:`_fetch` and joins what it read with :meth:`_join`."""

    what = "input"
    """What the thread reads, for error messages."""
    stall_timeout_s: float | None = None
    """A fetch that has not returned after this long is a stalled intake (None: reads may take any time)."""

    def __init__(self, max_buffered: int) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be positive, got {max_buffered}")
        self.max_buffered = max_buffered
        self._buffer: list[pa.Table] = []
        self._rows = 0
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._fetch_since: float | None = None
        """When the fetch in flight started (monotonic), None between fetches."""
        self._abandoned = False

    # -- what a subclass provides ----------------------------------------------------------------------

    def _fetch(self) -> object:
        """Read the next piece of input (on the thread, without the lock): None once the input has ended."""
        raise NotImplementedError

    def _join(self, fetched: object) -> pa.Table:
        """The examples that ``fetched`` completes (called under the lock, so that a checkpoint's cut never
        falls between the joiner handing examples out and the buffer taking them)."""
        raise NotImplementedError

    def _acknowledge(self, examples: pa.Table) -> None:
        """Examples entered the buffer (called under the lock)."""

    def _drain(self) -> pa.Table:
        """Every example still pending in the joiner (end of a bounded run)."""
        raise NotImplementedError

    def joiner_state(self) -> bytes:
        raise NotImplementedError

    def safe_offsets(self) -> dict[int, int]:
        """Per partition, the offset below which every event was acknowledged or dead-lettered."""
        raise NotImplementedError

    def commit(self, offsets: dict[int, int]) -> None:
        """Record ``offsets`` as durable (a checkpoint covers them)."""
        raise NotImplementedError

    def figures(self) -> dict[str, float]:
        """What the loop logs at its stats cadence."""
        return {}

    # -- the training loop's side ----------------------------------------------------------------------

    def restore(self, buffer: pa.Table) -> None:
        """Examples a checkpoint held, acknowledged before the crash: trained first."""
        with self._cond:
            self._append(buffer)

    def start(self) -> None:
        if self._thread is None and not self._ended:
            self._halt.clear()
            self._thread = threading.Thread(target=self._run, name=f"moestream-{self.what}", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop reading (after the read in flight); the input is then the caller's again."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        if self._abandoned:  # stuck inside a fetch: it is a daemon, and the worker is failing anyway
            return
        thread.join(timeout_s)
        if thread.is_alive():
            raise IntakeError(f"the {self.what} thread did not stop within {timeout_s:.0f}s")

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def ended(self) -> bool:
        """The input has ended (a replayed log read to its end): nothing more will be buffered."""
        return self._ended

    def check(self) -> None:
        """Raise the thread's failure in the caller's thread, if it failed, or :class:`IntakeStalled` if one
        fetch has been running for longer than ``stall_timeout_s``."""
        if self._error is not None:
            if isinstance(self._error, IntakeStalled):
                raise self._error
            raise IntakeError(f"reading {self.what} failed: {self._error!r}") from self._error
        since, limit = self._fetch_since, self.stall_timeout_s
        if since is not None and limit is not None and self.running and time.monotonic() - since > limit:
            self._abandoned = True
            raise IntakeStalled(f"the {self.what} intake is stalled: one fetch has not returned for "
                                f"{time.monotonic() - since:.0f}s (trainer.stall_timeout_s = {limit:g})")

    def buffered(self) -> int:
        return self._rows

    def wait(self, rows: int, timeout_s: float) -> int:
        """Wait until at least ``rows`` examples are buffered, the input ends, the thread fails, or
        ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._rows < rows and self._error is None and self.running and not self._ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._rows

    def take(self, n: int) -> pa.Table:
        """Up to ``n`` buffered examples, oldest first, removed from the buffer."""
        with self._cond:
            table = pa.concat_tables(self._buffer) if self._buffer else EXAMPLE_SCHEMA.empty_table()
            batch, rest = table.slice(0, n), table.slice(n)
            self._buffer = [rest] if rest.num_rows else []
            self._rows = rest.num_rows
            self._cond.notify_all()  # room again for the thread
        return batch

    def peek(self, n: int) -> pa.Table:
        """The next ``n`` buffered examples (or fewer), left in the buffer: what a later ``take(n)`` returns
        if nothing arrives in between (the feature loop reads their features ahead of time)."""
        with self._cond:
            parts, rows = [], 0
            for table in self._buffer:
                if rows >= n:
                    break
                parts.append(table.slice(0, n - rows))
                rows += parts[-1].num_rows
            return pa.concat_tables(parts) if parts else EXAMPLE_SCHEMA.empty_table()

    def drain(self) -> None:
        """Every example still pending in the joiner into the buffer (end of a bounded run); only once the
        thread has stopped."""
        if self.running:
            raise RuntimeError("drain() needs the thread stopped")
        with self._cond:
            self._admit(self._drain())

    def capture(self) -> tuple[pa.Table, bytes, dict[int, int]]:
        """One consistent cut for a checkpoint: the buffer, the joiner's state and the safe offsets."""
        with self._cond:
            buffer = pa.concat_tables(self._buffer) if self._buffer else EXAMPLE_SCHEMA.empty_table()
            return buffer, self.joiner_state(), self.safe_offsets()

    def trained_offsets(self) -> dict[int, int]:
        """Per partition, the offset below which every example has been trained (or dead-lettered): the
        safe offsets, held back by examples still in the buffer. What a snapshot's weights cover."""
        with self._cond:
            offsets = self.safe_offsets()
            for table in self._buffer:
                if not table.num_rows:
                    continue
                for part, low in _min_offsets(table).items():
                    if part in offsets:
                        offsets[part] = min(offsets[part], low)
            return offsets

    # -- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                self._between_reads()
                with self._cond:
                    if self._rows >= self.max_buffered:  # back-pressure: the trainer is behind
                        self._cond.wait(0.1)
                        continue
                self._fetch_since = time.monotonic()
                fetched = self._fetch()  # no shared state touched while reading
                self._fetch_since = None
                if self._abandoned:
                    return
                with self._cond:
                    if fetched is None:
                        self._ended = True
                        return
                    self._admit(self._join(fetched))
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer's thread, raised there by check()
            self._error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def _between_reads(self) -> None:
        """Housekeeping on the thread before each read (a subclass's commits and lag refreshes)."""

    def _admit(self, examples: pa.Table) -> None:
        """Buffer and acknowledge (not commit): the buffer is in every checkpoint (the caller holds the lock)."""
        if examples.num_rows:
            self._append(examples)
            self._acknowledge(examples)
            self._cond.notify_all()

    def _append(self, table: pa.Table) -> None:
        if table.num_rows:
            self._buffer.append(table)
            self._rows += table.num_rows


class ExamplesSource(BufferedSource):
    """Examples already joined, handed in by the caller (tests, notebooks): :meth:`put` queues a table, and the
    input ends once the queue is read."""

    what = "examples"

    def __init__(self, tables: Iterable[pa.Table] = (), max_buffered: int = 1 << 20) -> None:
        super().__init__(max_buffered)
        self._queue: deque[pa.Table] = deque(tables)

    def put(self, examples: pa.Table) -> None:
        self._queue.append(examples)

    def _fetch(self) -> pa.Table | None:
        return self._queue.popleft() if self._queue else None

    def _join(self, fetched: pa.Table) -> pa.Table:
        return fetched

    def _drain(self) -> pa.Table:
        return EXAMPLE_SCHEMA.empty_table()

    def joiner_state(self) -> bytes:
        return b""

    def safe_offsets(self) -> dict[int, int]:
        return {}

    def commit(self, offsets: dict[int, int]) -> None:
        """Nothing to commit: the caller owns the examples."""


class Intake(BufferedSource):
    """Kafka: fetched, decoded (malformed events dead-lettered) and joined on the intake thread."""

    what = "Kafka"

    def __init__(self, stream: JoinedStream, max_buffered: int, stall_timeout_s: float = 120.0) -> None:
        super().__init__(max_buffered)
        self.stream = stream
        self.stall_timeout_s = stall_timeout_s
        self._commit_request: dict[int, int] | None = None
        self._lag: dict[int, int] = {}
        self._lag_at = 0.0
        self.stalls = 0
        """Times the watchdog found the consumer stalled (and re-joined its group)."""
        self.recoveries = 0
        """Stalls after which events arrived again."""
        self._progress = (-1, time.monotonic())  # (events consumed, when that count last changed)
        self._rejoined_at: float | None = None

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop fetching and commit a commit still pending; the stream is then the caller's again."""
        was_running = self.running
        super().stop(timeout_s)
        if was_running:
            self._commit_pending()

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit up to ``offsets`` (a durable checkpoint's): on the intake thread when it runs (it owns the
        consumer), at once otherwise."""
        with self._cond:
            if self.running:
                self._commit_request = dict(offsets)
                return
            self.stream.commit(offsets)

    def lag(self) -> dict[int, int]:
        """Per partition, messages not yet fetched, as of the thread's last look (or now, when it is not
        running)."""
        if not self.running:
            with self._cond:
                self._lag = self.stream.lag()
        return dict(self._lag)

    def joiner_state(self) -> bytes:
        return self.stream.joiner.state()

    def safe_offsets(self) -> dict[int, int]:
        return self.stream.safe_offsets()

    def figures(self) -> dict[str, float]:
        lag = self._lag
        return {"kafka/lag": float(sum(lag.values())), **{f"kafka/partition_lag/{p}": float(n) for p, n in lag.items()},
                "kafka/consumed": float(self.stream.stats.consumed),
                "joiner/pending": float(self.stream.joiner.n_pending), "kafka/stalls": float(self.stalls),
                "kafka/broker_retries": float(self.stream.source.poll_errors),
                "kafka/stall_recoveries": float(self.recoveries)}

    def _fetch(self) -> SourceBatch:
        return self.stream.source.next_batch()  # fetch, decode, dead letters: no shared state

    def _join(self, fetched: SourceBatch) -> pa.Table:
        return self.stream.absorb(fetched)

    def _drain(self) -> pa.Table:
        return self.stream.flush()

    def _acknowledge(self, examples: pa.Table) -> None:
        self.stream.ack(examples, commit=False)

    def _between_reads(self) -> None:
        self._commit_pending()
        if time.monotonic() - self._lag_at >= LAG_EVERY_S:
            self._refresh_lag()
        self._watch()

    def _watch(self) -> None:
        """The liveness watchdog (see the module docstring), between two fetches on the intake thread."""
        now, consumed = time.monotonic(), self.stream.stats.consumed
        if consumed != self._progress[0]:
            if self._rejoined_at is not None:
                self.recoveries += 1
                log.warning("moestream: Kafka intake recovered: events arrive again %.0fs after re-joining the group",
                            now - self._rejoined_at)
                self._rejoined_at = None
            self._progress = (consumed, now)
            return
        source = self.stream.source
        lag, outside = sum(self._lag.values()), source.outside_group()
        if not lag and not outside:  # idle, not stalled: nothing to read and a place in the group
            self._progress = (consumed, now)
            return
        stalled_s = now - self._progress[1]
        if stalled_s < self.stall_timeout_s:
            return
        why = "outside its consumer group" if outside else f"{lag} events waiting in its partitions"
        if self._rejoined_at is not None:
            raise IntakeStalled(f"the Kafka intake is stalled: nothing fetched for {stalled_s:.0f}s with {why}, "
                                f"and re-joining the group did not help")
        self.stalls += 1
        log.warning("moestream: Kafka intake stalled: nothing fetched for %.0fs with %s; re-joining the group",
                    stalled_s, why)
        source.rejoin()
        self._rejoined_at = now
        self._progress = (consumed, now)

    def _refresh_lag(self) -> None:
        """A broker away (restarting) leaves the last lag in place: it is a gauge, and the fetch recovers."""
        try:
            self._lag = self.stream.lag()
        except KafkaError as exc:
            if not exc.retriable:
                raise
        self._lag_at = time.monotonic()

    def _commit_pending(self) -> None:
        with self._cond:
            request, self._commit_request = self._commit_request, None
            if request is not None:
                self.stream.commit(request)


def _min_offsets(table: pa.Table) -> dict[int, int]:
    grouped = table.group_by("partition").aggregate([("offset", "min")])
    return dict(zip(grouped["partition"].to_pylist(), grouped["offset_min"].to_pylist()))


__all__ = ["BufferedSource", "ExamplesSource", "Intake", "IntakeError"]
