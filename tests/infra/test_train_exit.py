"""A ``moestream train`` run that did not do its job says why and exits 1 (issue 19): a worker that died for good,
or a bounded run that trained nothing although the topic had events; one that did its job prints no warning
and no traceback (issue 23). Real broker, real local Ray, real W&B (offline)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.kafka_io import EventSink, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, bootstrap: str, topic: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MOESTREAM_TELEMETRY__MODE": "disabled",
               "MOESTREAM_TRAINER__MAX_RESTARTS": "0", "RAY_ADDRESS": "", **env}
    return subprocess.run([sys.executable, "-m", "infra.cli", "train", "--topic", topic, *args], cwd=tmp_path,
                          env=environ, capture_output=True, text=True, timeout=600)


def _simulated(bootstrap: str, topic: str, n_requests: int) -> int:
    kafka = KafkaConfig(bootstrap_servers=bootstrap, topic=topic)
    ensure_topics(kafka)
    sink = EventSink(kafka)
    sim = Simulator(SimulatorConfig(seed=5, n_users=300, n_items=800))
    n = 0
    for event in sim.events(int(time.time() * 1000), n_requests):  # 100 requests per second of event time
        sink.send(event)
        n += 1
    sink.close()
    return n


def test_a_run_that_did_its_job_prints_no_warning_and_no_traceback(kafka_bootstrap, unique_topic, tmp_path: Path) -> None:
    n = _simulated(kafka_bootstrap, unique_topic, 4_000)  # 40 s of event time: four joiner windows and more
    done = _train(tmp_path, kafka_bootstrap, unique_topic, "--max-events", str(n), "--seconds", "240",
                  "--data-root", str(tmp_path / "data"), MOESTREAM_TELEMETRY__MODE="offline")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "examples in" in out and "snapshots v1" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not re.search(r"(?i)\bwarning\b|Warning:", out), out[-3000:]


def _malformed(bootstrap: str, topic: str, n: int) -> None:
    kafka = KafkaConfig(bootstrap_servers=bootstrap, topic=topic)
    ensure_topics(kafka)
    sink = EventSink(kafka)
    for i in range(n):
        sink.send_raw(b'{"type": "impression", "request_id": "cut' + str(i).encode(), key=str(i).encode())
    sink.close()


def test_a_bounded_run_that_trained_nothing_while_the_topic_had_events_exits_1(
    kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    _malformed(kafka_bootstrap, unique_topic, 300)
    done = _train(tmp_path, kafka_bootstrap, unique_topic, "--max-events", "300", "--seconds", "240",
                  "--data-root", str(tmp_path / "data"))
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "trained no example although the workers consumed 300 events (300 dead-lettered)" in " ".join(out.split())
    assert "Traceback" not in out


def test_a_worker_that_died_for_good_makes_train_exit_1_naming_the_cause(
    kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    _malformed(kafka_bootstrap, unique_topic, 10)
    (tmp_path / "not-a-directory").write_text("the run's files cannot go under a file\n")
    done = _train(tmp_path, kafka_bootstrap, unique_topic, "--seconds", "120",
                  "--data-root", str(tmp_path / "not-a-directory"))
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, out[-3000:]
    assert "worker 0:" in out and "died after its restarts" in out
