"""The continuous trainer: the training loop (``learner.loop``) over Kafka, and how its parts are put together.

:func:`compose` builds the parts every run has, whatever its source: the predict-then-learn step
(``learner.step``), the feature loop (``learner.feature_loop``), the reporter (``learner.reporter``), the
checkpoint store and W&B, restoring the last checkpoint into them. :class:`TrainerWorker` adds the Kafka
source (``learner.intake``); direct replay (``learner.replay_source``) adds a log file instead.

``TrainerWorker`` is a plain class so it can be tested and run in-process; infra wraps it in a Ray actor
(threaded, so ``stats`` and ``stop`` answer while ``run`` loops). Joined examples are acknowledged as they
enter the training buffer, and offsets are committed only after a checkpoint holding the model, the joiner
state and that buffer is durable: impressions still pending in the joiner hold their partition back, so a
crash re-delivers them (the joiner drops the duplicates) instead of losing them, and what is trained twice is at
most what was trained after the last durable checkpoint (a worker alone writes its checkpoints beside training:
``learner.beside.CheckpointBeside``). A resumed worker skips what Kafka delivers again below its checkpoint's
offsets, in case the crash came between the checkpoint and the commit of its offsets.

Several workers (``WorkerConfig.group``) train one model data-parallel in lockstep (``learner.loop``): each
reads its own partitions, a static share (rank, rank + N, ...), so that no consumer-group rebalance can wait
on a worker blocked in a collective. Each keeps its own checkpoints (``checkpoint_dir/rank-R``), all at the
same steps; only rank 0 publishes snapshots.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from features.redact import redact_connection
from features.store import OnlineFeatures
from learner.allocator import retain_freed_memory
from learner.checkpoint import Checkpoint, CheckpointStore, restore_point
from learner.config import WorkerConfig
from learner.distributed import GroupReducer, LocalReducer, Reducer
from learner.feature_loop import FeatureLoop
from learner.intake import BufferedSource, Intake
from learner.loop import TrainingLoop
from learner.reporter import Reporter
from learner.snapshots import SnapshotStore
from learner.step import Learner
from learner.telemetry import Telemetry, TelemetryConfig
from stream.joined import JoinedStream
from stream.joiner import LabelJoiner
from stream.kafka_io import ensure_topics

SourceFactory = Callable[[Checkpoint | None], BufferedSource]
"""Builds a run's source, given the checkpoint being resumed (its joiner state and buffer), if any."""


def compose(config: WorkerConfig, source: SourceFactory, reducer: Reducer | None = None,
            checkpoints: bool = True) -> TrainingLoop:
    """The training loop of one worker over the source ``source`` builds, resumed from the last checkpoint."""
    retain_freed_memory()  # a step re-allocates the same buffers: keep them instead of page-faulting
    torch.set_num_threads(config.torch_threads or max(1, len(os.sched_getaffinity(0)) - 1))
    device = _device(config.device)
    reducer = reducer or LocalReducer()
    grouped = config.group is not None
    features = config.features
    if grouped and config.group.world_size > 1:
        # Feast's file offline store rewrites one Parquet file per push: several writers corrupt it. A group
        # pushes online only; offline history for point-in-time replay comes from replaying the log.
        features = replace(features, push_offline=False)
    telemetry = Telemetry(_rank_telemetry(config.telemetry, reducer.rank), run_config=run_config(config))
    learner = Learner(config.learner, list(ID_FIELDS), len(FEATURE_COLUMNS), device, reducer)
    online = OnlineFeatures(features)
    if reducer.rank == 0 and (features.static_users or features.static_items):
        online.load_static(features.static_users, features.static_items)  # the others wait at the first collective
    feature_loop = FeatureLoop(online, reducer, features.aggregates, codes=learner.code_fields)
    publish = config.learner.publish
    snapshots = SnapshotStore(config.snapshot_store, keep=publish.keep_bases, max_deltas=publish.max_deltas,
                              delta_fraction=publish.max_delta_fraction)
    weights = None
    if config.weight_store is not None and reducer.rank == 0:
        from learner.weight_store import weight_store_if_ray

        weights = weight_store_if_ray(config.weight_store)  # direct replay outside Ray: the durable store only
    reporter = Reporter(config.learner, learner.multitask, snapshots, telemetry, writes_health=reducer.rank == 0,
                        health_dir=config.snapshot_dir.parent / "health", weight_store=weights)
    store = None
    if checkpoints:
        store = CheckpointStore(config.checkpoint_dir / f"rank-{reducer.rank}" if grouped else config.checkpoint_dir)
    restored = restore_point(store, config.checkpoint_dir if grouped else None, reducer.world_size) if store else None
    loop = TrainingLoop(learner, features=feature_loop, reporter=reporter, source=source(restored),
                        checkpoints=store, cadence=config.learner.cadence, batch_size=config.batch_size,
                        telemetry=telemetry, group_dir=config.checkpoint_dir if grouped else None,
                        wait_s=config.kafka.max_wait_ms / 1000, audit_path=config.audit_path)
    if restored is not None:
        loop.resume(restored)
    reducer.broadcast_parameters(learner.model)
    return loop


class TrainerWorker:
    """The training loop over this worker's Kafka partitions."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.rank = config.group.rank if config.group else 0
        ensure_topics(config.kafka)
        device = torch.device(_device(config.device))
        reducer = GroupReducer(config.group, device) if config.group else LocalReducer()
        self.stream: JoinedStream | None = None
        self.restored_step: int | None = None
        self.loop = compose(config, self._intake, reducer)
        self.started_at = time.time()

    def _intake(self, restored: Checkpoint | None) -> Intake:
        config, kafka = self.config, self.config.kafka
        if config.group is not None:  # each rank reads its own partitions: no rebalance to wait on mid-step
            kafka = replace(kafka, assign=rank_partitions(kafka.partitions, config.group.world_size, self.rank))
        joiner = LabelJoiner.from_state(config.joiner, restored.joiner) if restored is not None else None
        resume_from = {int(p): int(o) for p, o in restored.meta.get("offsets", {}).items()} if restored is not None else None
        self.stream = JoinedStream(kafka, config.joiner, restored=joiner, resume_from=resume_from)
        self.stream.auto_commit = False  # commits follow checkpoints
        intake = Intake(self.stream, max_buffered=config.read_ahead_batches * config.batch_size,
                        stall_timeout_s=config.stall_timeout_s)
        if restored is not None:
            intake.restore(restored.buffer)  # acknowledged before the crash; trained first
            self.restored_step = restored.step
        return intake

    def run(self, max_seconds: float | None = None) -> dict:
        """Train until :meth:`stop` (or ``max_seconds``); on the way out, train on everything pending."""
        self.loop.run(max_seconds)
        return self.stats()

    def stop(self) -> None:
        self.loop.stop()

    def is_running(self) -> bool:
        return self.loop.is_running()

    def stats(self) -> dict:
        s = self.stream.stats
        return {
            **self.loop.stats(),
            "consumed": s.consumed,
            "dead_lettered": dict(self.stream.source.dead_letters.by_reason),
            "joiner": asdict(self.stream.joiner.stats),
            "pending": self.stream.joiner.n_pending,
            "rebalances": s.rebalances,
            "below_checkpoint": s.below_checkpoint,  # read again below the resumed checkpoint's offsets, skipped
            "broker_retries": self.stream.source.poll_errors,
            "intake_stalls": self.loop.source.stalls,
            "intake_stall_recoveries": self.loop.source.recoveries,
            "lag": self.loop.source.lag(),
            "committed": self.stream.committed,
            "restored_step": self.restored_step,
            "pid": os.getpid(),
            "uptime_s": time.time() - self.started_at,
        }

    def steps(self, since: float = 0.0) -> dict[str, list[float]]:
        """See :meth:`TrainingLoop.steps`."""
        return self.loop.steps(since)

    def close(self) -> None:
        self.loop.close()
        self.stream.close()
        self.loop.reducer.close()


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def rank_partitions(n_partitions: int, world_size: int, rank: int) -> tuple[int, ...]:
    """The partitions rank ``rank`` of ``world_size`` reads: every ``world_size``-th, starting at its rank."""
    if world_size > n_partitions:
        raise ValueError(f"kafka.partitions ({n_partitions}) must be at least the number of workers ({world_size})")
    return tuple(range(rank, n_partitions, world_size))


def _rank_telemetry(config: TelemetryConfig, rank: int) -> TelemetryConfig:
    """Rank 0 writes the run history ``moestream report`` draws; every other rank a file of its own beside it."""
    if rank == 0 or config.history is None:
        return config
    return replace(config, history=config.history.with_name(f"{config.history.stem}.rank-{rank}.jsonl"))


def run_config(config: WorkerConfig) -> dict:
    """The whole configuration as plain JSON for the W&B run (every run reproducible from its log), paths as
    strings and a Redis password masked."""
    return _plain(asdict(config))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: redact_connection(v) if k == "redis_connection" and isinstance(v, str) else _plain(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return str(obj) if isinstance(obj, os.PathLike) else obj


__all__ = ["TrainerWorker", "compose", "rank_partitions", "run_config"]
