"""The run history: every telemetry record of a run as JSON lines in the run directory, what ``moestream report``
draws from without W&B (an offline W&B run cannot be viewed without syncing it to an account).

One line per event, each with its wall time ``t`` (Unix seconds) and the trainer's ``step``:

    {"t": ..., "start": {"config": {...}}}                               a trainer started (or resumed)
    {"t": ..., "step": 120, "metrics": {"progressive/click/auc": ...}}   a record (``Telemetry.log``)
    {"t": ..., "step": 120, "alert": {"title": ..., "text": ..., "level": ...}}
    {"t": ..., "step": 120, "summary": {"health/anomalies": [...]}}       summary values that changed

The trainer logs its losses every step; :class:`HistorySink` writes their mean over ``loss_every_steps`` steps
instead, so the file grows with the reports, not with the steps. Lines are buffered and appended, whole, every
``flush_every_s`` seconds and when the run finishes; nothing is fsynced: a crash loses the last few seconds of
history, never the training. A file that cannot take the write (full, read-only) costs the history, not the run.

A trainer resumed from a checkpoint repeats the steps after it; :func:`read_history` keeps, for each key, the
values of the latest pass (W&B's resume does the same), so curves never step back.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

LOSS_PREFIX = "loss/"
LOSS_EVERY_STEPS = 10
FLUSH_EVERY_S = 5.0
FLUSH_BYTES = 1 << 20


class HistorySink:
    """A telemetry sink (``learner.telemetry.Sink``) appending the run history to ``path``."""

    def __init__(self, path: Path, run_config: dict, loss_every_steps: int = LOSS_EVERY_STEPS,
                 flush_every_s: float = FLUSH_EVERY_S) -> None:
        self.path = Path(path)
        self.loss_every_steps = loss_every_steps
        self.flush_every_s = flush_every_s
        self.step: int | None = None
        self._lines: list[bytes] = []
        self._buffered = 0
        self._flushed_at = time.monotonic()
        self._losses: dict[str, list[float]] = {}
        """Per loss key: the sum and count of its values since the last loss line."""
        self._losses_from: int | None = None
        self._summary: dict = {}
        self._failed = False
        if _ends_mid_line(self.path):  # a trainer killed mid-write: the start line begins a line of its own
            self._lines.append(b"\n")
        self._write({"t": time.time(), "start": {"config": run_config}})
        self.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.step = step
        losses = {k: v for k, v in metrics.items() if k.startswith(LOSS_PREFIX)}
        if losses:
            self._add_losses(losses, step)
            metrics = {k: v for k, v in metrics.items() if k not in losses}
        if metrics:
            self._write({"t": time.time(), "step": step, "metrics": metrics})

    def alert(self, title: str, text: str, level: str) -> None:
        self._write({"t": time.time(), "step": self.step, "alert": {"title": title, "text": text, "level": level}})

    def summarise(self, values: dict) -> None:
        changed = {k: v for k, v in values.items() if k not in self._summary or self._summary[k] != v}
        if changed:
            self._summary.update(changed)
            self._write({"t": time.time(), "step": self.step, "summary": changed})

    def finish(self) -> None:
        self._write_losses()
        self.flush()

    def flush(self) -> None:
        """Append the buffered lines in one write (whole lines: a reader never sees half of one)."""
        data, self._lines, self._buffered = b"".join(self._lines), [], 0
        self._flushed_at = time.monotonic()
        if not data or self._failed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            self._failed = True
            print(f"moestream: WARNING: cannot write the run history to {self.path}: {exc}; training goes on "
                  "without it", flush=True)

    def _add_losses(self, losses: dict[str, float], step: int) -> None:
        if self._losses_from is None:
            self._losses_from = step
        for key, value in losses.items():
            total = self._losses.setdefault(key, [0.0, 0])
            total[0] += value
            total[1] += 1
        if step - self._losses_from + 1 >= self.loss_every_steps:
            self._write_losses()

    def _write_losses(self) -> None:
        if self._losses:
            means = {k: total / n for k, (total, n) in self._losses.items()}
            self._write({"t": time.time(), "step": self.step, "metrics": means})
        self._losses, self._losses_from = {}, None

    def _write(self, line: dict) -> None:
        data = orjson.dumps(line, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
        self._lines.append(data)
        self._buffered += len(data)
        if self._buffered >= FLUSH_BYTES or time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # no file yet, or an empty one
        return False


@dataclass
class Series:
    """One key's values over a run: ``steps``, ``values`` (NaN where none was finite) and wall times."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def add(self, step: int, value: float, t: float) -> None:
        if self.steps and self.steps[-1] >= step:  # a resumed trainer repeats steps: the latest pass wins
            keep = bisect_left(self.steps, step)
            del self.steps[keep:], self.values[keep:], self.times[keep:]
        self.steps.append(step)
        self.values.append(value)
        self.times.append(t)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.steps, dtype=np.int64), np.asarray(self.values, dtype=np.float64)

    @property
    def last(self) -> float:
        return self.values[-1] if self.values else float("nan")


@dataclass
class Event:
    """An alert or a change of summary values, at a wall time and step."""

    t: float
    step: int | None
    data: dict


@dataclass
class History:
    """A run history as read back: a series per metric key, the alerts, summary changes and trainer starts."""

    series: dict[str, Series] = field(default_factory=dict)
    alerts: list[Event] = field(default_factory=list)
    summaries: list[Event] = field(default_factory=list)
    starts: list[Event] = field(default_factory=list)
    unreadable: int = 0
    """Lines that were not JSON (a trainer killed mid-write leaves at most one)."""

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.series if k.startswith(prefix)]

    @property
    def first_t(self) -> float | None:
        times = [s.times[0] for s in self.series.values() if s.times] + [e.t for e in self.starts]
        return min(times) if times else None

    @property
    def last_t(self) -> float | None:
        times = [s.times[-1] for s in self.series.values() if s.times] + [e.t for e in self.alerts + self.summaries]
        return max(times) if times else None

    @property
    def last_step(self) -> int | None:
        steps = [s.steps[-1] for s in self.series.values() if s.steps]
        return max(steps) if steps else None


def read_history(path: Path) -> History:
    """The history at ``path`` (see the module docstring); a missing file raises ``FileNotFoundError``."""
    history = History()
    for line in _lines(path):
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            history.unreadable += 1
            continue
        t, step = event.get("t", float("nan")), event.get("step")
        if "metrics" in event:
            for key, value in event["metrics"].items():
                if isinstance(value, (int, float)) or value is None:  # None: a NaN, as JSON writes it
                    history.series.setdefault(key, Series()).add(step, float("nan") if value is None else value, t)
        elif "alert" in event:
            history.alerts.append(Event(t, step, event["alert"]))
        elif "summary" in event:
            history.summaries.append(Event(t, step, event["summary"]))
        elif "start" in event:
            history.starts.append(Event(t, step, event["start"]))
    return history


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line


__all__ = ["Event", "History", "HistorySink", "Series", "read_history"]
