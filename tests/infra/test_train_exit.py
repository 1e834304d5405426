"""A ``moestream train`` run that did not do its job says why and exits 1 (issue 19): a worker that died for good,
or a bounded run that trained nothing although the topic had events. Real broker, real local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream.kafka_io import EventSink, KafkaConfig, ensure_topics

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, bootstrap: str, topic: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "MOESTREAM_TELEMETRY__MODE": "disabled",
               "MOESTREAM_TRAINER__MAX_RESTARTS": "0", "RAY_ADDRESS": "", **env}
    return subprocess.run([sys.executable, "-m", "infra.cli", "train", "--topic", topic, *args], cwd=tmp_path,
                          env=environ, capture_output=True, text=True, timeout=600)


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
