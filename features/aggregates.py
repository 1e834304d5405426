"""Streaming per-user and per-item statistics computed from joined examples.

Rates are smoothed towards a prior (``(positives + prior_rate * strength) / (n + strength)``) so that a user
with two impressions does not get a click rate of 0 or 1. The aggregator returns, per batch, one row per
touched entity, ready to push to Feast in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from features.definitions import ITEM_FEATURES, USER_FEATURES
from stream.events import PLAY_TIME, TASKS, TYPICAL_POSITIVE_RATES


@dataclass(frozen=True)
class AggregateConfig:
    prior_rates: tuple[float, ...] = tuple(TYPICAL_POSITIVE_RATES[t] for t in TASKS)
    prior_strength: float = 10.0
    prior_play_s: float = 6.0


_SUMS = ("n", *TASKS, "play_s")


class _EntityStats:
    """Running sums for one entity type, in a growable array indexed through a dict."""

    def __init__(self, key: str, names: tuple[str, ...], config: AggregateConfig) -> None:
        self.key, self.names, self.config = key, names, config
        self._row: dict[int, int] = {}
        self._sums = np.zeros((1024, len(_SUMS)), dtype=np.float64)

    def update(self, ids: np.ndarray, values: np.ndarray, ts: pd.Timestamp) -> pd.DataFrame:
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = np.fromiter((self._row.setdefault(int(u), len(self._row)) for u in uniq), np.int64, len(uniq))
        if len(self._row) > len(self._sums):
            grown = np.zeros((2 * len(self._row), len(_SUMS)))
            grown[: len(self._sums)] = self._sums
            self._sums = grown
        np.add.at(self._sums, rows[inverse], values)
        return self._features(uniq, self._sums[rows], ts)

    def _features(self, ids: np.ndarray, sums: np.ndarray, ts: pd.Timestamp) -> pd.DataFrame:
        c = self.config
        n = sums[:, 0]
        rates = (sums[:, 1 : 1 + len(TASKS)] + np.asarray(c.prior_rates) * c.prior_strength) / (
            n[:, None] + c.prior_strength
        )
        play = (sums[:, -1] + c.prior_play_s * c.prior_strength) / (n + c.prior_strength)
        matrix = np.column_stack([np.log1p(n), rates, play]).astype(np.float32)
        frame = pd.DataFrame(matrix, columns=list(self.names))
        frame.insert(0, self.key, ids.astype(np.int64))
        frame["event_timestamp"] = ts
        return frame

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        ids = np.fromiter(self._row.keys(), dtype=np.int64, count=len(self._row))
        rows = np.fromiter(self._row.values(), dtype=np.int64, count=len(self._row))
        return {f"{prefix}.ids": ids, f"{prefix}.sums": self._sums[rows]}

    def load_state(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        ids, sums = arrays[f"{prefix}.ids"], arrays[f"{prefix}.sums"]
        self._row = {int(i): r for r, i in enumerate(ids.tolist())}
        self._sums = np.zeros((max(1024, 2 * len(ids)), len(_SUMS)))
        self._sums[: len(ids)] = sums

    def defaults(self) -> np.ndarray:
        """The feature values of an entity never seen: no impressions, prior rates."""
        c = self.config
        return np.array([0.0, *c.prior_rates, c.prior_play_s], dtype=np.float32)


class StreamAggregator:
    def __init__(self, config: AggregateConfig = AggregateConfig()) -> None:
        if len(config.prior_rates) != len(TASKS):
            raise ValueError(f"prior_rates needs {len(TASKS)} values, one per task {TASKS}")
        self.users = _EntityStats("user_id", USER_FEATURES, config)
        self.items = _EntityStats("item_id", ITEM_FEATURES, config)

    def update(self, examples: pa.Table) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Fold joined examples in; return the new feature rows of the users and items they touched."""
        cols = examples.to_pydict() if examples.num_rows else None
        ts = pd.Timestamp(max(cols["ts_ms"]) if cols else 0, unit="ms", tz="UTC")
        if cols is None:
            empty = np.zeros(0, dtype=np.int64), np.zeros((0, len(_SUMS)))
            return self.users.update(*empty, ts), self.items.update(*empty, ts)
        values = np.column_stack(
            [np.ones(examples.num_rows), *(np.asarray(cols[t]) for t in TASKS), np.asarray(cols[PLAY_TIME]) / 1000]
        )
        return (
            self.users.update(np.asarray(cols["user_id"]), values, ts),
            self.items.update(np.asarray(cols["item_id"]), values, ts),
        )

    def defaults(self) -> np.ndarray:
        return np.concatenate([self.users.defaults(), self.items.defaults()])

    def state(self) -> dict[str, np.ndarray]:
        """Running sums as plain arrays (for a checkpoint)."""
        return {**self.users.state("users"), **self.items.state("items")}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.users.load_state("users", arrays)
        self.items.load_state("items", arrays)
