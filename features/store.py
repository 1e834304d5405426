"""The online feature store: a Feast ``FeatureStore`` configured in code, with batch push and batch lookup.

SQLite (online) and Parquet (offline) under ``data_dir`` by default; Redis as the online store when
configured. The registry is cached forever (``cache_ttl_seconds=0``) and the feature views are read from it
once per instance, so a lookup never touches, let alone waits for, the registry; :meth:`OnlineFeatures.apply`
is idempotent and recreates the repo from code.

A lookup reads each distinct user and item of a batch once, through the Feast provider's batched
``online_read`` (one round trip per view), and fills what the store lacks or has expired with the defaults
of :func:`defaults`. :meth:`OnlineFeatures.historical` is the point-in-time counterpart for replay and
backfill: Feast's ``get_historical_features`` over the Parquet files that pushes append to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from feast import FeatureStore
from feast.data_source import PushMode
from feast.infra.provider import get_provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RegistryConfig, RepoConfig

from features.aggregates import AggregateConfig, StreamAggregator
from features.definitions import (
    CATEGORICAL_COLUMNS, ENTITY_KEYS, FEATURE_COLUMNS, ID_FIELDS, ITEM_CATEGORICAL, ITEM_STATIC, ITEM_STREAM,
    MISSING_CODE, PUSH_SOURCES, STATIC_VIEWS, STREAM_VIEWS, USER_CATEGORICAL, USER_STATIC, USER_STREAM,
    WINDOW_STATS, WINDOWS, build_definitions, offline_schema,
)
from features.static import read_static

def static_as_of() -> pd.Timestamp:
    """When a static load counts as written: in January 1970, so every replayed event sees it, yet later
    for every later load (the wall clock's milliseconds read as microseconds after the epoch: 21 days in
    2026). Feast's Redis store ignores a write not newer than the stored one, so a constant stamp would
    silently keep the first load forever (SQLite would overwrite)."""
    return pd.Timestamp(0, tz="UTC") + pd.Timedelta(microseconds=time.time_ns() // 1_000_000)


@dataclass(frozen=True)
class FeatureStoreConfig:
    data_dir: Path = Path(".moestream/features")
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = "127.0.0.1:6379"
    """Feast's Redis connection string, e.g. ``host:port,password=...``."""
    project: str = "moestream"
    push_offline: bool = True
    """Push with ``PushMode.ONLINE_AND_OFFLINE`` (pushed rows also append to the Parquet offline store, for
    point-in-time replay); ``False`` pushes online only."""
    clock: Literal["event", "wall"] = "event"
    """What "now" is for window TTLs: the newest event time this instance pushed (falling back to the wall
    clock before its first push), or always the wall clock."""

    def __post_init__(self) -> None:
        if self.online_store not in ("sqlite", "redis"):
            raise ValueError(f"features.online_store must be 'sqlite' or 'redis', got {self.online_store!r}")
        if self.clock not in ("event", "wall"):
            raise ValueError(f"features.clock must be 'event' or 'wall', got {self.clock!r}")


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


_AGG = StreamAggregator(AggregateConfig())
_STREAM_DEFAULTS = {"user": _AGG.users.defaults(), "item": _AGG.items.defaults()}
_STATIC_WIDTH = {"user": len(USER_STATIC), "item": len(ITEM_STATIC)}
_CATEGORICAL = {"user": USER_CATEGORICAL, "item": ITEM_CATEGORICAL}
_WINDOW_MS = np.repeat([int(d.total_seconds() * 1000) for d in WINDOWS.values()], len(WINDOW_STATS))


def defaults() -> np.ndarray:
    """Dense features of an unknown user and item (``FEATURE_COLUMNS`` order): no events in any window (zero
    counts, the tasks' base rates, the prior watch time) and 0 for every static feature."""
    return np.concatenate([_STREAM_DEFAULTS["user"], np.zeros(len(USER_STATIC), np.float32),
                           _STREAM_DEFAULTS["item"], np.zeros(len(ITEM_STATIC), np.float32)])


class OnlineFeatures:
    """Pushes streaming aggregates to Feast and reads them back as a dense matrix."""

    def __init__(self, config: FeatureStoreConfig = FeatureStoreConfig(), *, apply: bool = True) -> None:
        self.config = config
        data_dir = Path(config.data_dir).absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        self._offline_dir = data_dir / "offline"
        self._offline_dir.mkdir(exist_ok=True)
        self.repo_config = self._repo_config(data_dir)
        self.store = FeatureStore(config=self.repo_config)
        self._provider = get_provider(self.repo_config)
        self._views: dict = {}
        self.clock_ms = 0
        """Newest row stamp this instance pushed (event time)."""
        if apply:
            self.apply()

    def _repo_config(self, data_dir: Path) -> RepoConfig:
        c = self.config
        if c.online_store == "redis":
            online = {"type": "redis", "connection_string": c.redis_connection}
        else:
            online = {"type": "sqlite", "path": str(data_dir / "online.db")}
        return RepoConfig(
            project=c.project,
            provider="local",
            registry=RegistryConfig(path=str(data_dir / "registry.db"), cache_ttl_seconds=0),
            online_store=online,
            offline_store={"type": "file"},
            entity_key_serialization_version=3,
            repo_path=data_dir,
        )

    def apply(self) -> None:
        """Register entities, sources and views (idempotent), creating empty offline files if needed."""
        for view in PUSH_SOURCES:
            path = self._offline_dir / f"{view}.parquet"
            if not path.exists():
                pq.write_table(offline_schema(view).empty_table(), path)
        self.store.apply(build_definitions(self._offline_dir))
        self.store.refresh_registry()
        self._views = {}
        self._load_views()

    def _load_views(self) -> None:
        """Read the feature views from the registry once; lookups use these and never the registry."""
        if not self._views:
            names = [*STREAM_VIEWS.values(), *STATIC_VIEWS.values()]
            self._views = {name: self.store.get_feature_view(name) for name in names}

    # ---- writes ----------------------------------------------------------------------------------

    @property
    def push_mode(self) -> PushMode:
        return PushMode.ONLINE_AND_OFFLINE if self.config.push_offline else PushMode.ONLINE

    def push(self, users: pd.DataFrame, items: pd.DataFrame) -> None:
        """One push per entity type for a whole batch of updated rows (``StreamAggregator.update`` output)."""
        for kind, frame, names in (("user", users, USER_STREAM), ("item", items, ITEM_STREAM)):
            if len(frame):
                self.store.push(PUSH_SOURCES[STREAM_VIEWS[kind]], _pack_stream(frame, ENTITY_KEYS[kind], names),
                                to=self.push_mode)
                self.clock_ms = max(self.clock_ms, int(frame["event_timestamp"].max().value // 1_000_000))

    def push_static(self, kind: str, rows: pd.DataFrame, chunk_rows: int = 50_000) -> int:
        """Push encoded static rows (``features.static``) of ``kind`` ("user" or "item") in chunks."""
        if kind not in ENTITY_KEYS:
            raise ValueError(f"kind must be 'user' or 'item', got {kind!r}")
        rows = rows.assign(event_timestamp=static_as_of())
        for start in range(0, len(rows), chunk_rows):
            self.store.push(PUSH_SOURCES[STATIC_VIEWS[kind]], rows.iloc[start : start + chunk_rows],
                            to=self.push_mode)
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
        rows expired) get :func:`defaults`.
        """
        return self.lookup_batch(user_ids, item_ids).dense

    def lookup_batch(self, user_ids: np.ndarray, item_ids: np.ndarray, as_of_ms: int | None = None) -> FeatureBatch:
        """Dense matrix plus the ID and categorical columns; ``as_of_ms`` is "now" for the window TTLs."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if user_ids.shape != item_ids.shape or user_ids.ndim != 1:
            raise ValueError(f"user_ids and item_ids must be 1-d and of equal length, got {user_ids.shape} "
                             f"and {item_ids.shape}")
        self._load_views()
        now_ms = as_of_ms if as_of_ms is not None else self._now_ms()
        u_dense, u_cats = self._read("user", user_ids, now_ms)
        i_dense, i_cats = self._read("item", item_ids, now_ms)
        ids = {"user_id": user_ids, "item_id": item_ids}
        ids |= dict(zip(CATEGORICAL_COLUMNS, np.concatenate([u_cats, i_cats], axis=1).T))
        return FeatureBatch(np.concatenate([u_dense, i_dense], axis=1), ids)

    def _now_ms(self) -> int:
        if self.config.clock == "event" and self.clock_ms:
            return self.clock_ms
        return int(time.time() * 1000)

    def _read(self, kind: str, ids: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        uniq, inverse = np.unique(ids, return_inverse=True)
        key = ENTITY_KEYS[kind]
        keys = [EntityKeyProto(join_keys=[key], entity_values=[ValueProto(int64_val=v)]) for v in uniq.tolist()]
        stream = self._stream_rows(kind, keys, now_ms)
        dense, cats = self._static_rows(kind, keys)
        return np.concatenate([stream, dense], axis=1)[inverse], cats[inverse]

    def _stream_rows(self, kind: str, keys: list, now_ms: int) -> np.ndarray:
        default = _STREAM_DEFAULTS[kind]
        rows = self._provider.online_read(self.repo_config, self._views[STREAM_VIEWS[kind]], keys, ["stats"])
        matrix = np.tile(default, (len(keys), 1))
        age_ms = np.full(len(keys), np.iinfo(np.int64).max)
        found = [(i, ts, values["stats"].float_list_val.val) for i, (ts, values) in enumerate(rows)
                 if ts is not None and values]
        found = [(i, ts, v) for i, ts, v in found if len(v) == len(default)]
        if found:
            index = np.fromiter((f[0] for f in found), np.int64, len(found))
            matrix[index] = np.array([f[2] for f in found], dtype=np.float32)
            age_ms[index] = now_ms - np.fromiter((f[1].timestamp() * 1000 for f in found), np.float64, len(found))
        # A window's values hold for that window's length after the row was written; then they expire.
        return np.where(age_ms[:, None] <= _WINDOW_MS[None, :], matrix, default).astype(np.float32)

    def _static_rows(self, kind: str, keys: list) -> tuple[np.ndarray, np.ndarray]:
        n_dense, n_cats = _STATIC_WIDTH[kind], len(_CATEGORICAL[kind])
        rows = self._provider.online_read(self.repo_config, self._views[STATIC_VIEWS[kind]], keys, ["dense", "cats"])
        dense = np.zeros((len(keys), n_dense), dtype=np.float32)
        cats = np.full((len(keys), n_cats), MISSING_CODE, dtype=np.int64)
        for i, (ts, values) in enumerate(rows):
            if ts is not None and values:
                d, c = values["dense"].float_list_val.val, values["cats"].int64_list_val.val
                if len(d) == n_dense and len(c) == n_cats:
                    dense[i], cats[i] = d, c
        return dense, cats

    # ---- point-in-time reads ---------------------------------------------------------------------

    def historical(self, events: pd.DataFrame) -> FeatureBatch:
        """Features of each (user_id, item_id, event_timestamp) row as of its own time, in the given order.

        Feast joins each row to the newest pushed row stamped at or before its time (within the view's TTL);
        a window's values older than that window are replaced by its defaults, as online.
        """
        missing = [c for c in ("user_id", "item_id", "event_timestamp") if c not in events]
        if missing:
            raise ValueError(f"historical() needs columns user_id, item_id, event_timestamp; missing {missing}")
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
            got = self._view_history(rows, stream, ("stats", "updated_ms"))
            stats = _unpack(got[f"{stream}__stats"], _STREAM_DEFAULTS[kind])
            updated = pd.to_numeric(got[f"{stream}__updated_ms"]).fillna(np.iinfo(np.int64).min // 2)
            age_ms = event_ms - updated.to_numpy(np.int64)
            blocks.append(np.where(age_ms[:, None] <= _WINDOW_MS[None, :], stats, _STREAM_DEFAULTS[kind]))
            got = self._view_history(rows, static, ("dense", "cats"))
            blocks.append(_unpack(got[f"{static}__dense"], np.zeros(_STATIC_WIDTH[kind], np.float32)))
            cats.append(_unpack(got[f"{static}__cats"], np.full(len(_CATEGORICAL[kind]), MISSING_CODE), np.int64))
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


def _pack_stream(frame: pd.DataFrame, key: str, names: tuple[str, ...]) -> pd.DataFrame:
    stamp = pd.to_datetime(frame["event_timestamp"], utc=True)
    return pd.DataFrame({
        key: frame[key].to_numpy(np.int64),
        "stats": list(frame[list(names)].to_numpy(np.float32)),
        "updated_ms": stamp.to_numpy("datetime64[ms]").astype(np.int64),
        "event_timestamp": stamp,
    })


def _unpack(column: pd.Series, default: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows of a list column as a matrix; missing (no row as of that time) or malformed rows get ``default``."""
    width = len(default)
    out = np.tile(np.asarray(default, dtype=dtype), (len(column), 1))
    for i, value in enumerate(column.tolist()):
        if value is not None and not (isinstance(value, float) and np.isnan(value)) and len(value) == width:
            out[i] = value
    return out


__all__ = ["FEATURE_COLUMNS", "ID_FIELDS", "FeatureBatch", "FeatureStoreConfig", "OnlineFeatures", "defaults"]
