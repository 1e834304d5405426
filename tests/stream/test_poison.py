"""Records the intake cannot use, against the real broker: each is dead-lettered with its key, its headers and a
reason, and the good records around it are all consumed (issue 19, items 2 and 8)."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.serializer import Serializer

from stream.events import encode
from stream.kafka_io import EventSource, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.integration

GOOD = {"type": "impression", "request_id": "r1", "user_id": 1, "item_id": 2, "ts_ms": 1_700_000_000_000}
NO_KEY = object()


class _NullableKey(Serializer):
    def serialize(self, topic, key):
        return None if key is NO_KEY else key


NULLS = [  # (key, headers) of records whose value is null (tombstones)
    (b"user-7", [("trace_id", b"t-1"), ("origin", b"app")]),
    (b"user-8", []),
    (None, [("trace_id", b"t-3")]),
    (None, []),
]


def _read_all(bootstrap: str, topic: str, n: int, timeout_s: float = 30) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=1000)
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < n and time.monotonic() < deadline:
            records += list(consumer)
    finally:
        consumer.close()
    return records


def test_null_values_are_dead_lettered_with_key_and_headers_and_the_rest_is_consumed(kafka_bootstrap,
                                                                                     unique_topic) -> None:
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic=unique_topic, group_id=f"{unique_topic}.g",
                         partitions=1, max_batch=64, max_wait_ms=100)
    ensure_topics(config)
    events = list(Simulator(SimulatorConfig(seed=3)).events(int(time.time() * 1000), 40))
    # kafka-python refuses a record with neither key nor value, which other clients (Java, librdkafka) produce;
    # it checks before serializing, so a serializer that turns the marker into None writes one.
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                             key_serializer=_NullableKey())
    sent: dict[int, tuple] = {}  # offset of each null record -> (key, headers)
    for i, event in enumerate(events):
        producer.send(unique_topic, value=encode(event), key=str(event["user_id"]).encode())
        if i % 10 == 5 and len(sent) < len(NULLS):
            key, headers = NULLS[len(sent)]
            meta = producer.send(unique_topic, value=None, key=NO_KEY if key is None else key, headers=headers)
            sent[meta.get(timeout=30).offset] = (key, headers)
    producer.flush()
    producer.close()
    assert len(sent) == len(NULLS)

    source = EventSource(config)
    valid, total = 0, len(events) + len(NULLS)
    deadline = time.monotonic() + 60
    try:
        while source.consumed < total:
            assert time.monotonic() < deadline, f"consumed {source.consumed} of {total}"
            valid += source.next_batch().decoded.n_valid
        source.dead_letters.flush()
    finally:
        source.close()
    assert valid == len(events)
    assert source.dead_letters.by_reason == {"empty": len(NULLS)}

    dead = _read_all(kafka_bootstrap, config.dlq_topic, len(NULLS))
    letters = {int(dict(r.headers)["source_offset"]): r for r in dead}
    assert set(letters) == set(sent)
    for offset, (key, headers) in sent.items():
        letter = letters[offset]
        own = dict(letter.headers)
        assert letter.key == key and letter.value == b""
        assert own["reason_code"] == b"empty" and own["reason"]
        assert own["source_topic"].decode() == unique_topic and own["source_partition"] == b"0"
        assert own["source_value_null"] == b"true"
        assert [(name.removeprefix("source_header."), value) for name, value in letter.headers
                if name.startswith("source_header.")] == headers


def test_a_message_too_large_for_the_dlq_is_dead_lettered_without_its_value(kafka_bootstrap, unique_topic) -> None:
    """Near the broker's size limit, the DLQ's headers would push a copy over it: the copy drops the value."""
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic=unique_topic, group_id=f"{unique_topic}.g",
                         partitions=1, max_wait_ms=100)
    ensure_topics(config)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    huge = producer.send(unique_topic, key=b"k", value=b"x" * 1_048_000, headers=[("note", b"n" * 400)])
    after = producer.send(unique_topic, key=b"1", value=encode(GOOD))
    offsets = huge.get(timeout=30).offset, after.get(timeout=30).offset
    producer.close()

    source = EventSource(config)
    valid, deadline = 0, time.monotonic() + 60
    try:
        while source.consumed < 2:
            assert time.monotonic() < deadline, f"consumed {source.consumed} of 2"
            valid += source.next_batch().decoded.n_valid
        source.dead_letters.flush()
    finally:
        source.close()
    assert valid == 1 and source.dead_letters.by_reason == {"oversized": 1}
    (letter,) = _read_all(kafka_bootstrap, config.dlq_topic, 1)
    own = dict(letter.headers)
    assert (letter.key, letter.value) == (b"k", b"")
    assert own["source_value_dropped"] == b"too_large" and own["source_offset"] == str(offsets[0]).encode()
    assert own["source_header.note"] == b"n" * 400
