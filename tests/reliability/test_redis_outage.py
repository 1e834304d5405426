"""Issue 19, item 5: the Redis online store is killed mid-run (SIGKILL) and started again on the same port.
The trainer waits it out instead of crashing: it trains no step on features it could not read, commits no
offset while the store is away, counts the outage, and goes on by itself when Redis is back; every
impression is trained exactly once (no Ray restart, so no replay).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from learner.worker import TrainerWorker
from tests.features.test_outages import KillableRedis
from tests.learner.test_crash_recovery import BATCH, EVERY, _delivery, _Progress, _trained, audited_backlog
from tests.reliability.test_unwritable_checkpoints import _group_offsets, _until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

DOWN_S = 8.0
"""How long the server stays away once the trainer has noticed."""


def test_a_killed_redis_is_waited_out_and_every_impression_trained(kafka_bootstrap, unique_topic,
                                                                    tmp_path: Path) -> None:
    config, impressions, n_events = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=13,
                                                    n_requests=3000, every=EVERY, batch=BATCH)
    group = config.kafka.group_id
    with KillableRedis(tmp_path / "redis") as server:
        features = replace(config.features, online_store="redis", redis_connection=server.address)
        worker = TrainerWorker(replace(config, features=features, read_ahead_batches=2))
        thread = threading.Thread(target=worker.run, name="trainer", daemon=True)
        thread.start()
        stats = worker.loop.stats
        try:
            _until(lambda: stats()["steps"] >= 2 * EVERY and _group_offsets(kafka_bootstrap, group), 120,
                   "training and a commit", thread)
            steps_before = stats()["steps"]
            server.kill()
            killed_at = time.monotonic()
            _until(lambda: stats()["feature_store_outages"] == 1, 60, "the trainer to notice the outage", thread)
            noticed = stats()
            committed_while_down = _group_offsets(kafka_bootstrap, group)
            time.sleep(DOWN_S)  # the outage itself: the trainer must sit it out
            down = stats()
            assert thread.is_alive()
            committed_after_wait = _group_offsets(kafka_bootstrap, group)
            server.start()
            back_at = time.monotonic()
            _until(lambda: stats()["steps"] > down["steps"], 60, "training to resume once Redis is back", thread)
            resumed_s = time.monotonic() - back_at
            progress = _Progress(tmp_path, after=0, most=int(0.9 * len(impressions)))
            _until(progress.settled, 180, "the trainer to train the rest and go idle", thread)
        finally:
            worker.stop()
            thread.join(120)
        final = worker.stats()
        worker.close()
    assert not thread.is_alive()

    lost, duplicates = _delivery(tmp_path, impressions)
    trained = sum(_trained(tmp_path).values())
    print(f"\nredis outage: {n_events} events produced, {len(impressions)} impressions sent, {trained} trained, lost "
          f"{len(lost)}, duplicates {duplicates}; Redis killed at step {steps_before}, trainer paused at step "
          f"{noticed['steps']} (still {down['steps']} after {DOWN_S:.0f} s down), {final['steps']} steps at the end; "
          f"outages {final['feature_store_outages']}, down {final['feature_store_down_s']:.1f} s (killed to back "
          f"{back_at - killed_at:.1f} s); training again {resumed_s:.2f} s after the restart; committed while down "
          f"{committed_while_down} -> {committed_after_wait}")
    assert down["steps"] == noticed["steps"] and down["examples_trained"] == noticed["examples_trained"]
    assert committed_after_wait == committed_while_down  # nothing committed while the store was away
    assert final["feature_store_outages"] == 1 and 0 < final["feature_store_down_s"] <= back_at - killed_at + 30
    assert not lost and trained == len(impressions)
    assert duplicates == 0  # no restart: every impression trained exactly once
