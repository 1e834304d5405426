"""``moestream --version`` and ``moestream doctor``: each check finds what is there (a real broker, a real Redis) and
names the fix for what is not."""

from __future__ import annotations

from collections import namedtuple
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra import doctor
from infra.cli import app
from infra.config import load_config
from tests.conftest import free_port

runner = CliRunner()


def _config(tmp_path: Path, **sections):
    return load_config(data={"paths": {"data_root": str(tmp_path)}, **sections}, environ={})


def _by_name(config) -> dict[str, doctor.Check]:
    return {c.name: c for c in doctor.checks(config)}


def test_version_prints_the_installed_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"moestream {metadata.version('moestream')}"


@pytest.mark.integration
def test_a_running_broker_passes_and_an_absent_one_names_the_fix(kafka_bootstrap, tmp_path: Path) -> None:
    assert _by_name(_config(tmp_path, kafka={"bootstrap_servers": kafka_bootstrap}))["Kafka broker"].ok is True
    absent = f"127.0.0.1:{free_port()}"
    check = _by_name(_config(tmp_path, kafka={"bootstrap_servers": absent, "connect_timeout_s": 1}))["Kafka broker"]
    assert check.ok is False and absent in check.found and "kafka.bootstrap_servers" in (check.fix or "")


@pytest.mark.integration
def test_redis_is_checked_only_when_configured(redis_server, tmp_path: Path) -> None:
    assert _by_name(_config(tmp_path))["Redis"].ok is None
    live = _config(tmp_path, features={"online_store": "redis", "redis_connection": redis_server})
    assert _by_name(live)["Redis"].ok is True
    port = free_port()
    dead = _by_name(_config(tmp_path, features={"online_store": "redis", "redis_connection": f"127.0.0.1:{port}"}))
    assert dead["Redis"].ok is False and f"redis-server --port {port}" in dead["Redis"].fix


def test_online_wandb_without_a_key_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    check = _by_name(_config(tmp_path, telemetry={"mode": "online"}))["W&B"]
    assert check.ok is False and "WANDB_API_KEY" in check.fix
    assert _by_name(_config(tmp_path))["W&B"].ok is True


def test_java_missing_from_path_names_the_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    check = _by_name(_config(tmp_path))["java"]
    assert check.ok is False and "openjdk-17" in check.fix


def test_an_old_java_is_missing(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text('#!/bin/sh\necho \'java version "1.8.0_392"\' >&2\n')
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    check = _by_name(_config(tmp_path))["java"]
    assert check.ok is False and "1.8.0_392" in check.found


def test_little_free_space_is_missing(tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    check = _by_name(_config(tmp_path))["disk"]
    assert check.ok is False and "paths.data_root" in check.fix


def test_a_check_that_breaks_is_reported_not_raised(tmp_path: Path, monkeypatch) -> None:
    def broken(config):
        raise OSError("no /proc")

    monkeypatch.setattr(doctor, "CHECKS", (broken,))
    (check,) = doctor.checks(_config(tmp_path))
    assert check.ok is False and "no /proc" in check.found


@pytest.mark.integration
def test_doctor_exits_1_when_something_is_missing_and_0_when_nothing_is(kafka_bootstrap, tmp_path: Path) -> None:
    env = {"MOESTREAM_PATHS__DATA_ROOT": str(tmp_path), "MOESTREAM_KAFKA__CONNECT_TIMEOUT_S": "1"}
    missing = runner.invoke(app, ["doctor"], env={**env, "MOESTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    assert missing.exit_code == 1, missing.output
    present = runner.invoke(app, ["doctor"], env={**env, "MOESTREAM_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap})
    jars_ok = _by_name(_config(tmp_path))["Kafka jars"].ok  # an external broker (KAFKA_BOOTSTRAP_SERVERS) needs none
    assert present.exit_code == (0 if jars_ok else 1), present.output
