"""An in-memory stand-in for the online store, for unit tests and offline experiments (not for serving)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.aggregates import StreamAggregator
from features.definitions import ITEM_FEATURES, USER_FEATURES


class InMemoryFeatures:
    """Same ``push``/``lookup`` contract as :class:`features.store.OnlineFeatures`, backed by dicts."""

    def __init__(self) -> None:
        self._users: dict[int, np.ndarray] = {}
        self._items: dict[int, np.ndarray] = {}
        defaults = StreamAggregator().defaults()
        self._user_default = defaults[: len(USER_FEATURES)]
        self._item_default = defaults[len(USER_FEATURES) :]

    def push(self, users: pd.DataFrame, items: pd.DataFrame) -> None:
        for table, frame, key, names in ((self._users, users, "user_id", USER_FEATURES), (self._items, items, "item_id", ITEM_FEATURES)):
            values = frame[list(names)].to_numpy(np.float32)
            table.update(zip(frame[key].tolist(), values))

    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        users = np.stack([self._users.get(int(u), self._user_default) for u in user_ids]) if len(user_ids) else np.zeros((0, len(USER_FEATURES)), np.float32)
        items = np.stack([self._items.get(int(i), self._item_default) for i in item_ids]) if len(item_ids) else np.zeros((0, len(ITEM_FEATURES)), np.float32)
        return np.concatenate([users, items], axis=1).astype(np.float32)
