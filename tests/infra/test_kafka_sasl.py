"""Kafka over SASL_SSL for real: a broker that takes only TLS connections with SASL/PLAIN credentials, and
moestream's producer, consumer and admin client reaching it with the settings of `KafkaConfig` and the
credentials of the environment. Built from the same jars as the local broker (`infra.kafka.broker.provision`),
with a self-signed certificate for 127.0.0.1 made by keytool."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from infra.config import load_config
from infra.kafka.broker import BrokerConfig, provision
from stream.kafka_io import (
    SASL_PASSWORD_ENV, SASL_USERNAME_ENV, EventSink, EventSource, KafkaConfig, client_options, ensure_topics,
)
from tests.conftest import free_ports

pytestmark = pytest.mark.integration

USER, PASSWORD = "moestream", "s3cret-" + uuid.uuid4().hex[:8]
ADMIN_PASSWORD = uuid.uuid4().hex
STORE_PASSWORD = uuid.uuid4().hex
READY_TIMEOUT_S = 120.0
LOG4J = Path(__file__).resolve().parents[2] / "infra" / "kafka" / "log4j2.properties"


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A PKCS12 keystore for the broker, a truststore with its certificate, and that certificate as PEM for the
    clients (SAN: 127.0.0.1)."""
    keystore, pem = directory / "broker.p12", directory / "ca.pem"
    subprocess.run(["keytool", "-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048",
                    "-validity", "2", "-dname", "CN=127.0.0.1", "-ext", "SAN=IP:127.0.0.1",
                    "-keystore", str(keystore), "-storetype", "PKCS12", "-storepass", STORE_PASSWORD],
                   check=True, capture_output=True)
    subprocess.run(["keytool", "-exportcert", "-rfc", "-alias", "broker", "-keystore", str(keystore),
                    "-storetype", "PKCS12", "-storepass", STORE_PASSWORD, "-file", str(pem)],
                   check=True, capture_output=True)
    # The broker checks its TLS settings by a handshake with itself (and talks to itself over this listener).
    subprocess.run(["keytool", "-importcert", "-noprompt", "-alias", "broker", "-file", str(pem),
                    "-keystore", str(directory / "trust.p12"), "-storetype", "PKCS12", "-storepass", STORE_PASSWORD],
                   check=True, capture_output=True)
    return keystore, pem


def _properties(directory: Path, port: int, controller_port: int, keystore: Path) -> Path:
    jaas = ('org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" '
            f'password="{ADMIN_PASSWORD}" user_admin="{ADMIN_PASSWORD}" user_{USER}="{PASSWORD}";')
    path = directory / "server.properties"
    path.write_text("\n".join([
        "process.roles=broker,controller", "node.id=1",
        f"controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}", "controller.listener.names=CONTROLLER",
        f"listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        "inter.broker.listener.name=SASL_SSL", "sasl.enabled.mechanisms=PLAIN",
        "sasl.mechanism.inter.broker.protocol=PLAIN", f"listener.name.sasl_ssl.plain.sasl.jaas.config={jaas}",
        f"ssl.keystore.location={keystore}", "ssl.keystore.type=PKCS12", f"ssl.keystore.password={STORE_PASSWORD}",
        f"ssl.key.password={STORE_PASSWORD}", f"ssl.truststore.location={directory / 'trust.p12'}",
        "ssl.truststore.type=PKCS12", f"ssl.truststore.password={STORE_PASSWORD}", f"log.dirs={directory / 'data'}",
        "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=1",
        "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1", "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0", "num.network.threads=2", "num.io.threads=2",
    ]) + "\n")
    return path


def _java(libs: Path, directory: Path, *args: str) -> list[str]:
    return ["java", "-Xmx384m", f"-Dlog4j2.configurationFile={LOG4J}", f"-Dkafka.logs.dir={directory / 'logs'}",
            "-cp", str(libs / "*"), *args]


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(bootstrap, CA file)`` of a SASL_SSL-only broker, stopped (by its pid) at the end of the module."""
    if not (shutil.which("java") and shutil.which("keytool")):
        pytest.fail("a Java runtime with keytool is needed for the Kafka broker")
    directory = tmp_path_factory.mktemp("kafka-sasl")
    libs = provision(BrokerConfig(data_dir=directory))
    port, controller_port = free_ports(2)
    keystore, pem = _certificate(directory)
    properties = _properties(directory, port, controller_port, keystore)
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode().replace("-", "A")
    subprocess.run(_java(libs, directory, "kafka.tools.StorageTool", "format", "--config", str(properties),
                         "--cluster-id", cluster_id, "--standalone"), check=True, capture_output=True, timeout=180)
    log = directory / "console.log"
    with log.open("wb") as out:
        broker = subprocess.Popen(_java(libs, directory, "kafka.Kafka", str(properties)), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    bootstrap = f"127.0.0.1:{port}"
    try:
        _wait_ready(bootstrap, pem, broker, directory)
        yield bootstrap, pem
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


def _wait_ready(bootstrap: str, pem: Path, broker: subprocess.Popen, directory: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    admin_options = {"bootstrap_servers": bootstrap, "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                     "sasl_plain_username": "admin", "sasl_plain_password": ADMIN_PASSWORD, "ssl_cafile": str(pem)}
    while True:
        if broker.poll() is not None:
            raise RuntimeError(f"the SASL_SSL broker exited:\n{_logs(directory)}")
        try:
            socket.create_connection(("127.0.0.1", int(bootstrap.rsplit(":", 1)[1])), timeout=1).close()
            with KafkaAdminClient(**admin_options, request_timeout_ms=5000) as admin:
                if admin.describe_cluster()["brokers"]:
                    return
        except (OSError, KafkaError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the SASL_SSL broker did not answer within {READY_TIMEOUT_S:.0f}s:\n{_logs(directory)}")
        time.sleep(1.0)  # poll interval


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
                     for log in (directory / "console.log", directory / "logs" / "server.log") if log.exists())


def test_sink_and_source_reach_a_sasl_ssl_broker_with_environment_credentials(sasl_broker, monkeypatch) -> None:
    bootstrap, pem = sasl_broker
    topic = f"sasl.{uuid.uuid4().hex[:8]}"
    # The settings as a user writes them: the file without credentials, these in the environment.
    config = load_config(data={"kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": f"{topic}.g",
                                         "partitions": 1, "security_protocol": "SASL_SSL",
                                         "sasl_mechanism": "PLAIN", "ssl_cafile": str(pem)}}, environ={}).kafka
    monkeypatch.setenv(SASL_USERNAME_ENV, USER)
    monkeypatch.setenv(SASL_PASSWORD_ENV, PASSWORD)
    ensure_topics(config)
    sink = EventSink(config)
    events = [{"type": "impression", "request_id": f"r{i}", "user_id": i, "item_id": 100 + i,
               "ts_ms": int(time.time() * 1000)} for i in range(20)]
    sink.send_all(events)
    sink.close()
    source = EventSource(replace(config, max_wait_ms=500))
    try:
        received, deadline = 0, time.monotonic() + 60
        while received < len(events) and time.monotonic() < deadline:
            received += source.next_batch().n_messages
    finally:
        source.close()
    assert received == len(events)


def test_a_wrong_password_is_refused_by_the_broker(sasl_broker, monkeypatch) -> None:
    bootstrap, pem = sasl_broker
    config = KafkaConfig(bootstrap_servers=bootstrap, security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                         ssl_cafile=str(pem))
    monkeypatch.setenv(SASL_USERNAME_ENV, USER)
    monkeypatch.setenv(SASL_PASSWORD_ENV, "not-" + PASSWORD)
    with pytest.raises(KafkaError):
        KafkaAdminClient(**client_options(config), request_timeout_ms=5000, bootstrap_timeout_ms=10000).close()


def test_without_the_ca_the_broker_certificate_is_not_trusted(sasl_broker, monkeypatch) -> None:
    bootstrap, _ = sasl_broker
    config = KafkaConfig(bootstrap_servers=bootstrap, security_protocol="SASL_SSL", sasl_mechanism="PLAIN")
    monkeypatch.setenv(SASL_USERNAME_ENV, USER)
    monkeypatch.setenv(SASL_PASSWORD_ENV, PASSWORD)
    with pytest.raises(KafkaError):
        KafkaAdminClient(**client_options(config), request_timeout_ms=5000, bootstrap_timeout_ms=10000).close()
    assert os.environ[SASL_PASSWORD_ENV] == PASSWORD  # the credentials were right: only the trust failed
