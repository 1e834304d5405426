"""The online label joiner: impressions wait for their feedback inside an attribution window.

An impression is keyed by ``(request_id, item_id)``. Feedback merges into it (labels are max-merged, so a
duplicate changes nothing and is only counted). Events are keyed by user on Kafka, so an impression and its
feedback share a partition; each partition therefore keeps its own event-time watermark (the latest event
time read from it), and one partition running ahead of another cannot close windows whose feedback is still
unread in the slower one. When its partition's watermark passes ``ts + window`` the impression is emitted as a training example with whatever labels it got: a binary label never seen is a
negative. Feedback for an impression already emitted is late; feedback for one never seen is an orphan.
Both are counted, not silently lost.

Late feedback is counted and, with ``late_policy="correct"``, the impression is emitted once more with its
completed labels and ``is_correction`` set (the "fake negative" correction of delayed-feedback learning:
the trainer learns the positive it first saw as a negative). Emitted impressions are remembered for two
windows for that, then forgotten.

Pending state is capped: past ``max_pending`` the oldest impressions are emitted early and counted as
evicted. Because pending impressions are not yet trained on, the offset that may be committed for a
partition is the offset of its oldest pending impression (``safe_offsets``): a crash then re-delivers
them instead of losing them.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import orjson
import pyarrow as pa

from stream.events import EXAMPLE_SCHEMA, LABELS, TASKS, DecodedBatch

_N_LABELS = len(LABELS)
_STATE_SCHEMA = pa.schema([pa.field("emitted", pa.bool_()), *EXAMPLE_SCHEMA.remove(EXAMPLE_SCHEMA.get_field_index("is_correction"))])


@dataclass(frozen=True)
class JoinerConfig:
    window_ms: int = 10_000
    """Attribution window: feedback later than this after the impression is not joined."""
    max_pending: int = 500_000
    """Cap on impressions held in memory; the oldest are emitted early beyond it."""
    late_policy: Literal["drop", "correct"] = "drop"
    """What late feedback on an emitted impression does: only counted, or re-emitted as a correction."""

    def __post_init__(self) -> None:
        if self.late_policy not in ("drop", "correct"):
            raise ValueError(f"joiner.late_policy must be 'drop' or 'correct', got {self.late_policy!r}")
        if self.window_ms < 0 or self.max_pending < 1:
            raise ValueError("joiner.window_ms must be >= 0 and joiner.max_pending >= 1")


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
    corrections: int = 0


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
        self._emitted: dict[tuple[str, int], _Pending] = {}  # recently emitted, for late/duplicate/correction
        self._corrections: list[_Pending] = []
        self._emitted_order: deque[tuple[int, int, tuple[str, int]]] = deque()  # (partition, ts, key)
        self._seq = 0

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def watermark_ms(self) -> float:
        """The slowest partition's watermark: every window that closed before it has been emitted."""
        return min(self._watermarks.values(), default=-math.inf)

    def add(self, batch: DecodedBatch) -> None:
        """Take a decoded batch: impressions first, so feedback in the same batch finds them."""
        imp, fb = batch.impressions.to_pydict(), batch.feedback.to_pydict()
        self._advance(imp["partition"], imp["ts_ms"])  # nothing in add() reads a watermark: once per batch
        self._advance(fb["partition"], fb["ts_ms"])
        for rid, user, item, ts, part, off in zip(
            imp["request_id"], imp["user_id"], imp["item_id"], imp["ts_ms"], imp["partition"], imp["offset"]
        ):
            key = (rid, item)
            if key in self._pending or key in self._emitted:
                self.stats.duplicate_impressions += 1
                continue
            self._pending[key] = _Pending((rid, user, item, ts, part, off), np.zeros(_N_LABELS, dtype=np.float32))
            heapq.heappush(self._by_time.setdefault(part, []), (ts, self._seq, key))
            self._seq += 1
            self._by_offset.setdefault(part, deque()).append((off, key))
            self.stats.impressions += 1

        if not fb["request_id"]:
            return
        label_cols = np.column_stack([np.asarray(fb[name], dtype=np.float32) for name in LABELS])
        window, joined = self.config.window_ms, []
        self.stats.feedback += len(fb["request_id"])
        for j, (rid, item, ts) in enumerate(zip(fb["request_id"], fb["item_id"], fb["ts_ms"])):
            key = (rid, item)
            pending = self._pending.get(key)
            if pending is None or ts > pending.row[3] + window:
                self._late(key, label_cols[j], pending)
            else:
                joined.append((j, pending))
        if joined:
            self._join(joined, np.where(np.isnan(label_cols), np.float32(0), label_cols))

    def _advance(self, partitions: list[int], stamps: list[int]) -> None:
        """Each partition's watermark to the latest of ``stamps`` read from it, if that is later."""
        if not stamps:
            return
        parts, ts = np.asarray(partitions, np.int64), np.asarray(stamps, np.int64)
        for part in np.unique(parts).tolist():
            latest = int(ts[parts == part].max()) if len(parts) > 1 else int(ts[0])
            if latest > self._watermarks.get(part, -math.inf):
                self._watermarks[part] = latest

    def _join(self, joined: list[tuple[int, _Pending]], present: np.ndarray) -> None:
        """Max-merge the feedback rows ``present[j]`` (absent labels as 0) into their pending impressions, a
        round at a time: round r holds each impression's r-th feedback of the batch, so every merge sees the
        ones before it, as one at a time would, while the maxima and comparisons run over whole rounds."""
        rounds: list[list[tuple[int, _Pending]]] = []
        seen: dict[int, int] = {}
        for j, pending in joined:
            r = seen.get(id(pending), 0)
            seen[id(pending)] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append((j, pending))
        for round_ in rounds:
            rows = np.fromiter((j for j, _ in round_), np.intp, len(round_))
            before = np.stack([pending.labels for _, pending in round_])
            merged = np.maximum(before, present[rows])
            duplicates = int((merged == before).all(axis=1).sum())
            self.stats.duplicate_feedback += duplicates
            self.stats.joined_feedback += len(round_) - duplicates
            for (_, pending), labels in zip(round_, merged):
                pending.labels = labels

    def _late(self, key: tuple[str, int], incoming: np.ndarray, pending: _Pending | None) -> None:
        emitted = self._emitted.get(key)
        if pending is None and emitted is None:
            self.stats.orphan_feedback += 1
            return
        self.stats.late_feedback += 1
        if self.config.late_policy == "correct" and emitted is not None:
            merged = _merge(emitted.labels, incoming)
            if not np.array_equal(merged, emitted.labels):
                emitted.labels = merged
                self._corrections.append(_Pending(emitted.row, merged.copy()))

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

    def state(self) -> bytes:
        """Everything needed to resume exactly: pending and recently emitted impressions, watermarks, stats.

        Arrow IPC with JSON metadata: no pickle, safe to read back from disk.
        """
        pending = list(self._pending.values())
        emitted = [self._emitted[key] for _, _, key in self._emitted_order if key in self._emitted]
        table = pa.Table.from_pydict(
            {"emitted": [False] * len(pending) + [True] * len(emitted), **_columns(pending + emitted)},
            schema=_STATE_SCHEMA,
        )
        meta = {"watermarks": {str(k): v for k, v in self._watermarks.items()}, "stats": asdict(self.stats)}
        table = table.replace_schema_metadata({"moestream.joiner": orjson.dumps(meta)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_state(cls, config: JoinerConfig, data: bytes) -> LabelJoiner:
        table = pa.ipc.open_stream(data).read_all()
        meta = orjson.loads(table.schema.metadata[b"moestream.joiner"])
        joiner = cls(config)
        joiner.stats = JoinerStats(**meta["stats"])
        joiner._watermarks = {int(k): v for k, v in meta["watermarks"].items()}
        cols = table.to_pydict()
        labels = np.column_stack([np.asarray(cols[n], dtype=np.float32) for n in LABELS]) if table.num_rows else []
        fields = zip(cols["emitted"], cols["request_id"], cols["user_id"], cols["item_id"], cols["ts_ms"],
                     cols["partition"], cols["offset"])
        for i, (was_emitted, rid, user, item, ts, part, off) in enumerate(fields):
            entry, key = _Pending((rid, user, item, ts, part, off), labels[i].copy()), (rid, item)
            if was_emitted:
                joiner._emitted[key] = entry
                joiner._emitted_order.append((part, ts, key))
            else:
                joiner._pending[key] = entry
                heapq.heappush(joiner._by_time.setdefault(part, []), (ts, joiner._seq, key))
                joiner._seq += 1
        for key, entry in sorted(joiner._pending.items(), key=lambda kv: kv[1].row[5]):
            joiner._by_offset.setdefault(entry.row[4], deque()).append((entry.row[5], key))
        return joiner

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
            self._emitted[key] = p
            self._emitted_order.append((p.row[4], p.row[3], key))
        # Remember emitted keys long enough to tell late feedback from orphans, then forget them.
        horizon = 2 * self.config.window_ms
        while self._emitted_order:
            part, ts, key = self._emitted_order[0]
            if ts >= self._watermarks.get(part, -math.inf) - horizon:
                break
            self._emitted.pop(key, None)
            self._emitted_order.popleft()
        self.stats.emitted += len(pendings)
        corrections, self._corrections = self._corrections, []
        self.stats.corrections += len(corrections)
        return _examples(pendings, corrections)


def _merge(labels: np.ndarray, incoming: np.ndarray) -> np.ndarray:
    """Max-merge: a label once seen stays; NaN (absent) changes nothing."""
    return np.maximum(labels, np.where(np.isnan(incoming), 0.0, incoming))


def _examples(pendings: list[_Pending], corrections: list[_Pending]) -> pa.Table:
    everything = pendings + corrections
    if not everything:
        return EXAMPLE_SCHEMA.empty_table()
    columns = _columns(everything)
    columns["is_correction"] = [False] * len(pendings) + [True] * len(corrections)
    return pa.Table.from_pydict(columns, schema=EXAMPLE_SCHEMA)


def _columns(pendings: list[_Pending]) -> dict[str, object]:
    rows = list(zip(*(p.row for p in pendings))) if pendings else [[] for _ in range(6)]
    labels = np.stack([p.labels for p in pendings]) if pendings else np.zeros((0, _N_LABELS), np.float32)
    return {
        "request_id": rows[0],
        "user_id": rows[1],
        "item_id": rows[2],
        "ts_ms": rows[3],
        **{name: labels[:, i] for i, name in enumerate(LABELS)},
        "partition": rows[4],
        "offset": rows[5],
    }


__all__ = ["JoinerConfig", "JoinerStats", "LabelJoiner", "TASKS"]
