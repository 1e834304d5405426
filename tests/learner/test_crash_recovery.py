"""SIGKILL the trainer's process mid-stream: it resumes from its checkpoint and no event goes untrained."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer

from features.store import FeatureStoreConfig, OnlineFeatures
from stream.kafka_io import EventSink, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EVERY, BATCH = 3, 128
WINDOW_MS = 1_500
"""The joiner's attribution window in these runs (``worker_process``, ``audited_backlog``)."""


def _impression_offsets(bootstrap: str, topic: str, n: int) -> set[tuple[int, int]]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    found, seen, deadline = set(), 0, time.monotonic() + 60
    try:
        while seen < n and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                seen += len(records)
                found |= {(r.partition, r.offset) for r in records if b'"impression"' in r.value}
    finally:
        consumer.close()
    assert seen == n
    return found


def audited_backlog(tmp_path: Path, bootstrap: str, topic: str, *, seed: int, n_requests: int, every: int,
                    batch: int):
    """A trainer config that audits every trained example to ``trained.csv``, a fresh feature repo, and a
    backlog of simulator traffic already in the topic; returns the config, the impressions' offsets and how
    many events were produced."""
    from dataclasses import replace

    from infra.pipeline import RunLayout, worker_config

    config = worker_config(RunLayout(tmp_path), bootstrap=bootstrap, topic=topic, window_ms=WINDOW_MS,
                           snapshot_every_steps=1_000, checkpoint_every_steps=every, batch_size=batch,
                           wandb_mode="disabled")
    config = replace(config, audit_path=tmp_path / "trained.csv")
    ensure_topics(config.kafka)
    OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "features")).apply()
    events = list(Simulator(SimulatorConfig(seed=seed, max_delay_s=1.0)).events(int(time.time() * 1000), n_requests))
    sink = EventSink(config.kafka)
    sink.send_all(events)
    sink.close()
    return config, _impression_offsets(bootstrap, topic, len(events)), len(events)


def _trained(root: Path) -> Counter:
    path = root / "trained.csv"
    if not path.exists():
        return Counter()
    return Counter(tuple(map(int, line.split(","))) for line in path.read_text().splitlines() if line)


def _delivery(root: Path, impressions: set[tuple[int, int]]) -> tuple[set[tuple[int, int]], int]:
    """Impressions never trained, and how many trainings were repeats, from the worker's audit file."""
    trained = _trained(root)
    return impressions - set(trained), sum(trained.values()) - len(trained)


def _start(root: Path, bootstrap: str, topic: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.learner.worker_process", str(root), bootstrap, topic, str(EVERY), str(BATCH)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.reliability
def test_sigkill_mid_stream_loses_nothing_and_duplicates_stay_within_a_checkpoint(
    kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic=unique_topic)
    ensure_topics(kafka)
    OnlineFeatures(FeatureStoreConfig(data_dir=tmp_path / "features")).apply()
    events = list(Simulator(SimulatorConfig(seed=9, max_delay_s=1.0)).events(int(time.time() * 1000), 1_200))
    sink = EventSink(kafka)
    sink.send_all(events)
    sink.close()
    impressions = _impression_offsets(kafka_bootstrap, unique_topic, len(events))

    first = _start(tmp_path, kafka_bootstrap, unique_topic)
    ckpts = tmp_path / "checkpoints"
    _wait(lambda: (ckpts / "LATEST").exists() and sum(_trained(tmp_path).values()) >= 5 * EVERY * BATCH // 2,
          240, "a checkpoint and some training", first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    before = _trained(tmp_path)

    again = read_again(ckpts, impressions)  # before the restarted worker writes checkpoints of its own
    second = _start(tmp_path, kafka_bootstrap, unique_topic)
    progress = _Progress(tmp_path, after=sum(before.values()), most=int(0.9 * len(impressions)),
                         again=again, slack=held_to_the_end(events, WINDOW_MS) + BATCH)
    _wait(progress.settled, 300, "the restarted worker to train past the crash and go idle", second)
    second.send_signal(signal.SIGTERM)  # graceful: flushes the last window
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 0, output[-3000:]
    assert "restored_step=None" not in output  # it resumed from the checkpoint

    lost, duplicates = _delivery(tmp_path, impressions)
    restored = int(re.search(r"restored_step=(\d+)", output).group(1))
    skipped = int(re.search(r"below_checkpoint=(\d+)", output).group(1))  # 0 when the commit beat the kill
    # Checkpoints are written beside training (learner.cadence.checkpoint_beside): the one restored is the last that
    # was durable at the kill, whose step may be a write's worth of steps behind the last one taken.
    after = sum(before.values()) - restored * BATCH
    print(f"\ncrash recovery: {len(impressions)} impressions, trained before kill {sum(before.values())}, "
          f"restored step {restored}, lost {len(lost)}, duplicates {duplicates} (bound {after}); events read again "
          f"below the checkpoint's offsets and skipped: {skipped}")
    assert not lost
    assert restored >= EVERY
    assert duplicates <= after  # at most what was trained after the checkpoint restored


class _Progress:
    """Settled: the restarted worker has trained at least ``most`` distinct impressions, beyond the
    crash point, and nothing new for 5 s (what is left is the last attribution window, which only the
    graceful stop flushes). Counting distinct impressions, not lines, keeps a slow group rejoin after the
    kill (the dead member's session must expire first) from passing for the end of the stream.

    ``again``: the impressions the restarted worker must train itself (``read_again``), all but ``slack`` of them
    (those the graceful stop flushes): without it, a first worker that trained most impressions before the kill
    lets a restarted one that paused for 5 s early on pass for one that went through the stream."""

    def __init__(self, root: Path, after: int, most: int, again: set[tuple[int, int]] | None = None,
                 slack: int = 0) -> None:
        self.root, self.after, self.most = root, after, most
        self.again, self.slack = again, slack
        self.count, self.since = -1, time.monotonic()

    def settled(self) -> bool:
        trained = _trained(self.root)
        count = sum(trained.values())
        if count != self.count:
            self.count, self.since = count, time.monotonic()
        if self.again is not None:
            trained_again = len(self.again & _trained_after(self.root, self.after))
            if trained_again < len(self.again) - self.slack:
                return False
        return count > self.after and len(trained) >= self.most and time.monotonic() - self.since > 5


def _trained_after(root: Path, lines: int) -> set[tuple[int, int]]:
    """The impressions trained after the first ``lines`` lines of the audit (by a restarted worker)."""
    text = (root / "trained.csv").read_text().splitlines()[lines:]
    return {tuple(map(int, line.split(","))) for line in text if line}


def read_again(checkpoints: Path, impressions: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The impressions a worker restored from the latest checkpoint in ``checkpoints`` reads from the log again: those
    at or past the checkpoint's offsets (the checkpoint holds the rest, trained, buffered or in its joiner)."""
    latest = (checkpoints / "LATEST").read_text().strip()
    offsets = {int(p): o for p, o in orjson.loads((checkpoints / latest / "meta.json").read_bytes())["offsets"].items()}
    return {(p, o) for p, o in impressions if o >= offsets.get(p, 0)}


def held_to_the_end_of(bootstrap: str, topic: str, n: int, window_ms: int = WINDOW_MS) -> int:
    """:func:`held_to_the_end` of the ``n`` events in ``topic`` (a backlog produced already)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    events, deadline = [], time.monotonic() + 60
    try:
        while len(events) < n and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                events += [orjson.loads(r.value) for r in records]
    finally:
        consumer.close()
    assert len(events) == n
    return held_to_the_end(events, window_ms)


def held_to_the_end(events: list[dict], window_ms: int) -> int:
    """At most this many impressions wait for the graceful stop: those of the last two attribution windows
    (the joiner holds an impression until its partition's event time passes it by one window)."""
    end = max(e["ts_ms"] for e in events)
    return sum(e["type"] == "impression" and e["ts_ms"] > end - 2 * window_ms for e in events)
