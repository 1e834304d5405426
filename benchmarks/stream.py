"""``moestream bench stream``: events/s through the real broker, stage by stage, beside a raw consume.

Rows, all over the same messages in one topic of a real Kafka broker:

- produce: ``EventSink`` with acks=all, flushed;
- raw consume (the anchor): a bare kafka-python ``KafkaConsumer`` polling the messages, nothing else;
- consume + parse + validate: ``EventSource.next_batch`` (decode into Arrow tables, dead letters routed);
- consume + parse + validate + join: ``JoinedStream.poll`` and ``ack`` (label joiner, commits).

Each consumer reads the whole topic from the beginning in its own consumer group. Without
``KAFKA_BOOTSTRAP_SERVERS`` a local broker is started for the run and stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator

from kafka import KafkaConsumer
from rich.progress import Progress

from benchmarks.harness import Report, Row
from stream.events import encode
from stream.joined import JoinedStream
from stream.joiner import JoinerConfig
from stream.kafka_io import EventSink, EventSource, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig

GOAL_EVENTS_PER_S = 50_000


@contextlib.contextmanager
def broker() -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    from infra.kafka import broker as local

    already = local.status().running
    address = local.up()
    try:
        yield address
    finally:
        if not already:
            local.down()


def _timed(n: int, drain: Callable[[], int], timeout_s: float = 600) -> float:
    """Events/s for ``drain`` (called repeatedly, returning how many it consumed) to reach ``n``."""
    start, seen = time.perf_counter(), 0
    while seen < n:
        seen += drain()
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"consumed {seen} of {n} in {timeout_s}s")
    return n / (time.perf_counter() - start)


def _raw_consume(config: KafkaConfig, n: int) -> float:
    consumer = KafkaConsumer(
        config.topic,
        bootstrap_servers=config.bootstrap_servers,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=config.max_batch,
    )
    try:
        return _timed(n, lambda: sum(len(b) for b in consumer.poll(timeout_ms=200, max_records=config.max_batch).values()))
    finally:
        consumer.close()


def _parse_consume(config: KafkaConfig, n: int) -> tuple[float, int]:
    """Events/s, and how many of the events were dead-lettered (0 for clean simulator traffic)."""
    source = EventSource(KafkaConfig(**{**config.__dict__, "group_id": f"parse-{uuid.uuid4().hex[:8]}"}))
    try:
        return _timed(n, lambda: source.next_batch().n_messages), source.dead_letters.total
    finally:
        source.close()


def _join_consume(config: KafkaConfig, n: int) -> float:
    stream = JoinedStream(KafkaConfig(**{**config.__dict__, "group_id": f"join-{uuid.uuid4().hex[:8]}"}), JoinerConfig())

    def drain() -> int:
        before = stream.stats.consumed
        stream.ack(stream.poll())
        return stream.stats.consumed - before

    try:
        return _timed(n, drain)
    finally:
        stream.close()


def _recent_events(n_requests: int) -> list[dict]:
    """Simulator traffic that ends a second ago: the consumer rejects event times beyond its clock-skew
    allowance, and a run's simulated span (minutes) would otherwise reach into the future."""
    events = list(Simulator(SimulatorConfig(seed=3)).events(0, n_requests))
    shift = int(time.time() * 1000) - 1000 - max(e["ts_ms"] for e in events)
    for event in events:
        event["ts_ms"] += shift
    return events


def run(quick: bool = False) -> Report:
    n_requests = 5_000 if quick else 40_000  # 8 events per request: 40k or 320k events
    report = Report("stream")
    events = [encode(e) for e in _recent_events(n_requests)]
    n = len(events)
    with broker() as bootstrap, Progress(transient=True) as progress:
        task = progress.add_task("stream benchmark", total=4)
        config = KafkaConfig(bootstrap_servers=bootstrap, topic=f"bench.stream.{uuid.uuid4().hex[:8]}", max_batch=4096)
        ensure_topics(config)
        sink = EventSink(config)
        start = time.perf_counter()
        for value in events:
            sink.send_raw(value, key=None)
        sink.flush()
        produce_rate = n / (time.perf_counter() - start)
        sink.close()
        progress.advance(task)
        raw = _raw_consume(config, n)
        progress.advance(task)
        parsed, dead = _parse_consume(config, n)
        progress.advance(task)
        joined = _join_consume(config, n)
        progress.advance(task)

    anchor = "raw kafka-python consume"
    report.add(Row("produce (acks=all)", produce_rate, "events/s"))
    report.add(Row("raw consume", raw, "events/s", anchor=anchor, anchor_value=raw))
    report.add(Row("consume + parse + validate", parsed, "events/s", anchor=anchor, anchor_value=raw,
                   goal=f">= {GOAL_EVENTS_PER_S:,} events/s", met=parsed >= GOAL_EVENTS_PER_S))
    report.add(Row("consume + parse + validate + join", joined, "events/s", anchor=anchor, anchor_value=raw))
    report.notes.append(f"{n:,} simulator events ({n_requests:,} requests), one topic of "
                        f"{config.partitions} partitions, batches of up to {config.max_batch}; "
                        f"{dead:,} dead-lettered by the parse stage")
    return report
