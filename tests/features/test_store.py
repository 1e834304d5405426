from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from features.aggregates import StreamAggregator
from features.definitions import FEATURE_COLUMNS, ITEM_FEATURES, USER_FEATURES
from features.store import FeatureStoreConfig, OnlineFeatures
from stream.events import EXAMPLE_SCHEMA, LABELS

pytestmark = pytest.mark.integration


def _examples(users: list[int], items: list[int], clicks: list[int]) -> pa.Table:
    n = len(users)
    cols = {
        "request_id": [f"r{i}" for i in range(n)],
        "user_id": users,
        "item_id": items,
        "ts_ms": [1_700_000_000_000 + i for i in range(n)],
        **{name: [0.0] * n for name in LABELS},
        "partition": [0] * n,
        "offset": list(range(n)),
        "is_correction": [False] * n,
    }
    cols["click"] = [float(c) for c in clicks]
    return pa.Table.from_pydict(cols, schema=EXAMPLE_SCHEMA)


def test_pushed_aggregates_come_back_in_column_order_and_unknowns_get_defaults(tmp_path: Path) -> None:
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    store.apply()  # a second apply is harmless
    agg = StreamAggregator()
    users, items = agg.update(_examples([1, 1, 2], [10, 11, 10], [1, 1, 0]))
    store.push(users, items)

    matrix = store.lookup(np.array([1, 2, 999, 1]), np.array([10, 10, 10, 777]))
    assert matrix.shape == (4, len(FEATURE_COLUMNS)) and matrix.dtype == np.float32
    frame = pd.DataFrame(matrix, columns=FEATURE_COLUMNS)
    prior = agg.defaults()
    assert frame.loc[0, "u_log_impressions"] == pytest.approx(np.log1p(2))
    assert frame.loc[0, "u_click_rate"] > prior[1]  # two clicks out of two pulls the rate above the prior
    assert frame.loc[1, "u_click_rate"] < prior[1]
    assert frame.loc[2, list(USER_FEATURES)].to_numpy() == pytest.approx(prior[: len(USER_FEATURES)])  # unknown user
    assert frame.loc[3, list(ITEM_FEATURES)].to_numpy() == pytest.approx(prior[len(USER_FEATURES):])  # unknown item
    assert frame.loc[0, "i_log_impressions"] == pytest.approx(np.log1p(2))  # item 10 was seen twice


def test_a_second_store_on_the_same_directory_reads_what_the_first_pushed(tmp_path: Path) -> None:
    writer = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    users, items = StreamAggregator().update(_examples([5], [50], [1]))
    writer.push(users, items)
    reader = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path), apply=False)
    assert reader.lookup(np.array([5]), np.array([50]))[0, 0] == pytest.approx(np.log1p(1))
