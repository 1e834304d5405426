"""Kafka's consumer in a process of its own, handing decoded batches to the trainer as Arrow.

kafka-python parses every record in Python (``DefaultRecordBatch``, ``PartitionRecords``), and with the JSON
decode that is most of what the trainer's intake thread does: profiled in one MMoE-8 worker at 10^7 IDs, the
intake thread held the trainer's GIL 35-50% of the time, more than half of it in kafka-python's parsing,
while the training and push threads waited for it (docs/learner.md, "Where the rest goes"). Here that work
runs in a child process: it owns an :class:`~stream.kafka_io.EventSource` (the consumer-group member, its
dead-letter producer, the decode), and the trainer's process gets each batch as two Arrow IPC buffers.

:class:`ProcessEventSource` is a drop-in for ``EventSource`` in :class:`~stream.joined.JoinedStream`: the same
``next_batch``, ``commit``, ``lag``, ``rejoin`` and ``outside_group``, and the same rebalance listener calls,
delivered in the order they happened between batches. Delivery does not change: the child commits only the
offsets it is told to (after the dead letters before them are flushed, as ``EventSource.commit`` does), so a
commit still follows a durable checkpoint. The child reads ahead at most ``prefetch`` batches (credits the
parent hands back as it takes batches), the same read-ahead kafka-python's own fetch buffer does.

The wire: ``multiprocessing.connection`` framing over a socket pair, a JSON header per message (orjson) and, for
a batch, the impressions and feedback tables as Arrow IPC streams. Nothing is pickled. The child exits when
its parent goes away (the socket closes); a child that dies makes the parent's next call raise
:class:`ConsumerProcessError`, which fails the intake like any other broken fetch (Ray restarts the worker
from its checkpoint and the committed offsets).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import kafka.errors
import orjson
import pyarrow as pa
from kafka import ConsumerRebalanceListener, TopicPartition

from stream.events import DecodedBatch, Reject
from stream.kafka_io import EventSource, KafkaConfig, SourceBatch

START_TIMEOUT_S = 90.0
"""How long the parent waits for the child to join its group (the topic's metadata alone may take 30 s)."""
REPLY_TIMEOUT_S = 120.0
"""How long a commit, lag query or re-join may take before the child counts as stuck."""


class ConsumerProcessError(RuntimeError):
    """The consumer process died or broke the protocol; the message says how."""


class DeadLetterCounts:
    """The child's dead-letter counts, as of the last batch (``EventSource.dead_letters`` in the parent)."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


class ProcessEventSource:
    """An :class:`~stream.kafka_io.EventSource` running in a child process (see the module docstring)."""

    def __init__(self, config: KafkaConfig, listener: ConsumerRebalanceListener | None = None,
                 prefetch: int = 2) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.config = config
        self.dead_letters = DeadLetterCounts()
        self.consumed = 0
        self.poll_errors = 0
        self._listener = listener
        self._outside = config.assign is None
        self._items: deque[tuple[str, Any]] = deque()  # batches and listener calls, in the child's order
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self._failure: dict | None = None
        self._lock = threading.RLock()
        parent, child = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "stream.consumer_process", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._send({"op": "start", "id": 0, "config": asdict(config), "prefetch": prefetch})
        self._reply(0, "start", START_TIMEOUT_S)  # the consumer exists and has subscribed (or the error)

    # -- EventSource's interface -------------------------------------------------------------------------

    def next_batch(self) -> SourceBatch:
        """The next batch the child fetched and decoded (it may be empty); listener calls that came before it
        are made first, in order."""
        with self._lock:
            while True:
                while self._items:
                    kind, item = self._items.popleft()
                    if kind == "batch":
                        self._send({"op": "more"})
                        return item
                    self._notify(kind, item)
                if self._failure is not None:
                    raise _error(self._failure)
                self._read(timeout_s=None)

    def commit(self, offsets: dict[int, int]) -> None:
        if offsets:
            self._call("commit", offsets={str(p): o for p, o in offsets.items()})

    def lag(self) -> dict[int, int]:
        return {int(p): n for p, n in self._call("lag").items()}

    def rejoin(self) -> None:
        self._call("rejoin")

    def outside_group(self) -> bool:
        """As of the child's last batch."""
        return self._outside

    def close(self, timeout_s: float = 30.0) -> None:
        """Close the consumer (no auto-commit) and flush its dead letters, then end the child."""
        try:
            if self._process.poll() is None:
                self._call("close", timeout_s=timeout_s)
        except (ConsumerProcessError, kafka.errors.KafkaError):
            pass  # the child is gone or broken: nothing it holds is durable anyway
        finally:
            self._conn.close()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    @property
    def pid(self) -> int:
        return self._process.pid

    # -- the wire ----------------------------------------------------------------------------------------

    def _send(self, message: dict) -> None:
        try:
            self._conn.send_bytes(orjson.dumps(message))
        except OSError as exc:
            raise self._gone(exc) from None

    def _call(self, op: str, timeout_s: float = REPLY_TIMEOUT_S, **arguments: Any) -> Any:
        """Send ``op`` and wait for its reply (batches and listener calls read meanwhile are kept, in order)."""
        with self._lock:
            self._next_id += 1
            self._send({"op": op, "id": self._next_id, **arguments})
            return self._reply(self._next_id, op, timeout_s)

    def _reply(self, ident: int, op: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while ident not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConsumerProcessError(f"the Kafka consumer process (pid {self.pid}) did not answer "
                                           f"{op!r} within {timeout_s:g}s")
            self._read(timeout_s=left)
        reply = self._replies.pop(ident)
        if "error" in reply:
            raise _error(reply["error"])
        return reply.get("value")

    def _read(self, timeout_s: float | None) -> None:
        """Read one message (waiting up to ``timeout_s``; None: as long as it takes) and file it."""
        try:
            if timeout_s is not None and not self._conn.poll(timeout_s):
                return
            header = orjson.loads(self._conn.recv_bytes())
            kind = header["kind"]
            if kind == "batch":
                impressions = _table(self._conn.recv_bytes())
                feedback = _table(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise self._gone(exc) from None
        if kind == "reply":
            self._replies[header["id"]] = header
        elif kind == "failed":
            self._failure = header["error"]
        elif kind == "batch":
            self.consumed, self.poll_errors = header["consumed"], header["poll_errors"]
            self.dead_letters.by_reason = Counter(header["dead_letters"])
            self._outside = header["outside"]
            rejects = [Reject(i, reason, code) for i, reason, code in header["rejects"]]
            decoded = DecodedBatch(impressions, feedback, rejects)
            offsets = {int(p): o for p, o in header["next_offsets"].items()}
            self._items.append(("batch", SourceBatch(decoded, offsets, header["n_messages"])))
        else:  # a listener call: made when the batches before it have been taken
            self._items.append((kind, header["partitions"]))

    def _notify(self, kind: str, partitions: list[int]) -> None:
        if self._listener is None:
            return
        held = [TopicPartition(self.config.topic, p) for p in partitions]
        if kind == "revoked":
            self._listener.on_partitions_revoked(held)
        else:
            self._listener.on_partitions_assigned(held)

    def _gone(self, cause: BaseException) -> ConsumerProcessError:
        code = self._process.poll()
        state = f"exited with code {code}" if code is not None else f"closed its connection ({cause!r})"
        return ConsumerProcessError(f"the Kafka consumer process (pid {self.pid}) {state}; its stderr is in this "
                                    "process's log")


def _table(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _describe(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)}


_BUILTIN_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, ConnectionError, TimeoutError, OSError)}


def _error(error: dict) -> BaseException:
    """The child's exception, rebuilt: kafka-python's errors as themselves (their ``retriable`` is a class
    attribute, so the caller's retry decisions hold), a few builtins, and anything else as
    :class:`ConsumerProcessError`."""
    name, message = error["type"], error["message"]
    cls = getattr(kafka.errors, name, None)
    if isinstance(cls, type) and issubclass(cls, kafka.errors.KafkaError):
        return cls(message)
    if name in _BUILTIN_ERRORS:
        return _BUILTIN_ERRORS[name](message)
    return ConsumerProcessError(f"the Kafka consumer process failed: {name}: {message}")


# -- the child -------------------------------------------------------------------------------------------


class _Forward(ConsumerRebalanceListener):
    """Rebalance calls, sent to the parent in order with the batches."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def on_partitions_revoked(self, revoked) -> None:
        self._conn.send_bytes(orjson.dumps({"kind": "revoked", "partitions": sorted(tp.partition for tp in revoked)}))

    def on_partitions_assigned(self, assigned) -> None:
        self._conn.send_bytes(orjson.dumps({"kind": "assigned", "partitions": sorted(tp.partition for tp in assigned)}))


def _child(fd: int) -> None:
    conn = Connection(fd)
    start = orjson.loads(conn.recv_bytes())
    fields = dict(start["config"])
    if fields.get("assign") is not None:
        fields["assign"] = tuple(fields["assign"])
    try:
        source = EventSource(KafkaConfig(**fields), listener=_Forward(conn))
    except Exception as exc:  # noqa: BLE001 - raised in the parent, which decides
        conn.send_bytes(orjson.dumps({"kind": "reply", "id": 0, "error": _describe(exc)}))
        return
    conn.send_bytes(orjson.dumps({"kind": "reply", "id": 0}))
    try:
        _serve(conn, source, credits=int(start["prefetch"]))
    except (EOFError, OSError):  # the parent went away: leave the group now, not after the session timeout
        source.close()


def _serve(conn: Connection, source: EventSource, credits: int) -> None:
    """Fetch while the parent has credits left; answer its commands between fetches; return on ``close``."""
    failed = False
    while True:
        # Commands first; without credits (or after a failed fetch) wait for one instead of fetching.
        while conn.poll(0 if credits and not failed else 0.5):
            message = orjson.loads(conn.recv_bytes())
            op = message["op"]
            if op == "more":
                credits += 1
                continue
            reply: dict[str, Any] = {"kind": "reply", "id": message["id"]}
            try:
                if op == "commit":
                    source.commit({int(p): o for p, o in message["offsets"].items()})
                elif op == "lag":
                    reply["value"] = {str(p): n for p, n in source.lag().items()}
                elif op == "rejoin":
                    source.rejoin()
                elif op == "close":
                    source.close()
                else:
                    raise ValueError(f"unknown command {op!r}")
            except Exception as exc:  # noqa: BLE001 - raised in the parent, which decides
                reply["error"] = _describe(exc)
            conn.send_bytes(orjson.dumps(reply))
            if op == "close":
                return
        if not credits or failed:
            continue
        try:
            batch = source.next_batch()
        except Exception as exc:  # noqa: BLE001 - the parent's next fetch raises it
            conn.send_bytes(orjson.dumps({"kind": "failed", "error": _describe(exc)}))
            failed = True
            continue
        decoded = batch.decoded
        conn.send_bytes(orjson.dumps({
            "kind": "batch", "n_messages": batch.n_messages,
            "next_offsets": {str(p): o for p, o in batch.next_offsets.items()},
            "rejects": [[r.index, r.reason, r.code] for r in decoded.rejects],
            "consumed": source.consumed, "poll_errors": source.poll_errors,
            "dead_letters": dict(source.dead_letters.by_reason), "outside": source.outside_group()}))
        conn.send_bytes(_ipc(decoded.impressions))
        conn.send_bytes(_ipc(decoded.feedback))
        credits -= 1


if __name__ == "__main__":
    try:
        _child(int(sys.argv[1]))
    finally:
        os._exit(0)  # kafka-python's threads must not keep a parentless child alive
