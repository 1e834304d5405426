"""The local Kafka broker: the jar cache, the process lifecycle and a real produce/consume round trip.

Every broker here gets its own temporary data dir and free ports, so a session broker on 19092 (or a
colleague's test run) is never touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from typer.testing import CliRunner

from infra.kafka import BrokerConfig, BrokerError, bootstrap_servers, down, provision, provisioned, status, up
from infra.kafka.cli import app
from tests.conftest import free_ports

DEADLINE_S = 60.0


def _config(data_dir: Path, **overrides) -> BrokerConfig:
    port, controller_port = free_ports(2)
    return BrokerConfig(data_dir=data_dir, port=port, controller_port=controller_port, **overrides)


def _jvms_naming(data_dir: Path) -> list[int]:
    """Pids of live java processes that name a file under `data_dir` anywhere on their command line."""
    inside = f"{data_dir}{os.sep}"
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if argv[0] and Path(argv[0].decode()).name == "java" and state != "Z":
            if any(inside in arg.decode(errors="replace") for arg in argv):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerConfig]:
    cfg = _config(tmp_path_factory.mktemp("kafka"))
    yield cfg
    down(cfg)


@pytest.fixture
def running(cfg: BrokerConfig) -> BrokerConfig:
    """The module's broker, started again if an earlier test stopped it."""
    up(cfg)
    return cfg


# -- provisioning -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_provision_redoes_an_interrupted_download_and_never_a_complete_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTREAM_KAFKA_HOME", str(tmp_path / "home"))
    cfg = BrokerConfig(data_dir=tmp_path / "data")
    # What a download killed halfway leaves behind: some jars, no marker.
    leftover = tmp_path / "home" / cfg.version / "libs" / "half-written.jar"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"PK")
    assert not provisioned(cfg)

    libs = provision(cfg)

    assert provisioned(cfg)
    assert not leftover.exists()
    jars = {jar.name for jar in libs.glob("*.jar")}
    assert f"kafka_2.13-{cfg.version}.jar" in jars
    assert any(name.startswith("log4j-core-") for name in jars)
    assert any(name.startswith("log4j-slf4j-impl-") for name in jars)

    # From here on `mvn` is a stand-in that records each call and fails.
    calls = tmp_path / "mvn-calls"
    shim = tmp_path / "bin" / "mvn"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")

    assert provision(cfg) == libs
    assert not calls.exists()

    (libs.parent / ".provisioned").unlink()  # the stand-in is what a missing marker would run
    with pytest.raises(BrokerError, match="mvn could not fetch"):
        provision(cfg)
    assert calls.exists()


# -- lifecycle ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_up_twice_is_harmless(cfg):
    first = up(cfg)
    pid = status(cfg).pid

    second = up(cfg)

    assert first == second == f"127.0.0.1:{cfg.port}"
    assert status(cfg).pid == pid
    assert (cfg.data_dir / "broker.pid").read_text().strip() == str(pid)


@pytest.mark.integration
def test_produce_then_consume_through_the_broker(running):
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    payload = uuid.uuid4().bytes
    producer = KafkaProducer(bootstrap_servers=running.bootstrap)
    try:
        producer.send(topic, key=b"k", value=payload).get(timeout=DEADLINE_S)
    finally:
        producer.close()

    consumer = KafkaConsumer(
        topic, bootstrap_servers=running.bootstrap, group_id=f"group-{topic}", auto_offset_reset="earliest"
    )
    received: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not received and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                received.extend(record.value for record in records)
    finally:
        consumer.close()

    assert received == [payload]


@pytest.mark.integration
def test_status_reflects_the_process(cfg):
    up(cfg)
    running = status(cfg)
    assert running.running
    assert b"kafka.Kafka" in Path(f"/proc/{running.pid}/cmdline").read_bytes().split(b"\0")

    down(cfg)

    stopped = status(cfg)
    assert not stopped.running
    assert stopped.pid is None
    assert stopped.bootstrap == running.bootstrap


@pytest.mark.integration
def test_down_leaves_no_jvm_behind(cfg):
    up(cfg)
    pid = status(cfg).pid
    assert _jvms_naming(cfg.data_dir) == [pid]

    down(cfg)

    assert not Path(f"/proc/{pid}").exists()
    assert _jvms_naming(cfg.data_dir) == []
    assert not (cfg.data_dir / "broker.pid").exists()
    down(cfg)  # stopping a stopped broker is harmless


@pytest.mark.integration
def test_a_stale_pid_file_is_not_a_running_broker(cfg):
    down(cfg)
    gone = subprocess.Popen(["true"])
    gone.wait()
    pid_file = cfg.data_dir / "broker.pid"

    for stale in (gone.pid, os.getpid()):  # a process that exited; a live one that is not java
        pid_file.write_text(f"{stale}\n")
        assert not status(cfg).running

    up(cfg)
    assert status(cfg).pid not in (gone.pid, os.getpid())


@pytest.mark.integration
def test_concurrent_ups_start_one_broker(cfg):
    down(cfg)

    with ThreadPoolExecutor(max_workers=2) as pool:
        addresses = list(pool.map(lambda _: up(cfg), range(2)))

    assert addresses == [cfg.bootstrap] * 2
    assert _jvms_naming(cfg.data_dir) == [status(cfg).pid]


@pytest.mark.integration
def test_cli_status_exit_code_follows_the_broker(running):
    where = ["--data-dir", str(running.data_dir)]
    ports = ["--port", str(running.port), "--controller-port", str(running.controller_port)]
    runner = CliRunner()

    assert runner.invoke(app, ["up", *where, *ports]).exit_code == 0  # already running: starts nothing
    shown = runner.invoke(app, ["status", *where, *ports])
    assert shown.exit_code == 0
    assert f"127.0.0.1:{running.port}" in shown.output

    assert runner.invoke(app, ["down", *where]).exit_code == 0
    assert runner.invoke(app, ["status", *where, *ports]).exit_code == 1


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_up_refuses_a_port_held_by_another_process(tmp_path):
    cfg = _config(tmp_path)
    with closing(socket.socket()) as squatter:
        squatter.bind(("127.0.0.1", cfg.port))
        squatter.listen()

        with pytest.raises(BrokerError, match=f"port 127.0.0.1:{cfg.port} is taken by another process"):
            up(cfg)

    assert _jvms_naming(cfg.data_dir) == []


@pytest.mark.integration
def test_a_broker_that_dies_on_start_reports_its_log(tmp_path):
    cfg = _config(tmp_path, heap="1k")  # the JVM refuses a heap this small before Kafka even loads

    with pytest.raises(BrokerError, match=r"exited while starting(?s:.*)heap"):
        up(cfg, timeout=DEADLINE_S)

    assert not status(cfg).running


def test_bootstrap_servers_prefers_the_environment(monkeypatch, tmp_path):
    cfg = BrokerConfig(data_dir=tmp_path, port=29092)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    assert bootstrap_servers(cfg) == "kafka:9092"

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    assert bootstrap_servers(cfg) == "127.0.0.1:29092"
