"""The aggregates' priors come from the configuration, and every reader of the store follows them: an
unknown or expired entity reads what the trainer's aggregator would fold it as, not the built-in priors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.aggregates import StreamAggregator
from features.config import AggregateConfig, FeatureStoreConfig
from features.definitions import FEATURE_COLUMNS, USER_STREAM
from features.rows import defaults
from features.store import OnlineFeatures
from stream.events import TASKS

PRIORS = AggregateConfig(prior_rates=tuple(0.5 for _ in TASKS), prior_strength=3.0, prior_play_s=20.0)


def test_a_store_with_other_priors_gives_unknown_entities_those_priors(tmp_path: Path) -> None:
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "f", aggregates=PRIORS))
    got = store.lookup(np.array([1]), np.array([2]))[0]
    assert np.allclose(got, defaults(PRIORS)) and not np.allclose(got, defaults())
    aggregator = StreamAggregator(PRIORS)
    assert np.allclose(got[: len(USER_STREAM)], aggregator.users.defaults())
    assert got[FEATURE_COLUMNS.index("u_click_rate_1h")] == pytest.approx(0.5)
    point_in_time = store.historical(pd.DataFrame({"user_id": [1], "item_id": [2],
                                                   "event_timestamp": ["2026-01-01T00:00:00Z"]}))
    assert np.allclose(point_in_time.dense[0], defaults(PRIORS))


def test_the_default_priors_are_what_the_store_used_before() -> None:
    assert np.allclose(defaults(AggregateConfig()), defaults())
    assert replace(FeatureStoreConfig(), aggregates=AggregateConfig()) == FeatureStoreConfig()


@pytest.mark.parametrize(("change", "key"), [
    ({"prior_rates": (0.1,)}, "prior_rates"),
    ({"prior_rates": tuple(1.0 for _ in TASKS)}, "prior_rates"),
    ({"prior_strength": float("nan")}, "prior_strength"),
    ({"prior_play_s": -1.0}, "prior_play_s"),
])
def test_bad_priors_are_refused_naming_the_key(change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"features\.aggregates\.{key}"):
        AggregateConfig(**change)
