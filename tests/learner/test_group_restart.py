"""Two trainer actors training one model data-parallel under Ray, on the real broker: kill one worker's
process mid-stream; the group re-forms from its last agreed checkpoint, nothing is lost, duplicates stay
within one checkpoint interval per worker, and both workers end with identical weights."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from infra.pipeline import start_trainers, wait_for
from learner.checkpoint import CheckpointStore
from learner.checkpoint import group_step
from tests.learner.test_crash_recovery import _delivery, _Progress, _trained, audited_backlog

pytestmark = pytest.mark.integration
EVERY, BATCH, WORKERS = 3, 128, 2


def test_a_killed_worker_rejoins_and_the_group_loses_nothing(
    ray_session, kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    ray = ray_session
    config, impressions, _ = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=13, n_requests=1600,
                                          every=EVERY, batch=BATCH)

    group = start_trainers(config, WORKERS, max_restarts=3)
    pids = ray.get([a.pid.remote() for a in group.actors], timeout=180)
    ckpts = tmp_path / "checkpoints"
    wait_for(lambda: group_step(ckpts, WORKERS) is not None and sum(_trained(tmp_path).values()) >= 4 * EVERY * BATCH,
             300, "an agreed group checkpoint and some training")
    os.kill(pids[1], signal.SIGKILL)
    before = sum(_trained(tmp_path).values())

    # Worker 0's next collective fails and it exits too; Ray restarts both, which meet again.
    wait_for(lambda: all(p not in pids for p in ray.get([a.pid.remote() for a in group.actors], timeout=180)),
             300, "both workers to be restarted")
    restored = [s["restored_step"] for s in group.stats()]
    assert restored[0] == restored[1] and restored[0] is not None
    progress = _Progress(tmp_path, after=before, most=int(0.9 * len(impressions)))
    wait_for(progress.settled, 300, "the group to train past the crash and go idle", every_s=0.5)
    finals = group.stop()
    for actor in group.actors:
        ray.kill(actor)

    lost, duplicates = _delivery(tmp_path, impressions)
    print(f"\ngroup restart: {len(impressions)} impressions, trained before kill {before}, restored step "
          f"{restored[0]}, lost {len(lost)}, duplicates {duplicates} (bound {WORKERS * EVERY * BATCH})")
    assert not lost
    assert duplicates <= WORKERS * EVERY * BATCH
    assert finals[0]["steps"] == finals[1]["steps"]
    step = group_step(ckpts, WORKERS)
    weights = [CheckpointStore(ckpts / f"rank-{r}").load(step).model for r in range(WORKERS)]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
