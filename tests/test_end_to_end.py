"""Simulator -> real Kafka -> trainer actor (joiner, Feast SQLite, MMoE) -> snapshots -> Ray Serve over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from kafka import KafkaConsumer

from features.store import OnlineFeatures
from infra.pipeline import RunLayout, start_serving, start_trainer, wait_for, worker_config
from stream.kafka_io import EventSink, ensure_topics
from stream.simulator import Simulator, SimulatorConfig
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MALFORMED = [
    b"this is not json",
    b'{"type": "impression", "request_id": "x", "user_id": "seven", "item_id": 1, "ts_ms": 1}',
    b'{"type": "feedback", "request_id": "x", "user_id": 7, "item_id": 1, "ts_ms": 1, "labels": {"share": 1}}',
]


def _dead_letters(bootstrap: str, topic: str, n: int, timeout_s: float = 30) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=1000)
    got, deadline = [], time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            got += [r for batch in consumer.poll(timeout_ms=500).values() for r in batch]
    finally:
        consumer.close()
    return got


def test_events_flow_from_kafka_to_a_served_prediction(kafka_bootstrap, ray_session, unique_topic, data_root: Path):
    layout = RunLayout(data_root)
    config = worker_config(layout, bootstrap=kafka_bootstrap, topic=unique_topic, window_ms=2_000,
                           snapshot_every_steps=3, batch_size=256, wandb_mode="offline")
    ensure_topics(config.kafka)
    OnlineFeatures(config.features).apply()
    trainer, run_ref = start_trainer(config)  # first: the actor starts while start_serving waits on Serve
    url = start_serving(config, free_port())

    sink = EventSink(config.kafka)
    events = list(Simulator(SimulatorConfig(seed=11, max_delay_s=1.5)).events(int(time.time() * 1000), 1500))
    impressions = sum(e["type"] == "impression" for e in events)
    half = len(events) // 2
    bad_at = {10: MALFORMED[0], 1500: MALFORMED[1], half + 500: MALFORMED[2]}  # mid-stream, not at its end

    def send(chunk: range) -> None:
        for i in chunk:
            sink.send(events[i])
            if i in bad_at:
                sink.send_raw(bad_at[i], key=b"bad")
        sink.flush()

    send(range(half))
    wait_for(lambda: httpx.get(f"{url}/healthz").json()["model_version"] is not None, 180, "a first snapshot served")
    first = httpx.get(f"{url}/healthz").json()
    send(range(half, len(events)))
    sink.close()
    produced = sink.sent
    assert produced == len(events) + len(MALFORMED)

    wait_for(lambda: ray_session.get(trainer.stats.remote())["consumed"] >= produced, 180, "consumption")
    trainer.stop.remote()
    stats = ray_session.get(run_ref, timeout=180)
    ray_session.get(trainer.close.remote())

    assert stats["consumed"] == produced
    assert sum(stats["dead_lettered"].values()) == len(MALFORMED)
    assert stats["examples_trained"] == impressions  # every impression became exactly one example
    assert stats["joiner"]["orphan_feedback"] == 0 and stats["joiner"]["duplicate_impressions"] == 0
    assert len(stats["snapshots"]) >= 2
    assert Path(stats["wandb_dir"]).exists()

    letters = _dead_letters(kafka_bootstrap, config.kafka.dlq_topic, len(MALFORMED))
    assert sorted(r.value for r in letters) == sorted(MALFORMED)
    reasons = {dict(r.headers)["reason"].decode() for r in letters}
    assert any(r.startswith("not JSON") for r in reasons)
    assert any("user_id must be" in r for r in reasons)
    assert any("unknown label 'share'" in r for r in reasons)
    assert all(dict(r.headers)["source_topic"].decode() == unique_topic for r in letters)
    assert stats["dead_lettered"] == {"not_json": 1, "wrong_type": 1, "unknown_label": 1}

    newest = stats["snapshots"][-1]
    wait_for(lambda: httpx.get(f"{url}/healthz").json()["model_version"] == newest, 60, f"serving v{newest}")
    health = httpx.get(f"{url}/healthz").json()
    assert health["pid"] == first["pid"], "the replica was restarted instead of swapping weights"
    assert health["swaps"] > first["swaps"] and newest > first["model_version"]
    response = httpx.post(f"{url}/predict", json={"user_id": 3, "item_ids": [1, 2, 3, 999_999]}, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == newest and body["family"] == "mmoe"
    assert [item["item_id"] for item in body["items"]] == [1, 2, 3, 999_999]
    for item in body["items"]:
        assert set(item["probabilities"]) == set(config.learner.tasks)
        assert all(0.0 < p < 1.0 for p in item["probabilities"].values())

    bad = httpx.post(f"{url}/predict", json={"user_id": "x", "item_ids": []}, timeout=10)
    assert bad.status_code == 422
