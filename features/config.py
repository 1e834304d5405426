"""The feature store's settings (``features`` in ``moestream.yaml``), apart from the code that uses them.

Standard library and ``stream.events`` constants only, so that loading the configuration imports neither
Feast nor pandas. ``features.store`` and ``features.aggregates`` import these back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stream.events import TASKS, TYPICAL_POSITIVE_RATES


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class AggregateConfig:
    """The priors of the streaming aggregates (``features.aggregates``): an entity's windowed rates are
    smoothed towards them, and an entity without events in a window gets them as its features. The
    trainer that folds events and every reader of the store (replicas included) must use the same
    values, so they live in the one ``features`` section both read."""

    prior_rates: tuple[float, ...] = tuple(TYPICAL_POSITIVE_RATES[t] for t in TASKS)
    """One per task, in the stream's task order (click, long_view, like, comment, follow, forward)."""
    prior_strength: float = 10.0
    """Pseudo-impressions of the prior: ``(positives + rate * strength) / (n + strength)``."""
    prior_play_s: float = 6.0
    """Prior mean watch time in seconds."""

    def __post_init__(self) -> None:
        rates = self.prior_rates
        if isinstance(rates, (str, bytes)) or len(rates) != len(TASKS):
            raise ValueError(f"features.aggregates.prior_rates needs {len(TASKS)} values, one per task "
                             f"({', '.join(TASKS)}), got {rates!r}")
        for task, rate in zip(TASKS, rates):
            if not _finite(rate) or not 0 < rate < 1:
                raise ValueError(f"features.aggregates.prior_rates ({task}) must be in (0, 1), got {rate!r}")
        if not _finite(self.prior_strength) or self.prior_strength <= 0:
            raise ValueError(f"features.aggregates.prior_strength must be a finite number > 0, got {self.prior_strength!r}")
        if not _finite(self.prior_play_s) or self.prior_play_s < 0:
            raise ValueError(f"features.aggregates.prior_play_s must be a finite number >= 0, got {self.prior_play_s!r}")


@dataclass(frozen=True)
class FeatureStoreConfig:
    data_dir: Path = Path(".moestream/features")
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = "127.0.0.1:6379"
    """Feast's Redis connection string, e.g. ``host:port,password=...``."""
    project: str = "moestream"
    push_offline: bool = True
    """Pushed rows land online and offline (Feast's ``PushMode.ONLINE_AND_OFFLINE``; the offline rows are what
    point-in-time replay reads); ``False`` pushes online only."""
    offline_fanout: int = 32
    """Offline parts of one level merged into one part of the next (``features.offline``)."""
    offline_part_rows: int = 8192
    """Pushed rows collected before they are written as one offline part (``1``: a part per push). Whatever
    is collected is also written by every flush: a checkpoint, a point-in-time read, the end of a run."""
    clock: Literal["event", "wall"] = "event"
    """What "now" is for window expiry. ``"event"``: the stream's event time, which is the clock the newest
    push to this project published with its rows (the newest row stamp it wrote); every reader, the trainer
    that pushed as well as a serving replica that never pushes, reads it with the rows and judges expiry
    alike. The wall clock only before anything was pushed. ``"wall"``: always the wall clock."""
    outage_timeout_s: float = 300.0
    """How long a read or write waits for a Redis server that went away (killed, restarting, unreachable),
    retrying with backoff, before it fails: the trainer then stops loudly and Ray restarts it from its last
    checkpoint. Meanwhile the trainer does not step and commits nothing. ``0``: fail at once."""
    aggregates: AggregateConfig = field(default_factory=AggregateConfig)
    """The aggregates' priors: what the trainer folds with and what a lookup of an unknown entity returns."""
    static_users: Path | None = None
    static_items: Path | None = None
    """Static attribute files (CSV or Parquet, KuaiRand-1K's format or the simulator's, ``features.static``)
    loaded into the store when a run's trainer starts, so the trainer and the replicas read them beside the
    aggregates: numeric attributes as dense features, categorical ones as codes a ``learner.tables`` entry can
    embed. ``moestream features load`` loads them into a store that is already running."""

    def __post_init__(self) -> None:
        if self.online_store not in ("sqlite", "redis"):
            raise ValueError(f"features.online_store must be 'sqlite' or 'redis', got {self.online_store!r}")
        if isinstance(self.offline_fanout, bool) or not isinstance(self.offline_fanout, int) or self.offline_fanout < 2:
            raise ValueError(f"features.offline_fanout must be an integer >= 2, got {self.offline_fanout!r}")
        if isinstance(self.offline_part_rows, bool) or not isinstance(self.offline_part_rows, int) \
                or self.offline_part_rows < 1:
            raise ValueError(f"features.offline_part_rows must be an integer >= 1, got {self.offline_part_rows!r}")
        if self.clock not in ("event", "wall"):
            raise ValueError(f"features.clock must be 'event' or 'wall', got {self.clock!r}")
        if not _finite(self.outage_timeout_s) or self.outage_timeout_s < 0:
            raise ValueError(f"features.outage_timeout_s must be a number of seconds >= 0, got {self.outage_timeout_s!r}")
        for key in ("static_users", "static_items"):
            path = getattr(self, key)
            if path is not None:
                object.__setattr__(self, key, Path(path))
                if not Path(path).is_file():
                    raise ValueError(f"features.{key}: no file at {path}")
        if not self.project or not isinstance(self.project, str):
            raise ValueError(f"features.project must be a non-empty name, got {self.project!r}")


__all__ = ["AggregateConfig", "FeatureStoreConfig"]
