"""The online store read and written a batch at a time, in Feast's own layout: one round trip per batch.

Feast's SQLite store keeps one table per feature view, ``{project}_{view}``, with a row per (entity key,
feature); its Redis store keeps one hash per entity key (``serialized key + project``), with a field per
feature (the murmur3 hash of ``"{view}:{feature}"``) and one ``_ts:{view}`` timestamp per view, so that all
views of an entity come back in one ``HMGET`` (feast-dev/feast ``docs/specs/online_store_format.md``). Rows written here are exactly what Feast's own writers would
write (``get_online_features`` reads them), and rows Feast wrote read back here
(``tests/features/test_backends.py``).

A Redis server that goes away (killed, restarting, unreachable) is waited out rather than crashed on: a read
or write is retried with exponential backoff (tenacity) for up to ``outage_timeout_s``
(``features.outage_timeout_s``), and only then raises :class:`FeatureStoreUnavailable`. Both are idempotent
(a write sets the same fields to the same values), so a retry after a half-done round trip is safe. The
caller that waits, the trainer, does not step meanwhile: no batch is trained on features it could not
read, and no offset moves. :class:`Outages` counts the outages and their seconds, and each is logged once
when it starts and once when it ends, with the server's address (never its password).

Feast's SQLite ``update`` also gives each table an index on ``entity_key`` beside its primary key ``(entity_key,
feature_name)``, whose first column it is: every read, Feast's and ours, is served by the primary key alike, and the
second index only doubled the B-tree pages that a push of new entities dirties (and the WAL takes at each commit:
with traffic of millions of distinct IDs, about 30% of a push's CPU). :meth:`SqliteRows.drop_redundant_indexes`
drops it once Feast has applied the views (:meth:`features.store.OnlineFeatures.apply`).

Beside the rows, each write publishes the writer's event-time clock (the newest row stamp it wrote) under a
key of its own, read back with the rows: it is how a reader that never writes, the serving replica, knows
"now" in event time (see ``FeatureStoreConfig.clock``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import features.feast_import  # noqa: F401 - before Feast itself: see that module
from feast.infra.online_stores.helpers import _mmh3
from feast.utils import to_naive_utc
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from features.codec import entity_keys

Blobs = list[bytes | None]

RETRY_FIRST_S = 0.1
"""First wait before a read or write is tried again while the server is away; doubled up to ``RETRY_MAX_S``."""
RETRY_MAX_S = 5.0


class FeatureStoreUnavailable(ConnectionError):
    """The online store stayed unreachable for longer than ``features.outage_timeout_s``."""


class Outages:
    """Outages of one online store as its callers saw them: how many, and how long it was away in all.

    A call that fails starts an outage (logged once, however many threads fail); the next call that
    succeeds ends it (logged with its length). Thread-safe: a replica's request threads share a store.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.count = 0
        self._closed_s = 0.0
        self._since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._since is not None

    def down_s(self) -> float:
        """Seconds the store was away, the current outage included."""
        with self._lock:
            return self._closed_s + (time.monotonic() - self._since if self._since is not None else 0.0)

    def failed(self, error: BaseException, waiting_s: float) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
            self.count += 1
        print(f"moestream: feature store {self.address} unreachable ({type(error).__name__}: {error}); "
              f"waiting for it up to {waiting_s:g} s (features.outage_timeout_s), training paused", flush=True)

    def succeeded(self) -> None:
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._since is None:
                return
            lasted = time.monotonic() - self._since
            self._closed_s += lasted
            self._since = None
        print(f"moestream: feature store {self.address} is back after {lasted:.1f} s; training resumes", flush=True)

    def call(self, attempt: Callable[[], list], timeout_s: float) -> list:
        """``attempt()``, retried with backoff while it raises a connection error, for up to ``timeout_s``."""
        retrying = Retrying(
            stop=stop_after_delay(timeout_s),
            wait=wait_exponential(multiplier=RETRY_FIRST_S, min=RETRY_FIRST_S, max=RETRY_MAX_S),
            retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
            before_sleep=lambda state: self.failed(state.outcome.exception(), timeout_s),
            reraise=True,
        )
        try:
            result = retrying(attempt)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.failed(exc, timeout_s)  # with no time to wait, the first failure (already counted otherwise)
            raise FeatureStoreUnavailable(
                f"feature store {self.address} unreachable for {timeout_s:g} s (features.outage_timeout_s): "
                f"{type(exc).__name__}: {exc}") from exc
        self.succeeded()
        return result


@dataclass(frozen=True)
class ViewRows:
    """Serialized values of one feature view for distinct entities, to write."""

    view: str
    join_key: str
    ids: np.ndarray  # (N,) int64, distinct
    values: dict[str, list[bytes]]  # feature -> one serialized Value per id
    stamps_ms: np.ndarray  # (N,) event time of each row


@dataclass(frozen=True)
class ReadRequest:
    """Features of one entity kind to read for distinct ids: ``(view, feature)`` pairs."""

    join_key: str
    ids: np.ndarray  # (N,) int64, distinct
    fields: tuple[tuple[str, str], ...]


def _distinct_stamps(stamps_ms: np.ndarray) -> tuple[list[datetime], np.ndarray]:
    """Each distinct stamp once, as an aware datetime, and the index of each row's stamp."""
    uniq, inverse = np.unique(np.asarray(stamps_ms, np.int64), return_inverse=True)
    return [datetime.fromtimestamp(ms / 1000, tz=timezone.utc) for ms in uniq.tolist()], inverse


def _primary_key(row: tuple) -> tuple[bytes, str]:
    return row[0], row[1]


class _WalCheckpointer:
    """Copies a writer's WAL back into the database file on a thread and connection of its own.

    SQLite's automatic checkpoint runs inside the commit that crosses its threshold: a push then also copied
    up to 64 MiB of pages and waited for two fsyncs, tens of milliseconds that the trainer's next step waited
    for. Here the writer's connection never checkpoints; each commit pokes this thread, which runs a PASSIVE
    checkpoint (it never blocks the writer or a reader) at most every ``every_s`` seconds. Durability is as
    before (``synchronous=NORMAL``: the checkpoint syncs the WAL before copying it).
    """

    def __init__(self, path: Path, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.failures = 0
        self._conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        self._due, self._closing = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="moestream-wal", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._closing.is_set():
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # the next commit pokes again; the WAL only grows meanwhile
                self.failures += 1
                if self.failures == 1:
                    print(f"moestream: WARNING: the online store's WAL checkpoint failed: {exc}", flush=True)
            self._closing.wait(self.every_s)  # at most one checkpoint a period: a page rewritten often is copied once

    def close(self) -> None:
        self._closing.set()
        self._due.set()
        self._thread.join()
        self._conn.close()


class SqliteRows:
    """Feast's SQLite online tables through one connection of our own (WAL: readers never block the writer;
    the writer's WAL is checkpointed on a thread of its own, see :class:`_WalCheckpointer`)."""

    CHUNK = 10_000  # bound parameters per statement, well under SQLite's limit

    def __init__(self, path: Path, project: str) -> None:
        self.project = project
        # One connection, shared by a replica's request threads; re-entrant for a read inside a write's transaction.
        self._lock = threading.RLock()
        self._written: set[str] = set()  # views known to hold rows (see _read_one)
        self._conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # online rows are re-derivable: no fsync per push
        self._conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: pushes touch pages all over the key order
        self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job, off the writer's commits
        self._conn.execute("CREATE TABLE IF NOT EXISTS moestream_clock (project TEXT PRIMARY KEY, ms INTEGER NOT NULL)")
        self._path = path
        self._checkpointer: _WalCheckpointer | None = None  # started by the first write: readers need none

    def _table(self, view: str) -> str:
        return '"' + f"{self.project}_{view}".replace('"', '""') + '"'

    def drop_redundant_indexes(self, views: Sequence[str]) -> list[str]:
        """Drop the ``{table}_ek`` index Feast's ``update`` puts on each view's table (the primary key already
        starts with ``entity_key``: see the module's docstring); the names of the indexes dropped. A later
        ``apply`` recreates them, so it calls this again."""
        names = [f"{self.project}_{view}_ek" for view in views]
        with self._lock:
            present = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            dropped = [name for name in names if name in present]
            for name in dropped:
                self._conn.execute("DROP INDEX IF EXISTS " + '"' + name.replace('"', '""') + '"')
        return dropped

    def write(self, batches: Sequence[ViewRows], clock_ms: int, before_commit: Callable[[], object] | None = None) -> None:
        """Upsert the rows and publish ``clock_ms``, in one transaction. ``before_commit`` runs inside it, before the
        commit, on this connection: a read there sees the rows (see ``features.store.OnlineFeatures.push``)."""
        statements = []
        for rows in batches:
            keys = entity_keys(rows.join_key, rows.ids)
            stamps, inverse = _distinct_stamps(rows.stamps_ms)
            # Feast stores event_ts through its sqlite3 adapter: whole seconds of the naive UTC time.
            seconds = np.array([int(to_naive_utc(s).timestamp()) for s in stamps], np.int64)[inverse].tolist()
            params = []
            for feature, blobs in rows.values.items():  # array features: Feast's SQLite ``value_text`` is NULL
                params += zip(keys, [feature] * len(keys), blobs, [None] * len(keys), seconds)
            params.sort(key=_primary_key)  # upserts in key order touch each B-tree page once, not at random
            # Many rows per statement: ``executemany`` steps the statement once per row, and each step lets go of
            # the GIL and waits to get it back from the trainer's other threads.
            per = self.CHUNK // 5  # five bound values a row
            for start in range(0, len(params), per):
                chunk = params[start : start + per]
                statements.append((
                    f"INSERT INTO {self._table(rows.view)} (entity_key, feature_name, value, value_text, event_ts, "
                    f"created_ts) VALUES {', '.join(['(?, ?, ?, ?, ?, NULL)'] * len(chunk))} "
                    "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
                    "value_text = excluded.value_text, event_ts = excluded.event_ts, created_ts = excluded.created_ts",
                    [value for row in chunk for value in row],
                ))
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._conn.execute(sql, params)
                self._conn.execute("INSERT INTO moestream_clock (project, ms) VALUES (?, ?) ON CONFLICT(project) "
                                   "DO UPDATE SET ms = excluded.ms", (self.project, int(clock_ms)))
                if before_commit is not None:
                    before_commit()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if self._checkpointer is None:
                self._checkpointer = _WalCheckpointer(self._path)
            self._checkpointer.poke()

    def read(self, requests: Sequence[ReadRequest]) -> tuple[list[dict[tuple[str, str], Blobs]], int | None]:
        out = []
        with self._lock:
            own = not self._conn.in_transaction  # else: inside a write's transaction, whose rows it reads
            if own:
                self._conn.execute("BEGIN")  # one snapshot for every view and the clock
            try:
                for request in requests:
                    out.append(self._read_one(request))
                clock = self._conn.execute("SELECT ms FROM moestream_clock WHERE project = ?",
                                           (self.project,)).fetchone()
            finally:
                if own:
                    self._conn.execute("COMMIT")
        return out, None if clock is None else int(clock[0])

    def _read_one(self, request: ReadRequest) -> dict[tuple[str, str], Blobs]:
        keys = entity_keys(request.join_key, request.ids)
        views = dict.fromkeys(view for view, _ in request.fields)
        # A view nothing was written to (the static ones, when no files were loaded) costs no lookups. A view
        # seen holding rows is not asked again: querying it is right even if it were emptied since.
        for view in views.keys() - self._written:
            if self._conn.execute(f"SELECT 1 FROM {self._table(view)} LIMIT 1").fetchone() is not None:
                self._written.add(view)
        written = {v: v in self._written for v in views}
        got = {}
        for view, feature in request.fields:
            if not written[view]:
                got[(view, feature)] = [None] * len(keys)
                continue
            found: dict[bytes, bytes] = {}
            for start in range(0, len(keys), self.CHUNK):  # one query per feature: dict() of its rows runs in C
                chunk = keys[start : start + self.CHUNK]
                found.update(self._conn.execute(
                    f"SELECT entity_key, value FROM {self._table(view)} "
                    f"WHERE feature_name = ? AND entity_key IN ({','.join('?' * len(chunk))})", (feature, *chunk)))
            got[(view, feature)] = [found.get(key) for key in keys]
        return got

    def close(self) -> None:
        with self._lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self._conn.close()


_HMGET_ALL = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end
return out
"""
"""One ``HMGET`` of the same fields (``ARGV``) per key, run by the server: one command for a batch."""

_HSET_ALL = """
local n = tonumber(ARGV[1])
local fv = {}
for i, key in ipairs(KEYS) do
  local base = 1 + n + (i - 1) * n
  for j = 1, n do fv[2 * j - 1] = ARGV[1 + j]; fv[2 * j] = ARGV[base + j] end
  redis.call('HSET', key, unpack(fv))
end
return #KEYS
"""
"""One ``HSET`` per key of the same ``n`` fields (``ARGV[2 .. n+1]``), each key with its ``n`` values after them."""


class RedisRows:
    """Feast's Redis hashes through Feast's own client, one round trip per read and per write.

    Each kind's keys go to the server in one command, a script that runs the ``HMGET`` or ``HSET`` of every
    key there (``EVALSHA``): a pipeline of one command per entity spends more time in redis-py than in Redis. Scripts touching many keys need a single Redis
    server, not a cluster (which is also all ``FeatureStoreConfig.redis_connection`` configures).
    """

    def __init__(self, client, project: str, address: str = "redis", outage_timeout_s: float = 0.0) -> None:
        """``address``: the server as logged (``host:port``, no password); ``outage_timeout_s``: how long a
        read or write waits for a server that went away before it raises :class:`FeatureStoreUnavailable`."""
        self.client = client
        self.project = project
        self.outages = Outages(address)
        self.outage_timeout_s = outage_timeout_s
        self._suffix = project.encode("utf-8")
        self._clock_key = f"moestream:clock:{project}"
        self._sha: dict[str, str] = {}

    def write(self, batches: Sequence[ViewRows], clock_ms: int, before_commit: Callable[[], object] | None = None) -> None:
        """Set the rows and publish ``clock_ms`` in one round trip, then run ``before_commit`` (Redis has no
        transaction to run it in: the rows are already visible to every reader)."""
        commands = []
        for rows in batches:
            keys = entity_keys(rows.join_key, rows.ids, self._suffix)
            stamps, inverse = _distinct_stamps(rows.stamps_ms)
            encoded = []
            for stamp in stamps:
                ts = Timestamp()
                ts.FromDatetime(stamp)
                encoded.append(ts.SerializeToString())
            fields = [f"_ts:{rows.view}", *(_mmh3(f"{rows.view}:{feature}") for feature in rows.values)]
            values = zip([encoded[i] for i in inverse.tolist()], *rows.values.values())  # one tuple per key
            commands.append((_HSET_ALL, keys, [len(fields), *fields, *(v for row in values for v in row)]))
        self._execute(commands, ("SET", self._clock_key, int(clock_ms)))
        if before_commit is not None:
            before_commit()

    def read(self, requests: Sequence[ReadRequest]) -> tuple[list[dict[tuple[str, str], Blobs]], int | None]:
        commands = []
        for request in requests:
            keys = entity_keys(request.join_key, request.ids, self._suffix)
            commands.append((_HMGET_ALL, keys, [_mmh3(f"{view}:{feature}") for view, feature in request.fields]))
        *replies, clock = self._execute(commands, ("GET", self._clock_key))
        out = []
        for request, rows in zip(requests, replies):
            out.append({f: [row[j] for row in rows] for j, f in enumerate(request.fields)})
        return out, None if clock is None else int(clock)

    def _execute(self, scripts: list[tuple[str, list[bytes], list]], last: tuple) -> list:
        """Run the scripts and then ``last`` in one pipeline: one round trip (more while the server is away)."""
        return self.outages.call(lambda: self._run(scripts, last), self.outage_timeout_s)

    def _run(self, scripts: list[tuple[str, list[bytes], list]], last: tuple) -> list:
        try:
            return self._pipeline(scripts, last)
        except NoScriptError:  # the server lost its scripts (a restart, SCRIPT FLUSH): load them, run again
            self._sha = {}
            return self._pipeline(scripts, last)

    def _pipeline(self, scripts: list[tuple[str, list[bytes], list]], last: tuple) -> list:
        if not self._sha:
            self._sha = {body: self.client.script_load(body) for body in (_HMGET_ALL, _HSET_ALL)}
        with self.client.pipeline(transaction=False) as pipe:
            for body, keys, args in scripts:
                pipe.evalsha(self._sha[body], len(keys), *keys, *args)
            pipe.execute_command(*last)
            return pipe.execute()

    def close(self) -> None:
        pass
