"""The consumer in a process of its own (``stream.consumer_process``), against the real broker: the same batches,
dead letters and commits as the in-process ``EventSource``, rebalance calls in order, and a child that dies or a
parent that leaves is noticed."""

from __future__ import annotations

import os
import signal
import time

import pandas as pd
import pyarrow as pa
import pytest
from kafka import ConsumerRebalanceListener, KafkaProducer, TopicPartition
from pandas.testing import assert_frame_equal
from kafka.errors import CommitFailedError, RebalanceInProgressError, UnknownTopicOrPartitionError

from stream.consumer_process import ConsumerProcessError, ProcessEventSource, _describe, _error
from stream.events import encode
from stream.kafka_io import SASL_PASSWORD_ENV, SASL_USERNAME_ENV, EventSource, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.integration


def _config(bootstrap: str, topic: str, **overrides) -> KafkaConfig:
    options = {"group_id": f"{topic}.g", "partitions": 2, "max_batch": 64, "max_wait_ms": 100, **overrides}
    return KafkaConfig(bootstrap_servers=bootstrap, topic=topic, **options)


def _produce(config: KafkaConfig, n_requests: int, bad: int = 0) -> int:
    """Simulator events keyed by user, with ``bad`` malformed messages among them; returns how many were sent."""
    events = list(Simulator(SimulatorConfig(seed=5)).events(int(time.time() * 1000) - 60_000, n_requests))
    producer = KafkaProducer(bootstrap_servers=config.bootstrap_servers, acks="all")
    for i, event in enumerate(events):
        producer.send(config.topic, value=encode(event), key=str(event["user_id"]).encode())
        if i % 17 == 3 and bad:
            producer.send(config.topic, value=b"{not json", key=b"bad")
            bad -= 1
    producer.flush()
    producer.close()
    return len(events)


def _drain(source, total: int, timeout_s: float = 60) -> list:
    batches, deadline = [], time.monotonic() + timeout_s
    while source.consumed < total:
        assert time.monotonic() < deadline, f"consumed {source.consumed} of {total}"
        batches.append(source.next_batch())
    return batches


def _rows(batches, table: str) -> pd.DataFrame:
    frame = pa.concat_tables(getattr(b.decoded, table) for b in batches).to_pandas()
    return frame.sort_values(["partition", "offset"], ignore_index=True)


def _committed(config: KafkaConfig) -> dict[int, int]:
    from kafka import KafkaConsumer

    probe = KafkaConsumer(bootstrap_servers=config.bootstrap_servers, group_id=config.group_id,
                          enable_auto_commit=False)
    try:
        return {p: probe.committed(TopicPartition(config.topic, p)) for p in range(config.partitions)}
    finally:
        probe.close()


def test_the_child_hands_out_what_the_in_process_source_reads_and_commits_what_it_is_told(
    kafka_bootstrap, unique_topic
) -> None:
    config = _config(kafka_bootstrap, unique_topic)
    ensure_topics(config)
    total = _produce(config, 120, bad=5) + 5

    child = ProcessEventSource(config)
    try:
        batches = _drain(child, total)
        ends = {}
        for b in batches:
            ends.update({p: max(o, ends.get(p, 0)) for p, o in b.next_offsets.items()})
        child.commit(ends)
        assert child.lag() == {0: 0, 1: 0}
        dead_letters = dict(child.dead_letters.by_reason)
        rejects = sum(len(b.decoded.rejects) for b in batches)
    finally:
        child.close()
    assert child._process.returncode == 0
    assert _committed(config) == ends and sum(ends.values()) == total

    reference = EventSource(_config(kafka_bootstrap, unique_topic, group_id=f"{unique_topic}.reference"))
    try:
        expected = _drain(reference, total)
    finally:
        reference.close()
    for table in ("impressions", "feedback"):  # NaN labels compare equal here
        assert_frame_equal(_rows(batches, table), _rows(expected, table))
    assert dead_letters == dict(reference.dead_letters.by_reason) == {"not_json": 5} and rejects == 5


class _Calls(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def on_partitions_revoked(self, revoked) -> None:
        self.calls.append(("revoked", sorted(tp.partition for tp in revoked)))

    def on_partitions_assigned(self, assigned) -> None:
        self.calls.append(("assigned", sorted(tp.partition for tp in assigned)))


def test_rebalance_calls_reach_the_listener_in_order_before_the_batches_after_them(kafka_bootstrap,
                                                                                   unique_topic) -> None:
    config = _config(kafka_bootstrap, unique_topic)
    ensure_topics(config)
    total = _produce(config, 40)
    calls = _Calls()
    source = ProcessEventSource(config, listener=calls)
    try:
        _drain(source, total)
        assert calls.calls[-1] == ("assigned", [0, 1])
        source.rejoin()  # the watchdog's remedy, done by the child
        deadline = time.monotonic() + 60
        while calls.calls[-1] != ("assigned", [0, 1]) or calls.calls[-2] != ("revoked", [0, 1]):
            assert time.monotonic() < deadline, calls.calls
            source.next_batch()
        assert not source.outside_group()
    finally:
        source.close()


def test_a_dead_child_fails_the_next_fetch_with_its_exit_code(kafka_bootstrap, unique_topic) -> None:
    config = _config(kafka_bootstrap, unique_topic)
    ensure_topics(config)
    source = ProcessEventSource(config)
    os.kill(source.pid, signal.SIGKILL)
    with pytest.raises(ConsumerProcessError, match="exited with code -9|closed its connection"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            source.next_batch()
    source.close()


def test_the_child_leaves_when_its_parent_closes_the_connection(kafka_bootstrap, unique_topic) -> None:
    config = _config(kafka_bootstrap, unique_topic)
    ensure_topics(config)
    source = ProcessEventSource(config)
    source._conn.close()  # what the parent's death does to the child's socket
    assert source._process.wait(60) == 0


def test_a_construction_error_is_raised_in_the_parent_as_itself(kafka_bootstrap, unique_topic, monkeypatch) -> None:
    monkeypatch.delenv(SASL_USERNAME_ENV, raising=False)
    monkeypatch.delenv(SASL_PASSWORD_ENV, raising=False)
    config = _config(kafka_bootstrap, unique_topic, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")
    with pytest.raises(ValueError, match="SASL credentials come from the environment only"):
        ProcessEventSource(config)


@pytest.mark.parametrize("exc", [CommitFailedError("gone"), RebalanceInProgressError("busy"),
                                 UnknownTopicOrPartitionError("t")],
                         ids=lambda e: type(e).__name__)
def test_kafka_errors_cross_as_themselves_so_retry_decisions_hold(exc) -> None:
    rebuilt = _error(_describe(exc))
    assert type(rebuilt) is type(exc) and rebuilt.retriable == exc.retriable


def test_other_errors_cross_as_a_consumer_process_error() -> None:
    assert isinstance(_error(_describe(ValueError("bad"))), ValueError)
    rebuilt = _error(_describe(KeyError("x")))
    assert isinstance(rebuilt, ConsumerProcessError) and "KeyError" in str(rebuilt)


def test_prefetch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="prefetch"):
        ProcessEventSource(KafkaConfig(), prefetch=0)


def test_kafka_consumer_is_checked() -> None:
    with pytest.raises(ValueError, match="kafka.consumer"):
        KafkaConfig(consumer="fork")  # type: ignore[arg-type]
