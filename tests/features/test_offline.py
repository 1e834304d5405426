"""The offline half of a push: Parquet parts, merged level by level, read by Feast's point-in-time join."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.aggregates import StreamAggregator
from features.definitions import offline_schema
from features.offline import SCHEMA_PART, OfflineLayoutError, OfflineLog
from features.store import FeatureStoreConfig, OnlineFeatures
from tests.features.test_store import HOUR_MS, T0, examples


def rows(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table({"user_id": ids, "aggregates": [[float(i), float(i)] for i in ids],
                     "event_timestamp": pd.to_datetime(ids, unit="ms", utc=True)}, schema=offline_schema("user_stream"))


def test_parts_merge_level_by_level_and_keep_every_row(tmp_path: Path) -> None:
    log = OfflineLog(tmp_path, fanout=3)
    log.ensure("user_stream", offline_schema("user_stream"))
    for push in range(10):
        log.append("user_stream", rows(2 * push, 2))
    names = sorted(p.name for p in log.parts("user_stream"))
    levels = sorted(n.split("-")[0] for n in names if n != SCHEMA_PART)
    assert levels == ["L0", "L2"]  # 10 pushes = 1 + 3 * 3: nine merged twice, the tenth still alone
    table = pq.read_table(tmp_path / "user_stream")
    assert sorted(table.column("user_id").to_pylist()) == list(range(20))
    assert not [p for p in (tmp_path / "user_stream").iterdir() if p.name.startswith(".")]  # no half-written parts


def test_writers_sharing_a_directory_merge_only_their_own_parts(tmp_path: Path) -> None:
    a, b = OfflineLog(tmp_path, fanout=2), OfflineLog(tmp_path, fanout=2)
    a.ensure("user_stream", offline_schema("user_stream"))
    a.append("user_stream", rows(0, 1))
    b.append("user_stream", rows(1, 1))
    a.append("user_stream", rows(2, 1))  # fills a's level 0: merges a's two parts, leaves b's alone
    names = [p.name for p in a.parts("user_stream")]
    assert sum(n.startswith(f"L1-{a.writer}") for n in names) == 1 and sum(n.startswith(f"L0-{b.writer}") for n in names) == 1
    assert sorted(pq.read_table(tmp_path / "user_stream").column("user_id").to_pylist()) == [0, 1, 2]


def test_a_bad_fanout_is_refused() -> None:
    with pytest.raises(ValueError, match="fanout"):
        OfflineLog(Path("unused"), fanout=1)
    with pytest.raises(ValueError, match="features.offline_fanout"):
        FeatureStoreConfig(offline_fanout=1)


@pytest.mark.integration
def test_a_file_from_the_single_file_layout_is_adopted(tmp_path: Path) -> None:
    """Earlier versions appended to ``offline/<view>.parquet``; its rows stay readable for replay."""
    old = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "old"))
    old.push(*StreamAggregator().update(examples([1], [10], [1], ts=[T0])))
    old.flush()  # the offline history is appended behind the push
    (tmp_path / "new" / "offline").mkdir(parents=True)
    for view in ("user_stream", "item_stream"):
        pq.write_table(pq.read_table(tmp_path / "old" / "offline" / view), tmp_path / "new" / "offline" / f"{view}.parquet")
    new = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "new"))
    events = pd.DataFrame({"user_id": [1], "item_id": [10], "event_timestamp": [pd.Timestamp(T0 + HOUR_MS // 2, unit="ms", tz="UTC")]})
    assert not (tmp_path / "new" / "offline" / "user_stream.parquet").exists()
    np.testing.assert_array_equal(new.historical(events).dense, old.historical(events).dense)
    assert new.historical(events).frame().loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(1))


def test_a_directory_of_an_older_layout_is_refused_with_what_to_do(tmp_path: Path) -> None:
    old = pa.schema([("user_id", pa.int64()), ("stats", pa.list_(pa.float32())), ("updated_ms", pa.int64()),
                     ("event_timestamp", pa.timestamp("ns", tz="UTC"))])
    (tmp_path / "offline" / "user_stream").mkdir(parents=True)
    pq.write_table(old.empty_table(), tmp_path / "offline" / "user_stream" / SCHEMA_PART)
    with pytest.raises(OfflineLayoutError, match="older moestream.*features.data_dir"):
        OfflineLog(tmp_path / "offline").ensure("user_stream", offline_schema("user_stream"))
    OfflineLog(tmp_path / "offline").ensure("item_stream", offline_schema("item_stream"))  # a fresh view is made
