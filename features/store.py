"""The online feature store: a Feast ``FeatureStore`` configured in code, with batch push and batch lookup.

SQLite (online) and Parquet (offline) under ``data_dir`` by default; Redis as the online store when
configured, whose outages a push or lookup waits out for up to ``features.outage_timeout_s``
(``features.backends``). The registry is cached forever (``cache_ttl_seconds=0``) and a push or lookup of stream features
never reads it; :meth:`OnlineFeatures.apply` is idempotent and recreates the repo from code.

A push lands online and offline (what Feast's ``PushMode.ONLINE_AND_OFFLINE`` does), written here rather than
through ``FeatureStore.push``: Feast converts a push row by row and rewrites the view's whole Parquet file
for each one, which made pushing most of a training step. Online, the rows go in Feast's own layout, one
round trip per push (``features.backends``); offline, the pushes of ``offline_part_rows`` rows are one new
Parquet part of the view's directory (``features.offline``), and every flush writes what is collected. Feast reads both exactly as it reads its own writes.

A lookup reads each distinct user and item of a batch once, every view of both kinds in one round trip, and
fills what the store lacks or has expired with the defaults of :func:`defaults`; given an item cache
(``features.cache``, a serving replica's), it reads only the items the cache does not hold fresh.
:meth:`OnlineFeatures.historical` is the point-in-time counterpart for replay and backfill: Feast's
``get_historical_features`` over the Parquet parts that pushes append.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import features.feast_import  # noqa: F401 - before Feast itself: see that module
from feast import FeatureStore
from feast.infra.provider import get_provider
from feast.repo_config import RegistryConfig, RepoConfig

from features.aggregates import expire
from features.backends import Outages, ReadRequest, RedisRows, SqliteRows
from features.cache import RowCache
from features.codec import ENTITY_KEY_SERIALIZATION_VERSION
from features.config import FeatureStoreConfig
from features.definitions import (
    CATEGORICAL_COLUMNS, ENTITY_KEYS, FEATURE_COLUMNS, ID_FIELDS, MISSING_CODE, PUSH_SOURCES, STATIC_VIEWS,
    STREAM_FIELD, STREAM_VIEWS, build_definitions, offline_schema,
)
from features.offline import OfflineLog
from features.rows import (
    CATEGORICAL_BY_KIND, STATIC_WIDTH, StoredRows, decode_stored, defaults, feast_push_frame, offline_table,
    online_rows, pair_ids, read_fields, stream_columns, stream_defaults, unpack_stream,
)
from features.static import read_static

HISTORY_QUEUE = 4
"""Offline appends that may wait behind the online writes before a push waits for the oldest."""


def static_as_of() -> pd.Timestamp:
    """When a static load counts as written: in January 1970, so every replayed event sees it, yet later
    for every later load (the wall clock's milliseconds read as microseconds after the epoch: 21 days in
    2026). Feast's Redis store ignores a write not newer than the stored one, so a constant stamp would
    silently keep the first load forever (SQLite would overwrite)."""
    return pd.Timestamp(0, tz="UTC") + pd.Timedelta(microseconds=time.time_ns() // 1_000_000)


@dataclass
class FeatureBatch:
    """Features of a batch of (user, item) pairs: ``dense`` in ``FEATURE_COLUMNS`` order, and integer ``ids``
    (``ID_FIELDS`` then ``CATEGORICAL_COLUMNS``) for the model to embed."""

    dense: np.ndarray  # (B, len(FEATURE_COLUMNS)) float32
    ids: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B,) int64
    columns: tuple[str, ...] = FEATURE_COLUMNS

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.dense, columns=list(self.columns))
        for name, values in self.ids.items():
            frame[name] = values
        return frame


def repo_config(config: FeatureStoreConfig, data_dir: Path) -> RepoConfig:
    """Feast's configuration of the repo under ``data_dir``: the registry cached forever, the online store
    chosen by ``config``, the file offline store."""
    if config.online_store == "redis":
        online = {"type": "redis", "connection_string": config.redis_connection}
    else:
        online = {"type": "sqlite", "path": str(data_dir / "online.db")}
    return RepoConfig(
        project=config.project,
        provider="local",
        registry=RegistryConfig(path=str(data_dir / "registry.db"), cache_ttl_seconds=0),
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
        repo_path=data_dir,
    )


class OnlineFeatures:
    """Pushes streaming aggregates to Feast and reads them back as a dense matrix."""

    def __init__(self, config: FeatureStoreConfig = FeatureStoreConfig(), *, apply: bool = True) -> None:
        self.config = config
        data_dir = Path(config.data_dir).absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        self._offline_dir = data_dir / "offline"
        self.offline = OfflineLog(self._offline_dir, config.offline_fanout)
        self.repo_config = repo_config(config, data_dir)
        self.store = FeatureStore(config=self.repo_config)
        self._provider = get_provider(self.repo_config)
        self.outages: Outages | None = None
        """The Redis server's outages as this store's reads and writes met them (None: SQLite, a local file)."""
        if config.online_store == "redis":  # Feast's own client: both connect with the same settings
            client = self._provider.online_store._get_client(self.repo_config.online_store)
            address = config.redis_connection.split(",", 1)[0]  # host:port; the options may hold a password
            self.rows = RedisRows(client, config.project, f"Redis at {address}", config.outage_timeout_s)
            self.outages = self.rows.outages
        else:
            self.rows = SqliteRows(data_dir / "online.db", config.project)
        self.clock_ms = 0
        """Newest row stamp this instance pushed (event time)."""
        self.stream_defaults = stream_defaults(config.aggregates)
        """What an entity without a row (or whose windows expired) reads: the configured priors."""
        self._historian = ThreadPoolExecutor(1, thread_name_prefix="moestream-offline")
        self._history: deque[Future] = deque()
        """Offline appends queued or running, oldest first."""
        self._collected: list[list[tuple]] = []
        """Pushes not yet handed to the writer (``config.offline_part_rows`` rows make one part)."""
        self._collected_rows = 0
        if apply:
            self.apply()

    def apply(self) -> None:
        """Register entities, sources and views (idempotent), creating the offline directories if needed."""
        for view in PUSH_SOURCES:
            self.offline.ensure(view, offline_schema(view))
        self.store.apply(build_definitions(self._offline_dir))
        self.store.refresh_registry()
        if isinstance(self.rows, SqliteRows):  # Feast's update has just (re)created its redundant index
            self.rows.drop_redundant_indexes(list(PUSH_SOURCES))

    # ---- writes ----------------------------------------------------------------------------------

    def push(self, users: pd.DataFrame, items: pd.DataFrame, before_commit: Callable[[], object] | None = None) -> None:
        """Write a batch of updated stream rows (``StreamAggregator.update`` output) online and offline.

        Online, each entity gets its newest row (the last of equals), users and items in one round trip,
        which also publishes this push's newest stamp as the event-time clock: when this returns, every read
        sees the rows. ``before_commit`` is called once the rows can be read through this store, before they
        are committed for other readers (SQLite: inside the write's transaction, so that the trainer's read of
        its next batch does not wait for the commit's page writes; Redis: after the write); with nothing to
        push, at once. Offline, every row is kept, appended in push order on a writer thread of its own (no
        online read waits for the history); :meth:`flush` waits for it, and a failed append is raised by the
        next push or flush.
        """
        pushed = [(kind, *stream_columns(kind, frame)) for kind, frame in (("user", users), ("item", items))]
        pushed = [p for p in pushed if len(p[1])]
        if not pushed:
            if before_commit is not None:
                before_commit()
            return
        clock_ms = max(int(stamps.max()) for _, _, _, stamps in pushed)
        self.rows.write([online_rows(kind, ids, stats, stamps) for kind, ids, stats, stamps in pushed], clock_ms,
                        before_commit)
        if self.config.push_offline:
            self._collected.append(pushed)
            self._collected_rows += sum(len(ids) for _, ids, _, _ in pushed)
            if self._collected_rows >= self.config.offline_part_rows:
                self._hand_over()
        self.clock_ms = max(self.clock_ms, clock_ms)

    def _hand_over(self) -> None:
        """Queue the collected pushes as one append per view (waiting while the queue is full)."""
        self._settle_history(keep=HISTORY_QUEUE - 1)
        collected, self._collected, self._collected_rows = self._collected, [], 0
        if collected:
            self._history.append(self._historian.submit(self._append_history, collected))

    def _append_history(self, pushes: list[list[tuple]]) -> None:
        """One part per view for many pushes, rows in push order: a Parquet file has a fixed cost of its own."""
        for kind in ENTITY_KEYS:
            rows = [(ids, stats, stamps) for pushed in pushes for k, ids, stats, stamps in pushed if k == kind]
            if rows:
                ids, stats, stamps = (np.concatenate(parts) for parts in zip(*rows))
                self.offline.append(STREAM_VIEWS[kind], offline_table(kind, ids, stats, stamps))

    def flush(self) -> None:
        """Until every pushed row is in the offline history (raises what a failed append raised)."""
        self._hand_over()
        self._settle_history(keep=0)

    def _settle_history(self, keep: int) -> None:
        """Raise a failed append; wait until at most ``keep`` appends are queued (the queue is bounded)."""
        while self._history and (self._history[0].done() or len(self._history) > keep):
            self._history.popleft().result()

    def push_static(self, kind: str, rows: pd.DataFrame, chunk_rows: int = 50_000) -> int:
        """Push encoded static rows (``features.static``) of ``kind`` ("user" or "item") in chunks, through
        Feast's own online writer (loads are rare) and, with ``push_offline``, as offline parts."""
        self.flush()  # one writer of the offline log at a time
        if kind not in ENTITY_KEYS:
            raise ValueError(f"kind must be 'user' or 'item', got {kind!r}")
        view = STATIC_VIEWS[kind]
        rows = rows.assign(event_timestamp=static_as_of())
        for start in range(0, len(rows), chunk_rows):
            chunk = rows.iloc[start : start + chunk_rows]
            self.store.write_to_online_store(view, chunk)
            if self.config.push_offline:
                table = pa.Table.from_pandas(chunk, schema=offline_schema(view), preserve_index=False)
                self.offline.append(view, table.replace_schema_metadata(None))  # as pushed parts: no pandas index
        return len(rows)

    def load_static(self, users: Path | None = None, items: Path | None = None) -> dict[str, int]:
        """Load static attribute files (KuaiRand-1K or simulator format); returns rows loaded per kind."""
        loaded = {}
        for kind, path in (("user", users), ("item", items)):
            if path is not None:
                loaded[kind] = self.push_static(kind, read_static(path, kind))
        return loaded

    # ---- online reads ----------------------------------------------------------------------------

    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Dense features ``(B, len(FEATURE_COLUMNS))`` for (user, item) pairs, in ``FEATURE_COLUMNS`` order.

        Each distinct user and item is read once per batch. Entities the store does not know (or whose
        rows expired) get :func:`defaults` of the configured priors (``features.aggregates``).
        """
        return self.lookup_batch(user_ids, item_ids).dense

    def lookup_batch(self, user_ids: np.ndarray, item_ids: np.ndarray, as_of_ms: int | None = None,
                     item_cache: RowCache | None = None) -> FeatureBatch:
        """Dense matrix plus the ID and categorical columns; ``as_of_ms`` is "now" for window expiry
        (``None``: the configured clock). With ``item_cache``, the items it holds are not read: only the users
        and the other items are, and those items' rows are kept in it. Either way the batch is the same for
        the same rows, since windows expire per lookup."""
        user_ids, item_ids = pair_ids(user_ids, item_ids)
        users, u_inverse = np.unique(user_ids, return_inverse=True)
        items, i_inverse = np.unique(item_ids, return_inverse=True)
        requests = [ReadRequest(ENTITY_KEYS["user"], users, read_fields("user"))]
        if item_cache is None:
            requests.append(ReadRequest(ENTITY_KEYS["item"], items, read_fields("item")))
            got, published_ms = self.rows.read(requests)
            item_rows = decode_stored("item", got[1], self.stream_defaults["item"])
        else:
            hit, cached = item_cache.lookup(items)
            missed = items[~hit]
            read_ns = item_cache.now_ns()
            if len(missed):
                requests.append(ReadRequest(ENTITY_KEYS["item"], missed, read_fields("item")))
            got, published_ms = self.rows.read(requests)
            item_rows = cached
            if len(missed):
                fresh = decode_stored("item", got[1], self.stream_defaults["item"])
                item_cache.fill(missed, fresh, read_ns)
                item_rows = StoredRows.merge(hit, cached, fresh)
        now_ms = as_of_ms if as_of_ms is not None else self.now_ms(published_ms)
        user_default = self.stream_defaults["user"]
        u_dense, u_cats = decode_stored("user", got[0], user_default).as_of(now_ms, user_default)
        i_dense, i_cats = item_rows.as_of(now_ms, self.stream_defaults["item"])
        ids = {"user_id": user_ids, "item_id": item_ids}
        ids |= dict(zip(CATEGORICAL_COLUMNS, np.concatenate([u_cats[u_inverse], i_cats[i_inverse]], axis=1).T))
        return FeatureBatch(np.concatenate([u_dense[u_inverse], i_dense[i_inverse]], axis=1), ids)

    def item_cache(self, capacity: int, ttl_ms: float) -> RowCache:
        """An empty cache of this store's item rows for :meth:`lookup_batch` (``features.cache``)."""
        return RowCache(capacity, ttl_ms, len(self.stream_defaults["item"]), STATIC_WIDTH["item"],
                        len(CATEGORICAL_BY_KIND["item"]))

    def now_ms(self, published_ms: int | None = None) -> int:
        """What "now" is for window expiry under the configured clock, given the clock the store published."""
        if self.config.clock == "event":
            if published_ms is not None:
                return published_ms
            if self.clock_ms:
                return self.clock_ms
        return int(time.time() * 1000)

    # ---- point-in-time reads ---------------------------------------------------------------------

    def historical(self, events: pd.DataFrame) -> FeatureBatch:
        """Features of each (user_id, item_id, event_timestamp) row as of its own time, in the given order.

        Feast joins each row to the newest pushed row stamped at or before its time (within the view's TTL);
        a window's values older than that window are replaced by its defaults, as online.
        """
        missing = [c for c in ("user_id", "item_id", "event_timestamp") if c not in events]
        if missing:
            raise ValueError(f"historical() needs columns user_id, item_id, event_timestamp; missing {missing}")
        self.flush()
        entity_df = pd.DataFrame({
            "user_id": events["user_id"].to_numpy(np.int64),
            "item_id": events["item_id"].to_numpy(np.int64),
            "event_timestamp": pd.to_datetime(events["event_timestamp"], utc=True).to_numpy(),
            "row_": np.arange(len(events)),
        })
        entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
        event_ms = entity_df["event_timestamp"].to_numpy("datetime64[ms]").astype(np.int64)
        blocks, cats = [], []
        for kind, key in ENTITY_KEYS.items():
            stream, static = STREAM_VIEWS[kind], STATIC_VIEWS[kind]
            rows = entity_df[[key, "event_timestamp", "row_"]]
            got = self._view_history(rows, stream, (STREAM_FIELD,))
            packed = _unpack(got[f"{stream}__{STREAM_FIELD}"], np.append(self.stream_defaults[kind], np.nan), np.float64)
            stats, updated = unpack_stream(packed, found=~np.isnan(packed[:, -1]))
            blocks.append(expire(stats, updated, event_ms, self.stream_defaults[kind]))
            got = self._view_history(rows, static, ("dense", "cats"))
            blocks.append(_unpack(got[f"{static}__dense"], np.zeros(STATIC_WIDTH[kind], np.float32)))
            no_codes = np.full(len(CATEGORICAL_BY_KIND[kind]), MISSING_CODE)
            cats.append(_unpack(got[f"{static}__cats"], no_codes, np.int64))
        frame = entity_df
        ids = {"user_id": frame["user_id"].to_numpy(np.int64), "item_id": frame["item_id"].to_numpy(np.int64)}
        ids |= dict(zip(CATEGORICAL_COLUMNS, np.concatenate(cats, axis=1).T))
        return FeatureBatch(np.concatenate(blocks, axis=1).astype(np.float32), ids)

    def _view_history(self, rows: pd.DataFrame, view: str, fields: tuple[str, ...]) -> pd.DataFrame:
        """One view's point-in-time join, one output row per input row (in ``row_`` order).

        One view per call: Feast's file offline store drops an entity row outright when its only feature rows
        are newer than it (``_filter_ttl`` filters the merged rows), which would take the other views' values
        of that row with it. A dropped row had no value as of its time, so it gets the defaults (NaN here).
        """
        refs = [f"{view}:{f}" for f in fields]
        # Feast's file store also collapses rows sharing a key and a timestamp (feast-dev/feast#6787), so
        # the query asks for each distinct (key, time) once and the answer is spread back.
        key = rows.columns[0]
        query = rows[[key, "event_timestamp"]].drop_duplicates().reset_index(drop=True)
        query["row_"] = np.arange(len(query))
        codes = rows[[key, "event_timestamp"]].merge(query, on=[key, "event_timestamp"], how="left")["row_"]
        got = self.store.get_historical_features(entity_df=query, features=refs, full_feature_names=True).to_df()
        got = got.set_index("row_").reindex(np.arange(len(query)))
        return got[[f"{view}__{f}" for f in fields]].iloc[codes].reset_index(drop=True)


def _unpack(column: pd.Series, default: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows of a list column as a matrix; missing (no row as of that time) or malformed rows get ``default``."""
    width = len(default)
    out = np.tile(np.asarray(default, dtype=dtype), (len(column), 1))
    for i, value in enumerate(column.tolist()):
        if value is not None and not (isinstance(value, float) and np.isnan(value)) and len(value) == width:
            out[i] = value
    return out


__all__ = ["FEATURE_COLUMNS", "ID_FIELDS", "FeatureBatch", "FeatureStoreConfig", "OnlineFeatures", "defaults",
           "feast_push_frame"]
