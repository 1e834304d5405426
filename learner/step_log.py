"""Where each training step's time went: a bounded log of the latest steps, phase by phase.

A trainer's freshness is the sum of what every step between an event's arrival and the version covering it cost.
The averages (``time/step_s`` in W&B, the publish times) hide the one step that took seconds; this log keeps the
latest :data:`CAPACITY` steps whole, so a benchmark (``bench freshness``) can read what the training thread did
at the moment freshness rose: which step, which phase, and how long it waited for its batch before it.

Columns (seconds, but ``at``: the step's start as wall time, and ``rows``): ``waited`` (from the end of the step
before to this one's start: the source had no full batch, or the loop was between steps), then one per phase of
:meth:`learner.loop.TrainingLoop.step` (:data:`PHASES`), and ``total`` (the step's wall time, phases included).
"""

from __future__ import annotations

import threading
import time

import numpy as np

PHASES = ("read", "fold", "learn", "observe", "report", "checkpoint", "publish", "figures")
COLUMNS = ("at", "waited", *PHASES, "total", "rows")
CAPACITY = 1 << 16
"""Steps kept: at 50 steps a second, the last 20 minutes."""


class StepLog:
    """A ring of the latest steps' :data:`COLUMNS`, one float64 row per step, written by the training thread and
    read from any (a read copies the rows under a lock)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._rows = np.zeros((capacity, len(COLUMNS)), dtype=np.float64)
        self._written = 0
        self._last_end: float | None = None  # perf_counter at the end of the step before
        self._phase_start = self._step_start = 0.0
        self._row: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(self._written, len(self._rows))

    def start(self) -> None:
        """A step begins: its wall time, and how long since the last one ended."""
        now = time.perf_counter()
        row = np.zeros(len(COLUMNS))
        row[0] = time.time()
        row[1] = now - self._last_end if self._last_end is not None else 0.0
        self._row, self._phase_start, self._step_start = row, now, now

    def phase(self, name: str) -> None:
        """The phase ``name`` (one of :data:`PHASES`) ended now; its time is added to the step's."""
        if self._row is None:
            return
        now = time.perf_counter()
        self._row[2 + PHASES.index(name)] += now - self._phase_start
        self._phase_start = now

    def end(self, rows: int) -> None:
        """The step ended: it is kept (the oldest is overwritten once the ring is full)."""
        if self._row is None:
            return
        now = time.perf_counter()
        self._row[-2], self._row[-1] = now - self._step_start, rows
        with self._lock:
            self._rows[self._written % len(self._rows)] = self._row
            self._written += 1
        self._last_end, self._row = now, None

    def since(self, wall_time: float = 0.0) -> dict[str, list[float]]:
        """The kept steps that started at or after ``wall_time``, oldest first, column by column."""
        with self._lock:
            n, capacity = len(self), len(self._rows)
            kept = self._rows[np.arange(self._written - n, self._written) % capacity]
        kept = kept[kept[:, 0] >= wall_time]
        return {name: kept[:, i].tolist() for i, name in enumerate(COLUMNS)}


__all__ = ["CAPACITY", "COLUMNS", "PHASES", "StepLog"]
