"""Feast objects of the moestream feature repo, declared in code (no ``feast apply`` by hand).

Two entities, ``user`` and ``item``, each with a feature view of streaming aggregates fed by a push source.
The push sources are backed by Parquet batch sources so that pushes can also land offline.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Float32, Int64

from stream.events import TASKS

STAT_NAMES: tuple[str, ...] = ("log_impressions", *(f"{t}_rate" for t in TASKS), "mean_play_s")
"""Per-entity streaming statistics, in a fixed order."""

USER_FEATURES: tuple[str, ...] = tuple(f"u_{s}" for s in STAT_NAMES)
ITEM_FEATURES: tuple[str, ...] = tuple(f"i_{s}" for s in STAT_NAMES)
FEATURE_COLUMNS: tuple[str, ...] = (*USER_FEATURES, *ITEM_FEATURES)
"""Column order of the dense matrix handed to models."""

ID_FIELDS: tuple[str, ...] = ("user_id", "item_id")
"""ID columns the model embeds (hashed)."""

USER_VIEW = "user_stream_stats"
ITEM_VIEW = "item_stream_stats"
USER_PUSH = "user_stats_push"
ITEM_PUSH = "item_stats_push"


def build_definitions(offline_dir: Path, ttl: timedelta) -> list:
    """Every Feast object of the repo, ready for ``FeatureStore.apply``."""
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A viewer.")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="A video.")
    objects: list = [user, item]
    for entity, key, view, push, names in (
        (user, "user_id", USER_VIEW, USER_PUSH, USER_FEATURES),
        (item, "item_id", ITEM_VIEW, ITEM_PUSH, ITEM_FEATURES),
    ):
        batch = FileSource(
            name=f"{view}_offline",
            path=str(offline_dir / f"{view}.parquet"),
            timestamp_field="event_timestamp",
        )
        source = PushSource(name=push, batch_source=batch)
        schema = [Field(name=key, dtype=Int64), *(Field(name=n, dtype=Float32) for n in names)]
        objects += [batch, source, FeatureView(name=view, entities=[entity], ttl=ttl, schema=schema, source=source)]
    return objects
