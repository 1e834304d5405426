"""Kafka I/O: the event sink (producer), the dead-letter sink, and the event source (consumer group).

The source never commits on its own (auto-commit off). It hands out decoded batches together with the
offsets they reach; the downstream stage calls :meth:`EventSource.ack` once what those offsets cover is
durable, and only then are they committed. Malformed messages are written to ``<topic>.dlq`` with the
reason and their source position in headers, and the DLQ is flushed before any commit that passes them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from stream.events import DecodedBatch, decode_batch, encode


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = "moestream.events"
    group_id: str = "moestream-trainer"
    partitions: int = 4
    max_batch: int = 1024
    """Most messages handed out in one batch."""
    max_wait_ms: int = 200
    """Longest a batch waits to fill up."""
    max_skew_ms: int = 5 * 60 * 1000
    """Events stamped further than this in the future are dead-lettered."""
    assign: tuple[int, ...] | None = None
    """Read exactly these partitions (static assignment, no group rebalancing; offsets are still committed
    under ``group_id``). Data-parallel trainer ranks use it: a rank blocked in a collective can then never
    hold up a rebalance that the other ranks wait on. None: join the consumer group."""

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"


def ensure_topics(config: KafkaConfig, timeout_s: float = 30.0) -> None:
    """Create the event topic and its DLQ if they do not exist (idempotent)."""
    admin = KafkaAdminClient(bootstrap_servers=config.bootstrap_servers, client_id="moestream-admin")
    try:
        wanted = [NewTopic(config.topic, config.partitions, 1), NewTopic(config.dlq_topic, 1, 1)]
        missing = [t for t in wanted if t.name not in set(admin.list_topics())]
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        while not {t.name for t in wanted} <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {[t.name for t in wanted]} not visible after {timeout_s}s")
            time.sleep(0.1)
    finally:
        admin.close()


class EventSink:
    """Produces events keyed by user id, so a user's impressions and feedback share a partition."""

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self.sent = 0
        self._producer = KafkaProducer(
            bootstrap_servers=config.bootstrap_servers,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            retries=10,
            compression_type=None,
        )

    def send(self, event: dict) -> None:
        self.send_raw(encode(event), key=str(event.get("user_id", "")).encode())

    def send_raw(self, value: bytes, key: bytes | None = None) -> None:
        self._producer.send(self.config.topic, value=value, key=key)
        self.sent += 1

    def send_all(self, events: Iterable[dict]) -> int:
        n = 0
        for event in events:
            self.send(event)
            n += 1
        return n

    def flush(self, timeout_s: float = 60.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()


class DeadLetterSink:
    """Writes rejected messages, byte for byte, to ``<topic>.dlq`` with the reason in headers."""

    def __init__(self, config: KafkaConfig) -> None:
        self.topic = config.dlq_topic
        self.by_reason: Counter[str] = Counter()
        self._producer = KafkaProducer(bootstrap_servers=config.bootstrap_servers, acks="all", retries=10)

    def send(
        self, value: bytes | None, reason: str, source_topic: str, partition: int, offset: int, code: str = "invalid"
    ) -> None:
        headers = [
            ("reason", reason.encode()),
            ("reason_code", code.encode()),
            ("source_topic", source_topic.encode()),
            ("source_partition", str(partition).encode()),
            ("source_offset", str(offset).encode()),
        ]
        self._producer.send(self.topic, value=value, headers=headers)
        self.by_reason[code] += 1

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def flush(self, timeout_s: float = 60.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()


@dataclass
class SourceBatch:
    decoded: DecodedBatch
    next_offsets: dict[int, int]
    """Partition -> the offset after the last message of this batch (what a commit would store)."""
    n_messages: int


class EventSource:
    """A consumer-group member that decodes batches and commits only what it is told is durable."""

    def __init__(
        self,
        config: KafkaConfig,
        dead_letters: DeadLetterSink | None = None,
        listener: ConsumerRebalanceListener | None = None,
    ) -> None:
        self.config = config
        self.dead_letters = dead_letters or DeadLetterSink(config)
        self.consumed = 0
        self._consumer = KafkaConsumer(
            bootstrap_servers=config.bootstrap_servers,
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.max_batch,
            fetch_max_wait_ms=min(config.max_wait_ms, 500),
            session_timeout_ms=30_000,
            max_poll_interval_ms=600_000,
        )
        if config.assign is None:
            self._await_topic_metadata(config.topic)
            self._consumer.subscribe([config.topic], listener=listener)
        else:
            owned = [TopicPartition(config.topic, p) for p in config.assign]
            self._consumer.assign(owned)
            if listener is not None:
                listener.on_partitions_assigned(owned)

    def _await_topic_metadata(self, topic: str, timeout_s: float = 30.0) -> None:
        """Know the topic's partitions before joining the group. The group leader assigns from its own
        metadata, and a leader that has none for the topic yet hands out an empty assignment that
        kafka-python did not revisit (seen as a member idle for minutes with ``assigned=[]``). A topic
        that does not exist yet is waited for up to ``timeout_s``, then joined anyway."""
        deadline = time.monotonic() + timeout_s
        while not self._consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            time.sleep(0.2)  # between metadata requests to the broker

    def next_batch(self) -> SourceBatch:
        """Up to ``max_batch`` messages, or whatever arrived within ``max_wait_ms``; may be empty."""
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        records: list = []
        while len(records) < self.config.max_batch:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 and records:
                break
            polled = self._consumer.poll(timeout_ms=max(left_ms, 0), max_records=self.config.max_batch - len(records))
            records += [r for batch in polled.values() for r in batch]
            if left_ms <= 0:
                break
        values = [r.value for r in records]
        decoded = decode_batch(
            values,
            [r.partition for r in records],
            [r.offset for r in records],
            now_ms=int(time.time() * 1000),
            max_skew_ms=self.config.max_skew_ms,
        )
        for reject in decoded.rejects:
            r = records[reject.index]
            self.dead_letters.send(r.value, reject.reason, r.topic, r.partition, r.offset, reject.code)
        next_offsets: dict[int, int] = {}
        for r in records:
            next_offsets[r.partition] = max(next_offsets.get(r.partition, 0), r.offset + 1)
        self.consumed += len(records)
        return SourceBatch(decoded, next_offsets, len(records))

    def ack(self, offsets: dict[int, int]) -> None:
        """Commit ``offsets`` (partition -> next offset): call only once what precedes them is durable."""
        if not offsets:
            return
        self.dead_letters.flush()
        self._consumer.commit(
            {TopicPartition(self.config.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
        )

    def lag(self) -> dict[int, int]:
        """Messages between each assigned partition's position and its end."""
        assigned = list(self._consumer.assignment())
        if not assigned:
            return {}
        ends = self._consumer.end_offsets(assigned)
        return {tp.partition: ends[tp] - self._consumer.position(tp) for tp in assigned}

    def close(self) -> None:
        self._consumer.close(autocommit=False)
        self.dead_letters.close()
