"""Kafka I/O: the event sink (producer), the dead-letter sink, and the event source (consumer group).

The source never commits on its own (auto-commit off). It hands out decoded batches together with the
offsets they reach; the downstream stage calls :meth:`EventSource.commit` once what those offsets cover is
durable. Malformed messages, a null value (a tombstone) among them, are written to ``<topic>.dlq`` with their
key, the reason, their source position and their own headers, and the DLQ is flushed before any commit that
passes them. Writing a dead letter never fails on what the message holds, so no message can stop the intake.

Commands check that a broker answers (:func:`require_broker`) before they start, so a missing one is one line
after ``kafka.connect_timeout_s``, not a timeout deep inside a producer.

Every client connects with :func:`client_options`: the broker address and the security settings of
:class:`KafkaConfig` (TLS, SASL) with the credentials read from the environment at that moment. Credentials
never sit in a config object, so they cannot reach a log, a W&B run config or a printed configuration.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, TopicAlreadyExistsError
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from stream.events import DecodedBatch, decode_batch, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = "moestream.events"
    group_id: str = "moestream.events.trainer"
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
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """With a SASL protocol; the user name and password come from the environment (``SASL_USERNAME_ENV``,
    ``SASL_PASSWORD_ENV``), never from here."""
    ssl_cafile: str | None = None
    """CA bundle that signed the brokers' certificates (None: the system's trust store)."""
    ssl_certfile: str | None = None
    """Client certificate, for brokers that authenticate clients by TLS."""
    ssl_keyfile: str | None = None
    """Its private key; a password protecting it comes from ``SSL_KEY_PASSWORD_ENV``."""
    ssl_check_hostname: bool = True
    connect_timeout_s: float = 5.0
    """How long a command waits for a broker to answer at ``bootstrap_servers`` before it says none does."""
    consumer: Literal["process", "thread"] = "process"
    """Where a trainer's consumer fetches and decodes: a child process handing it Arrow batches
    (``stream.consumer_process``: kafka-python's per-record parsing off the trainer's GIL), or a thread of the
    trainer's own process."""
    delivery_timeout_s: float = 120.0
    """How long an event producer keeps retrying a batch before its send fails: a broker outage shorter than
    this is waited out (``replay`` then prints where to resume)."""

    def __post_init__(self) -> None:
        if not self.connect_timeout_s > 0:
            raise ValueError(f"kafka.connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if not self.delivery_timeout_s >= 1:
            raise ValueError(f"kafka.delivery_timeout_s must be >= 1, got {self.delivery_timeout_s}")
        if self.consumer not in ("process", "thread"):
            raise ValueError(f"kafka.consumer must be process or thread, got {self.consumer!r}")
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise ValueError(f"kafka.security_protocol must be one of {protocols}, got {self.security_protocol!r}")
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"kafka.security_protocol {self.security_protocol} needs kafka.sasl_mechanism "
                             "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(f"kafka.sasl_mechanism is set but kafka.security_protocol is {self.security_protocol}; "
                             "use SASL_SSL (or SASL_PLAINTEXT)")

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"


SASL_USERNAME_ENV = "MOESTREAM_KAFKA_SASL_USERNAME"
SASL_PASSWORD_ENV = "MOESTREAM_KAFKA_SASL_PASSWORD"
SSL_KEY_PASSWORD_ENV = "MOESTREAM_KAFKA_SSL_KEY_PASSWORD"
SECRET_ENV = (SASL_USERNAME_ENV, SASL_PASSWORD_ENV, SSL_KEY_PASSWORD_ENV)
"""The environment variables Kafka credentials are read from (and only from)."""


def client_options(config: KafkaConfig) -> dict[str, Any]:
    """Connection keyword arguments shared by kafka-python's producer, consumer and admin client.

    Credentials are read from the environment here, when a client is built, so that no config object holds
    them; a SASL protocol without them is an error that names the variables to set.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "security_protocol": config.security_protocol,
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        options.update(
            ssl_cafile=config.ssl_cafile,
            ssl_certfile=config.ssl_certfile,
            ssl_keyfile=config.ssl_keyfile,
            ssl_password=os.environ.get(SSL_KEY_PASSWORD_ENV) or None,
            ssl_check_hostname=config.ssl_check_hostname,
        )
    if config.security_protocol.startswith("SASL_"):
        username, password = os.environ.get(SASL_USERNAME_ENV), os.environ.get(SASL_PASSWORD_ENV)
        missing = [name for name, value in ((SASL_USERNAME_ENV, username), (SASL_PASSWORD_ENV, password)) if not value]
        if missing:
            raise ValueError(f"kafka.security_protocol is {config.security_protocol} but {' and '.join(missing)} "
                             "is not set: SASL credentials come from the environment only")
        options.update(sasl_mechanism=config.sasl_mechanism, sasl_plain_username=username,
                       sasl_plain_password=password)
    return options


class BrokerUnavailable(ConnectionError):
    """No Kafka broker answered at the configured address; the message is one line that says how to start one."""


def require_broker(config: KafkaConfig) -> None:
    """Return once a broker answers at ``config.bootstrap_servers``; raise :class:`BrokerUnavailable` after
    ``config.connect_timeout_s`` otherwise. Commands call it first: without it a missing broker shows only as
    a producer's or consumer's timeout, tens of seconds later."""
    if not any(listens(server, config.connect_timeout_s) for server in config.bootstrap_servers.split(",")):
        raise _unavailable(config, "nothing accepts connections there")
    _admin(config, config.connect_timeout_s).close()


def listens(server: str, timeout_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection: a check that starts no client thread, so nothing of
    kafka-python is left running (or printing) when there is no broker at all."""
    host, _, port = server.strip().rpartition(":") if ":" in server else (server.strip(), "", "9092")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def _admin(config: KafkaConfig, timeout_s: float) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**client_options(config), client_id="moestream-admin",
                                bootstrap_timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        raise _unavailable(config, f"{type(exc).__name__} after {timeout_s:g} s") from None


def _unavailable(config: KafkaConfig, why: str) -> BrokerUnavailable:
    return BrokerUnavailable(f"no Kafka broker answered at {config.bootstrap_servers} (kafka.bootstrap_servers: "
                             f"{why}); start a local one with `moestream kafka up`")


def ensure_topics(config: KafkaConfig, timeout_s: float = 30.0) -> None:
    """Create the event topic and its DLQ if they do not exist (idempotent). A broker that does not answer
    within ``timeout_s`` (it may still be starting) raises :class:`BrokerUnavailable`."""
    admin = _admin(config, timeout_s)
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


FLUSH_MARGIN_S = 5.0
"""How long past its delivery timeout a flush may wait for the producer's last answers."""


class EventSink:
    """Produces events keyed by user id, so a user's impressions and feedback share a partition."""

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self.sent = 0
        delivery_timeout_ms = int(config.delivery_timeout_s * 1000)
        self._producer = KafkaProducer(
            **client_options(config),
            acks="all",
            delivery_timeout_ms=delivery_timeout_ms,
            request_timeout_ms=min(30_000, delivery_timeout_ms - 5),  # kafka-python: delivery >= linger + request
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

    def deliver(self, events: list[dict]) -> None:
        """Send ``events`` and return once the broker acknowledged every one of them; raise the first
        failure otherwise (a lost broker: after the producer's delivery timeout). What returned is durable,
        so a caller counting positions after each call counts only acknowledged events."""
        futures = [self._producer.send(self.config.topic, value=encode(e), key=str(e.get("user_id", "")).encode())
                   for e in events]
        self.sent += len(futures)
        self._flush_bounded()
        failed = next((f for f in futures if f.failed()), None)
        if failed is not None:
            raise failed.exception

    def flush(self, timeout_s: float = 60.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def _flush_bounded(self) -> None:
        """Flush, waiting at most the delivery timeout and a margin: kafka-python expires a batch after its
        delivery timeout only while its sender gets to run a cycle for it, and with the broker gone a flush
        without a bound was seen to wait for good (a replay that never exited)."""
        bound_s = self.config.delivery_timeout_s + FLUSH_MARGIN_S
        try:
            self._producer.flush(timeout=bound_s)
        except KafkaTimeoutError:
            raise KafkaTimeoutError(f"KafkaTimeoutError: the broker acknowledged nothing more within {bound_s:g} s "
                                    f"(kafka.delivery_timeout_s {self.config.delivery_timeout_s:g} s and "
                                    f"{FLUSH_MARGIN_S:g} s more)") from None

    def close(self) -> None:
        """Deliver what is pending (within the bound of :meth:`_flush_bounded`), then close; a broker that is gone
        loses the unacknowledged sends, which no caller counted as delivered."""
        try:
            self._flush_bounded()
        except KafkaTimeoutError as exc:
            log.warning("closing the event producer: %s; the sends not acknowledged are dropped", exc)
        finally:
            self._producer.close(timeout=FLUSH_MARGIN_S)


class DeadLetterSink:
    """Writes rejected messages to ``<topic>.dlq``: the key and value byte for byte, then moestream's headers
    (``reason``, ``reason_code``, ``source_topic``, ``source_partition``, ``source_offset``), then the message's
    own headers, each renamed ``source_header.<name>`` so that none can pass for one of ours.

    Kafka cannot take a record with neither key nor value, so a null value (a tombstone) is written as zero
    bytes with the header ``source_value_null: true``; a null header value as zero bytes. A message too large
    for the DLQ once the headers are added is written without its value (``source_value_dropped: too_large``).
    """

    def __init__(self, config: KafkaConfig) -> None:
        self.topic = config.dlq_topic
        self.by_reason: Counter[str] = Counter()
        self._producer = KafkaProducer(**client_options(config), acks="all", retries=10)

    def send(self, record: ConsumerRecord, reason: str, code: str = "invalid") -> None:
        """Dead-letter ``record`` (as the consumer returned it) for ``reason``; ``code`` groups the counts."""
        headers = [
            ("reason", reason.encode()),
            ("reason_code", code.encode()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
        ]
        if record.value is None:
            headers.append(("source_value_null", b"true"))
        headers += [(f"source_header.{name}", value or b"") for name, value in record.headers or ()]
        value = record.value or b""
        try:
            self._producer.send(self.topic, key=record.key, value=value, headers=headers)
        except MessageSizeTooLargeError:
            self._producer.send(self.topic, key=record.key, value=b"",
                                headers=[*headers, ("source_value_dropped", b"too_large")])
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
        self.poll_errors = 0
        """Polls that failed on a transient Kafka error (a broker away) and were retried."""
        self._listener = listener
        self._consumer = KafkaConsumer(
            **client_options(config),
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
            try:
                polled = self._consumer.poll(timeout_ms=max(left_ms, 0), max_records=self.config.max_batch - len(records))
            except KafkaError as exc:
                # kafka-python lets a refused connection out of poll (while it revalidates positions after a
                # broker restart). A raising poll returned nothing, so the position has not moved: keep what
                # earlier polls returned and try again, paced, until the broker answers.
                if not exc.retriable:
                    raise
                self.poll_errors += 1
                time.sleep(min(max(left_ms, 0), 100) / 1000)
                polled = {}
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
            self.dead_letters.send(r, reject.reason, reject.code)
        next_offsets: dict[int, int] = {}
        for r in records:
            next_offsets[r.partition] = max(next_offsets.get(r.partition, 0), r.offset + 1)
        self.consumed += len(records)
        return SourceBatch(decoded, next_offsets, len(records))

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit ``offsets`` (partition -> next offset): call only once what precedes them is durable."""
        if not offsets:
            return
        self.dead_letters.flush()
        self._consumer.commit(
            {TopicPartition(self.config.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
        )

    def outside_group(self) -> bool:
        """A group member without partitions (it left the group, or never got an assignment)."""
        return self.config.assign is None and not self._consumer.assignment()

    def rejoin(self) -> None:
        """Leave the consumer group and join it again: the group reassigns the partitions, and each resumes
        from its committed offset, as after any rebalance (the listener hears the revocation, which kafka-python's
        ``unsubscribe`` does not report). With a static assignment, the same partitions are assigned afresh.
        The intake's watchdog calls this for a member that fetches nothing while its partitions have lag, or
        that stays outside its group."""
        held = list(self._consumer.assignment())
        if self._listener is not None and held:
            self._listener.on_partitions_revoked(held)
        self._consumer.unsubscribe()
        if self.config.assign is None:
            self._consumer.subscribe([self.config.topic], listener=self._listener)
            return
        owned = [TopicPartition(self.config.topic, p) for p in self.config.assign]
        self._consumer.assign(owned)
        if self._listener is not None:
            self._listener.on_partitions_assigned(owned)

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
