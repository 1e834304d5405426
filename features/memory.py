"""An in-memory stand-in for the online store, for unit tests and offline experiments (not for serving).

Same ``push``/``lookup``/``lookup_batch`` contract as :class:`features.store.OnlineFeatures`: the same checks
on pushed rows, the newest row per entity, the same defaults for unknown entities and the same window expiry
under the same clocks (``"event"``: the newest stamp of the last push; ``"wall"``: the wall clock;
``as_of_ms`` when given). It holds no static features: every entity gets the static defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import pandas as pd

from features.aggregates import NEVER_MS, expire
from features.definitions import CATEGORICAL_COLUMNS, ENTITY_KEYS, MISSING_CODE
from features.rows import CATEGORICAL_BY_KIND, STATIC_WIDTH, STREAM_DEFAULTS, newest_rows, pair_ids, stream_columns
from features.store import FeatureBatch


class InMemoryFeatures:
    def __init__(self, clock: Literal["event", "wall"] = "event") -> None:
        if clock not in ("event", "wall"):
            raise ValueError(f"clock must be 'event' or 'wall', got {clock!r}")
        self.clock = clock
        self.clock_ms = 0
        """The newest row stamp of the last push: "now" under the event clock, as the real store publishes."""
        self._rows: dict[str, dict[int, tuple[np.ndarray, int]]] = {"user": {}, "item": {}}  # id -> (stats, ms)

    def push(self, users: pd.DataFrame, items: pd.DataFrame, before_commit: Callable[[], object] | None = None) -> None:
        pushed = [(kind, *stream_columns(kind, frame)) for kind, frame in (("user", users), ("item", items))]
        pushed = [p for p in pushed if len(p[1])]
        for kind, ids, stats, stamps in pushed:
            last = newest_rows(ids, stamps)  # as the store: the newest row of this push replaces the stored one
            self._rows[kind].update(zip(ids[last].tolist(), zip(stats[last], stamps[last].tolist())))
        if pushed:
            self.clock_ms = max(int(stamps.max()) for _, _, _, stamps in pushed)
        if before_commit is not None:
            before_commit()

    def flush(self) -> None:
        """Nothing is written behind a push here."""

    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        return self.lookup_batch(user_ids, item_ids).dense

    def lookup_batch(self, user_ids: np.ndarray, item_ids: np.ndarray, as_of_ms: int | None = None) -> FeatureBatch:
        user_ids, item_ids = pair_ids(user_ids, item_ids)
        now_ms = as_of_ms if as_of_ms is not None else self.now_ms()
        u_dense, u_cats = self._read("user", user_ids, now_ms)
        i_dense, i_cats = self._read("item", item_ids, now_ms)
        ids = {ENTITY_KEYS["user"]: user_ids, ENTITY_KEYS["item"]: item_ids}
        ids |= dict(zip(CATEGORICAL_COLUMNS, np.concatenate([u_cats, i_cats], axis=1).T))
        return FeatureBatch(np.concatenate([u_dense, i_dense], axis=1), ids)

    def now_ms(self) -> int:
        if self.clock == "event" and self.clock_ms:
            return self.clock_ms
        return int(time.time() * 1000)

    def _read(self, kind: str, ids: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        uniq, inverse = np.unique(ids, return_inverse=True)
        default, table = STREAM_DEFAULTS[kind], self._rows[kind]
        found = [table.get(i, (default, NEVER_MS)) for i in uniq.tolist()]
        stats = np.array([f[0] for f in found], np.float32).reshape(len(uniq), len(default))
        updated = np.fromiter((f[1] for f in found), np.int64, len(uniq))
        static = np.zeros((len(uniq), STATIC_WIDTH[kind]), np.float32)
        dense = np.concatenate([expire(stats, updated, now_ms, default), static], axis=1)
        cats = np.full((len(uniq), len(CATEGORICAL_BY_KIND[kind])), MISSING_CODE, np.int64)
        return dense[inverse], cats[inverse]
