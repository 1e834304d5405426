"""Scenario 2 of issue 19: records with a null value (tombstones) among good events, some keyed, some with
headers of their own. Before the fix one such record failed the intake, the worker restarted, read it
again, and the run died after its restarts. Every good impression must be trained, every null record must
land in ``<topic>.dlq`` under its own key, with its headers and the reason, and the trainer must never fail.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from learner.worker import TrainerWorker
from tests.learner.test_crash_recovery import _delivery, audited_backlog
from tests.reliability.test_malformed_flood import _read
from tests.reliability.test_unwritable_checkpoints import _until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
NULLS = 500


def test_null_records_are_dead_lettered_with_their_key_and_headers_and_every_good_event_is_trained(
    kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    config, impressions, n_good = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=21,
                                                  n_requests=1_000, every=5, batch=256)
    rng = random.Random(21)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    sent = []
    for i in range(NULLS):
        key = f"k{i}".encode() if rng.random() < 0.7 else b""  # kafka-python sends no record without both
        headers = [("origin", f"cdc-{i}".encode())] if rng.random() < 0.5 else []
        producer.send(unique_topic, value=None, key=key, headers=headers)
        sent.append((key, dict(headers)))
    producer.flush()
    producer.close()

    worker = TrainerWorker(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - the test's verdict, not the trainer's
            failure.append(exc)

    thread = threading.Thread(target=run, name="trainer", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        _until(lambda: worker.stream.stats.consumed >= n_good + NULLS, 300, "the trainer to consume every record", thread)
    finally:
        worker.stop()
        thread.join(120)
    stats = worker.stats()
    worker.close()
    letters = _read(kafka_bootstrap, config.kafka.dlq_topic, NULLS)
    lost, duplicates = _delivery(tmp_path, impressions)
    print(f"\npoison pill: {n_good} good events and {NULLS} null records; {len(impressions)} impressions, lost "
          f"{len(lost)}, duplicates {duplicates}; dead-lettered {len(letters)} ({stats['dead_lettered']}) in "
          f"{time.monotonic() - started:.1f} s, trainer failures {len(failure)}")
    assert not failure and not lost
    got = sorted((r.key or b"", dict(r.headers).get("source_header.origin", b"")) for r in letters)
    assert got == sorted((key, headers.get("origin", b"")) for key, headers in sent)
    for record in letters:
        headers = dict(record.headers)
        assert headers["reason_code"] == b"empty" and headers["source_value_null"] == b"true"
        assert record.value in (None, b"")
    assert stats["dead_lettered"] == {"empty": NULLS}
