"""The continuous trainer: joined examples from Kafka -> online learner, acknowledging what it trained.

``TrainerWorker`` is a plain class so it can be tested and run in-process; infra wraps it in a Ray actor
(threaded, so ``stats`` and ``stop`` answer while ``run`` loops). Each training batch is acknowledged to
the :class:`~stream.joined.JoinedStream` after its step, which commits offsets only up to what has been
trained on: examples still pending in the joiner or waiting in the training buffer hold their partition
back, so a crash re-delivers them instead of losing them.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from features.store import FeatureStoreConfig, OnlineFeatures
from learner.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from learner.online import LearnerConfig, OnlineLearner
from learner.snapshots import SnapshotStore
from learner.telemetry import Telemetry, TelemetryConfig
from stream.events import EXAMPLE_SCHEMA, decode_batch, encode
from stream.joined import JoinedStream
from stream.joiner import JoinerConfig, LabelJoiner
from stream.kafka_io import KafkaConfig, ensure_topics


@dataclass(frozen=True)
class WorkerConfig:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    joiner: JoinerConfig = field(default_factory=JoinerConfig)
    features: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    snapshot_dir: Path = Path(".moestream/snapshots")
    checkpoint_dir: Path = Path(".moestream/checkpoints")
    checkpoint_every_steps: int = 10
    """Kafka offsets are committed only after a checkpoint is durable, so this bounds re-training after a crash."""
    batch_size: int = 512
    """Joined examples per training step."""
    audit_path: Path | None = None
    """Append ``partition,offset`` of every trained example here (delivery audits; off by default)."""
    device: str = "auto"
    """"auto": CUDA when this process was given a GPU, else CPU."""


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


class TrainerWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        ensure_topics(config.kafka)
        self.snapshots = SnapshotStore(config.snapshot_dir)
        self.telemetry = Telemetry(config.telemetry, run_config=_plain(asdict(config)))
        self.learner = OnlineLearner(
            config.learner,
            OnlineFeatures(config.features),
            self.snapshots,
            self.telemetry,
            device=_device(config.device),
        )
        self.checkpoints = CheckpointStore(config.checkpoint_dir)
        self.checkpoint_failures = 0
        self.last_checkpoint_error: str | None = None
        self._buffer: list[pa.Table] = []
        restored = self.checkpoints.latest()
        joiner = None
        if restored is not None:
            self.learner.restore(restored.model, restored.optimizer, restored.arrays, restored.meta["counters"])
            joiner = LabelJoiner.from_state(config.joiner, restored.joiner)
            if restored.buffer.num_rows:
                self._buffer.append(restored.buffer)  # acknowledged before the crash; trained first
        self.restored_step = restored.step if restored else None
        self.stream = JoinedStream(config.kafka, config.joiner, restored=joiner)
        self.stream.auto_commit = False  # commits follow checkpoints
        self._stop = threading.Event()
        self._running = threading.Event()
        self.started_at = time.time()

    def run(self, max_seconds: float | None = None) -> dict:
        """Train until :meth:`stop` (or ``max_seconds``); on the way out, train on everything pending."""
        self._running.set()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self._take(self.stream.poll())
                while self._buffered() >= self.config.batch_size:
                    self._train(self.config.batch_size)
            self._take(self.stream.flush())
            while self._buffered():
                self._train(self.config.batch_size)
            self.checkpoint()
            self.learner.publish(self.stream.safe_offsets())
        finally:
            self._running.clear()
        return self.stats()

    def stop(self) -> None:
        self._stop.set()

    def is_running(self) -> bool:
        return self._running.is_set()

    def _take(self, examples: pa.Table) -> None:
        """Buffer joined examples until a full batch. They are acknowledged at once (not committed): the
        buffer is part of every checkpoint, so once a checkpoint is durable they survive a crash without
        Kafka re-delivering them, which would train them twice."""
        if examples.num_rows:
            self._buffer.append(examples)
            self.stream.ack(examples, commit=False)

    def _buffered(self) -> int:
        return sum(t.num_rows for t in self._buffer)

    def _train(self, n: int) -> None:
        table = pa.concat_tables(self._buffer)
        batch, rest = table.slice(0, n), table.slice(n)
        self._buffer = [rest] if rest.num_rows else []
        self.learner.learn(batch)
        self._audit(batch)
        if self.learner.step % self.config.checkpoint_every_steps == 0:
            self.checkpoint()
        if self.learner.snapshot_due:
            self.learner.publish(self.stream.safe_offsets())
        if self.learner.step % 10 == 0:
            lag = self.stream.lag()
            self.telemetry.log(
                {"kafka/lag": float(sum(lag.values())), "kafka/consumed": float(self.stream.stats.consumed),
                 "joiner/pending": float(self.stream.joiner.n_pending)},
                step=self.learner.step,
            )

    def _audit(self, batch: pa.Table) -> None:
        if self.config.audit_path is None:
            return
        lines = "".join(f"{p},{o}\n" for p, o in zip(batch["partition"].to_pylist(), batch["offset"].to_pylist()))
        fd = os.open(self.config.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())  # in the page cache as soon as this returns: survives SIGKILL
        finally:
            os.close(fd)

    def checkpoint(self) -> bool:
        """Write a checkpoint; only when it is durable, commit the offsets it covers. False if it failed."""
        model, optimizer, arrays, counters = self.learner.state()
        buffer = pa.concat_tables(self._buffer) if self._buffer else EXAMPLE_SCHEMA.empty_table()
        offsets = self.stream.safe_offsets()
        try:
            self.checkpoints.write(
                Checkpoint(self.learner.step, model, optimizer, arrays, self.stream.joiner.state(), buffer,
                           {"counters": counters, "offsets": {str(p): o for p, o in offsets.items()}})
            )
        except CheckpointError as exc:
            # Training goes on; nothing past the last durable checkpoint is committed, so nothing is lost.
            self.checkpoint_failures += 1
            self.last_checkpoint_error = str(exc)
            print(f"moestream: {exc}; offsets stay at the last durable checkpoint")
            return False
        self.stream.commit()
        return True

    def stats(self) -> dict:
        s = self.stream.stats
        return {
            "consumed": s.consumed,
            "dead_lettered": dict(self.stream.source.dead_letters.by_reason),
            "joiner": asdict(self.stream.joiner.stats),
            "pending": self.stream.joiner.n_pending,
            "rebalances": s.rebalances,
            "lag": self.stream.lag(),
            "steps": self.learner.step,
            "examples_trained": self.learner.examples,
            "snapshots": list(self.learner.published),
            "metrics": self.learner.metrics.summary(),
            "committed": self.stream.committed,
            "restored_step": self.restored_step,
            "checkpoint_failures": self.checkpoint_failures,
            "last_checkpoint_error": self.last_checkpoint_error,
            "wandb_dir": self.telemetry.run_dir,
            "uptime_s": time.time() - self.started_at,
        }

    def close(self) -> None:
        self.telemetry.finish()
        self.stream.close()


def _plain(obj):
    """A JSON-friendly copy of a nested config (paths as strings)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


class DirectTrainer:
    """Replay straight into the learner, without Kafka: validate -> join -> learn, in this process.

    The events go through the same decoder (invalid ones are counted, not trained), the same joiner and the
    same learner as the Kafka path; positions are the replay's own event counter.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.joiner = LabelJoiner(config.joiner)
        self.snapshots = SnapshotStore(config.snapshot_dir)
        self.telemetry = Telemetry(config.telemetry, run_config=_plain(asdict(config)))
        self.learner = OnlineLearner(
            config.learner, OnlineFeatures(config.features), self.snapshots, self.telemetry, device=_device(config.device)
        )
        self.rejected = 0
        self._position = 0
        self._buffer: list[pa.Table] = []

    def learn_events(self, events: list[dict]) -> None:
        n = len(events)
        decoded = decode_batch([encode(e) for e in events], [0] * n, range(self._position, self._position + n))
        self._position += n
        self.rejected += len(decoded.rejects)
        self.joiner.add(decoded)
        self._train(self.joiner.emit(), final=False)

    def finish(self) -> dict:
        self._train(self.joiner.flush(), final=True)
        self.learner.publish({0: self._position})
        self.telemetry.finish()
        return {
            "events": self._position,
            "rejected": self.rejected,
            "joiner": asdict(self.joiner.stats),
            "steps": self.learner.step,
            "examples_trained": self.learner.examples,
            "snapshots": list(self.learner.published),
            "metrics": self.learner.metrics.summary(),
        }

    def _train(self, examples: pa.Table, final: bool) -> None:
        if examples.num_rows:
            self._buffer.append(examples)
        table = pa.concat_tables(self._buffer) if self._buffer else None
        size = self.config.batch_size
        while table is not None and (table.num_rows >= size or (final and table.num_rows)):
            self.learner.learn(table.slice(0, size))
            table = table.slice(size)
            if self.learner.snapshot_due:
                self.learner.publish({0: self._position})
        self._buffer = [table] if table is not None and table.num_rows else []
