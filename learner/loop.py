"""The one training loop: a source of joined examples in, a model trained on them, everything else beside it.

Kafka training (``learner.worker``) and direct replay (``learner.replay_source``) run this loop; they differ
only in their source. One step reads like the pipeline:

    batch = source.take(n)                      # joined examples, acknowledged as they were buffered
    read = features.read(batch)                 # as the store holds them before this batch's labels
    features.fold(batch, upcoming)              # aggregates pushed while the model steps
    result = learner.learn(batch, read.dense, read.codes)  # predict, score progressively, then learn
    reporter.observe(step, result, seconds)     # losses, gates and the step's time

and the jobs beside it run at the cadences of ``learner.cadence`` (``CadenceConfig``), defined once:
checkpoints (and, once durable, the commit of the offsets they cover), snapshots, the progressive-metrics
summary with the expert-health report, and the source's own figures.

Several workers (``learner.distributed``) run the loop in lockstep: every round they agree whether anyone
has a full batch or wants to stop and step together, an idle worker taking a zero-weight step. Checkpoints
are taken at the same steps by all, and a group commits offsets only once every worker's checkpoint of a
step is durable and rank 0 has recorded that step in ``checkpoint_dir/GROUP`` (``learner.checkpoint``); a
restarted group restores that step on every worker. Only rank 0 publishes snapshots and health reports.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from learner.beside import BaseBeside, CheckpointBeside
from learner.checkpoint import Checkpoint, CheckpointError, CheckpointStore, write_group_step
from learner.collisions import IdCollisions
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.config import CadenceConfig, LearnerConfig
from learner.distributed import Reducer
from learner.feature_loop import FeatureLoop, FeatureReader
from learner.intake import BufferedSource, ExamplesSource
from learner.reporter import Reporter
from learner.snapshots import Manifest, PendingBase, SnapshotStore
from learner.step import Learner, StepResult
from learner.step_log import StepLog
from learner.telemetry import Telemetry


CHECKPOINT_TIMES_KEPT = 100
CHECKPOINT_RETRY_S = 1.0
"""After a checkpoint written beside training failed, the next is tried this much later (or at the next due step)."""


class TrainingLoop:
    def __init__(
        self,
        learner: Learner,
        features: FeatureLoop,
        reporter: Reporter,
        source: BufferedSource,
        checkpoints: CheckpointStore | None,
        cadence: CadenceConfig,
        batch_size: int,
        telemetry: Telemetry | None = None,
        group_dir: Path | None = None,
        wait_s: float = 0.5,
        audit_path: Path | None = None,
    ) -> None:
        """``checkpoints`` None: no checkpoints (and so no commits). ``group_dir``: where a data-parallel
        group records its last durable step (None: this worker trains alone). ``audit_path``: append
        ``partition,offset`` of every trained example there (delivery audits)."""
        self.learner = learner
        self.features = features
        self.reporter = reporter
        self.source = source
        self.checkpoints = checkpoints
        self.cadence = cadence
        self.batch_size = batch_size
        self.telemetry = telemetry
        self.group_dir = group_dir
        self.wait_s = wait_s
        self.audit_path = audit_path
        self.reducer = learner.reducer
        self.rank = self.reducer.rank
        self.summary: dict[str, dict[str, float]] = {}
        """The progressive metrics as of the last health report, publish or the end of the run."""
        self._summary_step = -1
        self.collisions = learner.collisions(dict)
        self.checkpoint_failures = 0
        self.last_checkpoint_error: str | None = None
        self._stop = threading.Event()
        self._running = threading.Event()
        self._closing = False  # the group is training on what it holds before it stops (see run)
        self.beside = BaseBeside(reporter.snapshots)
        """The base being written beside training, if any (``learner.beside``)."""
        self.checkpoint_beside = (CheckpointBeside(checkpoints) if checkpoints is not None and group_dir is None
                                  and cadence.checkpoint_beside else None)
        """Where a worker alone writes the checkpoints its cadence makes due, beside training
        (``learner.cadence.checkpoint_beside``); a group writes them on the training thread, in lockstep."""
        self._checkpoint_owed = False  # one came due while the one before was still being written, or too soon after
        self._checkpoint_ready_at = 0.0
        """When the next checkpoint written beside training may start: ``learner.cadence.checkpoint_max_share``."""
        self.step_log = StepLog()
        """The latest steps' times, phase by phase (``learner.step_log``): :meth:`steps`."""
        self.checkpoint_seconds: dict[str, list[float]] = {"capture": [], "write": [], "inline": []}
        """The latest checkpoints' times: of one written beside training, what it took of the training thread
        (``capture``) and of its own (``write``); of one written on the training thread, the whole (``inline``)."""

    @classmethod
    def local(cls, config: LearnerConfig, store: FeatureReader, snapshots: SnapshotStore, *,
              telemetry: Telemetry | None = None, reducer: Reducer | None = None, device: str = "cpu",
              batch_size: int = 512) -> TrainingLoop:
        """One worker's loop without a reading thread or checkpoints, over batches handed to :meth:`step`
        (or put in its :class:`~learner.intake.ExamplesSource` for :meth:`run`): tests and notebooks."""
        learner = Learner(config, list(ID_FIELDS), len(FEATURE_COLUMNS), device, reducer)
        reporter = Reporter(config, learner.multitask, snapshots, telemetry, writes_health=learner.reducer.rank == 0)
        return cls(learner, FeatureLoop(store, learner.reducer, codes=learner.code_fields), reporter, ExamplesSource(), checkpoints=None,
                   cadence=config.cadence, batch_size=batch_size, telemetry=telemetry)

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self, max_seconds: float | None = None) -> None:
        """Train until :meth:`stop`, ``max_seconds``, or the end of the source's input; on the way out, train
        on everything pending, checkpoint and publish."""
        self._running.set()
        self._closing = False
        deadline = time.monotonic() + max_seconds if max_seconds else None
        agree, n = self.reducer.agree, self.batch_size

        def asked() -> bool:
            return self._stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

        try:
            self.source.start()
            while True:
                self.source.check()
                if agree([asked() or self.source.ended])[0]:  # any worker stopping stops the group at the same step
                    break
                self.source.wait(n, self.wait_s)
                self._between_steps()
                while True:  # a trainer behind its input still stops within a step of being asked
                    full, stop = agree([self.source.buffered() >= n, asked()])
                    if not full or stop:
                        break
                    self.step(self.source.take(n), upcoming=self.source.peek(n))
            # Asked to stop, the group trains on what it holds with one checkpoint and one version at the end rather
            # than on every step's cadence (a version of a large model takes seconds); at the end of its input
            # (a replay) the rest is trained as the rest was.
            self._closing = agree([asked()])[0]
            self.source.stop()
            self.source.check()
            self.source.drain()
            while agree([self.source.buffered() > 0])[0]:
                self.step(self.source.take(n), upcoming=self.source.peek(n))
            self.checkpoint()
            self.publish(final=True)
            self._summarise()
            self.collisions = self._collisions()
            self._log_figures(self.learner.step)  # the run's totals (consumed, trained), not the last cadence's
        finally:
            self.source.stop()
            self._running.clear()

    def step(self, batch: pa.Table, upcoming: pa.Table | None = None) -> StepResult:
        """One (group) step on ``batch`` (taken from the source; empty for a worker with nothing to train),
        then whatever the cadences say is due. ``upcoming``: what the next step will most likely get, whose
        features are read ahead while this step's model runs."""
        cadence, log = self.cadence, self.step_log
        started = time.perf_counter()
        log.start()
        batch = batch.combine_chunks()  # a batch spans many fetches: one chunk makes every column read cheap
        features = self.features.read(batch)  # dense (B, F) and codes: before this batch's labels are folded in
        if (self.learner.step + 1) % cadence.stats_every_steps == 0:
            self.collisions = self._collisions()  # now: no push is folding into the aggregates
        log.phase("read")
        self.features.fold(batch, upcoming)
        log.phase("fold")
        result = self.learner.learn(batch, features.dense, features.codes)
        self._audit(batch)
        log.phase("learn")
        step = self.learner.step
        self.reporter.observe(step, result, time.perf_counter() - started)
        log.phase("observe")
        if step % cadence.health_every_steps == 0:
            self.reporter.report(step, self._summarise(), self.learner.positive_rates())
        log.phase("report")
        if self.checkpoint_beside is not None:
            self._collect_checkpoint()
        if (step % cadence.checkpoint_every_steps == 0 or self._checkpoint_owed) and not self._closing:
            self._checkpoint_on_cadence()
        log.phase("checkpoint")
        if self.snapshot_due(step) and not self._closing:
            self.publish()
        log.phase("publish")
        if step % cadence.stats_every_steps == 0:
            self._log_figures(step)
        log.phase("figures")
        log.end(batch.num_rows)
        return result

    def stop(self) -> None:
        self._stop.set()

    def _summarise(self, max_age_steps: int = 0) -> dict[str, dict[str, float]]:
        """The progressive metrics, taken now unless the last summary is at most ``max_age_steps`` steps old. A summary
        sorts every task's window (about 90 ms for six tasks of 20,000 examples, idle): taken once per step at most,
        however many jobs of the step read it, and by a version published between two health reports not at all (it
        carries the last report's, whose step its manifest names: ``metrics_step``)."""
        step = self.learner.step
        if not self.summary or self._summary_step < 0 or step - self._summary_step > max_age_steps:
            self.summary, self._summary_step = self.learner.summary(), step
        return self.summary

    def _audit(self, batch: pa.Table) -> None:
        if self.audit_path is None or not batch.num_rows:
            return
        lines = "".join(f"{p},{o}\n" for p, o in zip(batch["partition"].to_pylist(), batch["offset"].to_pylist()))
        fd = os.open(self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())  # in the page cache as soon as this returns: survives SIGKILL
        finally:
            os.close(fd)

    def is_running(self) -> bool:
        return self._running.is_set()

    def snapshot_due(self, step: int) -> bool:
        """Every ``snapshot_every_steps`` steps, or once ``snapshot_every_s`` passed since the last attempt."""
        every_s = self.cadence.snapshot_every_s
        late = every_s is not None and time.monotonic() - self.reporter.last_publish_attempt >= every_s
        return late or step % self.cadence.snapshot_every_steps == 0

    # -- publishing and checkpoints -----------------------------------------------------------------------

    def publish(self, final: bool = False) -> Manifest | None:
        """A guarded version of the current weights, covering the offsets trained so far (rank 0 only): a delta
        from the last published version, or a base. Its manifest, or None when the guard refused it, the store
        could not take it (retried after a backoff: see ``learner.reporter``) or this worker does not publish.
        The learner's changes are marked published only once the version is durable.

        A base is written here, on the training thread, when there is no chain to continue: the learner has no
        published parent (a new run, a restored checkpoint) or ``LATEST`` is no longer this trainer's last version
        (a rollback came in between: serving follows that one now), or when every version is whole
        (``learner.publish.max_deltas: 0``). When compaction makes one due, it is written beside training
        (``learner.beside``; ``learner.publish.base_beside``) and goes out with its catch-up delta once written;
        the run's ``final`` publish gives up a base still pending (a restarted trainer publishes a base first).

        The manifest's ``metrics`` (which the guard compares) are the progressive metrics of the last health report,
        at most ``health_every_steps`` steps old (``metrics_step`` names its step), or taken now; ``final``: now."""
        if self.rank != 0 or not self.reporter.publish_due():
            return None
        metrics = self._summarise(0 if final else self.cadence.health_every_steps)
        data = {**self.learner.manifest(), "metrics": metrics, "metrics_step": self._summary_step,
                "offsets": {str(p): o for p, o in self.source.trained_offsets().items()}}
        started = time.perf_counter()
        store, published, beside = self.reporter.snapshots, self.reporter.published, self.beside
        chained = self.learner.has_published_parent and bool(published) and store.latest_version() == published[-1]
        if beside.running and (final or not chained):
            beside.abandon()
        if beside.running and (pending := beside.ready()) is not None:
            return self._publish_beside(pending, data, started)
        base_beside = self.learner.config.publish.base_beside and store.max_deltas > 0
        base = not chained or (not base_beside and store.base_due())
        content = self.learner.weights() if base else self.learner.delta()
        manifest = self.reporter.publish(content, data, self.learner.step)
        if manifest is None:
            return None
        self.learner.mark_published()
        self.reporter.published_in(manifest, time.perf_counter() - started)
        if not base:
            beside.published(content)
            if base_beside and not final and not beside.running and store.base_due():  # copies of this version
                captured = time.perf_counter()
                beside.start(self.learner.capture(), manifest)
                self.reporter.timed("capture", 0, time.perf_counter() - captured)
        return manifest

    def _publish_beside(self, pending: PendingBase, data: dict, started: float) -> Manifest | None:
        """The base written beside training and its catch-up delta, as one publish; refused or not written, the
        base is given up and the next publish goes on along the old chain."""
        beside = self.beside
        manifest = self.reporter.publish(beside.catch_up(self.learner.delta()), data, self.learner.step, beside=pending)
        beside.finish(pending, published=manifest is not None)
        if manifest is not None:
            self.learner.mark_published()
            self.reporter.timed("base", pending.bytes, beside.seconds or 0.0)
            self.reporter.published_in(manifest, time.perf_counter() - started)
        return manifest

    def resume(self, restored: Checkpoint) -> None:
        """Load a checkpoint's state into the step, the feature loop and the reporter (its joiner state and
        buffer went to the source when it was built)."""
        counters = restored.meta["counters"]
        self.learner.restore(restored.model, restored.optimizer, restored.arrays, counters,
                             restored.meta.get("model_config"))  # absent from checkpoints of older versions
        self.features.restore(restored.arrays)
        self.features.nonfinite = counters.get("nonfinite_features", 0)
        self.reporter.published = list(counters.get("published", []))

    def checkpoint(self) -> bool:
        """Write a checkpoint now, on this thread; only when it is durable, commit the offsets it covers. False if
        it failed. One being written beside training is waited for (and its offsets committed) first.

        In a group every worker checkpoints at the same step, and none commits until all of them have: the
        workers agree that every checkpoint is durable, rank 0 records the step in ``GROUP``, they agree that
        this record is durable, and only then commit."""
        if self.checkpoints is None:
            return False
        if self.checkpoint_beside is not None:
            self._collect_checkpoint(wait=True)
            self._checkpoint_owed = False
        started = time.perf_counter()
        covered = self._write_checkpoint()
        self._checkpoint_time("inline", time.perf_counter() - started)
        if self.group_dir is None:
            if covered is not None:
                self.source.commit(covered)
            return covered is not None
        agree = self.reducer.agree
        if agree([covered is None])[0]:
            return False
        recorded = True
        if self.rank == 0:
            try:
                write_group_step(self.group_dir, self.learner.step, self.reducer.world_size)
            except OSError as exc:
                recorded = self._checkpoint_failed(f"cannot record the group's checkpoint step: {exc}")
        if agree([not recorded])[0]:
            return False
        self.checkpoints.pinned = self.learner.step
        self.source.commit(covered)
        return True

    def _between_steps(self) -> None:
        """What a worker alone does while it waits for a batch: commit the offsets of a checkpoint written beside
        training that became durable, and take one that is owed, so that what it trained before its input paused
        is checkpointed and committed without waiting for the next step."""
        if self.checkpoint_beside is None or self._closing:
            return
        self._collect_checkpoint()
        if self._checkpoint_owed:
            self._checkpoint_on_cadence()

    def _checkpoint_on_cadence(self) -> None:
        """The checkpoint the cadence made due: beside training when this worker trains alone (started now, its
        offsets committed by a later step once it is durable: :meth:`_collect_checkpoint`), else now. One due while
        the one before is still being written is taken at the first step after that one is durable, or later, so
        that writing them takes at most ``learner.cadence.checkpoint_max_share`` of the time: a model whose
        checkpoint takes seconds is checkpointed every minute or so, a small one every ``checkpoint_every_steps``."""
        beside = self.checkpoint_beside
        if beside is None:
            self.checkpoint()
            return
        if beside.running or time.monotonic() < self._checkpoint_ready_at:
            self._checkpoint_owed = True
            return
        self._checkpoint_owed = False
        started = time.perf_counter()
        assemble, optimizer, arrays, counters = self.learner.capture_state()
        try:
            arrays = {**arrays, **self.features.state()}
            counters = {**counters, "published": list(self.reporter.published),
                        "nonfinite_features": self.features.nonfinite}
            buffer, joiner, offsets = self.source.capture()
        except BaseException:
            assemble.release()  # or the tables and maps would keep every row they write for a copy never made
            raise
        step, meta = self.learner.step, {"counters": counters, "offsets": {str(p): o for p, o in offsets.items()},
                                         "model_config": self.learner.model.config}

        def whole(taken: tuple[dict, dict]) -> Checkpoint:
            model, maps = taken
            return Checkpoint(step, model, optimizer, {**arrays, **maps}, joiner, buffer, meta)
        beside.start(assemble, whole, offsets)
        self._checkpoint_time("capture", time.perf_counter() - started)

    def _collect_checkpoint(self, wait: bool = False) -> bool:
        """Commit the offsets of the checkpoint written beside training once it is durable (``wait``: wait for it);
        True when one was committed. A write that failed is counted, and its offsets are not committed."""
        beside = self.checkpoint_beside
        try:
            covered = beside.done(wait=wait)
        except CheckpointError as exc:  # tried again after a pause, at a step or while waiting for one
            self._checkpoint_owed = True
            self._checkpoint_ready_at = time.monotonic() + CHECKPOINT_RETRY_S
            return self._checkpoint_failed(str(exc))
        if covered is None:
            return False
        written = beside.seconds or 0.0
        self._checkpoint_time("write", written)
        self._checkpoint_ready_at = time.monotonic() + written * (1 / self.cadence.checkpoint_max_share - 1)
        self.source.commit(covered)
        return True

    def _checkpoint_time(self, kind: str, seconds: float) -> None:
        kept = self.checkpoint_seconds[kind]
        kept.append(seconds)
        del kept[:-CHECKPOINT_TIMES_KEPT]

    def _write_checkpoint(self) -> dict[int, int] | None:
        """Write a checkpoint; the offsets it covers once it is durable, None if it failed."""
        model, optimizer, arrays, counters = self.learner.state()
        arrays = {**arrays, **self.features.state()}
        counters = {**counters, "published": list(self.reporter.published), "nonfinite_features": self.features.nonfinite}
        buffer, joiner, offsets = self.source.capture()
        try:
            self.checkpoints.write(Checkpoint(self.learner.step, model, optimizer, arrays, joiner, buffer,
                                              {"counters": counters, "offsets": {str(p): o for p, o in offsets.items()},
                                               "model_config": self.learner.model.config}))
        except CheckpointError as exc:
            self._checkpoint_failed(str(exc))
            return None
        return offsets

    def _checkpoint_failed(self, error: str) -> bool:
        # Training goes on; nothing past the last durable checkpoint is committed, so nothing is lost.
        self.checkpoint_failures += 1
        self.last_checkpoint_error = error
        print(f"moestream: {error}; offsets stay at the last durable checkpoint", flush=True)
        return False

    # -- figures ------------------------------------------------------------------------------------------

    def _collisions(self) -> IdCollisions:
        """Hash collisions among the ids the aggregates hold (only between a read and the next fold); with ID
        maps, their own figures, without waiting for the push to read the aggregates' ids."""
        return self.learner.collisions(self.features.seen_ids)

    def _log_figures(self, step: int) -> None:
        if self.telemetry is None:
            return
        figures = {**self.source.figures(), "learner/examples": float(self.learner.examples),
                   "ids/collision_rate": self.collisions.rate, "ids/keys": float(self.collisions.n_keys)}
        if self.learner.event_time_hwm_ms:
            figures["learner/event_time_hwm_s"] = self.learner.event_time_hwm_ms / 1000
        for field, table in self.learner.id_tables().items():  # counted once a step: _collisions did it
            figures.update({f"ids/{field}/{k}": float(v) for k, v in table.items()})
        self.telemetry.log(figures, step=step)

    def stats(self) -> dict:
        """The loop's figures (the source's own are its owner's to add)."""
        learner = self.learner
        return {
            "steps": learner.step,
            "examples_trained": learner.examples,
            "skipped_steps": learner.skipped_steps,
            "nonfinite_features": self.features.nonfinite,
            "features_read_ahead": self.features.read_ahead,
            "snapshots": list(self.reporter.published),
            "refused_snapshots": dict(self.reporter.refused),
            "metrics": self.summary,
            **self.reporter.publish_figures(),
            **self.features.outage_figures(),
            "checkpoint_failures": self.checkpoint_failures,
            "checkpoint_writing": self.checkpoint_beside is not None and self.checkpoint_beside.running,
            "checkpoint_spans": list(self.checkpoint_beside.spans) if self.checkpoint_beside is not None else [],
            "checkpoint_seconds": {kind: {"n": len(t), "p50": float(np.median(t)), "max": max(t)}
                                   for kind, t in self.checkpoint_seconds.items() if t},
            "last_checkpoint_error": self.last_checkpoint_error,
            "rank": self.rank,
            "id_buckets": self.collisions.n_buckets,
            "id_collision_rate": self.collisions.rate,
            "id_keys": self.collisions.n_keys,
            "id_tables": self.learner.id_tables(),
            "wandb_dir": self.telemetry.run_dir if self.telemetry else None,
        }

    def steps(self, since: float = 0.0) -> dict[str, list[float]]:
        """The latest steps that started at or after wall time ``since``, phase by phase (``learner.step_log``)."""
        return self.step_log.since(since)

    def close(self) -> None:
        """The last push lands and the last heatmap is logged before the W&B run ends."""
        self.features.close()
        self.beside.close()
        if self.checkpoint_beside is not None:  # a checkpoint being written is finished: whole, as every one
            self.checkpoint_beside.close()
        self.reporter.close(self.learner.step)
        if self.telemetry is not None:
            self.telemetry.finish()


__all__ = ["TrainingLoop"]
