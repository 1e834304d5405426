"""Joined examples read ahead of the trainer: Kafka is fetched, decoded and joined on a thread of its own.

A training step spends most of its time in torch kernels, which release the GIL, and a Kafka fetch mostly
waits on the network; done one after the other, the model idles while the next batch is fetched, decoded
and joined, and the fetch idles while the model steps. :class:`Intake` overlaps them: its thread owns the
Kafka consumer (kafka-python's consumer is not thread-safe: every fetch, commit and lag query happens on
that thread), joins what it fetches and appends the examples to a buffer the trainer takes batches from.

Delivery stays as in :mod:`learner.worker`: examples are acknowledged as they enter the buffer, the buffer is
part of every checkpoint, and offsets are committed only up to what a durable checkpoint covered. The
trainer captures the buffer, the joiner state and the safe offsets under one lock (:meth:`Intake.capture`),
writes the checkpoint, then hands exactly those offsets to :meth:`Intake.commit`: examples that entered the
buffer after the capture are not in the checkpoint, so they must not be committed yet. The buffer is bounded
(``max_buffered`` rows): the thread stops fetching while it is full.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa
from kafka.errors import KafkaError

from stream.events import EXAMPLE_SCHEMA
from stream.joined import JoinedStream

LAG_EVERY_S = 1.0
"""How often the intake thread refreshes the consumer lag it reports (a broker round trip)."""


class IntakeError(RuntimeError):
    """The intake thread failed (a Kafka or decoding error it could not handle); its cause is chained."""


class Intake:
    def __init__(self, stream: JoinedStream, max_buffered: int) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be positive, got {max_buffered}")
        self.stream = stream
        self.max_buffered = max_buffered
        self._buffer: list[pa.Table] = []
        self._rows = 0
        self._cond = threading.Condition()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._commit_request: dict[int, int] | None = None
        self._error: BaseException | None = None
        self._lag: dict[int, int] = {}
        self._lag_at = 0.0

    # -- the trainer's side ------------------------------------------------------------------------------

    def restore(self, buffer: pa.Table) -> None:
        """Examples a checkpoint held, acknowledged before the crash: trained first."""
        with self._cond:
            self._append(buffer)

    def start(self) -> None:
        if self._thread is None:
            self._halt.clear()
            self._thread = threading.Thread(target=self._run, name="moestream-intake", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop fetching (after the fetch in flight) and commit a commit still pending; the stream is
        then the caller's again."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        thread.join(timeout_s)
        if thread.is_alive():
            raise IntakeError(f"the intake thread did not stop within {timeout_s:.0f}s")
        self._commit_pending()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def check(self) -> None:
        """Raise the intake thread's failure in the caller's thread, if it failed."""
        if self._error is not None:
            raise IntakeError(f"reading Kafka failed: {self._error!r}") from self._error

    def buffered(self) -> int:
        return self._rows

    def wait(self, rows: int, timeout_s: float) -> int:
        """Wait until at least ``rows`` examples are buffered, the thread fails, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._rows < rows and self._error is None and self.running:
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
            self._cond.notify_all()  # room again for the intake thread
        return batch

    def peek(self, n: int) -> pa.Table:
        """The next ``n`` buffered examples (or fewer), left in the buffer: what a later ``take(n)`` will
        return if nothing arrives in between (the learner looks up their features ahead of time)."""
        with self._cond:
            parts, rows = [], 0
            for table in self._buffer:
                if rows >= n:
                    break
                parts.append(table.slice(0, n - rows))
                rows += parts[-1].num_rows
            return pa.concat_tables(parts) if parts else EXAMPLE_SCHEMA.empty_table()

    def flush(self) -> None:
        """Every impression still pending in the joiner into the buffer (end of a bounded run); only once
        the thread has stopped."""
        if self.running:
            raise RuntimeError("flush() needs the intake thread stopped")
        with self._cond:
            self._take(self.stream.flush())

    def capture(self) -> tuple[pa.Table, bytes, dict[int, int]]:
        """One consistent cut for a checkpoint: the buffer, the joiner's state and the safe offsets."""
        with self._cond:
            buffer = pa.concat_tables(self._buffer) if self._buffer else EXAMPLE_SCHEMA.empty_table()
            return buffer, self.stream.joiner.state(), self.stream.safe_offsets()

    def trained_offsets(self) -> dict[int, int]:
        """Per partition, the offset below which every example has been trained (or dead-lettered): the
        safe offsets, held back by examples still in the buffer. What a snapshot's weights cover."""
        with self._cond:
            offsets = self.stream.safe_offsets()
            for table in self._buffer:
                if not table.num_rows:
                    continue
                for part, low in _min_offsets(table).items():
                    if part in offsets:
                        offsets[part] = min(offsets[part], low)
            return offsets

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit up to ``offsets`` (a durable checkpoint's): on the intake thread when it runs (it owns
        the consumer), at once otherwise."""
        with self._cond:
            if self.running:
                self._commit_request = dict(offsets)
                return
            self.stream.commit(offsets)

    def lag(self) -> dict[int, int]:
        """Per partition, messages not yet fetched, as of the intake thread's last look (or now, when it
        is not running)."""
        if not self.running:
            with self._cond:
                self._lag = self.stream.lag()
        return dict(self._lag)

    # -- the intake thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                self._commit_pending()
                if time.monotonic() - self._lag_at >= LAG_EVERY_S:
                    self._refresh_lag()
                with self._cond:
                    if self._rows >= self.max_buffered:  # back-pressure: the trainer is behind
                        self._cond.wait(0.1)
                        continue
                batch = self.stream.source.next_batch()  # fetch, decode, dead letters: no shared state
                with self._cond:
                    self._take(self.stream.absorb(batch))
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer's thread, raised there by check()
            self._error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

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

    def _take(self, examples: pa.Table) -> None:
        """Buffer and acknowledge (not commit): the buffer is in every checkpoint (the caller holds the lock)."""
        if examples.num_rows:
            self._append(examples)
            self.stream.ack(examples, commit=False)
            self._cond.notify_all()

    def _append(self, table: pa.Table) -> None:
        if table.num_rows:
            self._buffer.append(table)
            self._rows += table.num_rows


def _min_offsets(table: pa.Table) -> dict[int, int]:
    grouped = table.group_by("partition").aggregate([("offset", "min")])
    return dict(zip(grouped["partition"].to_pylist(), grouped["offset_min"].to_pylist()))


__all__ = ["Intake", "IntakeError"]
