"""`moestream simulate` and `moestream replay` on bad input and a missing or lost broker (issue 19, items 6-8):
each ends in a few lines that say what to do, with a non-zero exit and no traceback."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner

from infra.cli import app
from stream.events import encode
from stream.logfile import write_log
from stream.replay import PastTheEnd, ReplayConfig, replay
from stream.simulator import Simulator, SimulatorConfig
from tests.conftest import free_port, free_ports

MOESTREAM = str(Path(sys.executable).with_name("moestream"))


def events(n_requests: int = 50) -> list[dict]:
    return list(Simulator(SimulatorConfig(seed=11)).events(1_700_000_000_000, n_requests, rate=20.0))


def cli(*args: str, **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400", **env})
    return result.exit_code, result.output


def command(*args: str, timeout_s: float = 120, **env: str) -> subprocess.CompletedProcess:
    """The installed command in a process of its own, with no configuration but ``env``."""
    return subprocess.run([MOESTREAM, *args], capture_output=True, text=True, timeout=timeout_s,
                          env={"COLUMNS": "400", "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled", **env})


@pytest.mark.parametrize(("flag", "value"),
                         [("--rate", "-5"), ("--rate", "0"), ("--seconds", "-1"), ("--seconds", "0")])
def test_simulate_refuses_a_rate_or_duration_that_is_not_positive(flag: str, value: str) -> None:
    code, output = cli("simulate", flag, value, MOESTREAM_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    assert code == 2 and f"'{flag}'" in output and "must be > 0" in output


def test_a_start_past_the_end_of_the_log_is_an_error_naming_the_events_it_has(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    n = write_log(events(), log)
    with pytest.raises(PastTheEnd, match=rf"start {n + 1} is past the end of the log \({n} events\)"):
        replay(ReplayConfig(log, start=n + 1, progress=False), lambda batch: None)
    assert replay(ReplayConfig(log, start=n, progress=False), lambda batch: None).emitted == 0  # the end: no error


def _said(output: str) -> list[str]:
    """What a command said, less the note naming the configuration file it read."""
    return [line for line in output.splitlines() if line.strip() and not line.startswith("config: ")]


@pytest.mark.parametrize("name", ["simulate", "replay", "train"])
def test_without_a_broker_a_command_says_where_it_looked_and_how_to_start_one(tmp_path: Path, name: str) -> None:
    servers = f"127.0.0.1:{free_port()}"  # nothing listens there
    log = tmp_path / "log.parquet"
    write_log(events(), log)
    args = {"simulate": ["simulate", "--seconds", "1"], "replay": ["replay", str(log), "--data-root", str(tmp_path)],
            "train": ["train", "--seconds", "5", "--data-root", str(tmp_path)]}[name]
    done = command(*args, MOESTREAM_KAFKA__BOOTSTRAP_SERVERS=servers, MOESTREAM_KAFKA__CONNECT_TIMEOUT_S="2")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    (line,) = _said(output)
    assert servers in line and "moestream kafka up" in line


def test_a_port_that_accepts_connections_but_is_no_broker_is_said_in_one_line_too() -> None:
    with socket.socket() as silent:  # accepts (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        servers = f"127.0.0.1:{silent.getsockname()[1]}"
        done = command("simulate", MOESTREAM_KAFKA__BOOTSTRAP_SERVERS=servers, MOESTREAM_KAFKA__CONNECT_TIMEOUT_S="1")
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    (line,) = _said(output)
    assert servers in line and "moestream kafka up" in line


@pytest.mark.integration
def test_replay_past_the_end_through_the_command(kafka_bootstrap: str, unique_topic: str, tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    n = write_log(events(), log)
    common = ("--topic", unique_topic, "--data-root", str(tmp_path / "root"))
    code, output = cli("replay", str(log), "--start", str(n + 5), *common, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    assert code == 1 and f"--start {n + 5} is past the end of" in output and f"({n} events)" in output
    assert "Traceback" not in output
    code, output = cli("replay", str(log), "--start", str(n), *common, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    assert code == 0 and "replayed 0 events" in output and f"resume with --start {n}" in output


# --------------------------------------------------------------------------- a broker lost part-way


def _topic_values(bootstrap: str, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in parts) and time.monotonic() < deadline:
            values += [r.value for batch in consumer.poll(timeout_ms=500).values() for r in batch]
        return values
    finally:
        consumer.close()


def _produced(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(parts).values()) if parts else 0
    finally:
        consumer.close()


@pytest.mark.integration
def test_a_replay_that_loses_its_broker_says_where_to_resume_and_the_resume_completes_it(tmp_path: Path) -> None:
    """A broker of this test's own, stopped while a paced replay produces to it: the command exits 1 with the
    position of the events the broker acknowledged; once it is back, resuming from there leaves every event of
    the log in the topic."""
    from infra.kafka import broker

    port, controller_port = free_ports(2)
    config = broker.BrokerConfig(data_dir=tmp_path / "kafka", port=port, controller_port=controller_port)
    bootstrap = broker.up(config)
    log = tmp_path / "log.parquet"
    replayed = events(400)
    total = write_log(replayed, log)
    span_s = (replayed[-1]["ts_ms"] - replayed[0]["ts_ms"]) / 1000
    topic = "replay.lost"
    env = {"MOESTREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "MOESTREAM_KAFKA__DELIVERY_TIMEOUT_S": "3",
           "COLUMNS": "400", "PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"}
    args = [MOESTREAM, "replay", str(log), "--topic", topic, "--data-root", str(tmp_path / "root")]
    try:
        process = subprocess.Popen([*args, "--speed", str(span_s / 30)], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)  # about 30 s of replay
        deadline = time.monotonic() + 60
        while _produced(bootstrap, topic) == 0:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the replay produced nothing"
            time.sleep(0.2)  # poll interval
        broker.down(config)
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 1, output
        assert "Traceback" not in output and "replay stopped: KafkaTimeoutError" in output
        resume = int(re.search(r"resume with --start (\d+)", output).group(1))
        assert 0 < resume < total, output

        broker.up(config)
        assert len(_topic_values(bootstrap, topic)) >= resume  # what was acknowledged is there
        done = subprocess.run([*args, "--start", str(resume)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"replayed {total - resume} events" in done.stdout
        values = _topic_values(bootstrap, topic)
        assert set(values) == {encode(e) for e in replayed} and len(values) >= total
    finally:
        broker.down(config)
