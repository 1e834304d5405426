"""The continuous trainer: joined examples from Kafka -> online learner, acknowledging what it trained.

``TrainerWorker`` is a plain class so it can be tested and run in-process; infra wraps it in a Ray actor
(threaded, so ``stats`` and ``stop`` answer while ``run`` loops). Joined examples are acknowledged to the
:class:`~stream.joined.JoinedStream` as they enter the training buffer, and offsets are committed only after
a checkpoint holding the model, the joiner state and that buffer is durable: impressions still pending in
the joiner hold their partition back, so a crash re-delivers them (the joiner drops the duplicates) instead
of losing them, and at most one checkpoint interval is trained twice.

Several workers (``WorkerConfig.group``) train one model data-parallel, in lockstep (see
``learner.distributed``): each reads its own partitions, a static share (rank, rank + N, ...) so that no
consumer-group rebalance can wait on a worker blocked in a collective, then all agree whether anyone has a full batch
or wants to stop, and step together, an idle worker taking a zero-weight step. Each keeps its own
checkpoints (``checkpoint_dir/rank-R``: its joiner, buffer and offsets); weights, optimizer and step are
restored by every worker from rank 0's latest checkpoint, so the group resumes with identical weights.
Only rank 0 publishes snapshots.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from features.store import FeatureStoreConfig, OnlineFeatures
from learner.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from learner.distributed import GroupConfig, GroupReducer, LocalReducer
from learner.models import FeatureEncoder
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
    group: GroupConfig | None = None
    """Data-parallel group this worker belongs to (None: it trains alone)."""


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


class TrainerWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        ensure_topics(config.kafka)
        self.snapshots = SnapshotStore(config.snapshot_dir)
        self.rank = config.group.rank if config.group else 0
        self.telemetry = Telemetry(config.telemetry, run_config=_plain(asdict(config)))
        device = _device(config.device)
        reducer = GroupReducer(config.group, torch.device(device)) if config.group else LocalReducer()
        features = config.features
        if config.group is not None and config.group.world_size > 1:
            # Feast's file offline store rewrites one Parquet file per push: several writers corrupt it.
            # A group pushes online only; offline history for point-in-time replay comes from replaying
            # the log (``moestream replay --direct``), one writer.
            features = replace(features, push_offline=False)
        self.learner = OnlineLearner(
            config.learner,
            OnlineFeatures(features),
            self.snapshots,
            self.telemetry,
            device=device,
            reducer=reducer,
        )
        grouped = config.group is not None
        self.checkpoints = CheckpointStore(config.checkpoint_dir / f"rank-{self.rank}" if grouped else config.checkpoint_dir)
        self.checkpoint_failures = 0
        self.last_checkpoint_error: str | None = None
        self._buffer: list[pa.Table] = []
        restored = self.checkpoints.latest()
        joiner = None
        if restored is not None:
            self.learner.restore(restored.model, restored.optimizer, restored.arrays, restored.meta["counters"])
            joiner = LabelJoiner.from_state(config.joiner, restored.joiner)
        leader = CheckpointStore(config.checkpoint_dir / "rank-0").latest() if grouped and self.rank else None
        if leader is not None:  # the group's weights, optimizer and step are rank 0's
            self.learner.model.load_state_dict(leader.model)
            self.learner.optimizer.load_state_dict(leader.optimizer)
            self.learner.step = leader.meta["counters"]["step"]
        self.learner.reducer.broadcast_parameters(self.learner.model)
        if restored is not None:
            if restored.buffer.num_rows:
                self._buffer.append(restored.buffer)  # acknowledged before the crash; trained first
        self.restored_step = restored.step if restored else None
        kafka = config.kafka
        if config.group is not None:  # each rank reads its own partitions: no rebalance to wait on mid-step
            kafka = replace(kafka, assign=rank_partitions(kafka.partitions, config.group.world_size, self.rank))
        self.stream = JoinedStream(kafka, config.joiner, restored=joiner)
        self.stream.auto_commit = False  # commits follow checkpoints
        self._stop = threading.Event()
        self._running = threading.Event()
        self.started_at = time.time()
        self.collisions = self.id_collisions()
        print(f"moestream: worker {self.rank}: {self.collisions}", flush=True)

    def run(self, max_seconds: float | None = None) -> dict:
        """Train until :meth:`stop` (or ``max_seconds``); on the way out, train on everything pending."""
        self._running.set()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        try:
            agree = self.learner.reducer.agree
            while True:
                stop = self._stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
                if agree([stop])[0]:  # any worker stopping stops the group at the same step
                    break
                self._take(self.stream.poll())
                while agree([self._buffered() >= self.config.batch_size])[0]:
                    self._train(self.config.batch_size)
            self._take(self.stream.flush())
            while agree([self._buffered() > 0])[0]:
                self._train(self.config.batch_size)
            self.checkpoint()
            if self.rank == 0:
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
        """One (group) step on up to ``n`` buffered examples: fewer, or none, when this worker has fewer."""
        table = pa.concat_tables(self._buffer) if self._buffer else EXAMPLE_SCHEMA.empty_table()
        batch, rest = table.slice(0, n), table.slice(n)
        self._buffer = [rest] if rest.num_rows else []
        self.learner.learn(batch)
        self._audit(batch)
        if self.learner.step % self.config.checkpoint_every_steps == 0:
            self.checkpoint()
        if self.learner.snapshot_due and self.rank == 0:
            self.learner.publish(self.stream.safe_offsets())
        if self.learner.step % 100 == 0:
            self.collisions = self.id_collisions()
        if self.learner.step % 10 == 0:
            lag = self.stream.lag()
            self.telemetry.log(
                {"kafka/lag": float(sum(lag.values())), "kafka/consumed": float(self.stream.stats.consumed),
                 "joiner/pending": float(self.stream.joiner.n_pending)},
                step=self.learner.step,
            )

    def id_collisions(self) -> IdCollisions:
        """Hash collisions among the user and item ids this worker has seen (the aggregates hold them)."""
        agg = self.learner.aggregator.state()
        return id_collisions(self.learner.model.encoder, {"user_id": agg["users.ids"], "item_id": agg["items.ids"]})

    def _audit(self, batch: pa.Table) -> None:
        if self.config.audit_path is None or not batch.num_rows:
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
            "rank": self.rank,
            "pid": os.getpid(),
            "id_buckets": self.collisions.n_buckets,
            "id_collision_rate": self.collisions.rate,
            "id_keys": self.collisions.n_keys,
            "last_checkpoint_error": self.last_checkpoint_error,
            "wandb_dir": self.telemetry.run_dir,
            "uptime_s": time.time() - self.started_at,
        }

    def close(self) -> None:
        self.telemetry.finish()
        self.stream.close()
        self.learner.reducer.close()


@dataclass(frozen=True)
class IdCollisions:
    n_keys: int
    """Distinct (field, id) keys seen."""
    n_buckets: int
    occupied: int
    rate: float
    """Fraction of keys that share their bucket with at least one other key."""
    expected_rate: float
    """``1 - exp(-n_keys / n_buckets)``: the rate a uniform hash gives (``learner/models/encoder.py``)."""

    def __str__(self) -> str:
        return (f"hashed ids: {self.n_keys:,} keys in {self.n_buckets:,} buckets, collision rate {self.rate:.2%} "
                f"(uniform hashing: {self.expected_rate:.2%})")


def id_collisions(encoder: FeatureEncoder, ids: dict[str, np.ndarray]) -> IdCollisions:
    """Collision rate of the hashed embedding table over the given ids per field (e.g. all ids seen)."""
    n = max((len(v) for v in ids.values()), default=0)
    if n == 0:
        return IdCollisions(0, encoder.n_buckets, 0, 0.0, 0.0)
    device = encoder.salts.device
    buckets = []
    for field_name, values in ids.items():  # one field at a time: the others are padded with a fixed id
        column = {f: torch.zeros(len(values), dtype=torch.int64, device=device) for f in encoder.id_fields}
        column[field_name] = torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)
        buckets.append(encoder.buckets(column)[:, encoder.id_fields.index(field_name)])
    all_buckets = torch.cat(buckets)
    _, inverse, counts = torch.unique(all_buckets, return_inverse=True, return_counts=True)
    n_keys = int(all_buckets.numel())
    rate = float((counts[inverse] > 1).float().mean())
    expected = 1.0 - float(np.exp(-n_keys / encoder.n_buckets))
    return IdCollisions(n_keys, encoder.n_buckets, int(counts.numel()), rate, expected)


def rank_partitions(n_partitions: int, world_size: int, rank: int) -> tuple[int, ...]:
    """The partitions rank ``rank`` of ``world_size`` reads: every ``world_size``-th, starting at its rank."""
    if world_size > n_partitions:
        raise ValueError(f"kafka.partitions ({n_partitions}) must be at least the number of workers ({world_size})")
    return tuple(range(rank, n_partitions, world_size))


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
