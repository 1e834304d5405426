"""Kill the trainer actor's process under Ray: Ray restarts it, it resumes from its checkpoint and the
committed offsets, its ``run`` is retried, and every produced impression is trained at least once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from infra.pipeline import start_trainer, wait_for
from tests.learner.test_crash_recovery import (_delivery, _Progress, _trained, audited_backlog, held_to_the_end_of,
                                              read_again)

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
EVERY, BATCH = 3, 128


def test_killed_actor_is_restarted_by_ray_and_resumes_from_its_checkpoint(
    ray_session, kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    ray = ray_session
    config, impressions, n_events = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=11, n_requests=1200,
                                                 every=EVERY, batch=BATCH)
    held = held_to_the_end_of(kafka_bootstrap, unique_topic, n_events)

    actor, run_ref = start_trainer(config, max_restarts=2)
    first_pid = ray.get(actor.pid.remote(), timeout=120)
    ckpts = tmp_path / "checkpoints"
    wait_for(lambda: (ckpts / "LATEST").exists() and sum(_trained(tmp_path).values()) >= 5 * EVERY * BATCH // 2,
             240, "a checkpoint and some training")
    os.kill(first_pid, signal.SIGKILL)
    before = sum(_trained(tmp_path).values())
    again = read_again(ckpts, impressions)  # the checkpoint the restarted actor resumes from: it writes none yet

    stats = ray.get(actor.stats.remote(), timeout=180)  # answered by the restarted process
    assert stats["pid"] != first_pid
    assert stats["restored_step"] is not None and stats["restored_step"] > 0
    progress = _Progress(tmp_path, after=before, most=int(0.9 * len(impressions)), again=again, slack=held + BATCH)
    wait_for(progress.settled, 300, "the restarted actor to train past the crash and go idle", every_s=0.5)
    ray.get(actor.stop.remote())
    final = ray.get(run_ref, timeout=120)  # the retried run, on the new process
    ray.get(actor.close.remote())
    assert final["pid"] == stats["pid"]

    lost, duplicates = _delivery(tmp_path, impressions)
    print(f"\nray restart: {len(impressions)} impressions, trained before kill {before}, restored step "
          f"{stats['restored_step']}, lost {len(lost)}, duplicates {duplicates}")
    assert not lost
    # at most what was trained after the checkpoint restored: with checkpoints written beside training, the last
    # one durable at the kill may be a write's worth of steps behind the last one taken
    assert duplicates <= before - stats["restored_step"] * BATCH
    ray.kill(actor)
