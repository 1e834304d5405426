"""The online label joiner: impressions wait for their feedback inside an attribution window.

An impression is keyed by ``(request_id, item_id)``. Feedback merges into it (labels are max-merged, so a
duplicate changes nothing and is only counted). Events are keyed by user on Kafka, so an impression and its
feedback share a partition; each partition therefore keeps its own event-time watermark (the latest event
time read from it), and one partition running ahead of another cannot close windows whose feedback is still
unread in the slower one. When its partition's watermark passes ``ts + window`` the impression is emitted as a training example with whatever labels it got: a binary label never seen is a
negative. Feedback for an impression already emitted is late; feedback for one never seen is an orphan.
Both are counted, not silently lost.

Pending state is capped: past ``max_pending`` the oldest impressions are emitted early and counted as
evicted. Because pending impressions are not yet trained on, the offset that may be committed for a
partition is the offset of its oldest pending impression (``safe_offsets``): a crash then re-delivers
them instead of losing them.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from stream.events import EXAMPLE_SCHEMA, LABELS, PLAY_TIME, TASKS, DecodedBatch

_N_LABELS = len(LABELS)
_PLAY = LABELS.index(PLAY_TIME)


@dataclass(frozen=True)
class JoinerConfig:
    window_ms: int = 10_000
    """Attribution window: feedback later than this after the impression is not joined."""
    max_pending: int = 500_000
    """Cap on impressions held in memory; the oldest are emitted early beyond it."""


@dataclass
class JoinerStats:
    impressions: int = 0
    feedback: int = 0
    emitted: int = 0
    joined_feedback: int = 0
    duplicate_feedback: int = 0
    late_feedback: int = 0
    orphan_feedback: int = 0
    duplicate_impressions: int = 0
    evicted: int = 0


class _Pending:
    __slots__ = ("row", "labels")

    def __init__(self, row: tuple, labels: np.ndarray) -> None:
        self.row = row  # (request_id, user_id, item_id, ts_ms, partition, offset)
        self.labels = labels


class LabelJoiner:
    def __init__(self, config: JoinerConfig = JoinerConfig()) -> None:
        self.config = config
        self.stats = JoinerStats()
        self._watermarks: dict[int, int] = {}  # partition -> latest event time read from it
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._by_time: dict[int, list[tuple[int, int, tuple[str, int]]]] = {}  # partition -> heap (ts, seq, key)
        self._by_offset: dict[int, deque[tuple[int, tuple[str, int]]]] = {}  # per partition, arrival order
        self._emitted: set[tuple[str, int]] = set()
        self._emitted_order: deque[tuple[int, int, tuple[str, int]]] = deque()  # (partition, ts, key)
        self._seq = 0

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def watermark_ms(self) -> float:
        """The slowest partition's watermark: every window that closed before it has been emitted."""
        return min(self._watermarks.values(), default=-math.inf)

    def _advance(self, partition: int, ts: int) -> None:
        if ts > self._watermarks.get(partition, -math.inf):
            self._watermarks[partition] = ts

    def add(self, batch: DecodedBatch) -> None:
        """Take a decoded batch: impressions first, so feedback in the same batch finds them."""
        imp = batch.impressions.to_pydict()
        for rid, user, item, ts, part, off in zip(
            imp["request_id"], imp["user_id"], imp["item_id"], imp["ts_ms"], imp["partition"], imp["offset"]
        ):
            key = (rid, item)
            self._advance(part, ts)
            if key in self._pending or key in self._emitted:
                self.stats.duplicate_impressions += 1
                continue
            labels = np.zeros(_N_LABELS, dtype=np.float32)
            self._pending[key] = _Pending((rid, user, item, ts, part, off), labels)
            heapq.heappush(self._by_time.setdefault(part, []), (ts, self._seq, key))
            self._seq += 1
            self._by_offset.setdefault(part, deque()).append((off, key))
            self.stats.impressions += 1

        fb = batch.feedback.to_pydict()
        label_cols = np.column_stack([np.asarray(fb[name], dtype=np.float32) for name in LABELS]) if fb[
            "request_id"
        ] else np.zeros((0, _N_LABELS), dtype=np.float32)
        for j, (rid, item, ts, part) in enumerate(zip(fb["request_id"], fb["item_id"], fb["ts_ms"], fb["partition"])):
            self.stats.feedback += 1
            self._advance(part, ts)
            key = (rid, item)
            pending = self._pending.get(key)
            if pending is None:
                if key in self._emitted:
                    self.stats.late_feedback += 1
                else:
                    self.stats.orphan_feedback += 1
                continue
            if ts > pending.row[3] + self.config.window_ms:
                self.stats.late_feedback += 1
                continue
            incoming = label_cols[j]
            present = ~np.isnan(incoming)
            merged = np.maximum(pending.labels, np.where(present, incoming, 0.0))
            if np.array_equal(merged, pending.labels):
                self.stats.duplicate_feedback += 1
            else:
                self.stats.joined_feedback += 1
            pending.labels = merged

    def emit(self) -> pa.Table:
        """Examples whose attribution window has closed at the current watermark, plus any evictions."""
        keys = []
        window = self.config.window_ms
        for part, heap in self._by_time.items():
            watermark = self._watermarks[part]
            while heap and heap[0][0] + window <= watermark:
                keys.append(heapq.heappop(heap)[2])
        overflow = len(self._pending) - len(keys) - self.config.max_pending
        if overflow > 0:
            oldest = heapq.nsmallest(overflow, (item for heap in self._by_time.values() for item in heap))
            for _, _, key in oldest:
                keys.append(key)
            self.stats.evicted += len(oldest)
            evicted = {key for _, _, key in oldest}
            for part, heap in self._by_time.items():
                self._by_time[part] = [item for item in heap if item[2] not in evicted]
                heapq.heapify(self._by_time[part])
        return self._take(keys)

    def flush(self) -> pa.Table:
        """Emit everything pending, e.g. at the end of a bounded replay."""
        keys = [key for _, _, key in sorted(item for heap in self._by_time.values() for item in heap)]
        self._by_time.clear()
        return self._take(keys)

    def safe_offsets(self, consumed: dict[int, int]) -> dict[int, int]:
        """Per partition, the next offset that may be committed: nothing before it is still pending.

        ``consumed`` maps partition -> next offset to read. Pending impressions pull it back to their own
        offset so a restart re-delivers them.
        """
        safe = dict(consumed)
        for part, queue in self._by_offset.items():
            while queue and queue[0][1] not in self._pending:
                queue.popleft()
            if queue and part in safe:
                safe[part] = min(safe[part], queue[0][0])
        return safe

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget everything pending from ``partitions`` (revoked: their new owner re-reads it). Returns the count."""
        doomed = [key for key, p in self._pending.items() if p.row[4] in partitions]
        for key in doomed:
            del self._pending[key]
        for part in partitions:
            self._by_time.pop(part, None)
            self._by_offset.pop(part, None)
            self._watermarks.pop(part, None)
        return len(doomed)

    def _take(self, keys: list[tuple[str, int]]) -> pa.Table:
        pendings = [self._pending.pop(key) for key in keys]
        for key, p in zip(keys, pendings):
            self._emitted.add(key)
            self._emitted_order.append((p.row[4], p.row[3], key))
        # Remember emitted keys long enough to tell late feedback from orphans, then forget them.
        horizon = 2 * self.config.window_ms
        while self._emitted_order:
            part, ts, key = self._emitted_order[0]
            if ts >= self._watermarks.get(part, -math.inf) - horizon:
                break
            self._emitted.discard(key)
            self._emitted_order.popleft()
        self.stats.emitted += len(pendings)
        if not pendings:
            return EXAMPLE_SCHEMA.empty_table()
        rows = list(zip(*(p.row for p in pendings)))
        labels = np.stack([p.labels for p in pendings])
        labels[:, _PLAY] = np.where(labels[:, _PLAY] > 0, labels[:, _PLAY], 0.0)
        columns = {
            "request_id": rows[0],
            "user_id": rows[1],
            "item_id": rows[2],
            "ts_ms": rows[3],
            **{name: labels[:, i] for i, name in enumerate(LABELS)},
            "partition": rows[4],
            "offset": rows[5],
        }
        return pa.Table.from_pydict(columns, schema=EXAMPLE_SCHEMA)


__all__ = ["JoinerConfig", "JoinerStats", "LabelJoiner", "TASKS"]
