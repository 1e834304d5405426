"""Feast objects of the moestream feature repo, declared in code and registered by ``OnlineFeatures.apply``.

Two entities, ``user`` and ``item``. Each has two feature views:

- ``{entity}_stream``: streaming aggregates over sliding windows (``WINDOWS``), pushed from the learner through
  a push source backed by a directory of Parquet parts (pushes land online and offline; ``features.offline``).
  The view's TTL is the longest window; a shorter window's values are valid for that window's length after
  the row's update time, which the row carries.
- ``{entity}_static``: attributes loaded from files (KuaiRand-1K's ``user_features_1k.csv`` /
  ``video_features_basic_1k.csv`` or the simulator's own; ``features.static``), no TTL.

Each view stores its values packed in one array feature (``aggregates``, ``dense``, ``cats``) whose element
order is the column order below. Reading one array per entity instead of one value per feature is what makes a
1024-pair lookup take milliseconds (see docs/features.md); the names live here, in one place. The stream view's
array also ends with the row's update time (``STREAM_FIELD``), so that a push writes one online row per entity.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import features.feast_import  # noqa: F401 - before Feast itself: see that module
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64

from stream.events import TASKS

WINDOWS: dict[str, timedelta] = {"1h": timedelta(hours=1), "1d": timedelta(days=1)}
"""Sliding windows of the streaming aggregates, shortest first."""

WINDOW_STATS: tuple[str, ...] = (
    "log_n",  # log1p(impressions in the window)
    *(f"{t}_rate" for t in TASKS),  # positives / impressions, smoothed towards the task's base rate
    *(f"log_{t}" for t in TASKS),  # log1p(positives in the window)
    "mean_play_s",  # mean watch time, smoothed towards a prior
)
"""Statistics computed over each window, in a fixed order."""


def _stream(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_{s}_{w}" for w in WINDOWS for s in WINDOW_STATS)


USER_STREAM: tuple[str, ...] = _stream("u")
ITEM_STREAM: tuple[str, ...] = _stream("i")

USER_STATIC: tuple[str, ...] = (
    "u_is_lowactive_period", "u_is_live_streamer", "u_is_video_author", "u_log_follow_user_num",
    "u_log_fans_user_num", "u_log_friend_user_num", "u_log_register_days",  # KuaiRand-1K
    "u_sim_activity",  # the simulator's engagement level
)
ITEM_STATIC: tuple[str, ...] = (
    "i_log_duration_s", "i_is_ad", "i_visible_status", "i_aspect_ratio", "i_n_tags",  # KuaiRand-1K
    "i_sim_quality",  # the simulator's item quality
)
"""Numeric static features; an entity without a static row gets 0 in all of them."""

USER_CATEGORICAL: tuple[str, ...] = (
    "u_active_degree", "u_follow_user_num_range", "u_fans_user_num_range", "u_friend_user_num_range",
    "u_register_days_range", *(f"u_onehot_feat{i}" for i in range(18)),
)
ITEM_CATEGORICAL: tuple[str, ...] = (
    "i_author_id", "i_music_id", "i_music_type", "i_video_type", "i_upload_type", "i_first_tag",
)
CATEGORICAL_COLUMNS: tuple[str, ...] = (*USER_CATEGORICAL, *ITEM_CATEGORICAL)
"""Integer codes a model may embed beside the IDs; ``MISSING_CODE`` where unknown."""
MISSING_CODE = -1

USER_FEATURES: tuple[str, ...] = (*USER_STREAM, *USER_STATIC)
ITEM_FEATURES: tuple[str, ...] = (*ITEM_STREAM, *ITEM_STATIC)
FEATURE_COLUMNS: tuple[str, ...] = (*USER_FEATURES, *ITEM_FEATURES)
"""Column order of the dense matrix handed to models."""

STREAM_FIELD = "aggregates"
"""The stream view's one feature: the window statistics (``USER_STREAM`` / ``ITEM_STREAM`` order) and then the time
the row was written (ms since the epoch, exact in a float64), one Float64 list. Feast's SQLite store keeps a row per
feature, so one feature instead of statistics and time apart halves the B-tree entries a push of new entities
inserts and a lookup reads (docs/features.md)."""

ID_FIELDS: tuple[str, ...] = ("user_id", "item_id")
"""ID columns the model embeds (hashed)."""

USER_VIEW, ITEM_VIEW = "user_stream", "item_stream"
USER_PUSH, ITEM_PUSH = "user_stream_push", "item_stream_push"
USER_STATIC_VIEW, ITEM_STATIC_VIEW = "user_static", "item_static"
USER_STATIC_PUSH, ITEM_STATIC_PUSH = "user_static_push", "item_static_push"

ENTITY_KEYS = {"user": "user_id", "item": "item_id"}
STREAM_VIEWS = {"user": USER_VIEW, "item": ITEM_VIEW}
STATIC_VIEWS = {"user": USER_STATIC_VIEW, "item": ITEM_STATIC_VIEW}
PUSH_SOURCES = {USER_VIEW: USER_PUSH, ITEM_VIEW: ITEM_PUSH, USER_STATIC_VIEW: USER_STATIC_PUSH,
                ITEM_STATIC_VIEW: ITEM_STATIC_PUSH}


def offline_schema(view: str) -> pa.Schema:
    """Arrow schema of a view's Parquet offline parts, which is also what a push to it must carry."""
    key = "user_id" if view.startswith("user") else "item_id"
    if view in STREAM_VIEWS.values():
        values = [(STREAM_FIELD, pa.list_(pa.float64()))]
    else:
        values = [("dense", pa.list_(pa.float32())), ("cats", pa.list_(pa.int64()))]
    return pa.schema([(key, pa.int64()), *values, ("event_timestamp", pa.timestamp("ns", tz="UTC"))])


def build_definitions(offline_dir: Path, parts: bool = True) -> list:
    """Every Feast object of the repo, ready for ``FeatureStore.apply``. Each view's offline source is a
    directory of Parquet parts (``features.offline``); ``parts=False`` makes it one Parquet file, the layout
    Feast's own ``push`` can append to (the benchmark's anchor)."""
    objects: list = []
    for kind, key in ENTITY_KEYS.items():
        entity = Entity(name=kind, join_keys=[key], value_type=ValueType.INT64,
                        description="A viewer." if kind == "user" else "A video.")
        objects.append(entity)
        for view, ttl in ((STREAM_VIEWS[kind], max(WINDOWS.values())), (STATIC_VIEWS[kind], timedelta(0))):
            path = offline_dir / (view if parts else f"{view}.parquet")
            batch = FileSource(name=f"{view}_offline", path=str(path), timestamp_field="event_timestamp")
            source = PushSource(name=PUSH_SOURCES[view], batch_source=batch)
            if view in STREAM_VIEWS.values():
                fields = [Field(name=STREAM_FIELD, dtype=Array(Float64))]
            else:
                fields = [Field(name="dense", dtype=Array(Float32)), Field(name="cats", dtype=Array(Int64))]
            schema = [Field(name=key, dtype=Int64), *fields]
            objects += [batch, source, FeatureView(name=view, entities=[entity], ttl=ttl, schema=schema, source=source)]
    return objects
