"""Scenario 1 of issue 19: the Kafka intake stops making progress while its partitions have events.

Seen in the field as a member that left its group and a consumer looping in kafka-python's coordinator
lookup inside ``poll``, with the trainer alive and idle. The watchdog (``learner.intake``) must notice it,
re-join the group, and every event must still be trained; a fetch that never returns must fail the worker
loudly (Ray then restarts it from its checkpoint) rather than leave it looking alive.

Each stall is driven for real on the intake thread, which owns the consumer: the consumer pauses every
partition it holds (it stays in its group and heartbeats, but fetches nothing while lag grows), or it
leaves its group (kafka-python's ``unsubscribe``), or its fetch blocks.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from learner.config import WorkerConfig
from learner.intake import IntakeStalled
from learner.worker import TrainerWorker
from stream.kafka_io import EventSource
from tests.learner.test_crash_recovery import _delivery, audited_backlog
from tests.reliability.test_unwritable_checkpoints import _until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
STALL_S = 3.0
"""``trainer.stall_timeout_s`` in these runs."""


def _stall_once(monkeypatch, how) -> list[float]:
    """After the consumer's first non-empty fetch, stall it ``how`` (on the intake thread); returns when."""
    original, stalled = EventSource.next_batch, []

    def next_batch(self):
        batch = original(self)
        if batch.n_messages and not stalled:
            stalled.append(time.monotonic())
            how(self)
        return batch

    monkeypatch.setattr(EventSource, "next_batch", next_batch)
    return stalled


def _start(worker: TrainerWorker) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``worker`` on a thread; what it dies of (what the actor would die of) lands in the returned list."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failure.append(exc)

    thread = threading.Thread(target=run, name="trainer", daemon=True)
    thread.start()
    return thread, failure


def _in_process(config: WorkerConfig) -> WorkerConfig:
    """The consumer on the trainer's own thread, where these tests reach into it (the watchdog is the same with
    the consumer in a process of its own: ``test_a_stopped_consumer_process_fails_the_worker_loudly``)."""
    return replace(config, kafka=replace(config.kafka, consumer="thread"))


def _pause_everything(source: EventSource) -> None:
    source._consumer.pause(*source._consumer.assignment())


def _leave_the_group(source: EventSource) -> None:
    source._consumer.unsubscribe()


@pytest.mark.parametrize("how", [_pause_everything, _leave_the_group], ids=["paused", "left-group"])
def test_a_stalled_consumer_rejoins_its_group_and_every_event_is_trained(
    kafka_bootstrap, unique_topic, tmp_path: Path, monkeypatch, how
) -> None:
    config, impressions, n_events = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=19,
                                                    n_requests=1_500, every=5, batch=256)
    config = _in_process(replace(config, stall_timeout_s=STALL_S))
    stalled = _stall_once(monkeypatch, how)
    worker = TrainerWorker(config)
    thread = threading.Thread(target=worker.run, name="trainer", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        # Every event fetched: the count alone is not enough, since a consumer that re-joins reads again from the
        # last commit and its repeats count too; no partition may have anything left to fetch, and every partition
        # must be assigned when that is read (a member between leaving and re-joining has none, and no lag).
        def fetched() -> bool:
            lag = worker.stats()["lag"]
            return (worker.stream.stats.consumed >= n_events and len(lag) == config.kafka.partitions
                    and not any(lag.values()))
        _until(fetched, 180, "the trainer to fetch every event", thread)
    finally:
        worker.stop()
        thread.join(120)
    stats = worker.stats()
    worker.close()
    lost, duplicates = _delivery(tmp_path, impressions)
    recovered_s = time.monotonic() - started
    print(f"\nintake stall ({how.__name__}): {n_events} events, stalled after the first fetch, "
          f"{stats['intake_stalls']} stall(s) detected, {stats['intake_stall_recoveries']} recovered; "
          f"{len(impressions)} impressions, lost {len(lost)}, duplicates {duplicates}; all consumed in {recovered_s:.1f} s")
    assert stalled, "the consumer was never stalled"
    assert stats["intake_stalls"] == 1 and stats["intake_stall_recoveries"] == 1
    assert not lost
    assert not thread.is_alive()


def test_a_fetch_that_never_returns_fails_the_worker_loudly(kafka_bootstrap, unique_topic, tmp_path: Path,
                                                           monkeypatch) -> None:
    config, _, _ = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=20, n_requests=300, every=5,
                                   batch=256)
    config = _in_process(replace(config, stall_timeout_s=STALL_S))
    release = threading.Event()
    _stall_once(monkeypatch, lambda source: release.wait(600))  # kafka-python looping inside poll, in effect
    worker = TrainerWorker(config)
    thread, failure = _start(worker)
    thread.join(120)
    release.set()
    assert not thread.is_alive(), "the worker kept running with a stuck intake"
    assert len(failure) == 1 and isinstance(failure[0], IntakeStalled), failure
    assert "trainer.stall_timeout_s" in str(failure[0])
    worker.close()


def test_a_stopped_consumer_process_fails_the_worker_loudly(kafka_bootstrap, unique_topic, tmp_path: Path) -> None:
    """The consumer in its own process (the default), frozen by SIGSTOP after the trainer's first step: the fetch
    the intake waits on never comes, and the watchdog fails the worker as it does for a fetch stuck in-process."""
    config, _, _ = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=21, n_requests=300, every=5,
                                   batch=256)
    config = replace(config, stall_timeout_s=STALL_S)
    assert config.kafka.consumer == "process"
    worker = TrainerWorker(config)
    thread, failure = _start(worker)
    _until(lambda: worker.loop.stats()["steps"] >= 1, 120, "the first training step", thread)
    child = worker.stream.source.pid
    os.kill(child, signal.SIGSTOP)
    try:
        thread.join(120)
    finally:
        os.kill(child, signal.SIGCONT)
    assert not thread.is_alive(), "the worker kept running with a frozen consumer process"
    assert len(failure) == 1 and isinstance(failure[0], IntakeStalled), failure
    worker.close()
