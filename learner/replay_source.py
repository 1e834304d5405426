"""Direct replay: a historical log trained by the same loop as Kafka, without Kafka.

The replay reader (``stream.replay``) hands out event tables in event-time order (Arrow, columnar: bad rows
already in the rejects file); :class:`ReplayIntake` joins them with the same label joiner as the Kafka path
and buffers the examples, on its own thread, so that parsing the next chunk overlaps the model's step. No
event becomes a Python dict or JSON on the way. Positions play the part of Kafka offsets: partition 0, the
offset of an event is its position in the replay's sorted sequence, so a snapshot's ``offsets`` say how far
into the log its weights have trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import pyarrow as pa

from learner.config import WorkerConfig
from learner.intake import BufferedSource, IntakeError
from learner.loop import TrainingLoop
from learner.worker import compose
from stream.joiner import LabelJoiner
from stream.logfile import decoded_batch
from stream.replay import LogError, ReplayConfig, ReplayResult, ReplaySource


class ReplayIntake(BufferedSource):
    what = "the log"

    def __init__(self, replay: ReplaySource, joiner: LabelJoiner, max_buffered: int) -> None:
        super().__init__(max_buffered)
        self.replay = replay
        self.joiner = joiner
        self._tables: Iterator[pa.Table] | None = None
        self.position = replay.config.resume_from.emitted
        """Events read so far (of the sorted sequence, earlier runs included): the next event's offset."""
        self.committed: dict[int, int] = {}

    def close(self) -> None:
        """End the reading (the rejects file is closed) if the loop stopped before the log's end."""
        if self._tables is not None:
            self._tables.close()

    def _fetch(self) -> pa.Table | None:
        if self._tables is None:
            self._tables = self.replay.tables()
        return next(self._tables, None)

    def _join(self, events: pa.Table) -> pa.Table:
        self.joiner.add(decoded_batch(events, self.position))
        self.position += events.num_rows
        return self.joiner.emit()

    def _drain(self) -> pa.Table:
        return self.joiner.flush()

    def joiner_state(self) -> bytes:
        return self.joiner.state()

    def safe_offsets(self) -> dict[int, int]:
        return self.joiner.safe_offsets({0: self.position})

    def commit(self, offsets: dict[int, int]) -> None:
        self.committed = dict(offsets)

    def figures(self) -> dict[str, float]:
        return {"replay/position": float(self.position), "joiner/pending": float(self.joiner.n_pending)}


def train_replay(config: WorkerConfig, replay: ReplayConfig, max_seconds: float | None = None,
                 prepare: Callable[[TrainingLoop], None] | None = None) -> tuple[ReplayResult, dict]:
    """Replay ``replay`` into a model trained with ``config``, in this process: what was replayed, and the
    training loop's figures. ``prepare`` sees the loop before it runs (a benchmark taps its scores). A log that
    turns out unreadable part-way raises ``stream.replay.LogError``."""
    started = time.monotonic()
    reader = ReplaySource(replay)  # LogError at once for a file that cannot be read as a log at all
    joiner = LabelJoiner(config.joiner)
    intake = ReplayIntake(reader, joiner, config.read_ahead_batches * config.batch_size)
    loop = compose(config, lambda restored: intake, checkpoints=False)
    if prepare is not None:
        prepare(loop)
    try:
        loop.run(max_seconds)
    except IntakeError as exc:
        if isinstance(exc.__cause__, LogError):
            raise exc.__cause__ from None
        raise
    finally:
        intake.close()
        loop.close()
    result = ReplayResult(reader.position.emitted - replay.resume_from.emitted, reader.position,
                          time.monotonic() - started, reader.schema, reader.spilled_runs, dict(reader.rejected),
                          replay.rejects_path, reader.unknown_columns)
    return result, {**loop.stats(), "joiner": asdict(joiner.stats)}


__all__ = ["ReplayIntake", "train_replay"]
