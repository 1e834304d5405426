"""JoinedStream against the real broker: acknowledgement-driven commits and a rebalance mid-stream."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from stream.joined import JoinedStream
from stream.joiner import JoinerConfig
from stream.kafka_io import EventSink, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig

pytestmark = pytest.mark.integration


def _produce(config: KafkaConfig, n_requests: int, seed: int) -> tuple[int, set[tuple[str, int]]]:
    sim = Simulator(SimulatorConfig(seed=seed, max_delay_s=1.0))
    events = list(sim.events(int(time.time() * 1000), n_requests))
    sink = EventSink(config)
    sink.send_all(events)
    sink.close()
    return len(events), {(e["request_id"], e["item_id"]) for e in events if e["type"] == "impression"}


STALL_S = 20.0
"""A member that holds partitions with events waiting and fetches nothing for this long re-joins its group, as the
trainer's intake watchdog does (``learner.intake``): kafka-python can leave an assigned consumer fetching nothing
until the next rebalance (seen once here in CI: all four partitions assigned, nothing consumed in 120 s; cf.
dpkp/kafka-python#3131)."""


class Member(threading.Thread):
    """A group member that 'trains' by recording examples and acknowledges them right away."""

    def __init__(self, config: KafkaConfig, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.stream = JoinedStream(config, JoinerConfig(window_ms=1_500))
        self.done, self.seen, self.error = done, Counter(), None
        self.idle = threading.Event()
        self.rejoins = 0

    def run(self) -> None:
        try:
            progress = (self.stream.stats.consumed, time.monotonic())
            while not self.done.is_set():
                examples = self.stream.poll()
                self._record(examples)
                self.stream.ack(examples)
                waiting = any(self.stream.lag().values())
                idle = examples.num_rows == 0 and self.stream.stats.assigned and not waiting
                self.idle.set() if idle else self.idle.clear()
                if self.stream.stats.consumed != progress[0] or not waiting:
                    progress = (self.stream.stats.consumed, time.monotonic())
                elif time.monotonic() - progress[1] > STALL_S:  # the watchdog's remedy: a rebalance
                    self.stream.source.rejoin()
                    self.rejoins += 1
                    progress = (self.stream.stats.consumed, time.monotonic())
            examples = self.stream.flush()
            self._record(examples)
            self.stream.ack(examples)
        except Exception as exc:  # surfaced by the test thread
            self.error = exc
        finally:
            self.stream.close()

    def _record(self, examples) -> None:
        self.seen.update(zip(examples.column("request_id").to_pylist(), examples.column("item_id").to_pylist()))


def test_a_second_member_joining_mid_stream_loses_nothing(kafka_bootstrap, unique_topic) -> None:
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic=unique_topic, group_id=f"{unique_topic}.g",
                         partitions=4, max_batch=200, max_wait_ms=100)
    ensure_topics(config)
    produced, impressions = _produce(config, 800, seed=21)
    done = threading.Event()
    first = Member(config, done)
    first.start()
    deadline = time.monotonic() + 120
    while first.stream.stats.consumed < produced // 2:
        assert first.error is None, first.error
        assert time.monotonic() < deadline, f"the first member made no progress: {first.stream.stats}"
        time.sleep(0.05)
    second = Member(config, done)
    second.start()
    while not second.stream.stats.assigned:  # the rebalance happened while the stream is still flowing
        assert first.error is None and second.error is None, (first.error, second.error)
        assert time.monotonic() < deadline, f"the second member was never assigned partitions: {second.stream.stats}"
        time.sleep(0.05)
    more, more_impressions = _produce(config, 800, seed=22)
    produced, impressions = produced + more, impressions | more_impressions
    while not (first.idle.is_set() and second.idle.is_set() and second.stream.stats.assigned):
        assert time.monotonic() < deadline, f"not drained: {first.stream.stats}, {second.stream.stats}"
        assert first.error is None and second.error is None, (first.error, second.error)
        time.sleep(0.1)
    done.set()
    first.join(60)
    second.join(60)
    assert first.error is None and second.error is None, (first.error, second.error)

    trained = first.seen + second.seen
    assert set(trained) == impressions  # nothing lost
    duplicates = sum(trained.values()) - len(impressions)
    print(f"\nrebalance: produced {produced} events, {len(impressions)} impressions, {duplicates} re-delivered "
          f"examples; member 1 {first.stream.stats}; member 2 {second.stream.stats}; stalls re-joined: "
          f"{first.rejoins}, {second.rejoins}")
    assert first.stream.stats.rebalances >= 1
    assert second.stream.stats.handed_out >= len(more_impressions) // 4  # the newcomer really took over work
    assert first.stream.stats.assigned and second.stream.stats.assigned
    assert not set(first.stream.stats.assigned) & set(second.stream.stats.assigned)
    assert duplicates <= len(impressions) // 2  # re-delivery is bounded by what was in flight at the rebalance
