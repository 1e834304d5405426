"""The online feature store: a Feast ``FeatureStore`` configured in code, with batch push and batch lookup.

SQLite (online) and Parquet (offline) under ``data_dir`` by default; Redis as the online store when
configured. The registry is cached forever (``cache_ttl_seconds=0``) so a lookup never blocks on a
registry refresh; :meth:`OnlineFeatures.apply` is idempotent and recreates the repo from code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from feast import FeatureStore
from feast.data_source import PushMode
from feast.repo_config import RegistryConfig, RepoConfig

from features.aggregates import AggregateConfig, StreamAggregator
from features.definitions import (
    FEATURE_COLUMNS,
    ITEM_FEATURES,
    ITEM_PUSH,
    ITEM_VIEW,
    USER_FEATURES,
    USER_PUSH,
    USER_VIEW,
    build_definitions,
)


@dataclass(frozen=True)
class FeatureStoreConfig:
    data_dir: Path = Path(".moestream/features")
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = "127.0.0.1:6379"
    """Feast's Redis connection string, e.g. ``host:port,password=...``."""
    project: str = "moestream"
    ttl_s: int = 7 * 24 * 3600
    push_offline: bool = False
    """Also append pushed rows to the Parquet offline store (for point-in-time replay)."""


class OnlineFeatures:
    """Pushes streaming aggregates to Feast and reads them back as a dense matrix."""

    def __init__(self, config: FeatureStoreConfig = FeatureStoreConfig(), *, apply: bool = True) -> None:
        self.config = config
        data_dir = Path(config.data_dir).absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        self._offline_dir = data_dir / "offline"
        self._offline_dir.mkdir(exist_ok=True)
        self.store = FeatureStore(config=self._repo_config(data_dir))
        self._defaults = StreamAggregator(AggregateConfig()).defaults()
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
        for view, key, names in ((USER_VIEW, "user_id", USER_FEATURES), (ITEM_VIEW, "item_id", ITEM_FEATURES)):
            path = self._offline_dir / f"{view}.parquet"
            if not path.exists():
                empty = pd.DataFrame({key: pd.Series([], dtype="int64")})
                for name in names:
                    empty[name] = pd.Series([], dtype="float32")
                empty["event_timestamp"] = pd.Series([], dtype="datetime64[ns, UTC]")
                empty.to_parquet(path)
        self.store.apply(build_definitions(self._offline_dir, timedelta(seconds=self.config.ttl_s)))
        self.store.refresh_registry()

    def push(self, users: pd.DataFrame, items: pd.DataFrame) -> None:
        """One push per entity type for a whole batch of updated rows."""
        mode = PushMode.ONLINE_AND_OFFLINE if self.config.push_offline else PushMode.ONLINE
        for source, frame in ((USER_PUSH, users), (ITEM_PUSH, items)):
            if len(frame):
                self.store.push(source, frame, to=mode)

    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Dense features ``(B, len(FEATURE_COLUMNS))`` for (user, item) pairs, in ``FEATURE_COLUMNS`` order.

        Each distinct user and item is read once per batch. Entities the store does not know (or whose
        rows expired) get the aggregator's defaults: zero impressions and the prior rates.
        """
        users = self._read(np.asarray(user_ids, dtype=np.int64), "user_id", USER_VIEW, USER_FEATURES, 0)
        items = self._read(np.asarray(item_ids, dtype=np.int64), "item_id", ITEM_VIEW, ITEM_FEATURES, len(USER_FEATURES))
        return np.concatenate([users, items], axis=1)

    def _read(self, ids: np.ndarray, key: str, view: str, names: tuple[str, ...], offset: int) -> np.ndarray:
        uniq, inverse = np.unique(ids, return_inverse=True)
        defaults = self._defaults[offset : offset + len(names)]
        if len(uniq) == 0:
            return np.zeros((0, len(names)), dtype=np.float32)
        response = self.store.get_online_features(
            features=[f"{view}:{n}" for n in names], entity_rows={key: uniq.tolist()}
        ).to_dict()
        matrix = np.array([response[n] for n in names], dtype=np.float64).T  # None -> nan
        matrix = np.where(np.isnan(matrix), defaults, matrix).astype(np.float32)
        return matrix[inverse]


__all__ = ["FEATURE_COLUMNS", "FeatureStoreConfig", "OnlineFeatures"]
