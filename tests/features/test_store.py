"""The Feast feature repo against real stores: SQLite (default) and a real redis-server, Parquet offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.aggregates import StreamAggregator
from features.definitions import (
    CATEGORICAL_COLUMNS, FEATURE_COLUMNS, ITEM_STATIC, MISSING_CODE, USER_STATIC, USER_STREAM,
)
from features.memory import InMemoryFeatures
from features.static import KUAIRAND_USER_COLUMNS, KUAIRAND_VIDEO_COLUMNS
from features.store import FeatureStoreConfig, OnlineFeatures, defaults
from stream.events import EXAMPLE_SCHEMA, LABELS

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000


def examples(users: list[int], items: list[int], clicks: list[int], ts: list[int] | None = None) -> pa.Table:
    n = len(users)
    cols = {
        "request_id": [f"r{i}" for i in range(n)],
        "user_id": users,
        "item_id": items,
        "ts_ms": ts if ts is not None else [T0 + i for i in range(n)],
        **{name: [0.0] * n for name in LABELS},
        "partition": [0] * n,
        "offset": list(range(n)),
        "is_correction": [False] * n,
    }
    cols["click"] = [float(c) for c in clicks]
    return pa.Table.from_pydict(cols, schema=EXAMPLE_SCHEMA)


def frame(matrix: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(matrix, columns=FEATURE_COLUMNS)


def test_pushed_aggregates_come_back_in_column_order_and_unknowns_get_defaults(config: FeatureStoreConfig) -> None:
    store = OnlineFeatures(config)
    store.apply()  # a second apply is harmless
    agg = StreamAggregator()
    users, items = agg.update(examples([1, 1, 2], [10, 11, 10], [1, 1, 0]))
    store.push(users, items)

    got = frame(store.lookup(np.array([1, 2, 999, 1]), np.array([10, 10, 10, 777])))
    assert got.shape == (4, len(FEATURE_COLUMNS)) and got.dtypes.eq(np.float32).all()
    prior = frame(defaults()[None, :]).iloc[0]
    for window in ("1h", "1d"):
        assert got.loc[0, f"u_log_n_{window}"] == pytest.approx(np.log1p(2))
        assert got.loc[0, f"u_click_rate_{window}"] > prior[f"u_click_rate_{window}"]  # 2 clicks of 2
        assert got.loc[0, f"u_log_click_{window}"] == pytest.approx(np.log1p(2))
        assert got.loc[1, f"u_click_rate_{window}"] < prior[f"u_click_rate_{window}"]  # 0 of 1
        assert got.loc[0, f"i_log_n_{window}"] == pytest.approx(np.log1p(2))  # item 10 was seen twice
    user_cols = [c for c in FEATURE_COLUMNS if c.startswith("u_")]
    item_cols = [c for c in FEATURE_COLUMNS if c.startswith("i_")]
    assert got.loc[2, user_cols].to_numpy() == pytest.approx(prior[user_cols].to_numpy())  # unknown user
    assert got.loc[3, item_cols].to_numpy() == pytest.approx(prior[item_cols].to_numpy())  # unknown item
    assert (got.loc[0] == got.loc[3]).loc[user_cols].all()  # the same user twice in a batch: the same row


def test_lookup_batch_returns_ids_and_categoricals_with_defaults(config: FeatureStoreConfig) -> None:
    store = OnlineFeatures(config)
    batch = store.lookup_batch(np.array([3, 4]), np.array([30, 40]))
    assert batch.dense.shape == (2, len(FEATURE_COLUMNS))
    assert list(batch.ids) == ["user_id", "item_id", *CATEGORICAL_COLUMNS]
    assert batch.ids["user_id"].tolist() == [3, 4] and batch.ids["item_id"].tolist() == [30, 40]
    assert all((batch.ids[c] == MISSING_CODE).all() for c in CATEGORICAL_COLUMNS)
    assert store.lookup_batch(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).dense.shape == (0, len(FEATURE_COLUMNS))
    with pytest.raises(ValueError, match="equal length"):
        store.lookup(np.array([1, 2]), np.array([1]))


def test_windows_expire_after_their_length(config: FeatureStoreConfig) -> None:
    store = OnlineFeatures(config)
    users, items = StreamAggregator().update(examples([1], [10], [1]))
    store.push(users, items)
    stamp = int(users["event_timestamp"].iloc[0].value // 1_000_000)
    fresh = frame(store.lookup_batch(np.array([1]), np.array([10]), as_of_ms=stamp + 1000).dense)
    later = frame(store.lookup_batch(np.array([1]), np.array([10]), as_of_ms=stamp + 2 * HOUR_MS).dense)
    gone = frame(store.lookup_batch(np.array([1]), np.array([10]), as_of_ms=stamp + 25 * HOUR_MS).dense)
    prior = frame(defaults()[None, :])
    assert fresh.loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(1))
    assert later.loc[0, "u_log_n_1h"] == 0 and later.loc[0, "u_click_rate_1h"] == pytest.approx(prior.loc[0, "u_click_rate_1h"])
    assert later.loc[0, "u_log_n_1d"] == pytest.approx(np.log1p(1))  # the day window still holds
    assert gone.loc[0, "u_log_n_1d"] == 0


def test_a_second_store_on_the_same_repo_reads_what_the_first_pushed(config: FeatureStoreConfig) -> None:
    writer = OnlineFeatures(config)
    users, items = StreamAggregator().update(examples([5], [50], [1]))
    writer.push(users, items)
    reader = OnlineFeatures(config, apply=False)
    stamp = int(users["event_timestamp"].iloc[0].value // 1_000_000)
    assert reader.lookup_batch(np.array([5]), np.array([50]), as_of_ms=stamp).dense[0, 0] == pytest.approx(np.log1p(1))


def test_a_reader_that_found_the_store_empty_sees_what_is_pushed_later(config: FeatureStoreConfig, tmp_path: Path) -> None:
    reader = OnlineFeatures(config)  # a serving replica started before the first push: every view empty
    before = reader.lookup_batch(np.array([5]), np.array([50])).frame()
    assert before.loc[0, "u_log_n_1h"] == pytest.approx(frame(defaults()[None, :]).loc[0, "u_log_n_1h"])
    users, items = StreamAggregator().update(examples([5], [50], [1]))
    OnlineFeatures(config, apply=False).push(users, items)
    pd.DataFrame({"item_id": [50], "quality": [0.75]}).to_csv(tmp_path / "items.csv", index=False)
    OnlineFeatures(config, apply=False).load_static(items=tmp_path / "items.csv")
    stamp = int(users["event_timestamp"].iloc[0].value // 1_000_000)
    for _ in range(2):  # and again once the views are known to hold rows
        after = reader.lookup_batch(np.array([5]), np.array([50]), as_of_ms=stamp).frame()
        assert after.loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(1))
        assert after.loc[0, "i_sim_quality"] == pytest.approx(0.75)


def test_static_files_in_kuairand_and_simulator_formats_load_and_read_back(config: FeatureStoreConfig, tmp_path: Path) -> None:
    users = pd.DataFrame({c: [0, 0] for c in KUAIRAND_USER_COLUMNS})
    users["user_id"] = [1, 2]
    users["user_active_degree"] = ["full_active", "UNKNOWN"]
    users["follow_user_num_range"] = ["(0,10]", "0"]
    users["fans_user_num"] = [312, 0]
    users["register_days"] = [3624, 20]
    users["onehot_feat3"] = [1153, 7]
    users.to_csv(tmp_path / "user_features_1k.csv", index=False)
    videos = pd.DataFrame({c: [None, None] for c in KUAIRAND_VIDEO_COLUMNS})
    videos["video_id"], videos["author_id"], videos["video_type"] = [10, 11], [441, 9], ["NORMAL", "AD"]
    videos["upload_type"], videos["video_duration"] = ["ShortImport", "Web"], [17200.0, None]
    videos["server_width"], videos["server_height"], videos["tag"] = [720, 0], [1280, 0], ["12,65", None]
    videos.to_csv(tmp_path / "video_features_basic_1k.csv", index=False)
    pd.DataFrame({"item_id": [12], "quality": [0.5]}).to_csv(tmp_path / "sim_items.csv", index=False)

    store = OnlineFeatures(config)
    assert store.load_static(tmp_path / "user_features_1k.csv", tmp_path / "video_features_basic_1k.csv") == {"user": 2, "item": 2}
    assert store.load_static(items=tmp_path / "sim_items.csv") == {"item": 1}
    batch = store.lookup_batch(np.array([1, 2, 3]), np.array([10, 11, 12]))
    got = batch.frame()
    assert got.loc[0, "u_log_fans_user_num"] == pytest.approx(np.log1p(312))
    assert got.loc[0, "u_log_register_days"] == pytest.approx(np.log1p(3624))
    assert got.loc[0, "u_active_degree"] == 1 and got.loc[1, "u_active_degree"] == 3
    assert got.loc[0, "u_onehot_feat3"] == 1153 and got.loc[0, "u_follow_user_num_range"] == 1
    assert got.loc[2, list(USER_STATIC)].eq(0).all() and got.loc[2, "u_onehot_feat3"] == MISSING_CODE  # unknown user
    assert got.loc[0, "i_log_duration_s"] == pytest.approx(np.log1p(17.2))
    assert got.loc[0, "i_aspect_ratio"] == pytest.approx(1280 / 720) and got.loc[0, "i_n_tags"] == 2
    assert got.loc[0, "i_first_tag"] == 12 and got.loc[0, "i_author_id"] == 441
    assert got.loc[1, "i_is_ad"] == 1 and got.loc[1, "i_first_tag"] == MISSING_CODE
    assert got.loc[2, "i_sim_quality"] == pytest.approx(0.5) and got.loc[2, list(ITEM_STATIC[:-1])].eq(0).all()


def test_a_file_in_neither_format_is_refused_with_its_columns(tmp_path: Path) -> None:
    pd.DataFrame({"uid": [1], "age": [3]}).to_csv(tmp_path / "users.csv", index=False)
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "repo"))
    with pytest.raises(ValueError, match=r"users.csv: columns \['uid', 'age'\] match no known format"):
        store.load_static(users=tmp_path / "users.csv")


def test_reloading_static_files_replaces_the_values_on_every_store(config: FeatureStoreConfig, tmp_path: Path) -> None:
    store = OnlineFeatures(config)
    for quality in (0.25, 0.75):
        pd.DataFrame({"item_id": [12], "quality": [quality]}).to_csv(tmp_path / "items.csv", index=False)
        store.load_static(items=tmp_path / "items.csv")
        assert store.lookup_batch(np.array([1]), np.array([12])).frame().loc[0, "i_sim_quality"] == pytest.approx(quality)


def test_a_static_file_with_a_repeated_id_is_refused(tmp_path: Path) -> None:
    pd.DataFrame({"item_id": [5, 5], "quality": [0.1, 0.9]}).to_csv(tmp_path / "items.csv", index=False)
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "repo"))
    with pytest.raises(ValueError, match="item_id: ids appear more than once"):
        store.load_static(items=tmp_path / "items.csv")


def test_a_static_row_without_an_integer_id_is_refused_not_dropped(tmp_path: Path) -> None:
    pd.DataFrame({"user_id": [1, "x", 2.5], "activity": [0.1, 0.2, 0.3]}).to_csv(tmp_path / "users.csv", index=False)
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "repo"))
    with pytest.raises(ValueError, match=r"user_id: 2 row\(s\) without an integer id"):
        store.load_static(users=tmp_path / "users.csv")


def test_recreating_the_repo_is_idempotent(tmp_path: Path) -> None:
    config = FeatureStoreConfig(data_dir=tmp_path)
    store = OnlineFeatures(config)
    store.push(*StreamAggregator().update(examples([1], [10], [1])))
    before = sorted(v.name for v in store.store.list_feature_views())
    for _ in range(2):
        OnlineFeatures(config).apply()
    again = OnlineFeatures(config)
    assert sorted(v.name for v in again.store.list_feature_views()) == before
    assert sorted(s.name for s in again.store.list_data_sources()) == sorted(s.name for s in store.store.list_data_sources())
    assert again.lookup_batch(np.array([1]), np.array([10]), as_of_ms=T0 + 10).dense[0, 0] == pytest.approx(np.log1p(1))


def test_lookups_never_touch_the_registry_after_start(tmp_path: Path) -> None:
    """The registry is cached forever: with its file gone, lookups and pushes still work."""
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    shutil.move(tmp_path / "registry.db", tmp_path / "registry.moved")
    store.push(*StreamAggregator().update(examples([1], [10], [1])))
    assert store.lookup(np.array([1]), np.array([10]))[0, 0] == pytest.approx(np.log1p(1))
    assert not (tmp_path / "registry.db").exists()


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="features.online_store"):
        FeatureStoreConfig(online_store="cassandra")  # type: ignore[arg-type]


def test_push_lands_offline_too(tmp_path: Path) -> None:
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    store.push(*StreamAggregator().update(examples([1, 2], [10, 10], [1, 0])))
    store.flush()  # the offline history is appended behind the push: flush waits for it
    offline = pd.read_parquet(tmp_path / "offline" / "user_stream")
    assert sorted(offline["user_id"]) == [1, 2] and len(offline["aggregates"].iloc[0]) == len(USER_STREAM) + 1


@pytest.mark.parametrize("later_click", [0, 1])
def test_point_in_time_a_later_label_never_reaches_an_earlier_example(tmp_path: Path, later_click: int) -> None:
    """Replay: user 1 sees item 10 at T0 (no click), then item 11 at T0+1s and T0+2s, each batch pushed
    online and offline. Each event's historical features count only the events before it; flipping the
    label of a later event changes nothing for the earlier ones."""
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    agg = StreamAggregator()
    stamps = [T0, T0 + 1000, T0 + 2000]
    for ts, item, click in zip(stamps, [10, 11, 11], [0, later_click, 1]):
        store.push(*agg.update(examples([1], [item], [click], ts=[ts])))
    events = pd.DataFrame({"user_id": [1, 1, 1, 1], "item_id": [10, 11, 11, 11],
                           "event_timestamp": pd.to_datetime([*stamps, T0 + 2000], unit="ms", utc=True)})
    got = store.historical(events).frame()
    prior = frame(defaults()[None, :]).iloc[0]
    user_cols = [c for c in got.columns if c.startswith("u_") and c in FEATURE_COLUMNS]
    assert got.loc[0, user_cols].to_numpy() == pytest.approx(prior[user_cols].to_numpy())  # nothing before T0
    assert got.loc[1, "u_log_n_1h"] == pytest.approx(np.log1p(1)) and got.loc[1, "u_log_click_1h"] == 0
    # The event at T0+2s sees the two before it: its own label and later ones stay out.
    assert got.loc[2, "u_log_n_1h"] == pytest.approx(np.log1p(2))
    assert got.loc[2, "u_log_click_1h"] == pytest.approx(np.log1p(later_click))
    assert got.loc[3].equals(got.loc[2])  # two rows with the same key and time both come back
    assert got.loc[1, "i_log_n_1h"] == 0  # item 11 had no event before T0+1s


@pytest.mark.parametrize("fanout", [2, 32])
def test_point_in_time_features_match_what_was_online_at_the_time(tmp_path: Path, fanout: int) -> None:
    """Also across merged offline parts (a part per push; fanout 2 merges after every second push)."""
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path, offline_fanout=fanout, offline_part_rows=1))
    agg = StreamAggregator()
    online = []
    rng = np.random.default_rng(0)
    for step in range(5):
        users, items = rng.integers(0, 5, 8).tolist(), rng.integers(0, 5, 8).tolist()
        ts = [T0 + step * 60_000 + i for i in range(8)]
        batch = examples(users, items, rng.integers(0, 2, 8).tolist(), ts=ts)
        online.append(store.lookup_batch(np.array(users), np.array(items), as_of_ms=ts[0]).dense)
        store.push(*agg.update(batch))
    events = pd.DataFrame({"user_id": np.arange(5), "item_id": np.arange(5),
                           "event_timestamp": pd.Timestamp(T0 + 5 * 60_000, unit="ms", tz="UTC")})
    history = store.historical(events).dense
    now = store.lookup_batch(np.arange(5), np.arange(5), as_of_ms=T0 + 5 * 60_000).dense
    np.testing.assert_allclose(history, now, rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns=["u_log_n_1h"]), r"lack column\(s\) \['u_log_n_1h'\]"),
    (lambda f: f.drop(columns=["event_timestamp"]), "lack column"),
    (lambda f: f.assign(user_id=f["user_id"] + 0.5), "push: user_id must hold integer ids"),
    (lambda f: f.assign(user_id=["a"] * len(f)), "push: user_id must hold integer ids"),
    (lambda f: f.assign(u_click_rate_1d=np.nan), r"non-finite values in \['u_click_rate_1d'\]"),
    (lambda f: f.assign(u_log_n_1h=np.inf), "non-finite"),
    (lambda f: f.assign(event_timestamp=pd.NaT), "missing event_timestamp"),
])
def test_bad_pushed_rows_are_refused_before_anything_is_written(tmp_path: Path, change, message: str) -> None:
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    users, items = StreamAggregator().update(examples([1, 2], [10, 10], [1, 0]))
    with pytest.raises(ValueError, match=message):
        store.push(change(users), items)
    got = frame(store.lookup_batch(np.array([1]), np.array([10]), as_of_ms=T0).dense)
    assert got.loc[0, "u_log_n_1h"] == 0 and got.loc[0, "i_log_n_1h"] == 0  # neither kind was written
    assert pq.read_table(tmp_path / "offline" / "item_stream").num_rows == 0


def test_an_entity_pushed_twice_in_one_batch_keeps_its_newest_row_online_and_both_offline(config: FeatureStoreConfig) -> None:
    store = OnlineFeatures(config)
    agg = StreamAggregator()
    older, _ = agg.update(examples([1], [10], [0], ts=[T0]))
    newer, items = agg.update(examples([1, 1], [10, 10], [1, 1], ts=[T0 + 1, T0 + 2]))
    users = pd.concat([newer, older], ignore_index=True)  # newest first: position must not decide
    store.push(users, items)
    got = frame(store.lookup_batch(np.array([1]), np.array([10]), as_of_ms=T0 + 10).dense)
    assert got.loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(3))
    store.flush()
    assert pq.read_table(Path(config.data_dir) / "offline" / "user_stream").num_rows == 2


@pytest.mark.parametrize("users, items, message", [
    (np.array([1.5]), np.array([1]), "user_ids must hold integer ids"),
    (np.array(["x"]), np.array([1]), "user_ids must hold integer ids"),
    (np.array([1]), np.array([np.nan]), "item_ids must hold integer ids"),
    (np.array([[1]]), np.array([[1]]), "must be 1-d"),
])
def test_lookups_refuse_ids_that_are_not_whole_numbers(tmp_path: Path, users, items, message: str) -> None:
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    with pytest.raises(ValueError, match=message):
        store.lookup(users, items)
    assert store.lookup(np.array([2.0]), np.array([3.0])).shape == (1, len(FEATURE_COLUMNS))  # whole floats are ids


def test_the_in_memory_store_reads_what_the_real_one_reads(config: FeatureStoreConfig) -> None:
    """``InMemoryFeatures`` is the real store's stand-in in unit tests: same rows, same expiry, same clock."""
    store, memory = OnlineFeatures(config), InMemoryFeatures()
    agg = StreamAggregator()
    rng = np.random.default_rng(1)
    users, items = np.arange(8), np.arange(8)[::-1]  # 6 and 7 are never pushed
    for hours in (0, 0.5, 2, 30):  # the last step is more than a day after the others
        ts = [T0 + int(hours * HOUR_MS) + i for i in range(10)]
        rows = agg.update(examples(rng.integers(0, 6, 10).tolist(), rng.integers(0, 6, 10).tolist(),
                                   rng.integers(0, 2, 10).tolist(), ts=ts))
        store.push(*rows)
        memory.push(*rows)
        for as_of in (None, ts[0] + HOUR_MS // 2, ts[0] + 3 * HOUR_MS):
            np.testing.assert_array_equal(store.lookup_batch(users, items, as_of_ms=as_of).dense,
                                          memory.lookup_batch(users, items, as_of_ms=as_of).dense)


def test_pushes_are_collected_into_offline_parts_of_the_configured_size_and_a_flush_writes_the_rest(tmp_path: Path) -> None:
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path, offline_part_rows=8))
    agg = StreamAggregator()
    for k in range(10):  # a user row and an item row per push: a part every 4 pushes, 2 pushes left collected
        store.push(*agg.update(examples([k], [10 + k % 2], [1], ts=[T0 + k])))
    store._settle_history(keep=0)  # the queued appends, not the collected rows
    directory = tmp_path / "offline" / "user_stream"
    written = [pq.read_table(p) for p in sorted(directory.glob("L0-*.parquet"))]
    assert [t.num_rows for t in written] == [4, 4]
    assert pa.concat_tables(written)["user_id"].to_pylist() == list(range(8))  # in push order
    store.flush()
    assert sorted(pd.read_parquet(directory)["user_id"]) == list(range(10))


def test_the_offline_history_is_written_behind_the_push_in_order_and_a_failed_append_is_raised(
    tmp_path: Path, monkeypatch
) -> None:
    """Online rows are readable when push returns; the history follows on the writer thread, in push order,
    and flush() (or the next push) raises an append that failed instead of dropping it."""
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path))
    agg = StreamAggregator()
    for k in range(6):  # more pushes than the queue holds: a push waits for the oldest append
        store.push(*agg.update(examples([k], [10], [1], ts=[T0 + k])))
        assert frame(store.lookup_batch(np.array([k]), np.array([10]), as_of_ms=T0 + k).dense).loc[0, "u_log_n_1h"] > 0
    store.flush()
    offline = pd.read_parquet(tmp_path / "offline" / "user_stream")
    assert sorted(offline["user_id"]) == list(range(6))

    def broken(view, table):
        raise OSError("disk full")

    monkeypatch.setattr(store.offline, "append", broken)
    store.push(*agg.update(examples([7], [10], [1], ts=[T0 + 7])))  # online still lands
    with pytest.raises(OSError, match="disk full"):
        store.flush()
