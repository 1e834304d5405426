"""Joined examples from Kafka, committed only when the caller acknowledges them.

``JoinedStream`` owns an :class:`~stream.kafka_io.EventSource` (in a process of its own by default:
``stream.consumer_process``) and a :class:`~stream.joiner.LabelJoiner`.
``poll`` hands out newly joined examples; ``ack(examples)`` says they are durable downstream (trained and,
later, checkpointed), and commits every partition up to its *safe* offset: the lowest offset that is still
pending in the joiner or handed out but not yet acknowledged. A crash therefore re-delivers exactly what
was not acknowledged (and, with it, at most one attribution window of examples that were).

Rebalances: acknowledgements commit synchronously, so when partitions are revoked everything acknowledged is
already committed. The revocation listener only records the revoked partitions; on the next ``poll`` their
in-flight state (pending impressions, unacknowledged examples) is dropped, because the new owner re-reads
it from the committed offset. Acks for partitions this member no longer owns are ignored.
"""

from __future__ import annotations

import heapq
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from kafka import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError

from stream.events import DecodedBatch
from stream.joiner import JoinerConfig, LabelJoiner
from stream.consumer_process import ProcessEventSource
from stream.kafka_io import EventSource, KafkaConfig, SourceBatch


@dataclass
class StreamStats:
    consumed: int = 0
    handed_out: int = 0
    acked: int = 0
    dropped_on_revoke: int = 0
    rebalances: int = 0
    commit_retries: int = 0
    below_checkpoint: int = 0
    """Events read again below the offsets of the checkpoint resumed from, and skipped (what it holds already)."""
    assigned: list[int] = field(default_factory=list)


class _Outstanding:
    """Per partition, the impression offsets handed out and not yet acknowledged (min-heap, lazy delete)."""

    def __init__(self) -> None:
        self._heaps: dict[int, list[int]] = {}
        self._acked: dict[int, Counter[int]] = {}  # a multiset: a correction hands an offset out again

    def add(self, partitions: list[int], offsets: list[int]) -> None:
        for part, off in zip(partitions, offsets):
            heapq.heappush(self._heaps.setdefault(part, []), off)

    def ack(self, partitions: list[int], offsets: list[int]) -> None:
        for part, off in zip(partitions, offsets):
            if part in self._heaps:
                self._acked.setdefault(part, Counter())[off] += 1

    def minimum(self, part: int) -> int | None:
        heap, acked = self._heaps.get(part), self._acked.get(part, Counter())
        while heap and acked[heap[0]] > 0:
            off = heapq.heappop(heap)
            acked[off] -= 1
            if not acked[off]:
                del acked[off]
        return heap[0] if heap else None

    def drop(self, parts: set[int]) -> None:
        for part in parts:
            self._heaps.pop(part, None)
            self._acked.pop(part, None)


class _Revocations(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.revoked: set[int] = set()
        self.assigned: set[int] = set()
        self.events = 0

    def on_partitions_revoked(self, revoked) -> None:
        with self._lock:
            self.revoked |= {tp.partition for tp in revoked}
            self.events += 1

    def on_partitions_assigned(self, assigned) -> None:
        with self._lock:
            self.assigned = {tp.partition for tp in assigned}

    def take(self) -> tuple[set[int], set[int]]:
        with self._lock:
            revoked, self.revoked = self.revoked, set()
            return revoked, set(self.assigned)


class JoinedStream:
    def __init__(
        self, kafka: KafkaConfig, joiner: JoinerConfig = JoinerConfig(), restored: LabelJoiner | None = None,
        resume_from: dict[int, int] | None = None,
    ) -> None:
        """``restored``: the joiner of the checkpoint resumed from; ``resume_from``: its offsets (partition -> next
        offset). Kafka's committed offsets may be behind them: a crash can come between a checkpoint made durable
        and the commit of its offsets (a checkpoint written beside training is committed by a later step). The
        events below them, read again, are skipped: the checkpoint holds them already (trained, in its buffer or
        in its joiner), and joining them again would train them twice."""
        self._floor = dict(resume_from or {})
        self._listener = _Revocations()
        source = ProcessEventSource if kafka.consumer == "process" else EventSource
        self.source: EventSource | ProcessEventSource = source(kafka, listener=self._listener)
        self.joiner = restored if restored is not None else LabelJoiner(joiner)
        self.stats = StreamStats()
        self._outstanding = _Outstanding()
        self._consumed: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        self.auto_commit = True
        """False: nothing is committed except by :meth:`commit` (a caller that checkpoints first)."""

    def poll(self) -> pa.Table:
        """Read one batch from Kafka and return the examples whose attribution window closed (may be empty)."""
        examples = self.absorb(self.source.next_batch())
        if self.auto_commit:
            self._commit()  # progress that needs no acknowledgement (dead letters, a retried commit)
        return examples

    def absorb(self, batch: SourceBatch) -> pa.Table:
        """The half of :meth:`poll` after the fetch: join a batch from ``source.next_batch()`` and hand out
        what it completes. It makes no Kafka call, so one thread may fetch the next batch while another
        works on joined examples (the caller serialises this with the stream's other methods)."""
        owned = self._apply_revocations()
        decoded, next_offsets = batch.decoded, batch.next_offsets
        if not set(next_offsets) <= owned:  # records fetched before a revocation in the same batch
            decoded = _only(decoded, owned)
            next_offsets = {p: o for p, o in next_offsets.items() if p in owned}
        if self._floor:
            decoded, skipped = _from(decoded, self._floor)
            self.stats.below_checkpoint += skipped
        self.joiner.add(decoded)
        self._consumed.update(next_offsets)
        self.stats.consumed += batch.n_messages
        examples = self.joiner.emit()
        self._hand_out(examples)
        return examples

    def flush(self) -> pa.Table:
        """Every impression still pending, emitted now (end of a bounded run)."""
        examples = self.joiner.flush()
        self._hand_out(examples)
        return examples

    def ack(self, examples: pa.Table, commit: bool = True) -> None:
        """``examples`` (as handed out) are done downstream. With ``commit``, commit what that makes safe now;
        without, the caller commits later (after its checkpoint is durable) with :meth:`commit`."""
        parts, offs = examples.column("partition").to_pylist(), examples.column("offset").to_pylist()
        self._outstanding.ack(parts, offs)
        self.stats.acked += examples.num_rows
        if commit and self.auto_commit:
            self._commit()

    def commit(self, offsets: dict[int, int] | None = None) -> None:
        """Commit every owned partition up to its safe offset, or up to ``offsets``: the safe offsets a
        checkpoint recorded, when more may have been acknowledged since (those are not durable yet)."""
        self._commit(offsets)

    def safe_offsets(self) -> dict[int, int]:
        """Per owned partition, the offset up to which everything is acknowledged."""
        safe = self.joiner.safe_offsets(self._consumed)
        for part in safe:
            held = self._outstanding.minimum(part)
            if held is not None:
                safe[part] = min(safe[part], held)
        return safe

    @property
    def committed(self) -> dict[int, int]:
        """What this member has committed so far, per partition it owns."""
        return dict(self._committed)

    def lag(self) -> dict[int, int]:
        return self.source.lag()

    def close(self) -> None:
        self.source.close()

    def _hand_out(self, examples: pa.Table) -> None:
        if examples.num_rows:
            self._outstanding.add(examples.column("partition").to_pylist(), examples.column("offset").to_pylist())
            self.stats.handed_out += examples.num_rows

    def _commit(self, upto: dict[int, int] | None = None) -> None:
        safe = self.safe_offsets()
        if upto is not None:  # only partitions still owned, never past what is safe now
            safe = {p: min(o, safe[p]) for p, o in upto.items() if p in safe}
        offsets = {p: o for p, o in safe.items() if self._committed.get(p) != o}
        if not offsets:
            return
        try:
            self.source.commit(offsets)
        except (CommitFailedError, RebalanceInProgressError):
            # The group is rebalancing: keep the offsets uncommitted and retry after the next poll. If the
            # partition moves, its new owner re-reads from the last commit (re-delivery, never loss).
            self.stats.commit_retries += 1
            return
        except KafkaError as exc:
            # The broker is away (restarting): the offsets stay uncommitted and a later commit, which covers
            # them, retries (re-delivery after a crash meanwhile, never loss).
            if not exc.retriable:
                raise
            self.stats.commit_retries += 1
            return
        self._committed.update(offsets)

    def _apply_revocations(self) -> set[int]:
        """Drop the in-flight state of partitions taken away; return the partitions owned now."""
        revoked, assigned = self._listener.take()
        self.stats.assigned = sorted(assigned)
        if not revoked:
            return assigned
        self.stats.rebalances += 1
        gone = revoked - assigned
        self.stats.dropped_on_revoke += self.joiner.drop_partitions(gone)
        self._outstanding.drop(gone)
        for part in gone:
            self._consumed.pop(part, None)
            self._committed.pop(part, None)
        return assigned


def _from(decoded: DecodedBatch, floor: dict[int, int]) -> tuple[DecodedBatch, int]:
    """The events at or past each partition's ``floor`` offset (partitions it does not name: all), and how many
    were left out."""
    def keep(table: pa.Table) -> pa.Table:
        if not table.num_rows:
            return table
        parts, offsets = table["partition"].to_numpy(), table["offset"].to_numpy()
        lows = np.zeros(int(parts.max()) + 1, np.int64)
        for part, low in floor.items():
            if part < len(lows):
                lows[part] = low
        return table.filter(pa.array(offsets >= lows[parts]))
    kept = DecodedBatch(impressions=keep(decoded.impressions), feedback=keep(decoded.feedback), rejects=decoded.rejects)
    return kept, decoded.n_valid - kept.n_valid


def _only(decoded: DecodedBatch, partitions: set[int]) -> DecodedBatch:
    keep = pa.array(sorted(partitions), type=pa.int32())
    return DecodedBatch(
        impressions=decoded.impressions.filter(pc.is_in(decoded.impressions["partition"], keep)),
        feedback=decoded.feedback.filter(pc.is_in(decoded.feedback["partition"], keep)),
        rejects=decoded.rejects,
    )


__all__ = ["JoinedStream", "StreamStats"]
