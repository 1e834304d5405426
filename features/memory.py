"""An in-memory stand-in for the online store, for unit tests and offline experiments (not for serving).

Same ``push``/``lookup`` contract as :class:`features.store.OnlineFeatures` and the same defaults for unknown
entities; it keeps the latest row per entity and applies no TTL and no static features.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.definitions import ITEM_STATIC, ITEM_STREAM, USER_STATIC, USER_STREAM
from features.store import defaults


class InMemoryFeatures:
    def __init__(self) -> None:
        self._tables: dict[str, dict[int, np.ndarray]] = {"user": {}, "item": {}}
        d = defaults()
        n_user = len(USER_STREAM) + len(USER_STATIC)
        self._default = {"user": d[:n_user], "item": d[n_user:]}

    def push(self, users: pd.DataFrame, items: pd.DataFrame) -> None:
        for kind, frame, key, names, n_static in (("user", users, "user_id", USER_STREAM, len(USER_STATIC)),
                                                  ("item", items, "item_id", ITEM_STREAM, len(ITEM_STATIC))):
            values = frame[list(names)].to_numpy(np.float32)
            values = np.concatenate([values, np.zeros((len(values), n_static), np.float32)], axis=1)
            self._tables[kind].update(zip(frame[key].tolist(), values))

    def _rows(self, kind: str, ids: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        table, default = self._tables[kind], self._default[kind]
        rows = np.stack([table.get(i, default) for i in uniq.tolist()]) if len(uniq) else np.zeros((0, len(default)))
        return rows[inverse].astype(np.float32)

    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        return np.concatenate([self._rows("user", user_ids), self._rows("item", item_ids)], axis=1)
