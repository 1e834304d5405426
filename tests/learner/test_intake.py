"""The intake thread against the real broker: it reads ahead within its bound, commits only what a
checkpoint covered, and reports trained offsets held back by what is still buffered."""

from __future__ import annotations

import time

import pytest

from infra.pipeline import wait_for
from learner.intake import Intake, IntakeError
from stream.joined import JoinedStream
from stream.joiner import JoinerConfig
from stream.kafka_io import EventSink, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig
from tests.learner.test_crash_recovery import _impression_offsets

pytestmark = pytest.mark.integration


def _committed(config: KafkaConfig) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=config.bootstrap_servers, group_id=config.group_id,
                             enable_auto_commit=False)
    try:
        parts = [TopicPartition(config.topic, p) for p in range(config.partitions)]
        return {tp.partition: off for tp in parts if (off := consumer.committed(tp)) is not None}
    finally:
        consumer.close()


def test_read_ahead_is_bounded_and_commits_follow_the_captured_cut(kafka_bootstrap, unique_topic) -> None:
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic=unique_topic, group_id=f"{unique_topic}.g",
                         partitions=2, max_batch=100, max_wait_ms=100)
    ensure_topics(config)
    events = list(Simulator(SimulatorConfig(seed=5, max_delay_s=0.2)).events(int(time.time() * 1000), 400))
    sink = EventSink(config)
    sink.send_all(events)
    sink.close()
    impressions = _impression_offsets(kafka_bootstrap, unique_topic, len(events))

    stream = JoinedStream(config, JoinerConfig(window_ms=200))
    stream.auto_commit = False
    intake = Intake(stream, max_buffered=150)
    intake.start()
    try:
        wait_for(lambda: intake.buffered() >= 150, 180, "the buffer to fill")  # a safety net: 60 s ran out at load 9
        # Bounded: the thread stops fetching once the buffer holds max_buffered rows (one joined batch over).
        time.sleep(0.5)  # give an unbounded reader the time to overshoot: a bound is checked, not awaited
        assert intake.buffered() < 150 + 2 * config.max_batch

        buffer, _, covered = intake.capture()
        trained = intake.trained_offsets()
        assert buffer.num_rows >= 150 and set(trained) <= set(covered)
        assert all(trained[p] <= covered[p] for p in trained)
        first = {p: min(o for (q, o) in impressions if q == p) for p in trained}
        assert all(trained[p] <= first[p] for p in trained)  # nothing trained yet: held at the first impression

        intake.commit(covered)
        taken = 0
        while taken < len(impressions) - 50:
            ahead, held = intake.peek(100), intake.buffered()
            batch = intake.take(100)  # the thread only appends: the head peeked is the head taken
            assert held >= ahead.num_rows and batch.slice(0, ahead.num_rows).equals(ahead)
            taken += batch.num_rows
            intake.wait(1, 10)
        wait_for(lambda: stream.committed == covered, 30, "the captured offsets to be committed")
    finally:
        intake.stop()
    intake.check()
    assert _committed(config) == covered  # exactly the cut, though far more was acknowledged since
    intake.drain()
    stream.close()


def test_a_failing_fetch_is_raised_in_the_trainer_thread(kafka_bootstrap, unique_topic) -> None:
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic=unique_topic, group_id=f"{unique_topic}.g",
                         partitions=1, max_wait_ms=50)
    ensure_topics(config)
    stream = JoinedStream(config)

    def broken() -> None:
        raise OSError("disk on fire")

    stream.source.next_batch = broken
    intake = Intake(stream, max_buffered=10)
    intake.start()
    intake.wait(1, 30)
    with pytest.raises(IntakeError, match="disk on fire"):
        intake.check()
    intake.stop()
    stream.close()
