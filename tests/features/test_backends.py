"""The fast online path against Feast's own: what one writes the other reads, byte for byte, on both stores;
one read per entity; and the event-time clock that readers share with the writer."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from features.aggregates import StreamAggregator
from features.codec import entity_keys
from features.definitions import ENTITY_KEYS, PUSH_SOURCES, STREAM_FIELD, STREAM_VIEWS, USER_STREAM
from features.store import FeatureStoreConfig, OnlineFeatures, feast_push_frame
from tests.features.test_store import HOUR_MS, T0, examples, frame

pytestmark = pytest.mark.integration


def _redis_client(config: FeatureStoreConfig) -> redis.Redis:
    host, port = config.redis_connection.split(":")
    return redis.Redis(host=host, port=int(port))


def stored_rows(config: FeatureStoreConfig, kind: str, ids: list[int]) -> dict:
    """Everything the online store holds for these entities' stream rows, as raw bytes, store-neutral."""
    view, key = STREAM_VIEWS[kind], ENTITY_KEYS[kind]
    if config.online_store == "redis":
        client = _redis_client(config)
        keys = entity_keys(key, np.array(ids), config.project.encode())
        return {i: client.hgetall(k) for i, k in zip(ids, keys)}
    with sqlite3.connect(Path(config.data_dir) / "online.db") as conn:
        rows = conn.execute(f'SELECT entity_key, feature_name, value, value_text, event_ts, created_ts '
                            f'FROM "{config.project}_{view}" ORDER BY entity_key, feature_name').fetchall()
    by_key = dict(zip(entity_keys(key, np.array(ids)), ids))
    out: dict[int, list] = {}
    for entity_key, *row in rows:
        if entity_key in by_key:
            out.setdefault(by_key[entity_key], []).append(tuple(row))
    return out


def batches() -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    agg = StreamAggregator()
    return [agg.update(examples([1, 2, 1], [10, 11, 12], [1, 0, 1], ts=[T0, T0 + 5, T0 + 9])),
            agg.update(examples([2, 3], [10, 13], [1, 1], ts=[T0 + HOUR_MS, T0 + HOUR_MS + 1]))]


def test_pushed_rows_are_what_feasts_own_reader_returns(config: FeatureStoreConfig) -> None:
    store = OnlineFeatures(config)
    pushed = batches()
    for users, items in pushed:
        store.push(users, items)
    users = pd.concat([b[0] for b in pushed]).drop_duplicates("user_id", keep="last").set_index("user_id")
    got = store.store.get_online_features(features=[f"user_stream:{STREAM_FIELD}"],
                                          entity_rows=[{"user_id": u} for u in (1, 2, 3, 4)]).to_dict()[STREAM_FIELD]
    for i, user in enumerate((1, 2, 3)):
        stats, updated_ms = np.array(got[i][:-1]), got[i][-1]
        assert np.float32(stats).tobytes() == users.loc[user, list(USER_STREAM)].to_numpy(np.float32).tobytes()
        assert updated_ms == users.loc[user, "event_timestamp"].value // 1_000_000
    assert got[3] is None  # never pushed


def test_the_fast_writer_stores_the_bytes_feasts_writer_stores(config: FeatureStoreConfig, tmp_path: Path) -> None:
    ours = OnlineFeatures(config)
    theirs_config = replace(config, data_dir=tmp_path / "feast", project=f"{config.project}f")
    theirs = OnlineFeatures(theirs_config)
    for users, items in batches():
        ours.push(users, items)
        for kind, rows in (("user", users), ("item", items)):  # the reference path: Feast's own online write
            theirs.store.write_to_online_store(STREAM_VIEWS[kind], feast_push_frame(kind, rows))
    for kind, ids in (("user", [1, 2, 3]), ("item", [10, 11, 12, 13])):
        expected = stored_rows(theirs_config, kind, ids)
        got = stored_rows(config, kind, ids)
        assert got == expected and sorted(got) == ids  # SQLite: (feature, value, ...) rows; Redis: hash fields
        # one online row (SQLite) or hash field beside the view's timestamp (Redis) per entity: the statistics
        # and the update time travel as one feature
        assert all(len(fields) == (1 if config.online_store == "sqlite" else 2) for fields in got.values())
    users, items = np.array([1, 2, 3, 4, 1]), np.array([10, 13, 11, 12, 99])
    for as_of in (T0 + 10, T0 + HOUR_MS + 5, T0 + 3 * HOUR_MS):  # and both read back the same through lookups
        np.testing.assert_array_equal(ours.lookup_batch(users, items, as_of_ms=as_of).dense,
                                      theirs.lookup_batch(users, items, as_of_ms=as_of).dense)


def test_a_redis_lookup_reads_each_distinct_entity_once_for_all_its_views(redis_server: str, tmp_path: Path) -> None:
    config = FeatureStoreConfig(data_dir=tmp_path, online_store="redis", redis_connection=redis_server,
                                project="onecommand")
    store = OnlineFeatures(config)
    pd.DataFrame({"item_id": [10], "quality": [0.5]}).to_csv(tmp_path / "items.csv", index=False)
    store.load_static(items=tmp_path / "items.csv")
    store.push(*batches()[0])
    client = _redis_client(config)

    def hmgets() -> int:
        return client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)

    before = hmgets()
    got = store.lookup_batch(np.array([1, 1, 2, 7]), np.array([10, 11, 10, 10]))
    assert hmgets() - before == 3 + 2  # users 1, 2, 7 and items 10, 11: stream and static views in one command
    assert got.frame().loc[0, "i_sim_quality"] == pytest.approx(0.5) and got.frame().loc[0, "u_log_n_1h"] > 0


def test_a_redis_server_that_lost_its_scripts_gets_them_again(redis_server: str, tmp_path: Path) -> None:
    config = FeatureStoreConfig(data_dir=tmp_path, online_store="redis", redis_connection=redis_server,
                                project="scriptflush")
    store = OnlineFeatures(config)
    first, second = batches()
    store.push(*first)
    _redis_client(config).script_flush()  # as a restarted server would have it
    store.push(*second)
    _redis_client(config).script_flush()
    got = frame(store.lookup_batch(np.array([3]), np.array([13]), as_of_ms=T0 + HOUR_MS + 5).dense)
    assert got.loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(1)) and got.loc[0, "i_log_n_1h"] == pytest.approx(np.log1p(1))


def test_a_reader_that_never_pushes_judges_expiry_by_the_writers_event_time(config: FeatureStoreConfig) -> None:
    writer = OnlineFeatures(config)
    reader = OnlineFeatures(config, apply=False)  # a serving replica: it only reads
    agg = StreamAggregator()
    user, item = np.array([1]), np.array([10])
    writer.push(*agg.update(examples([1], [10], [1], ts=[T0])))
    fresh = reader.lookup(user, item)  # T0 is in 2023: by the wall clock every window would have expired
    assert frame(fresh).loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(1))
    np.testing.assert_array_equal(fresh, writer.lookup(user, item))

    writer.push(*agg.update(examples([2], [20], [0], ts=[T0 + 2 * HOUR_MS])))  # event time moves two hours on
    later = reader.lookup(user, item)
    assert frame(later).loc[0, "u_log_n_1h"] == 0 and frame(later).loc[0, "u_log_n_1d"] == pytest.approx(np.log1p(1))
    np.testing.assert_array_equal(later, writer.lookup(user, item))

    wall = OnlineFeatures(replace(config, clock="wall"), apply=False)
    assert frame(wall.lookup(np.array([2]), np.array([20]))).loc[0, "u_log_n_1d"] == 0  # years ago, by the wall

    replay = OnlineFeatures(config, apply=False)  # a replay from a day earlier: the clock is the last push's
    replay.push(*StreamAggregator().update(examples([3], [30], [1], ts=[T0 - 24 * HOUR_MS])))
    assert frame(reader.lookup(np.array([3]), np.array([30]))).loc[0, "u_log_n_1h"] == pytest.approx(np.log1p(1))


def test_sqlite_tables_keep_only_their_primary_key_which_serves_feasts_reads(tmp_path: Path) -> None:
    # Feast's update gives each table an index on entity_key beside the primary key that starts with it; apply
    # drops it again after every update (here the second), and Feast's own read still seeks the primary key.
    config = FeatureStoreConfig(data_dir=tmp_path)
    store = OnlineFeatures(config)
    store.apply()
    tables = sorted(f"{config.project}_{view}" for view in PUSH_SOURCES)
    with sqlite3.connect(tmp_path / "online.db") as conn:
        indexes = conn.execute(f"SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND tbl_name IN "
                               f"({','.join('?' * len(tables))}) ORDER BY tbl_name", tables).fetchall()
        assert [t for _, t in indexes] == tables and len(tables) == 4  # one index per table: its primary key
        assert all(name.startswith("sqlite_autoindex_") for name, _ in indexes)
        table = f'"{config.project}_{STREAM_VIEWS["user"]}"'
        plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT entity_key, feature_name, value, event_ts FROM {table} "
                            "WHERE entity_key IN (?, ?) ORDER BY entity_key", (b"a", b"b")).fetchall()
        assert len(plan) == 1 and "USING INDEX sqlite_autoindex_" in plan[0][-1]  # a seek per key, no sort
    test_pushed_rows_are_what_feasts_own_reader_returns(config)  # and Feast reads what is pushed


def test_the_writers_wal_is_checkpointed_off_its_commits_into_the_database_file(tmp_path: Path) -> None:
    """The writer's connection never checkpoints (a push does not wait for page copies and fsyncs); the
    checkpointer's thread copies the pushed rows into the database file itself."""
    store = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "store"))
    assert store.rows._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for users, items in batches():
        store.push(users, items)
    expected = store.lookup_batch(np.array([1, 2, 3]), np.array([10, 11, 13])).dense
    copied = tmp_path / "copy.db"
    deadline = time.monotonic() + 60
    while True:  # the database file alone (no WAL beside it) holds every pushed row once a checkpoint has run
        copied.write_bytes((tmp_path / "store" / "online.db").read_bytes())
        try:
            with sqlite3.connect(copied) as conn:
                n = conn.execute(f'SELECT count(*) FROM "{store.config.project}_user_stream"').fetchone()[0]
        except sqlite3.DatabaseError:  # no table yet, or a copy taken while a checkpoint wrote the file
            n = 0
        finally:
            conn.close()
        if n == 3:
            break
        assert time.monotonic() < deadline, f"the database file holds {n} of 3 user rows after 60 s"
        time.sleep(0.05)  # polling a condition under a deadline
    reader = OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "store"))  # and what is read is unchanged
    np.testing.assert_array_equal(reader.lookup_batch(np.array([1, 2, 3]), np.array([10, 11, 13])).dense, expected)
