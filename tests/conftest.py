"""Session fixtures: one real Kafka broker and one real local Ray instance for the whole run.

``KAFKA_BOOTSTRAP_SERVERS`` points the tests at an existing broker instead of starting one.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack, closing
from pathlib import Path

import pytest


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out as free, held together so the same one is not returned twice."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> str:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    from infra.kafka import broker

    port, controller_port = free_ports(2)
    config = broker.BrokerConfig(data_dir=tmp_path_factory.mktemp("kafka"), port=port, controller_port=controller_port)
    address = broker.up(config)
    try:
        yield address
    finally:
        broker.down(config)


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray import serve

    from infra.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    return f"test.{request.node.name.replace('[', '.').replace(']', '')}.{os.getpid()}.{free_port()}"


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real redis-server on a free loopback port (installed from Debian's packages if missing), as
    ``host:port``; stopped at the end of the session."""
    from infra.redis_server import RedisServerConfig, running

    config = RedisServerConfig(port=free_port(), data_dir=tmp_path_factory.mktemp("redis"))
    with running(config) as server:
        yield server.connection_string
