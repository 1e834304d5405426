"""The collisionless ID map: exact admission, expiry, eviction and serving semantics, checked by hand on small
cases and against a plain dict reference over thousands of random calls; state and snapshot round trips;
bad input refused by name."""

from __future__ import annotations

import math
import threading
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import load, save

import learner.idmap
import learner.models.row_snapshot
from learner.idmap import EVICT_DIVISOR, SWEEP_DIVISOR, IdMap, IdMapConfig, _KeyIndex, as_ids, hashed_rows, mix64
from learner.models.row_snapshot import RowSnapshot

M64 = (1 << 64) - 1


def _mix_reference(x: int) -> int:
    """murmur3's 64-bit finaliser in plain Python ints."""
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        x ^= x >> 33
        x = (x * mult) & M64
    return x ^ (x >> 33)


class _Entries:
    """Keys in entries 1..n with a free stack and last-seen (event time, call), as ``learner.idmap._Pool``."""

    def __init__(self, n: int) -> None:
        self.n, self.of_key, self.key = n, {}, {}
        self.seen: dict[int, list[int]] = {}  # entry -> [seen_ms, seen_tick]
        self.free = list(range(n, 0, -1))

    def take(self, key: int, now: int, tick: int) -> int:
        entry = self.free.pop()
        self.of_key[key], self.key[entry], self.seen[entry] = entry, key, [now, tick]
        return entry

    def release(self, entries: list[int]) -> None:
        for entry in sorted(entries, reverse=True):
            del self.of_key[self.key.pop(entry)]
            self.free.append(entry)

    def least_recent(self, k: int, tick: int) -> list[int]:
        cand = sorted((self.seen[e][1], e) for e in self.key if self.seen[e][1] < tick)
        return [e for _, e in cand[:k]]

    def seen_before(self, cutoff: int) -> list[int]:
        return [e for e in self.key if self.seen[e][0] < cutoff]


class ReferenceMap:
    """The semantics of ``IdMap`` one ID at a time, with dicts."""

    def __init__(self, config: IdMapConfig) -> None:
        self.config, self.tick, self.next_sweep = config, 0, -math.inf
        self.rows = _Entries(config.capacity)
        self.pending = _Entries(config.pending_entries)
        self.count: dict[int, int] = {}
        self.counters = Counter()

    def lookup(self, ids: list[int], now: int, train: bool = True) -> tuple[list[int], list[int]]:
        if self.config.mode == "hash":
            if train:
                self._learn(ids, now)
            return [1 + _mix_reference(i) % self.config.capacity for i in ids], []
        if not train:
            ttl = self.config.ttl_ms
            rows = [self.rows.of_key.get(i, 0) for i in ids]
            return [r if r and (ttl is None or self.rows.seen[r][0] >= now - ttl) else 0 for r in rows], []
        return self._learn(ids, now)

    def _learn(self, ids: list[int], now: int) -> tuple[list[int], list[int]]:
        self.tick += 1
        ttl, rows = self.config.ttl_ms, self.rows
        if ttl is not None and now >= self.next_sweep:
            self.next_sweep = now + max(1, ttl // SWEEP_DIVISOR)
            dead = rows.seen_before(now - ttl)
            rows.release(dead)
            self.counters["expired"] += len(dead)
            self._drop(self.pending.seen_before(now - ttl))
        stale = [rows.of_key[i] for i in set(ids) if i in rows.of_key and ttl is not None
                 and rows.seen[rows.of_key[i]][0] < now - ttl]
        rows.release(stale)
        self.counters["expired"] += len(stale)
        for i in set(ids) & rows.of_key.keys():
            seen = rows.seen[rows.of_key[i]]
            seen[:] = [max(seen[0], now), self.tick]
        counts = Counter(i for i in ids if i not in rows.of_key)
        qualify, waiting = [], []
        for key in sorted(counts):
            entry = self.pending.of_key.get(key)
            if entry is not None and ttl is not None and self.pending.seen[entry][0] < now - ttl:
                self._drop([entry])
                entry = None
            total = counts[key] + (self.count[entry] if entry else 0)
            if entry:
                self.count[entry] = total
                seen = self.pending.seen[entry]
                seen[:] = [max(seen[0], now), self.tick]
            if total >= self.config.min_count:
                qualify.append((key, entry))
            elif entry is None:
                waiting.append(key)
        fresh = []
        if qualify:
            need = len(qualify) - len(rows.free)
            if need > 0:
                victims = rows.least_recent(max(need, rows.n // EVICT_DIVISOR, 1), self.tick)
                rows.release(victims)
                self.counters["evicted"] += len(victims)
            chosen = qualify[:len(rows.free)]
            fresh = sorted(rows.take(key, now, self.tick) for key, _ in chosen)
            self.counters["admitted"] += len(chosen)
            self.counters["overflow"] += len(qualify) - len(chosen)
            self.pending.release([entry for _, entry in chosen if entry])
        need = len(waiting) - len(self.pending.free)
        if need > 0:
            self._drop(self.pending.least_recent(max(need, self.pending.n // EVICT_DIVISOR, 1), self.tick))
        held = waiting[:len(self.pending.free)]
        for key in held:
            self.count[self.pending.take(key, now, self.tick)] = counts[key]
        self.counters["pending_dropped"] += len(waiting) - len(held)
        return [rows.of_key.get(i, 0) for i in ids], fresh

    def _drop(self, entries: list[int]) -> None:
        self.pending.release(entries)
        self.counters["pending_dropped"] += len(entries)

    def stats(self) -> dict[str, int]:
        live = list(self.rows.of_key)
        if self.config.mode == "hash":
            shared = Counter(1 + _mix_reference(i) % self.config.capacity for i in live)
        else:
            shared = Counter(self.rows.of_key.values())
        return {"live": len(live), "pending": len(self.pending.of_key),
                "collisions": sum(c for c in shared.values() if c > 1),
                **{k: self.counters[k] for k in ("admitted", "expired", "evicted", "overflow", "pending_dropped")}}


def _learn(idmap: IdMap, ids: list[int], now: int, train: bool = True) -> tuple[list[int], list[int]]:
    lookup = idmap.rows(np.array(ids, np.int64), now, train=train)
    return lookup.rows.tolist(), lookup.fresh.tolist()


def _stats(idmap: IdMap) -> dict[str, int]:
    return {k: v for k, v in idmap.stats().items() if k not in ("capacity", "bytes")}


# ---- exact semantics, by hand -------------------------------------------------------------------------------

def test_an_id_reads_the_default_row_until_min_count_then_its_own() -> None:
    idmap = IdMap(IdMapConfig(capacity=4, min_count=3))
    assert _learn(idmap, [7], 0) == ([0], [])
    assert _learn(idmap, [7, 8], 1) == ([0, 0], [])
    assert _learn(idmap, [8, 7], 2) == ([0, 1], [1])  # third sighting of 7: its row, to be reset
    assert _learn(idmap, [7, 8], 3) == ([1, 2], [2])
    assert _learn(idmap, [9, 9, 9], 4) == ([3, 3, 3], [3])  # three sightings in one call count
    assert _learn(idmap, [7, 8, 9], 5) == ([1, 2, 3], [])
    assert idmap.stats()["admitted"] == 3 and idmap.stats()["pending"] == 0


def test_rows_not_seen_for_ttl_expire_and_their_row_is_reused_as_fresh() -> None:
    idmap = IdMap(IdMapConfig(capacity=2, ttl_ms=100))
    assert _learn(idmap, [1, 2], 0) == ([1, 2], [1, 2])
    assert _learn(idmap, [1], 50) == ([1], [])
    assert _learn(idmap, [2], 100, train=False) == ([2], [])  # seen exactly ttl ago: still live
    assert _learn(idmap, [2], 101, train=False) == ([0], [])
    assert _learn(idmap, [3], 120) == ([2], [2])  # 2 expired, its row reset for 3
    assert idmap.stats()["expired"] == 1 and idmap.stats()["live"] == 2
    assert _learn(idmap, [2], 121) == ([1], [1])  # full: 1 is the least recently seen, evicted
    assert idmap.stats()["evicted"] == 1


def test_a_lookup_finds_a_row_expired_before_the_sweep_reaches_it() -> None:
    idmap = IdMap(IdMapConfig(capacity=4, ttl_ms=80))
    _learn(idmap, [1, 2], 0)  # sweeps at 0; next sweep at 10
    assert _learn(idmap, [3], 81) == ([1], [1])  # sweeps: 1 and 2 expire, rows 1 and 2 free again
    assert idmap.stats()["expired"] == 2
    assert _learn(idmap, [4], 85) == ([2], [2])
    assert _learn(idmap, [4], 85 + 81) == ([1], [1])  # sweeps again: 3 and 4 expire, 4 comes back on row 1
    assert idmap.stats()["expired"] == 4
    idmap = IdMap(IdMapConfig(capacity=4, ttl_ms=800))
    _learn(idmap, [1], 0)
    _learn(idmap, [2], 799)  # next sweep at 899
    assert _learn(idmap, [1], 801) == ([1], [1])  # stale on lookup: freed and re-admitted, row reset


def test_a_full_table_evicts_the_least_recently_seen() -> None:
    idmap = IdMap(IdMapConfig(capacity=3))
    for t, i in enumerate([1, 2, 3, 1]):
        _learn(idmap, [i], t)
    assert _learn(idmap, [4], 9) == ([2], [2])
    assert _learn(idmap, [5, 1], 10) == ([3, 1], [3])  # 3 goes, not 1 (seen in this call)
    assert _learn(idmap, [2], 11, train=False) == ([0], [])
    assert idmap.stats() | {"bytes": 0} == {"capacity": 3, "live": 3, "admitted": 5, "expired": 0, "evicted": 2,
                                            "overflow": 0, "pending_dropped": 0, "pending": 0, "collisions": 0,
                                            "bytes": 0}


def test_a_table_full_of_hot_ids_sends_the_overflow_to_the_default_row() -> None:
    idmap = IdMap(IdMapConfig(capacity=2))
    assert _learn(idmap, [1, 2, 3], 0) == ([1, 2, 0], [1, 2])
    assert _learn(idmap, [4, 3, 2, 1], 1) == ([0, 0, 2, 1], [])
    assert idmap.stats()["overflow"] == 3 and idmap.stats()["evicted"] == 0
    assert _learn(idmap, [3], 2) == ([1], [1])  # the next call has room again: 1 was seen longest ago


def test_a_pending_id_left_without_a_row_keeps_its_count() -> None:
    idmap = IdMap(IdMapConfig(capacity=1, min_count=2, pending_capacity=4))
    _learn(idmap, [5, 6], 0)
    assert _learn(idmap, [5, 6], 1) == ([1, 0], [1])
    assert _learn(idmap, [6], 2) == ([1], [1])  # 6 still counted: admitted at once, 5 evicted
    assert idmap.stats()["overflow"] == 1


def test_a_full_pending_table_drops_its_least_recently_seen() -> None:
    idmap = IdMap(IdMapConfig(capacity=8, min_count=2, pending_capacity=2))
    _learn(idmap, [1], 0)
    _learn(idmap, [2], 1)
    _learn(idmap, [3], 2)  # 1 dropped
    assert idmap.stats()["pending_dropped"] == 1 and idmap.stats()["pending"] == 2
    assert _learn(idmap, [1, 2, 3], 3) == ([0, 1, 2], [1, 2])


def test_serving_reads_only() -> None:
    idmap = IdMap(IdMapConfig(capacity=4, min_count=2, ttl_ms=100))
    _learn(idmap, [1, 1, 2], 0)
    before = idmap.state()
    for _ in range(3):
        assert _learn(idmap, [1, 2, 3], 50, train=False) == ([1, 0, 0], [])
    assert _learn(idmap, [1], 101, train=False) == ([0], [])
    after = idmap.state()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


# ---- collisionless, randomized ------------------------------------------------------------------------------

def test_admitted_ids_never_share_a_row() -> None:
    rng = np.random.default_rng(1)
    idmap = IdMap(IdMapConfig(capacity=500, min_count=2, ttl_ms=2_000))
    owner: dict[int, int] = {}  # row -> the id that holds it
    for t in range(300):
        ids = rng.zipf(1.3, 256) + rng.integers(0, 2**40) * (t % 7 == 0)
        lookup = idmap.rows(ids, t * 10)
        for row in lookup.fresh.tolist():
            owner.pop(row, None)
        for i, row in zip(ids.tolist(), lookup.rows.tolist()):
            if row:
                assert owner.setdefault(row, i) == i
        snapshot = idmap.snapshot()
        assert len(np.unique(snapshot["rows"])) == len(snapshot["rows"]) == idmap.stats()["live"]
    assert idmap.stats()["evicted"] > 0  # the run did fill the table


def test_ids_below_capacity_keep_their_row_forever() -> None:
    rng = np.random.default_rng(2)
    idmap = IdMap(IdMapConfig(capacity=20_000))
    universe = rng.integers(0, 2**63 - 1, 20_000)
    first: dict[int, int] = {}
    for t in range(40):
        ids = universe[rng.integers(0, 20_000, 2048)]
        for i, row in zip(ids.tolist(), idmap.rows(ids, t).rows.tolist()):
            assert first.setdefault(i, row) == row
    assert idmap.stats()["evicted"] == 0
    assert sorted(first.values()) == sorted(set(first.values()))


# ---- against the reference ----------------------------------------------------------------------------------

CONFIGS = [
    IdMapConfig(capacity=16),
    IdMapConfig(capacity=12, min_count=3, pending_capacity=9),
    IdMapConfig(capacity=16, ttl_ms=60),
    IdMapConfig(capacity=24, min_count=2, ttl_ms=40, pending_capacity=7),
    IdMapConfig(capacity=300, min_count=2, ttl_ms=400),  # bulk eviction: 3 rows at a time
    IdMapConfig(capacity=10, mode="hash"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-cap{c.capacity}-min{c.min_count}-ttl{c.ttl_ms}")
def test_matches_the_reference_over_random_calls(config: IdMapConfig) -> None:
    rng = np.random.default_rng(config.capacity)
    idmap, reference = IdMap(config), ReferenceMap(config)
    n_ids = 3 * config.capacity
    now = 0
    for _ in range(1000):  # about 6,000 ID sightings
        now += int(rng.integers(-3, 8))  # event time mostly advances, sometimes steps back
        ids = (rng.zipf(1.2, int(rng.integers(0, 12))) % n_ids).tolist()
        train = bool(rng.random() < 0.85)
        assert _learn(idmap, ids, now, train) == reference.lookup(ids, now, train)
        assert _stats(idmap) == reference.stats()
    assert reference.counters["admitted"] > config.capacity


def test_hash_mode_is_the_hashing_trick() -> None:
    ids = np.array([0, 1, 2, 5, 2**40 + 3, 2**63 - 1], np.int64)
    assert hashed_rows(ids, 1000).tolist() == [1 + _mix_reference(i) % 1000 for i in ids.tolist()]
    assert mix64(ids).tolist() == [_mix_reference(i) for i in ids.tolist()]
    idmap = IdMap(IdMapConfig(capacity=1000, mode="hash"))
    assert idmap.rows(ids, 0).rows.tolist() == hashed_rows(ids, 1000).tolist()
    serving = IdMap.for_serving(idmap.config, idmap.snapshot())
    assert serving.rows(ids).rows.tolist() == hashed_rows(ids, 1000).tolist()


def test_hash_mode_counts_ids_sharing_a_row() -> None:
    idmap = IdMap(IdMapConfig(capacity=64, mode="hash"))
    ids = np.arange(64)
    idmap.rows(ids, 0)
    _, per_row = np.unique(hashed_rows(ids, 64), return_counts=True)
    assert idmap.stats()["collisions"] == per_row[per_row > 1].sum() > 0


# ---- changes since the last publish -------------------------------------------------------------------------

def _changes(idmap: IdMap) -> tuple[list[int], list[int], list[int]]:
    ids, rows, tombstones = idmap.changes()
    return ids.tolist(), rows.tolist(), tombstones.tolist()


def _snapshot_diff(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> tuple[list[int], list[int], list[int]]:
    """The reference: two snapshots compared id by id."""
    before = dict(zip(old["ids"].tolist(), old["rows"].tolist()))
    after = dict(zip(new["ids"].tolist(), new["rows"].tolist()))
    upserts = sorted(i for i in after if before.get(i) != after[i])
    return upserts, [after[i] for i in upserts], sorted(i for i in before if i not in after)


def test_changes_are_admissions_moves_and_tombstones_of_ids_published_at_the_mark() -> None:
    idmap = IdMap(IdMapConfig(capacity=2))
    _learn(idmap, [5, 7], 0)
    assert _changes(idmap) == ([5, 7], [1, 2], [])  # nothing published yet: the whole map
    idmap.mark_published()
    assert _changes(idmap) == ([], [], [])
    _learn(idmap, [9], 1)  # full: evicts 5 (least recently seen, then lowest row), 9 takes its row
    assert _changes(idmap) == ([9], [1], [5])
    _learn(idmap, [5], 2)  # evicts 7; 5 comes back on row 2: published on row 1, so an upsert, not unchanged
    assert _changes(idmap) == ([5, 9], [2, 1], [7])
    assert _changes(idmap) == ([5, 9], [2, 1], [7])  # reading does not clear
    idmap.mark_published()
    assert _changes(idmap) == ([], [], [])


def test_an_id_admitted_and_freed_within_the_interval_leaves_no_trace() -> None:
    idmap = IdMap(IdMapConfig(capacity=4, ttl_ms=10))
    _learn(idmap, [5], 0)
    idmap.mark_published()
    _learn(idmap, [6], 1)
    _learn(idmap, [7], 20)  # the sweep expires 5 (published) and 6 (never published)
    assert _changes(idmap) == ([7], idmap.snapshot()["rows"].tolist(), [5])
    hashed = IdMap(IdMapConfig(capacity=4, mode="hash"))
    _learn(hashed, [1, 2, 3], 0)
    assert _changes(hashed) == ([], [], [])  # no map to publish


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-cap{c.capacity}-min{c.min_count}-ttl{c.ttl_ms}")
def test_changes_are_the_difference_of_the_snapshots_over_random_calls(config: IdMapConfig, monkeypatch) -> None:
    monkeypatch.setattr(learner.idmap, "JOURNAL_MIN", 8)  # compact the journal often
    rng = np.random.default_rng(config.capacity + 1)
    idmap = IdMap(config)
    published = idmap.snapshot()
    seen = 0
    for _ in range(1500):
        ids = rng.zipf(1.2, int(rng.integers(0, 12))) % (3 * config.capacity)
        idmap.rows(ids, int(rng.integers(0, 8)) + seen, train=bool(rng.random() < 0.9))
        seen += 3
        if rng.random() < 0.3:  # a publish attempt; a third of them fail, and the next delta covers both
            now = idmap.snapshot()
            assert _changes(idmap) == _snapshot_diff(published, now)
            if rng.random() < 0.66:
                idmap.mark_published()
                published = now
    assert config.mode == "hash" or idmap.stats()["expired"] + idmap.stats()["evicted"] > 0


def test_a_restored_map_has_published_nothing() -> None:
    idmap = IdMap(IdMapConfig(capacity=8))
    _learn(idmap, [3, 1, 2], 0)
    idmap.mark_published()
    restored = IdMap.from_state(idmap.config, idmap.state())
    assert _changes(restored) == ([1, 2, 3], idmap.snapshot()["rows"].tolist(), [])


# ---- state and serving --------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS[1:5], ids=lambda c: f"cap{c.capacity}-min{c.min_count}-ttl{c.ttl_ms}")
def test_restore_resumes_exactly(config: IdMapConfig) -> None:
    rng = np.random.default_rng(3)
    calls = [((rng.zipf(1.2, 10) % (3 * config.capacity)), t * 3) for t in range(400)]
    idmap = IdMap(config)
    for ids, now in calls[:200]:
        idmap.rows(ids, now)
    arrays = idmap.state()
    assert all(a.dtype == np.int64 and a.ndim == 1 for a in arrays.values())
    restored = IdMap.from_state(config, load(save(arrays)))  # through safetensors
    for ids, now in calls[200:]:
        a, b = idmap.rows(ids, now), restored.rows(ids, now)
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.fresh, b.fresh)
        assert _stats(idmap) == _stats(restored)


def _learn_calls(idmap: IdMap, rng: np.random.Generator, calls: range) -> None:
    """Calls that admit, expire, evict, count pending ids and drop them: every kind of write a map makes."""
    n_ids = 3 * idmap.config.capacity
    for t in calls:
        idmap.rows(rng.zipf(1.2, 10) % n_ids, t * 3)


def _same_state(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-cap{c.capacity}-min{c.min_count}-ttl{c.ttl_ms}")
def test_a_state_snapshot_copied_after_the_map_learned_on_is_the_state_of_its_moment(config: IdMapConfig) -> None:
    rng = np.random.default_rng(4)
    idmap = IdMap(config)
    _learn_calls(idmap, rng, range(200))
    expected, (expected_keys, expected_live) = idmap.state(), idmap.capture()
    snapshot = idmap.snapshot_state()
    _learn_calls(idmap, rng, range(200, 400))  # twice past the ttls: rows and pending ids expire, evict, come back
    assert not all(np.array_equal(idmap.state()[k], expected[k]) for k in expected)  # the map did change
    arrays = snapshot.copy()
    _same_state(arrays, expected)
    keys, live = snapshot.live(arrays)
    assert np.array_equal(keys, expected_keys) and np.array_equal(live, expected_live)
    pools = [idmap._rows] + ([idmap._pending] if idmap._pending is not None else [])
    assert all(s.done for pool in pools for s in pool._snapshots)  # and the map keeps nothing for it any more


def test_the_free_stack_is_kept_while_it_is_copied_after_the_entries(monkeypatch) -> None:
    """The snapshot copies the entries, then the free stack: ids taken and freed in between still leave the stack
    of the snapshot's moment (a stack read as it is then would list live entries as free, and lose free ones)."""
    idmap = IdMap(IdMapConfig(capacity=64, ttl_ms=60))
    idmap.rows(np.arange(20), 0)
    expected = idmap.state()
    snapshot = idmap.snapshot_state()
    copy = RowSnapshot.copy

    def learning_before_the_stack(self, progress=None):
        if self is snapshot.rows.stack:  # the entries are copied: the map takes and frees entries meanwhile
            idmap.rows(np.arange(100, 130), 10)  # 30 entries taken from the top of the stack
            idmap.rows(np.arange(200, 205), 65)  # the first 20 expire: pushed where those 30 were, 5 taken
        return copy(self, progress)
    monkeypatch.setattr(RowSnapshot, "copy", learning_before_the_stack)
    _same_state(snapshot.copy(), expected)


@pytest.mark.parametrize("config", CONFIGS[1:5], ids=lambda c: f"cap{c.capacity}-min{c.min_count}-ttl{c.ttl_ms}")
def test_a_state_snapshot_copied_while_the_map_learns_is_the_state_of_its_moment(config: IdMapConfig,
                                                                                 monkeypatch) -> None:
    """Copied on another thread two entries at a time, the map learning a few calls after every chunk: its writes
    land behind the copy, ahead of it and across it."""
    monkeypatch.setattr(learner.models.row_snapshot, "CHUNK_ROWS", 2)
    copy, learn_now, copy_now = RowSnapshot.copy, threading.Semaphore(0), threading.Semaphore(0)

    def taking_turns(self, progress=None):
        def turn(_rows: int) -> None:
            learn_now.release()
            assert copy_now.acquire(timeout=30)
        return copy(self, turn)
    rng = np.random.default_rng(5)
    idmap = IdMap(config)
    _learn_calls(idmap, rng, range(100))
    expected = idmap.state()
    snapshot = idmap.snapshot_state()
    monkeypatch.setattr(RowSnapshot, "copy", taking_turns)
    copied: dict = {}
    thread = threading.Thread(target=lambda: copied.update(arrays=snapshot.copy()))
    thread.start()
    t = 100
    while thread.is_alive():
        if learn_now.acquire(timeout=0.05):  # the copy waits for this thread's turn after each chunk
            _learn_calls(idmap, rng, range(t, t + 3))
            t += 3
            copy_now.release()
    thread.join(30)
    monkeypatch.undo()
    assert not all(np.array_equal(idmap.state()[k], expected[k]) for k in expected)  # the map did change
    _same_state(copied["arrays"], expected)


def test_restore_refuses_state_of_another_size() -> None:
    idmap = IdMap(IdMapConfig(capacity=4))
    with pytest.raises(ValueError, match="rows.keys"):
        IdMap.from_state(IdMapConfig(capacity=5), idmap.state())
    with pytest.raises(ValueError, match="lacks 'clock'"):
        IdMap.from_state(IdMapConfig(capacity=4), {})


def test_serving_answers_like_the_trainer_without_changing_it() -> None:
    rng = np.random.default_rng(4)
    idmap = IdMap(IdMapConfig(capacity=100, min_count=2))
    for t in range(50):
        idmap.rows(rng.zipf(1.2, 64) % 300, t)
    serving = IdMap.for_serving(idmap.config, load(save(idmap.snapshot())))
    probe = np.arange(400).reshape(20, 20)
    expected = idmap.rows(probe, 50, train=False).rows
    assert expected.shape == (20, 20) and (expected > 0).sum() == idmap.stats()["live"]
    assert np.array_equal(serving.rows(probe).rows, expected)
    assert serving.rows(np.zeros(0, np.int64)).rows.shape == (0,)
    with pytest.raises(ValueError, match="read-only"):
        serving.rows(probe, train=True)


# ---- the hash index itself ----------------------------------------------------------------------------------

def test_the_index_grows_when_a_probe_run_outgrows_its_padding() -> None:
    index = _KeyIndex(1001)  # 2048 slots
    candidates = np.arange(2_000_000, dtype=np.int64)
    same_home = candidates[(mix64(candidates) & np.uint64(index.size - 1)) == index.size - 1][:300]  # the last
    index.insert(same_home, np.arange(1, 301))
    assert index.size == 4096
    assert index.find(same_home).tolist() == list(range(1, 301))
    index.remove(np.arange(1, 151))
    assert index.find(same_home).tolist() == [0] * 150 + list(range(151, 301))


def test_tombstones_are_cleared_by_a_rebuild() -> None:
    idmap = IdMap(IdMapConfig(capacity=64))
    for t in range(200):
        idmap.rows(np.arange(t * 64, t * 64 + 64), t)  # every call evicts the whole table
        assert idmap._rows.index.n_tombs <= 0.75 * idmap._rows.index.size
    assert idmap.rows(np.arange(199 * 64, 200 * 64), 300, train=False).rows.tolist() == list(range(1, 65))


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ids", "message"), [
    (np.array([3, -1]), r"ids must be >= 0, got -1"),
    (np.array([2**64 - 1], np.uint64), r"ids must be <= 2\*\*63-1, got 18446744073709551615"),
    ([1, 2**64 - 1], r"<= 2\*\*63-1"),
    ([1, 2**70], r"dtype=object"),
    (np.array([1, "a"], object), r"dtype=object"),
    (np.array([1.0, 2.5]), r"whole numbers, got 2.5"),
    (np.array([1.0, np.nan]), r"finite integers, got nan"),
    (np.array([np.inf]), r"finite integers, got inf"),
    (np.array([2.0**60]), r"above 2\*\*53"),
    (np.array([True, False]), r"integers, got dtype=bool"),
    (np.array(["1"]), r"integers, got dtype=<U1"),
])
def test_bad_ids_are_refused_by_name(ids: object, message: str) -> None:
    idmap = IdMap(IdMapConfig(capacity=4))
    for train in (True, False):
        with pytest.raises(ValueError, match=message):
            idmap.rows(ids, 0, train=train)
    assert idmap.stats()["live"] == 0


def test_good_ids_of_any_integer_type() -> None:
    assert as_ids(np.array([[1, 2]], np.uint8)).tolist() == [1, 2]
    assert as_ids(np.array([3.0, 2.0**53])).tolist() == [3, 2**53]
    assert as_ids([0, 2**63 - 1]).tolist() == [0, 2**63 - 1]
    assert as_ids(np.array([2**63 - 1], np.uint64)).tolist() == [2**63 - 1]
    idmap = IdMap(IdMapConfig(capacity=2))
    assert idmap.rows(np.array([2**63 - 1, 0]), 0).rows.tolist() == [2, 1]  # admitted in ID order


def test_now_must_be_an_integer() -> None:
    with pytest.raises(ValueError, match="now_ms must be an integer"):
        IdMap(IdMapConfig(capacity=2)).rows([1], 1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"capacity": 0}, "capacity must be an integer >= 1, got 0"),
    ({"capacity": True}, "capacity must be an integer >= 1, got True"),
    ({"capacity": 4, "min_count": 0}, "min_count must be an integer >= 1, got 0"),
    ({"capacity": 4, "ttl_ms": 0}, "ttl_ms must be an integer >= 1 or null, got 0"),
    ({"capacity": 4, "ttl_ms": 1.5}, "ttl_ms must be an integer >= 1 or null, got 1.5"),
    ({"capacity": 4, "pending_capacity": -2}, "pending_capacity must be an integer >= 1 or null, got -2"),
    ({"capacity": 4, "mode": "cuckoo"}, "mode must be one of"),
    ({"capacity": 4, "mode": "hash", "min_count": 2}, "apply to mode 'collisionless' only"),
    ({"capacity": 4, "mode": "hash", "ttl_ms": 10}, "apply to mode 'collisionless' only"),
])
def test_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        IdMapConfig(**kwargs)
