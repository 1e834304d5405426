"""A base written beside training, so that compaction never stops the stream for the seconds a whole model takes.

When a chain is due a new base (``SnapshotStore.base_due``), the training loop publishes its delta as usual and
then hands :meth:`BaseBeside.start` the learner's copies of that very version (``Learner.capture``: memory copies
on the training thread, no sort, no serialisation). A thread of its own orders the maps, serialises, hashes and
writes the payload under a temporary name (``SnapshotStore.write_pending``) while training and delta publishing go
on along the old chain (the thread runs at a lower priority: ``WRITER_NICE``); each delta published meanwhile is kept (:meth:`BaseBeside.published`). Once the payload is
written, the next publish makes it a version together with :meth:`BaseBeside.catch_up`, the composition of those
deltas and the change since the last of them (``learner.delta.compose``): base and delta go out as one publish
(``SnapshotStore.publish_beside``), ``LATEST`` straight to the delta. A replica whose model went through the
version the base holds applies that delta in place and never reads the base (``serving.weights``); a cold one
loads the base and its chain as ever.

Without it, a base of a model with 10^7 ids held the training thread for about 9 s (docs/telemetry.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

from learner.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from learner.delta import Delta, compose
from learner.priority import lower_thread_priority
from learner.snapshots import Manifest, PendingBase, SnapshotError, SnapshotStore


T = TypeVar("T")


class Captured(Generic[T]):
    """State of one moment taken on the training thread as snapshots (``Learner.capture``): calling it copies the
    state (once, on any thread); :meth:`release` when it will never be called, or the tables and maps would go on
    keeping every row they write for it. Releasing after the copy does nothing."""

    def __init__(self, copy: Callable[[], T], release: Callable[[], None]) -> None:
        self._copy, self.release = copy, release

    def __call__(self) -> T:
        return self._copy()


SPANS_KEPT = 100
"""Checkpoint writes whose start and end :attr:`CheckpointBeside.spans` keeps."""
WRITER_NICE = 10
"""Steps of niceness the writing thread adds to the trainer's own (``learner.priority``): training, the consumers and
serving come first, the base takes longer. Inside a Ray worker, at niceness 15, the writer runs at 19."""


def _lower_priority() -> None:
    """The calling thread yields the CPU to the others of its machine (``learner.priority``)."""
    lower_thread_priority(WRITER_NICE)


class BaseBeside:
    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="moestream-base")
        self._job: Future[PendingBase] | None = None
        self._deltas: list[Delta] = []
        self.seconds: float | None = None
        """How long the last base took to write, on its own thread."""
        self.failures = 0
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        """A base is being written, or written and waiting for its catch-up delta."""
        return self._job is not None

    def start(self, assemble: Captured[dict[str, torch.Tensor]], same_as: Manifest) -> None:
        """Write ``assemble()`` (the state of published version ``same_as``) on the writing thread; ``assemble`` is
        released if it cannot be."""
        try:
            if self._job is not None:
                raise RuntimeError("a base is already being written beside training")
            self._deltas = []
            self._job = self._writer.submit(self._write, assemble, same_as)
        except BaseException:
            assemble.release()
            raise

    def _write(self, assemble: Captured[dict[str, torch.Tensor]], same_as: Manifest) -> PendingBase:
        try:
            _lower_priority()
            started = time.perf_counter()
            pending = self.store.write_pending(assemble(), same_as)
        finally:
            assemble.release()
        self.seconds = time.perf_counter() - started
        return pending

    def published(self, delta: Delta) -> None:
        """A delta went out on the old chain while the base was written: the catch-up delta must carry it."""
        if self._job is not None:
            self._deltas.append(delta)

    def ready(self) -> PendingBase | None:
        """The base written, once it is; None while it is being written. A write that failed is logged, counted
        and given up: the chain goes on, and the next publish starts another."""
        if self._job is None or not self._job.done():
            return None
        try:
            return self._job.result()
        except (SnapshotError, OSError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            print(f"moestream: a base written beside training failed ({exc}); the chain goes on", flush=True)
            self._job, self._deltas = None, []
            return None

    def catch_up(self, current: Delta) -> Delta:
        """The change from the base's version to now: every delta published since, then ``current``."""
        return compose([*self._deltas, current])

    def finish(self, pending: PendingBase, published: bool) -> None:
        """The base went out with its catch-up delta (``published``), or is given up (its file removed)."""
        if not published:
            self.store.discard_pending(pending)
        self._job, self._deltas = None, []

    def abandon(self) -> None:
        """Give up the base being written, without waiting for it: its file goes once it is written (a rollback
        moved the chain it would continue, or the run ends: a restarted trainer publishes a base first anyway)."""
        job, self._job, self._deltas = self._job, None, []
        if job is not None:
            job.add_done_callback(self._discard)

    def _discard(self, job: Future[PendingBase]) -> None:
        if not job.cancelled() and job.exception() is None:
            self.store.discard_pending(job.result())

    def close(self) -> None:
        """Give up a base still being written and wait for its thread."""
        self.abandon()
        self._writer.shutdown()


class CheckpointBeside:
    """A checkpoint written beside training: the training loop captures the state (``Learner.capture_state``: the
    tables as snapshots, copies of the rest) and this writes it on a thread of its own, at ``WRITER_NICE``, while
    training goes on; the offsets it covers are committed only once :meth:`done` says it is durable. One at a
    time: a checkpoint due while one is being written waits for it (``learner.loop``).

    Without it, a checkpoint of a model with 10^7 live IDs held the training thread for seconds, every
    ``learner.cadence.checkpoint_every_steps`` steps (docs/learner.md has the figures)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="moestream-checkpoint")
        self._job: Future[dict[int, int]] | None = None
        self.seconds: float | None = None
        """How long the last checkpoint took to write, on its own thread."""
        self.spans: deque[tuple[float, float]] = deque(maxlen=SPANS_KEPT)
        """When the latest checkpoints' writes began and ended (wall time), oldest first."""

    @property
    def running(self) -> bool:
        """A checkpoint is being written, or written and not yet collected by :meth:`done`."""
        return self._job is not None

    def start(self, assemble: Captured[T], rest: Callable[[T], Checkpoint], offsets: dict[int, int]) -> None:
        """Write ``rest(assemble())`` on the writing thread; ``offsets``: what it covers, once durable. ``assemble``
        is released if it cannot be."""
        try:
            if self._job is not None:
                raise RuntimeError("a checkpoint is already being written beside training")
            self._job = self._writer.submit(self._write, assemble, rest, offsets)
        except BaseException:
            assemble.release()
            raise

    def _write(self, assemble: Captured[T], rest: Callable[[T], Checkpoint],
               offsets: dict[int, int]) -> dict[int, int]:
        try:
            _lower_priority()
            started, began = time.perf_counter(), time.time()
            self.store.write(rest(assemble()))
        finally:
            assemble.release()
        self.seconds = time.perf_counter() - started
        self.spans.append((began, time.time()))
        return offsets

    def done(self, wait: bool = False) -> dict[int, int] | None:
        """The offsets the checkpoint covers once it is durable (collected: the next may start); None while it is
        being written (``wait``: waits for it) or when none is. Raises :class:`CheckpointError` for one that
        failed (collected too)."""
        job = self._job
        if job is None or not (wait or job.done()):
            return None
        self._job = None
        try:
            return job.result()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a copy that failed is a checkpoint that failed, not a crash
            raise CheckpointError(f"the checkpoint written beside training failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Wait for a checkpoint still being written (it is whole or absent, never half) and stop the thread."""
        self._writer.shutdown(wait=True)


__all__ = ["BaseBeside", "Captured", "CheckpointBeside"]
