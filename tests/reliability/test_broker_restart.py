"""Scenario b of issue 9: the Kafka broker stops and restarts mid-stream. The producer, the trainer's
consumer and its commits recover on their own, and every impression is trained.

The test runs its own broker (own ports, own data dir), so stopping it leaves the session broker that the
other tests share untouched; the restart keeps the data dir, as a broker restart in production does.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer

from features.store import FeatureStoreConfig, OnlineFeatures
from infra.kafka import broker
from stream.kafka_io import EventSink, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig
from tests.conftest import free_ports
from tests.learner.test_crash_recovery import (BATCH, EVERY, _delivery, _impression_offsets, _Progress, _start, _trained,
                                              _wait, held_to_the_end)
from tests.reliability.test_unwritable_checkpoints import _group_offsets

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
REQUESTS = 600
"""The first half of their events is produced before the outage, the second as it starts and during it."""
WINDOW_MS = 1_500
"""The attribution window ``tests.learner.worker_process`` runs with."""


@pytest.fixture
def own_broker(tmp_path: Path):
    port, controller_port = free_ports(2)
    config = broker.BrokerConfig(data_dir=tmp_path / "kafka", port=port, controller_port=controller_port)
    broker.up(config)
    try:
        yield config
    finally:
        broker.down(config)


def _offsets_of(bootstrap: str, topic: str, request_ids: set[str]) -> set[tuple[int, int]]:
    """Positions of the impressions of these requests (the caller has checked the topic is complete)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5_000)
    try:
        return {(r.partition, r.offset) for r in consumer
                if (e := orjson.loads(r.value))["type"] == "impression" and e["request_id"] in request_ids}
    finally:
        consumer.close()


def _last_line(output: str, prefix: str) -> str:
    return next((line for line in reversed(output.splitlines()) if line.startswith(prefix)), "")


def test_broker_restart_mid_stream_loses_nothing(own_broker: broker.BrokerConfig, tmp_path: Path) -> None:
    bootstrap, topic = own_broker.bootstrap, "reliability.broker-restart"
    kafka = KafkaConfig(bootstrap_servers=bootstrap, topic=topic, group_id=f"{topic}.trainer")  # the worker's group
    ensure_topics(kafka)
    OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "features")).apply()
    events = list(Simulator(SimulatorConfig(seed=21, max_delay_s=1.0)).events(int(time.time() * 1000), REQUESTS))
    first_half, second_half = events[: len(events) // 2], events[len(events) // 2:]
    sink = EventSink(kafka)
    sink.send_all(first_half)
    sink.flush()
    _impression_offsets(bootstrap, topic, len(first_half))

    worker = _start(tmp_path, bootstrap, topic)
    try:
        ckpts = tmp_path / "checkpoints"
        _wait(lambda: (ckpts / "LATEST").exists() and sum(_trained(tmp_path).values()) >= EVERY * BATCH,
              240, "a checkpoint and some training before the outage", worker)

        in_flight, during = second_half[: len(second_half) // 2], second_half[len(second_half) // 2:]
        sink.send_all(in_flight)  # not flushed: in flight or batched when the broker goes away
        down_at = time.monotonic()
        broker.down(own_broker)
        trained_at_stop = sum(_trained(tmp_path).values())
        sink.send_all(during)  # buffered by the producer while no broker answers
        broker.up(own_broker)
        up_at = time.monotonic()
        sink.flush(timeout_s=120)
        sink.close()

        impressions = _impression_offsets(bootstrap, topic, len(events))  # every event was produced exactly once
        produced_during = _offsets_of(bootstrap, topic, {e["request_id"] for e in during if e["type"] == "impression"})
        _wait(lambda: not produced_during.isdisjoint(_trained(tmp_path)), 120,
              "the trainer to train an impression produced during the outage", worker)
        recovered_s = time.monotonic() - up_at
        progress = _Progress(tmp_path, after=trained_at_stop,
                             most=len(impressions) - held_to_the_end(events, WINDOW_MS) - BATCH)
        _wait(progress.settled, 180, "the trainer to catch up and go idle", worker)
        worker.send_signal(signal.SIGTERM)  # graceful: flushes the last window
        output, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
    assert worker.returncode == 0, output[-3000:]

    committed = _group_offsets(bootstrap, kafka.group_id)
    lost, duplicates = _delivery(tmp_path, impressions)
    print(f"\nbroker restart: {len(events)} events produced ({len(in_flight)} sent just before the stop, {len(during)} during the outage), "
          f"{len(impressions)} impressions, trained {sum(_trained(tmp_path).values())} "
          f"({trained_at_stop} before the stop), lost {len(lost)}, duplicates {duplicates}, offsets committed "
          f"{sum(committed.values())}; "
          f"broker down for {up_at - down_at:.1f} s, events produced during the outage trained within "
          f"{recovered_s:.1f} s of the restart; worker: {_last_line(output, 'stopped ')}")
    assert not lost
    assert sum(committed.values()) == len(events)  # the consumer's commits recovered too: the whole log
