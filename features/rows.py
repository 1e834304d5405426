"""Stream rows on their way in and out: the checked columns of a pushed frame, the serialized values the
online store holds, the Arrow table of an offline part, and the dense rows a lookup returns.

Shared by :class:`features.store.OnlineFeatures` and its in-memory stand-in, so both check, keep and expire
rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from features.aggregates import NEVER_MS, expire, no_events
from features.config import AggregateConfig
from features.backends import ViewRows
from features.codec import decode_float_lists, decode_int64_lists, encode_float_lists
from features.definitions import (
    ENTITY_KEYS, ITEM_CATEGORICAL, ITEM_STATIC, ITEM_STREAM, MISSING_CODE, STATIC_VIEWS, STREAM_FIELD, STREAM_VIEWS,
    USER_CATEGORICAL, USER_STATIC, USER_STREAM, offline_schema,
)



def stream_defaults(config: AggregateConfig = AggregateConfig()) -> dict[str, np.ndarray]:
    """Per entity kind, the stream statistics of an entity with no events in any window under ``config``."""
    return {"user": no_events(config), "item": no_events(config)}


STREAM_DEFAULTS = stream_defaults()
"""Under the default priors; a store configured with others uses :func:`stream_defaults` of its own."""
STREAM_NAMES = {"user": USER_STREAM, "item": ITEM_STREAM}
STATIC_WIDTH = {"user": len(USER_STATIC), "item": len(ITEM_STATIC)}
CATEGORICAL_BY_KIND = {"user": USER_CATEGORICAL, "item": ITEM_CATEGORICAL}


def read_fields(kind: str) -> tuple[tuple[str, str], ...]:
    """The ``(view, feature)`` pairs a lookup reads for one entity kind, stream then static."""
    stream, static = STREAM_VIEWS[kind], STATIC_VIEWS[kind]
    return (stream, STREAM_FIELD), (static, "dense"), (static, "cats")


def defaults(config: AggregateConfig = AggregateConfig()) -> np.ndarray:
    """Dense features of an unknown user and item (``FEATURE_COLUMNS`` order): no events in any window (zero
    counts, the priors of ``config``) and 0 for every static feature."""
    stream = stream_defaults(config)
    return np.concatenate([stream["user"], np.zeros(len(USER_STATIC), np.float32),
                           stream["item"], np.zeros(len(ITEM_STATIC), np.float32)])


def entity_ids(values, name: str) -> np.ndarray:
    """``values`` as a 1-d int64 array; refuses what is not a whole number (a float id is not truncated)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-d, got shape {array.shape}")
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        return array.astype(np.int64)
    if array.size == 0:
        return np.zeros(0, np.int64)
    raise ValueError(f"{name} must hold integer ids, got dtype {array.dtype} (e.g. {array[:3].tolist()})")


def pair_ids(user_ids, item_ids) -> tuple[np.ndarray, np.ndarray]:
    """The ids of a lookup's (user, item) pairs, checked."""
    user_ids, item_ids = entity_ids(user_ids, "user_ids"), entity_ids(item_ids, "item_ids")
    if user_ids.shape != item_ids.shape:
        raise ValueError(f"user_ids and item_ids must be of equal length, got {user_ids.shape} and {item_ids.shape}")
    return user_ids, item_ids


def stream_columns(kind: str, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entity ids, the ``(N, W)`` statistics and the row stamps (ms) of pushed stream rows, checked."""
    key, names = ENTITY_KEYS[kind], STREAM_NAMES[kind]
    missing = [c for c in (key, *names, "event_timestamp") if c not in frame]
    if missing:
        raise ValueError(f"push: the {kind} rows lack column(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    ids = entity_ids(frame[key].to_numpy(), f"push: {key}")
    stats = frame[list(names)].to_numpy(np.float32)
    bad = ~np.isfinite(stats).all(axis=0)
    if bad.any():
        raise ValueError(f"push: the {kind} rows hold non-finite values in {[n for n, b in zip(names, bad) if b][:3]}")
    stamps = frame["event_timestamp"]
    if not isinstance(stamps.dtype, pd.DatetimeTZDtype):
        stamps = pd.to_datetime(stamps, utc=True)
    if stamps.isna().any():
        raise ValueError(f"push: the {kind} rows have missing event_timestamp values")
    return ids, stats, stamps.array.as_unit("ms").asi8


def newest_rows(ids: np.ndarray, stamps_ms: np.ndarray) -> np.ndarray:
    """Index of each entity's newest row (the last of equally new ones), in id order."""
    order = np.lexsort((np.arange(len(ids)), stamps_ms, ids))  # by id, then stamp, then position
    return order[np.r_[ids[order][1:] != ids[order][:-1], True]]


def pack_stream(stats: np.ndarray, stamps_ms: np.ndarray) -> np.ndarray:
    """The stream view's ``STREAM_FIELD`` rows: each entity's statistics, then its row's stamp (ms), as float64
    (both exact: the statistics are float32, a stamp is far below 2^53)."""
    return np.column_stack([np.asarray(stats, np.float64), np.asarray(stamps_ms, np.float64)])


def unpack_stream(packed: np.ndarray, found: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Statistics (float32) and update times (int64 ms) of ``pack_stream`` rows; ``NEVER_MS`` where not ``found``."""
    updated = packed[:, -1].astype(np.int64)
    if found is not None:
        updated[~found] = NEVER_MS
    return packed[:, :-1].astype(np.float32), updated


def online_rows(kind: str, ids: np.ndarray, stats: np.ndarray, stamps_ms: np.ndarray) -> ViewRows:
    """The newest row of each entity, serialized for the stream view: one feature, so one online row each."""
    last = newest_rows(ids, stamps_ms)
    stamps = stamps_ms[last]
    return ViewRows(STREAM_VIEWS[kind], ENTITY_KEYS[kind], ids[last],
                    values={STREAM_FIELD: encode_float_lists(pack_stream(stats[last], stamps), "<f8")},
                    stamps_ms=stamps)


def offline_table(kind: str, ids: np.ndarray, stats: np.ndarray, stamps_ms: np.ndarray) -> pa.Table:
    """Stream rows as an Arrow table of the view's offline schema, built column by column (no pandas)."""
    packed = pack_stream(stats, stamps_ms)
    width = packed.shape[1]
    values = pa.ListArray.from_arrays(pa.array(np.arange(0, (len(ids) + 1) * width, width, dtype=np.int32)),
                                      pa.array(packed.ravel(), pa.float64()))
    stamps = pa.array(stamps_ms.astype("datetime64[ms]").astype("datetime64[ns]")).cast(pa.timestamp("ns", tz="UTC"))
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), values, stamps], schema=offline_schema(STREAM_VIEWS[kind]))


@dataclass(frozen=True)
class StoredRows:
    """Distinct entities' rows as stored, decoded but not yet expired: what an item cache may keep, since
    window expiry depends on "now" and is applied per lookup (:meth:`as_of`)."""

    stats: np.ndarray  # (n, S) float32, the stream statistics as written
    updated: np.ndarray  # (n,) int64 ms, when the stream row was written (``NEVER_MS``: no row)
    static: np.ndarray  # (n, D) float32, 0 where no whole static row
    cats: np.ndarray  # (n, K) int64, ``MISSING_CODE`` where no whole static row

    @classmethod
    def merge(cls, mask: np.ndarray, where_true: StoredRows, where_false: StoredRows) -> StoredRows:
        """Rows of ``len(mask)`` entities: where ``mask`` holds the rows of ``where_true`` in order, elsewhere
        those of ``where_false``."""
        def column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            out = np.empty((len(mask), *a.shape[1:]), a.dtype)
            out[mask], out[~mask] = a, b
            return out

        fields = ("stats", "updated", "static", "cats")
        return cls(*(column(getattr(where_true, f), getattr(where_false, f)) for f in fields))

    def as_of(self, now_ms: int, default: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense rows (stream then static) and categorical codes as of ``now_ms``."""
        return np.concatenate([expire(self.stats, self.updated, now_ms, default), self.static], axis=1), self.cats


def decode_stored(kind: str, got: dict, default: np.ndarray | None = None) -> StoredRows:
    """The rows of distinct entities from their stored blobs; ``default``: the stream statistics of an entity
    without a row (those of the default priors if None), which fixes the stream width."""
    stream, static = STREAM_VIEWS[kind], STATIC_VIEWS[kind]
    default = STREAM_DEFAULTS[kind] if default is None else default
    packed, found = decode_float_lists(got[(stream, STREAM_FIELD)], len(default) + 1, "<f8")
    stats, updated = unpack_stream(packed, found)  # a missing or malformed row counts as none
    dense, has_dense = decode_float_lists(got[(static, "dense")], STATIC_WIDTH[kind])
    cats, has_cats = decode_int64_lists(got[(static, "cats")], len(CATEGORICAL_BY_KIND[kind]), MISSING_CODE)
    complete = has_dense & has_cats  # a static row counts only whole
    dense[~complete], cats[~complete] = 0.0, MISSING_CODE
    return StoredRows(stats, updated, dense, cats)


def decode_rows(kind: str, got: dict, now_ms: int, default: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense rows (stream then static) and categorical codes of distinct entities from their stored blobs, as
    of ``now_ms``; ``default``: the stream statistics of an entity without a row (the default priors' if None)."""
    default = STREAM_DEFAULTS[kind] if default is None else default
    return decode_stored(kind, got, default).as_of(now_ms, default)


def feast_push_frame(kind: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Stream rows in the shape Feast's own ``FeatureStore.push`` takes for the stream view: the reference
    path the fast one is tested against (and the benchmark's anchor)."""
    ids, stats, stamps_ms = stream_columns(kind, frame)
    return pd.DataFrame({
        ENTITY_KEYS[kind]: ids,
        STREAM_FIELD: list(pack_stream(stats, stamps_ms)),
        "event_timestamp": pd.to_datetime(stamps_ms, unit="ms", utc=True),
    })
