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
checkpoints (``checkpoint_dir/rank-R``: weights, optimizer, its joiner, buffer and offsets), all at the same
steps. A group commits offsets only once every worker's checkpoint of a step is durable and rank 0 has
recorded that step in ``checkpoint_dir/GROUP``; a restarted group restores that step on every worker, so
the workers resume with identical weights and none from offsets past what its peers can restore. Only
rank 0 publishes snapshots.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import torch

from features.store import FeatureStoreConfig, OnlineFeatures
from learner.allocator import retain_freed_memory
from learner.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from learner.distributed import GroupConfig, GroupReducer, LocalReducer
from learner.intake import Intake
from learner.models import FeatureEncoder
from learner.online import LearnerConfig, OnlineLearner
from learner.snapshots import SnapshotStore, write_atomic
from learner.telemetry import Telemetry, TelemetryConfig
from stream.events import decode_batch, encode
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
    read_ahead_batches: int = 4
    """How many batches the intake thread may buffer ahead of training (``learner.intake``)."""
    audit_path: Path | None = None
    """Append ``partition,offset`` of every trained example here (delivery audits; off by default)."""
    device: str = "auto"
    """"auto": CUDA when this process was given a GPU, else CPU."""
    torch_threads: int = 0
    """Intra-op threads for training; 0: every core this process may run on. Ray starts an actor with
    ``OMP_NUM_THREADS`` set to its CPU reservation (1 for the trainer), which would leave the other cores of a
    small machine idle while the model steps."""
    group: GroupConfig | None = None
    """Data-parallel group this worker belongs to (None: it trains alone)."""


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


class TrainerWorker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        retain_freed_memory()  # a step re-allocates the same buffers: keep them instead of page-faulting
        torch.set_num_threads(config.torch_threads or len(os.sched_getaffinity(0)))
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
        restored = self._restore_point()
        joiner = None
        if restored is not None:
            self.learner.restore(restored.model, restored.optimizer, restored.arrays, restored.meta["counters"])
            joiner = LabelJoiner.from_state(config.joiner, restored.joiner)
        self.learner.reducer.broadcast_parameters(self.learner.model)
        self.restored_step = restored.step if restored else None
        kafka = config.kafka
        if config.group is not None:  # each rank reads its own partitions: no rebalance to wait on mid-step
            kafka = replace(kafka, assign=rank_partitions(kafka.partitions, config.group.world_size, self.rank))
        self.stream = JoinedStream(kafka, config.joiner, restored=joiner)
        self.stream.auto_commit = False  # commits follow checkpoints
        self.intake = Intake(self.stream, max_buffered=config.read_ahead_batches * config.batch_size)
        if restored is not None:
            self.intake.restore(restored.buffer)  # acknowledged before the crash; trained first
        self._stop = threading.Event()
        self._running = threading.Event()
        self.started_at = time.time()
        self.collisions = self.id_collisions()
        print(f"moestream: worker {self.rank}: {self.collisions}", flush=True)

    def run(self, max_seconds: float | None = None) -> dict:
        """Train until :meth:`stop` (or ``max_seconds``); on the way out, train on everything pending.

        Kafka is read ahead on the intake thread (``learner.intake``) while this thread trains."""
        self._running.set()
        deadline = time.monotonic() + max_seconds if max_seconds else None
        batch = self.config.batch_size
        wait_s = self.config.kafka.max_wait_ms / 1000
        try:
            agree = self.learner.reducer.agree
            self.intake.start()
            while True:
                self.intake.check()
                stop = self._stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
                if agree([stop])[0]:  # any worker stopping stops the group at the same step
                    break
                self.intake.wait(batch, wait_s)
                while agree([self.intake.buffered() >= batch])[0]:
                    self._train(batch)
            self.intake.stop()
            self.intake.check()
            self.intake.flush()
            while agree([self.intake.buffered() > 0])[0]:
                self._train(batch)
            self.checkpoint()
            if self.rank == 0:
                self.learner.publish(self.intake.trained_offsets())
            self.learner.refresh_summary()
            self.collisions = self.id_collisions()
        finally:
            self.intake.stop()
            self._running.clear()
        return self.stats()

    def stop(self) -> None:
        self._stop.set()

    def is_running(self) -> bool:
        return self._running.is_set()

    def _train(self, n: int) -> None:
        """One (group) step on up to ``n`` buffered examples: fewer, or none, when this worker has fewer."""
        batch = self.intake.take(n)
        self.learner.learn(batch, upcoming=self.intake.peek(n))
        self._audit(batch)
        if self.learner.step % self.config.checkpoint_every_steps == 0:
            self.checkpoint()
        if self.learner.snapshot_due and self.rank == 0:
            self.learner.publish(self.intake.trained_offsets())
        if self.learner.step % 100 == 0:
            self.collisions = self.id_collisions()
        if self.learner.step % 10 == 0:
            self.telemetry.log(
                {"kafka/lag": float(sum(self.intake.lag().values())), "kafka/consumed": float(self.stream.stats.consumed),
                 "joiner/pending": float(self.stream.joiner.n_pending)},
                step=self.learner.step,
            )

    def id_collisions(self) -> IdCollisions:
        """Hash collisions among the user and item ids this worker has seen (the aggregates hold them)."""
        self.learner.wait_for_push()  # the push thread folds into the aggregates
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

    def _restore_point(self) -> Checkpoint | None:
        """Alone: the latest checkpoint. In a group: this worker's checkpoint of the last step that every
        worker made durable (``GROUP``), so that all restore the same step: the same weights, and offsets
        no worker committed past (a worker may hold a newer checkpoint that a peer never finished)."""
        if self.config.group is None:
            return self.checkpoints.latest()
        step = group_step(self.config.checkpoint_dir, self.config.group.world_size)
        if step is None:
            return None
        self.checkpoints.pinned = step
        return self.checkpoints.load(step)

    def checkpoint(self) -> bool:
        """Write a checkpoint; only when it is durable, commit the offsets it covers. False if it failed.

        In a group every worker checkpoints at the same step, and none commits until all of them have:
        the workers agree that every checkpoint is durable, rank 0 records the step in ``GROUP`` (the
        step a restart restores), they agree that this record is durable, and only then commit."""
        covered = self._write_checkpoint()
        durable = covered is not None
        if self.config.group is None:
            if covered is not None:
                self.intake.commit(covered)
            return durable
        agree = self.learner.reducer.agree
        if agree([not durable])[0]:
            return False
        recorded = True
        if self.rank == 0:
            try:
                write_group_step(self.config.checkpoint_dir, self.learner.step, self.config.group.world_size)
            except OSError as exc:
                recorded = self._checkpoint_failed(f"cannot record the group's checkpoint step: {exc}")
        if agree([not recorded])[0]:
            return False
        self.checkpoints.pinned = self.learner.step
        self.intake.commit(covered)
        return True

    def _checkpoint_failed(self, error: str) -> bool:
        # Training goes on; nothing past the last durable checkpoint is committed, so nothing is lost.
        self.checkpoint_failures += 1
        self.last_checkpoint_error = error
        print(f"moestream: {error}; offsets stay at the last durable checkpoint", flush=True)
        return False

    def _write_checkpoint(self) -> dict[int, int] | None:
        """Write a checkpoint; the offsets it covers once it is durable, None if it failed."""
        model, optimizer, arrays, counters = self.learner.state()
        buffer, joiner, offsets = self.intake.capture()
        try:
            self.checkpoints.write(
                Checkpoint(self.learner.step, model, optimizer, arrays, joiner, buffer,
                           {"counters": counters, "offsets": {str(p): o for p, o in offsets.items()}})
            )
        except CheckpointError as exc:
            self._checkpoint_failed(str(exc))
            return None
        return offsets

    def stats(self) -> dict:
        s = self.stream.stats
        return {
            "consumed": s.consumed,
            "dead_lettered": dict(self.stream.source.dead_letters.by_reason),
            "joiner": asdict(self.stream.joiner.stats),
            "pending": self.stream.joiner.n_pending,
            "rebalances": s.rebalances,
            "lag": self.intake.lag(),
            "steps": self.learner.step,
            "examples_trained": self.learner.examples,
            "skipped_steps": self.learner.skipped_steps,
            "nonfinite_features": self.learner.nonfinite_features,
            "features_read_ahead": self.learner.features_read_ahead,
            "snapshots": list(self.learner.published),
            "metrics": self.learner.summary,  # as of the last health report, publish or the end of the run
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
        self.learner.close()  # its last push lands and its last heatmap is logged before the W&B run ends
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


GROUP_FILE = "GROUP"


def group_step(checkpoint_dir: Path, world_size: int) -> int | None:
    """The last step whose checkpoint every worker of a group of ``world_size`` made durable (None: none
    yet). A group of another size cannot resume it: its workers read other partitions."""
    path = Path(checkpoint_dir) / GROUP_FILE
    try:
        record = orjson.loads(path.read_bytes())
        step, recorded = int(record["step"]), int(record["world_size"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if recorded != world_size:
        raise CheckpointError(
            f"{path}: the checkpoints were written by {recorded} workers and cannot be resumed by {world_size} "
            "(each worker's state covers its own partitions); start with a new checkpoint directory or "
            f"--workers {recorded}"
        )
    return step


def write_group_step(checkpoint_dir: Path, step: int, world_size: int) -> None:
    write_atomic(Path(checkpoint_dir) / GROUP_FILE, orjson.dumps({"step": step, "world_size": world_size}))


def rank_partitions(n_partitions: int, world_size: int, rank: int) -> tuple[int, ...]:
    """The partitions rank ``rank`` of ``world_size`` reads: every ``world_size``-th, starting at its rank."""
    if world_size > n_partitions:
        raise ValueError(f"kafka.partitions ({n_partitions}) must be at least the number of workers ({world_size})")
    return tuple(range(rank, n_partitions, world_size))


_REDIS_PASSWORD = re.compile(r"(password=)[^,]*")


def _plain(obj):
    """A JSON-friendly copy of a nested config (paths as strings) for the W&B run config, with a Redis
    password (given through the environment in ``features.redis_connection``) masked."""
    if isinstance(obj, dict):
        return {k: _REDIS_PASSWORD.sub(r"\1***", v) if k == "redis_connection" and isinstance(v, str) else _plain(v)
                for k, v in obj.items()}
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
        self.learner.close()  # the last push lands before the replay reports
        self.telemetry.finish()
        return {
            "events": self._position,
            "rejected": self.rejected,
            "joiner": asdict(self.joiner.stats),
            "steps": self.learner.step,
            "examples_trained": self.learner.examples,
            "snapshots": list(self.learner.published),
            "metrics": self.learner.refresh_summary(),
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
