"""Scenario g of issue 9: the checkpoint directory becomes unwritable mid-stream. The trainer reports a
clear error and keeps training, commits no offset past its last durable checkpoint, and checkpoints and
commits again once the directory is writable again; no impression goes untrained.

Tests run as root, for whom permission bits do not block writes; a regular file in the directory's place does:
nothing can be created under it. The checkpoint path is a symlink swapped atomically (a new link renamed over it)
between the real directory and a regular file, so the trainer never finds the path missing, which it would
recreate as an empty directory in the instant between taking the file away and putting the directory back.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from kafka import KafkaAdminClient

from learner.worker import TrainerWorker
from tests.learner.test_crash_recovery import BATCH, EVERY, _delivery, _Progress, _trained, audited_backlog

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _until(predicate, timeout_s: float, what: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert thread.is_alive(), f"the trainer stopped while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _point(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` in one step: the trainer sees the old target or the new, never neither."""
    new = link.with_name(f"{link.name}.new")
    new.unlink(missing_ok=True)
    new.symlink_to(target)
    os.replace(new, link)


def _group_offsets(bootstrap: str, group: str) -> dict[int, int]:
    """What the broker holds as the trainer group's committed offsets (not what the worker believes)."""
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def _durable_offsets(ckpts: Path) -> tuple[int, dict[int, int]]:
    """The step and offsets of the last checkpoint made durable in ``ckpts``."""
    meta = orjson.loads((ckpts / (ckpts / "LATEST").read_text().strip() / "meta.json").read_bytes())
    return meta["step"], {int(p): o for p, o in meta["offsets"].items()}


def test_unwritable_checkpoint_dir_holds_commits_back_until_writable_again(
    kafka_bootstrap, unique_topic, tmp_path: Path
) -> None:
    config, impressions, n_events = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=7, n_requests=1200,
                                          every=EVERY, batch=BATCH)

    ckpts, store, blocker = config.checkpoint_dir, tmp_path / "checkpoint-store", tmp_path / "not-a-directory"
    store.mkdir()
    if ckpts.is_dir():
        ckpts.rmdir()  # empty: nothing has run yet
    _point(ckpts, store)
    blocker.write_text("not a directory: checkpoints cannot be written under this path\n")
    # A checkpoint at every cadence step (no share bound: learner.cadence.checkpoint_max_share), so that the failures
    # come while the backlog lasts; the bound only spaces the attempts out.
    cadence = replace(config.learner.cadence, checkpoint_max_share=1.0)
    worker = TrainerWorker(replace(config, read_ahead_batches=2, learner=replace(config.learner, cadence=cadence)))
    thread = threading.Thread(target=worker.run, name="trainer", daemon=True)
    thread.start()
    group = config.kafka.group_id
    try:
        _until(lambda: (ckpts / "LATEST").exists() and _group_offsets(kafka_bootstrap, group), 120,
               "a durable checkpoint and a commit", thread)
        _point(ckpts, blocker)
        broken_at, trained_at_break = time.monotonic(), sum(_trained(tmp_path).values())
        _until(lambda: worker.loop.checkpoint_failures >= 2 and sum(_trained(tmp_path).values()) > trained_at_break + EVERY * BATCH,
               120, "two failed checkpoints while training goes on", thread)
        error = worker.loop.last_checkpoint_error
        durable_step, durable = _durable_offsets(store)
        committed = _group_offsets(kafka_bootstrap, group)
        trained_while_broken = sum(_trained(tmp_path).values()) - trained_at_break

        _point(ckpts, store)
        fixed_at = time.monotonic()
        _until(lambda: _durable_offsets(ckpts)[0] > durable_step and _group_offsets(kafka_bootstrap, group) != committed,
               120, "a new checkpoint and commit once the directory is writable", thread)
        # a checkpoint written beside training that was under way at the fix may still fail; once a later one is
        # durable (one at a time), that one has been counted
        failures = worker.loop.checkpoint_failures
        recovered_s = time.monotonic() - fixed_at
        progress = _Progress(tmp_path, after=0, most=int(0.9 * len(impressions)))
        _until(progress.settled, 180, "the trainer to train the rest and go idle", thread)
    finally:
        _point(ckpts, store)
        worker.stop()
        thread.join(120)
    stats = worker.stats()
    worker.close()
    assert not thread.is_alive()

    lost, duplicates = _delivery(tmp_path, impressions)
    print(f"\nunwritable checkpoints: {n_events} events produced, {len(impressions)} impressions, "
          f"trained {sum(_trained(tmp_path).values())} ({trained_while_broken} while unwritable), lost {len(lost)}, "
          f"duplicates {duplicates}; {failures} failed checkpoints over {fixed_at - broken_at:.1f} s, "
          f"commits held at step {durable_step}: committed {committed} <= checkpointed {durable}; "
          f"checkpointing and committing again {recovered_s:.1f} s after the fix\nerror: {error}")
    assert error == f"cannot write checkpoint to {ckpts}: it is not a directory"
    assert all(offset <= durable.get(part, 0) for part, offset in committed.items())
    assert stats["checkpoint_failures"] == failures  # none once checkpoints were durable again
    assert not lost
    assert duplicates == 0  # no restart: every impression trained exactly once
