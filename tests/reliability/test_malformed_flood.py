"""Scenario d of issue 9: malformed messages mixed into a stream of good ones. Every good impression is
trained, every bad message lands in ``<topic>.dlq`` byte for byte with its reason, and the trainer never
stops.

The issue's full size: 100k good and 10k bad messages (about 30 s on a 2-core machine).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer

from features.store import FeatureStoreConfig, OnlineFeatures
from infra.pipeline import RunLayout, worker_config
from learner.worker import TrainerWorker
from stream.events import MAX_MESSAGE_BYTES, encode
from stream.kafka_io import EventSink, ensure_topics
from stream.simulator import Simulator, SimulatorConfig
from tests.learner.test_crash_recovery import _delivery, _trained
from tests.reliability.test_unwritable_checkpoints import _until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
GOOD, BAD = 100_000, 10_000
OVERSIZED = 50
"""Few: each is over 64 KiB."""


def _malformed(rng: random.Random, good: list[dict], n: int) -> list[tuple[bytes, str]]:
    """``n`` distinct bad messages of every kind a producer gets wrong, each with the reason code it earns."""
    impression = next(e for e in good if e["type"] == "impression")
    feedback = next(e for e in good if e["type"] == "feedback")
    kinds = [
        lambda i: (b"", "empty"),
        lambda i: (b'{"type": "impression", "request_id": "x' + str(i).encode(), "not_json"),
        lambda i: (orjson.dumps([i, "impression"]), "not_object"),
        lambda i: (encode({**impression, "request_id": f"bad{i}", "type": "click"}), "unknown_type"),
        lambda i: (encode({k: v for k, v in {**impression, "request_id": f"bad{i}"}.items() if k != "item_id"}),
                   "missing_field"),
        lambda i: (encode({**impression, "request_id": f"bad{i}", "user_id": "forty-two"}), "wrong_type"),
        lambda i: (encode({**feedback, "request_id": f"bad{i}", "labels": {"clicked": 1}}), "unknown_label"),
        lambda i: (encode({**feedback, "request_id": f"bad{i}", "labels": {"click": 7}}), "bad_label"),
    ]
    bad = [(encode({**impression, "request_id": f"big{i}", "pad": "x" * MAX_MESSAGE_BYTES}), "oversized")
           for i in range(OVERSIZED)]
    bad += [rng.choice(kinds)(i) for i in range(n - OVERSIZED)]
    return bad


def _read(bootstrap: str, topic: str, n: int, headers: bool = False) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             fetch_max_bytes=16 * 1024 * 1024, max_partition_fetch_bytes=4 * 1024 * 1024)
    records, deadline = [], time.monotonic() + 120
    try:
        while len(records) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records += batch
    finally:
        consumer.close()
    assert len(records) == n, f"{topic}: {len(records)} records, expected {n}"
    return records


def test_malformed_messages_go_to_the_dlq_with_their_reason_and_every_good_one_is_trained(
    kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    config = worker_config(RunLayout(tmp_path), bootstrap=kafka_bootstrap, topic=unique_topic, window_ms=1_500,
                           snapshot_every_steps=1_000, checkpoint_every_steps=20, batch_size=512, wandb_mode="disabled")
    config = replace(config, audit_path=tmp_path / "trained.csv")
    ensure_topics(config.kafka)
    OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "features")).apply()
    simulated = Simulator(SimulatorConfig(seed=4, max_delay_s=1.0)).events(int(time.time() * 1000), GOOD)
    good = [e for _, e in zip(range(GOOD), simulated)]
    rng = random.Random(4)
    bad = _malformed(rng, good, BAD)
    # Bad messages at random places, good ones in their event-time order; only good ones carry a key.
    placed = [(i, encode(e), str(e["user_id"]).encode()) for i, e in enumerate(good)]
    placed += [(rng.uniform(0, len(good)), value, None) for value, _ in bad]
    stream = [(value, key) for _, value, key in sorted(placed, key=lambda item: item[0])]

    started = time.monotonic()
    sink = EventSink(config.kafka)
    for value, key in stream:
        sink.send_raw(value, key=key)
    sink.close()
    produced_s = time.monotonic() - started
    expected_code = dict(bad)
    records = _read(kafka_bootstrap, unique_topic, len(stream))
    bad_at = {(r.partition, r.offset): expected_code[r.value] for r in records if r.key is None}
    impressions = {(r.partition, r.offset) for r in records if r.key is not None and b'"impression"' in r.value}

    started = time.monotonic()
    worker = TrainerWorker(config)
    thread = threading.Thread(target=worker.run, name="trainer", daemon=True)
    thread.start()
    try:
        # Once every message is consumed, what is not trained yet (a partial batch, the last attribution
        # window) is trained by the graceful stop.
        _until(lambda: worker.stream.stats.consumed >= len(stream), 600, "the trainer to consume every message", thread)
    finally:
        worker.stop()
        thread.join(120)
    trained_s = time.monotonic() - started
    stats = worker.stats()
    worker.close()
    assert not thread.is_alive()

    letters = _read(kafka_bootstrap, config.kafka.dlq_topic, BAD)
    headers = [dict(r.headers) for r in letters]
    dead = {(int(h["source_partition"]), int(h["source_offset"])): h["reason_code"].decode() for h in headers}
    lost, duplicates = _delivery(tmp_path, impressions)
    by_reason = Counter(dead.values())
    print(f"\nmalformed flood: {len(stream)} messages produced in {produced_s:.1f} s ({GOOD} good, {BAD} bad: "
          f"{dict(sorted(Counter(bad_at.values()).items()))}); {len(impressions)} impressions, trained "
          f"{sum(_trained(tmp_path).values())}, lost {len(lost)}, duplicates {duplicates}; dead-lettered {len(letters)} "
          f"({dict(sorted(by_reason.items()))}); consumed {stats['consumed']}, all trained in {trained_s:.1f} s")
    assert not lost
    assert dead == bad_at  # each bad message once, at its own position, with the reason it deserves
    assert all(h["reason"] and h["source_topic"].decode() == unique_topic for h in headers)
    assert sorted(r.value for r in letters) == sorted(v for v, _ in bad)  # byte for byte
    assert stats["dead_lettered"] == dict(by_reason)
    assert stats["joiner"]["feedback"] == sum(e["type"] == "feedback" for e in good)
