"""A cache of item rows in the reading process (a serving replica), bounded in entries and in staleness.

A ranking batch reads a thousand or more items, and the popular ones again in every batch; the item rows
change only when the trainer pushes them. :class:`RowCache` keeps the rows it was handed (decoded, not yet
expired: :class:`features.rows.StoredRows`) with the time each was read, and answers a lookup from them for
up to ``ttl_ms``: an item pushed at time t is served from the store from ``t + ttl_ms`` at the latest
(plus the read's own time). Window expiry is applied per lookup, to cached and fresh rows alike, so a hit
is exactly what the store held when it was read.

The structure is a set-associative cache in numpy arrays, as a CPU's cache is: ``capacity`` slots in sets
of ``WAYS``, an item's set fixed by a 64-bit mix of its id. A lookup gathers the batch's sets in one step
and compares all ways at once (no per-item Python); a fill writes each miss over the way of its set read
longest ago (its own expired copy first), so an entry lives at most ``ttl_ms`` and the oldest goes first;
misses that share a set are placed in rounds, and those beyond ``WAYS`` in one set in one fill are not kept.
Memory is fixed at construction (:attr:`nbytes`). Thread-safe: one lock around each lookup and fill (in-process callers score on threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from features.rows import StoredRows

WAYS = 4
"""Slots per set: conflict misses at 4 ways are close to those of a fully associative cache of the same size."""
_EMPTY = -1
_NEVER_NS = np.iinfo(np.int64).min // 2


def mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fixed, well-spread 64-bit mix, so neighbouring ids land in different sets."""
    z = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class RowCache:
    """Rows of distinct entity ids, each served for at most ``ttl_ms`` after it was read."""

    def __init__(self, capacity: int, ttl_ms: float, stats_width: int, static_width: int, n_cats: int,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        if capacity < 1 or ttl_ms <= 0:
            raise ValueError(f"a row cache needs capacity >= 1 and ttl_ms > 0, got {capacity} and {ttl_ms}")
        self.ttl_ns = int(ttl_ms * 1e6)
        self.n_sets = -(-capacity // WAYS)
        self.capacity = self.n_sets * WAYS
        self.clock_ns = clock_ns
        """Monotonic nanoseconds; a test may set its own clock."""
        self._keys = np.full((self.n_sets, WAYS), _EMPTY, np.int64)
        self._read_ns = np.full((self.n_sets, WAYS), _NEVER_NS, np.int64)
        self._stats_width = stats_width
        # Two tables, not four columns: a hit's row is two gathers (floats: stats then static; ints: updated then cats).
        self._floats = np.zeros((self.capacity, stats_width + static_width), np.float32)
        self._ints = np.zeros((self.capacity, 1 + n_cats), np.int64)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.max_age_served_ns = 0
        """Oldest row a lookup answered from the cache, since start (at most ``ttl_ns``)."""
        self.occupied = 0
        """Slots holding an item, fresh or expired (not yet replaced)."""
        self._unreported = (0, 0, None)  # hits, misses, oldest age served (ns) since the last ``report``

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._read_ns.nbytes + self._floats.nbytes + self._ints.nbytes

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, StoredRows]:
        """Which of the distinct ``ids`` the cache holds fresh (a mask), and their rows, in ``ids`` order."""
        sets = (mix64(ids) % np.uint64(self.n_sets)).astype(np.int64)  # (n,)
        with self._lock:
            now = self.clock_ns()
            read_ns = self._read_ns[sets]  # (n, WAYS)
            valid = (self._keys[sets] == ids[:, None]) & (read_ns >= now - self.ttl_ns)
            hit = valid.any(axis=1)
            way = valid.argmax(axis=1)
            slots = sets[hit] * WAYS + way[hit]
            floats, ints = self._floats[slots], self._ints[slots]
            n_hits = int(hit.sum())
            self.hits += n_hits
            self.misses += len(ids) - n_hits
            oldest = int(now - read_ns[hit, way[hit]].min()) if n_hits else None
            if oldest is not None:
                self.max_age_served_ns = max(self.max_age_served_ns, oldest)
            hits, misses, unreported = self._unreported
            if oldest is not None and unreported is not None:
                oldest = max(oldest, unreported)
            self._unreported = (hits + n_hits, misses + len(ids) - n_hits, unreported if oldest is None else oldest)
        width = self._stats_width
        return hit, StoredRows(floats[:, :width], ints[:, 0], floats[:, width:], ints[:, 1:])

    def fill(self, ids: np.ndarray, rows: StoredRows, read_ns: int) -> None:
        """Keep the rows of distinct ``ids`` read from the store at ``read_ns`` (this cache's clock, taken
        before the read: a row is never older than its stamp says)."""
        if not len(ids):
            return
        sets = (mix64(ids) % np.uint64(self.n_sets)).astype(np.int64)
        order = np.argsort(sets, kind="stable")
        sorted_sets = sets[order]
        starts = np.r_[0, np.flatnonzero(sorted_sets[1:] != sorted_sets[:-1]) + 1]
        rank = np.empty(len(ids), np.int64)  # 0 for the first miss of its set in this fill, 1 for the next, ...
        rank[order] = np.arange(len(ids)) - np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
        floats = np.concatenate([rows.stats, rows.static], axis=1)
        ints = np.column_stack([rows.updated, rows.cats])
        with self._lock:
            for r in range(WAYS):  # a round per rank: the misses of a round are in distinct sets
                at = np.flatnonzero(rank == r)
                if not len(at):
                    break
                s = sets[at]
                keys = self._keys[s]  # (m, WAYS)
                # The victim: the way holding this id's own (expired) copy, else the one read longest ago.
                way = np.where(keys == ids[at, None], _NEVER_NS - 1, self._read_ns[s]).argmin(axis=1)
                self.occupied += int((keys[np.arange(len(at)), way] == _EMPTY).sum())
                self._keys[s, way] = ids[at]
                self._read_ns[s, way] = read_ns
                slots = s * WAYS + way
                self._floats[slots] = floats[at]
                self._ints[slots] = ints[at]

    def report(self) -> tuple[int, int, float | None]:
        """Hits, misses and the oldest row served (ms; None without hits) since the last call: what a metrics
        exporter adds up, exact however many threads look up."""
        with self._lock:
            (hits, misses, oldest_ns), self._unreported = self._unreported, (0, 0, None)
        return hits, misses, None if oldest_ns is None else oldest_ns / 1e6

    def now_ns(self) -> int:
        return self.clock_ns()

    def figures(self) -> dict:
        """Hits, misses, hit rate, live entries, the oldest live entry's age and the oldest row served (ms)."""
        with self._lock:
            now = self.clock_ns()
            live = (self._keys != _EMPTY) & (self._read_ns >= now - self.ttl_ns)
            oldest_ns = int(now - self._read_ns[live].min()) if live.any() else 0
            hits, misses = self.hits, self.misses
            return {
                "ttl_ms": self.ttl_ns / 1e6,
                "capacity": self.capacity,
                "entries": int(live.sum()),
                "bytes": self.nbytes,
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "oldest_entry_age_ms": oldest_ns / 1e6,
                "max_staleness_served_ms": self.max_age_served_ns / 1e6,
            }


__all__ = ["WAYS", "RowCache", "mix64"]
