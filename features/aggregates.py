"""Streaming per-user and per-item statistics over sliding windows, computed from joined examples.

Each window of length ``L`` keeps, per entity, the sums of two tumbling buckets: the current one and the one
before. At time ``t`` (in bucket ``B = t // L``) the sliding-window sum is estimated as
``cur + prev * (1 - (t - B*L) / L)``, the sliding-window counter of rate limiters: exact when events are
spread evenly over the previous bucket, O(1) memory per entity and window, and fully vectorized.

Rates are smoothed towards a prior (``(positives + prior_rate * strength) / (n + strength)``) so that a user
with two impressions does not get a click rate of 0 or 1. Per batch, ``update`` returns one row per touched
entity, ready to push to Feast in one call. Rows are stamped one millisecond after the newest event they
count (and strictly later than the previous stamp), so a point-in-time join at an event's own time never
sees that event's label, and a store that drops same-instant rewrites (Feast's Redis store) drops none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from features.config import AggregateConfig
from features.definitions import ITEM_STREAM, USER_STREAM, WINDOW_STATS, WINDOWS
from stream.events import PLAY_TIME, TASKS


_SUMS = ("n", *TASKS, "play_s")
_WINDOW_MS = {w: int(d.total_seconds() * 1000) for w, d in WINDOWS.items()}
_COLUMN_WINDOW_MS = np.repeat(list(_WINDOW_MS.values()), len(WINDOW_STATS))  # the window of each stream column

NEVER_MS = np.iinfo(np.int64).min // 2
"""``updated_ms`` of an entity without a row: older than any window."""


def expire(stats: np.ndarray, updated_ms: np.ndarray, now_ms: int | np.ndarray, defaults: np.ndarray) -> np.ndarray:
    """Stream statistics as of ``now_ms`` (one time, or one per row): a window's values hold for that window's
    length after their row was written (``updated_ms``), then they are that window's ``defaults`` (as if no
    event fell in it)."""
    age_ms = now_ms - np.asarray(updated_ms, np.int64)  # (N,)
    return np.where(age_ms[:, None] <= _COLUMN_WINDOW_MS[None, :], stats, defaults).astype(np.float32)


def window_features(sums: np.ndarray, config: AggregateConfig) -> np.ndarray:
    """``(N, len(WINDOW_STATS))`` statistics from ``(N, len(_SUMS))`` window sums."""
    k, n = config.prior_strength, sums[:, 0]
    positives = sums[:, 1 : 1 + len(TASKS)]
    rates = (positives + np.asarray(config.prior_rates) * k) / (n[:, None] + k)
    play = (sums[:, -1] + config.prior_play_s * k) / (n + k)
    return np.column_stack([np.log1p(n), rates, np.log1p(positives), play]).astype(np.float32)


def no_events(config: AggregateConfig) -> np.ndarray:
    """The stream statistics of an entity with no events in any window (users and items alike): zero
    counts, the prior rates and watch time. What a lookup returns for an unknown or expired entity, so
    the store must use the priors the trainer folds with (``features.aggregates``)."""
    block = window_features(np.zeros((1, len(_SUMS))), config)[0]
    return np.tile(block, len(WINDOWS))


class _EntityWindows:
    """Bucketed window sums for one entity type, in growable arrays indexed through a dict."""

    def __init__(self, key: str, names: tuple[str, ...], config: AggregateConfig) -> None:
        self.key, self.names, self.config = key, names, config
        self._row: dict[int, int] = {}
        self._alloc(1024)

    def _alloc(self, capacity: int) -> None:
        self._cur = {w: np.zeros((capacity, len(_SUMS))) for w in WINDOWS}
        self._prev = {w: np.zeros((capacity, len(_SUMS))) for w in WINDOWS}
        self._bucket = {w: np.full(capacity, -(2**62), dtype=np.int64) for w in WINDOWS}

    def _grow(self) -> None:
        old = len(self._bucket[next(iter(WINDOWS))])
        if len(self._row) <= old:
            return
        cur, prev, bucket = self._cur, self._prev, self._bucket
        self._alloc(2 * len(self._row))
        for w in WINDOWS:
            self._cur[w][:old], self._prev[w][:old], self._bucket[w][:old] = cur[w], prev[w], bucket[w]

    def update(self, ids: np.ndarray, ts_ms: np.ndarray, values: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Fold events in; return the touched entities and their window statistics as of ``now_ms``."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = np.fromiter((self._row.setdefault(int(u), len(self._row)) for u in uniq), np.int64, len(uniq))
        self._grow()
        blocks = []
        for w, length in _WINDOW_MS.items():
            cur, prev, bucket = self._cur[w], self._prev[w], self._bucket[w]
            now_bucket = now_ms // length
            shift = (now_bucket - bucket[rows])[:, None]  # >= 0: now_ms never goes back
            prev[rows] = np.where(shift == 0, prev[rows], np.where(shift == 1, cur[rows], 0.0))
            cur[rows] = np.where(shift == 0, cur[rows], 0.0)
            bucket[rows] = now_bucket
            age = now_bucket - ts_ms // length  # 0: current bucket, 1: previous, more: out of the window
            event_rows = rows[inverse]
            np.add.at(cur, event_rows[age == 0], values[age == 0])
            np.add.at(prev, event_rows[age == 1], values[age == 1])
            elapsed = (now_ms - now_bucket * length) / length
            blocks.append(window_features(cur[rows] + prev[rows] * (1.0 - elapsed), self.config))
        return uniq, np.concatenate(blocks, axis=1)

    def frame(self, ids: np.ndarray, matrix: np.ndarray, stamp_ms: int) -> pd.DataFrame:
        frame = pd.DataFrame(matrix, columns=list(self.names))
        frame.insert(0, self.key, ids.astype(np.int64))
        frame["event_timestamp"] = pd.Timestamp(stamp_ms, unit="ms", tz="UTC")
        return frame

    def ids(self) -> np.ndarray:
        return np.fromiter(self._row.keys(), dtype=np.int64, count=len(self._row))

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        ids = self.ids()
        rows = np.fromiter(self._row.values(), dtype=np.int64, count=len(self._row))
        arrays = {f"{prefix}.ids": ids}
        for w in WINDOWS:
            arrays |= {f"{prefix}.{w}.cur": self._cur[w][rows], f"{prefix}.{w}.prev": self._prev[w][rows],
                       f"{prefix}.{w}.bucket": self._bucket[w][rows]}
        return arrays

    def load_state(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        missing = [f"{prefix}.{w}.{part}" for w in WINDOWS for part in ("cur", "prev", "bucket")
                   if f"{prefix}.{w}.{part}" not in arrays]
        if missing:
            raise ValueError(f"aggregator state lacks {missing[0]} (saved by an older version without windows)")
        ids = arrays[f"{prefix}.ids"]
        self._row = {int(i): r for r, i in enumerate(ids.tolist())}
        self._alloc(max(1024, 2 * len(ids)))
        for w in WINDOWS:
            self._cur[w][: len(ids)] = arrays[f"{prefix}.{w}.cur"]
            self._prev[w][: len(ids)] = arrays[f"{prefix}.{w}.prev"]
            self._bucket[w][: len(ids)] = arrays[f"{prefix}.{w}.bucket"]

    def defaults(self) -> np.ndarray:
        """The statistics of an entity with no events in a window: zero counts, the prior rates."""
        return no_events(self.config)


@dataclass(frozen=True)
class Events:
    """What the aggregates fold in from joined examples: ids, event times and the summed values
    (``n`` = 1, each task's label with a missing one as 0, play time in seconds), one row per example."""

    user_id: np.ndarray  # (N,) int64
    item_id: np.ndarray  # (N,) int64
    ts_ms: np.ndarray  # (N,) int64
    values: np.ndarray  # (N, len(_SUMS)) float64

    @classmethod
    def of(cls, examples: pa.Table) -> Events:
        cols = {name: examples.column(name).to_numpy(zero_copy_only=False)
                for name in ("user_id", "item_id", "ts_ms", *TASKS, PLAY_TIME)}
        values = np.column_stack([
            np.ones(examples.num_rows),
            *(np.nan_to_num(cols[t].astype(np.float64)) for t in TASKS),
            np.nan_to_num(cols[PLAY_TIME].astype(np.float64)) / 1000,
        ]).reshape(examples.num_rows, len(_SUMS))
        return cls(cols["user_id"].astype(np.int64), cols["item_id"].astype(np.int64),
                   cols["ts_ms"].astype(np.int64), values)

    def __len__(self) -> int:
        return len(self.ts_ms)

    def where(self, keep: np.ndarray) -> Events:
        return Events(self.user_id[keep], self.item_id[keep], self.ts_ms[keep], self.values[keep])

    def to_matrix(self) -> np.ndarray:
        """``(N, 3 + len(_SUMS))`` int64, the values' float64 bits as they are (exact), for a collective."""
        ids = np.column_stack([self.user_id, self.item_id, self.ts_ms]).reshape(len(self), 3)
        return np.concatenate([ids, self.values.view(np.int64).reshape(len(self), len(_SUMS))], axis=1)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> Events:
        matrix = np.ascontiguousarray(matrix, dtype=np.int64)
        return cls(matrix[:, 0].copy(), matrix[:, 1].copy(), matrix[:, 2].copy(), matrix[:, 3:].copy().view(np.float64))


class StreamAggregator:
    def __init__(self, config: AggregateConfig = AggregateConfig()) -> None:
        if len(config.prior_rates) != len(TASKS):
            raise ValueError(f"prior_rates needs {len(TASKS)} values, one per task {TASKS}")
        self.config = config
        self.users = _EntityWindows("user_id", USER_STREAM, config)
        self.items = _EntityWindows("item_id", ITEM_STREAM, config)
        self.stamp_ms = 0
        """The stamp of the last rows returned: strictly increasing, one ms past the newest event counted."""

    def update(self, examples: pa.Table) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Fold joined examples in; return the new feature rows of the users and items they touched."""
        events = Events.of(examples)
        return self.fold(events, events)

    def fold(self, user_events: Events, item_events: Events) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Fold ``user_events`` into the user windows and ``item_events`` into the item windows (a trainer
        worker folds the events of the entities it owns, from every worker's batch); return the new rows
        of the users and items touched. Both are stamped alike, one ms past the newest event of either."""
        newest = max((int(e.ts_ms.max()) for e in (user_events, item_events) if len(e)), default=None)
        if newest is not None:
            self.stamp_ms = max(newest + 1, self.stamp_ms + 1)
        now_ms = self.stamp_ms - 1
        frames = []
        for windows, events, width in ((self.users, user_events, len(USER_STREAM)),
                                       (self.items, item_events, len(ITEM_STREAM))):
            if len(events):
                ids = events.user_id if windows is self.users else events.item_id
                frames.append(windows.frame(*windows.update(ids, events.ts_ms, events.values, now_ms), self.stamp_ms))
            else:
                frames.append(windows.frame(np.zeros(0, np.int64), np.zeros((0, width), np.float32), self.stamp_ms))
        return frames[0], frames[1]

    def defaults(self) -> np.ndarray:
        """Stream statistics of an unknown user followed by those of an unknown item."""
        return np.concatenate([self.users.defaults(), self.items.defaults()])

    def ids(self) -> dict[str, np.ndarray]:
        """The user and item ids folded so far."""
        return {"user_id": self.users.ids(), "item_id": self.items.ids()}

    def state(self) -> dict[str, np.ndarray]:
        """Window sums, buckets and the stamp as plain arrays (for a checkpoint)."""
        return {**self.users.state("users"), **self.items.state("items"),
                "stamp_ms": np.array([self.stamp_ms], dtype=np.int64)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.users.load_state("users", arrays)
        self.items.load_state("items", arrays)
        self.stamp_ms = int(arrays["stamp_ms"][0]) if "stamp_ms" in arrays else 0
