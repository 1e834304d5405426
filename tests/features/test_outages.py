"""A Redis server that goes away mid-run (issue 19, item 5): a push or lookup waits it out with backoff and
goes on once it is back on the same port; the outage is counted and logged once, with the address and no
password; past ``features.outage_timeout_s`` the store fails loudly. A real ``redis-server``, killed with
SIGKILL and started again."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import redis

from features.aggregates import StreamAggregator
from features.backends import FeatureStoreUnavailable
from features.config import FeatureStoreConfig
from features.store import OnlineFeatures
from infra.redis_server import RedisServerConfig, running
from tests.conftest import free_port
from tests.features.test_store import T0, examples

pytestmark = pytest.mark.integration


class KillableRedis:
    """A private redis-server that a test can kill (SIGKILL: no goodbye to the clients) and start again on
    the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.config = RedisServerConfig(port=free_port(), data_dir=data_dir)
        self._stack = ExitStack()

    @property
    def address(self) -> str:
        return self.config.connection_string

    def start(self) -> None:
        self._stack.enter_context(running(self.config))

    def kill(self) -> None:
        client = redis.Redis(host=self.config.host, port=self.config.port, socket_timeout=2)
        pid = int(client.info("server")["process_id"])
        client.close()
        os.kill(pid, signal.SIGKILL)  # the server this object started
        deadline = time.monotonic() + 10
        while _answers(self.config) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _answers(self.config), "redis-server still answers after SIGKILL"

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> KillableRedis:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _answers(config: RedisServerConfig) -> bool:
    try:
        redis.Redis(host=config.host, port=config.port, socket_connect_timeout=0.5).ping()
        return True
    except redis.ConnectionError:
        return False


def _config(tmp_path: Path, address: str, **overrides) -> FeatureStoreConfig:
    return FeatureStoreConfig(data_dir=tmp_path / "features", online_store="redis",
                              redis_connection=f"{address},password=s3cret-not-logged" if overrides.pop("password", False)
                              else address, project=f"t{uuid.uuid4().hex[:12]}", **overrides)


def test_a_lookup_waits_for_a_killed_server_and_goes_on_when_it_is_back(tmp_path: Path, capsys) -> None:
    with KillableRedis(tmp_path / "redis") as server:
        store = OnlineFeatures(_config(tmp_path, server.address))
        users, items = StreamAggregator().update(examples([1, 2], [10, 11], [1, 0], ts=[T0, T0 + 1]))
        store.push(users, items)
        before = store.lookup(np.array([1, 2]), np.array([10, 11]))
        server.kill()
        got: dict = {}
        reader = threading.Thread(target=lambda: got.update(dense=store.lookup(np.array([1, 2]), np.array([10, 11]))))
        reader.start()
        deadline = time.monotonic() + 60  # the first failed attempt may wait out a connect on a loaded machine
        while not store.outages.down and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.outages.down and reader.is_alive()  # waiting, not failed
        assert store.outages.count == 1
        server.start()  # a fresh, empty server on the same port (nothing persisted)
        store.push(users, items)  # the trainer pushes again before it reads: its aggregates are in memory
        reader.join(30)
        assert not reader.is_alive()
        after = store.lookup(np.array([1, 2]), np.array([10, 11]))
    np.testing.assert_array_equal(after, before)
    assert "dense" in got
    assert store.outages.count == 1 and not store.outages.down and store.outages.down_s() > 0
    log = capsys.readouterr().out
    assert log.count("unreachable") == 1 and log.count("is back after") == 1
    assert f"Redis at {server.address}" in log


def test_past_the_outage_timeout_the_store_fails_loudly_without_the_password(tmp_path: Path, capsys) -> None:
    with KillableRedis(tmp_path / "redis") as server:
        store = OnlineFeatures(_config(tmp_path, server.address, outage_timeout_s=0.5, password=True), apply=False)
        server.kill()
        users, items = StreamAggregator().update(examples([1], [10], [1], ts=[T0]))
        with pytest.raises(FeatureStoreUnavailable, match="features.outage_timeout_s") as raised:
            store.push(users, items)
        server.start()
    assert f"Redis at {server.address} unreachable for 0.5 s" in str(raised.value)
    assert "s3cret" not in str(raised.value) and "s3cret" not in capsys.readouterr().out
    assert store.outages.count == 1


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "5", True])
def test_a_bad_outage_timeout_names_its_key(value) -> None:
    with pytest.raises(ValueError, match="features.outage_timeout_s"):
        FeatureStoreConfig(outage_timeout_s=value)
