"""Issue 19, item 4: the snapshot directory fills up, then goes read-only, mid-stream. The trainer keeps
training (no ActorDiedError), counts and reports every failed publish, leaves no temporary file behind,
keeps ``LATEST`` on the last whole version, and publishes again by itself once the directory takes writes;
offsets follow checkpoints, which live elsewhere, so no impression goes untrained.

Tests run as root, for whom permission bits do not block writes: the snapshot directory is a small tmpfs
that really fills up (ENOSPC) and is really remounted read-only (EROFS).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from learner import reporter
from learner.config import CadenceConfig
from learner.snapshots import SnapshotStore
from learner.worker import TrainerWorker
from tests.learner.test_crash_recovery import BATCH, EVERY, _delivery, _Progress, _trained, audited_backlog
from tests.learner.test_snapshots import fill, remount
from tests.reliability.test_unwritable_checkpoints import _until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


@pytest.fixture
def snapshot_fs(tmp_path: Path) -> Path:
    """A tmpfs big enough for the 10 + 1 snapshots of the test's model that a store holds (17 MB each)."""
    import subprocess

    mount = tmp_path / "snapfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256M", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _remounted(mount: Path, mode: str) -> bool:
    """Whether ``mount`` was remounted ``mode``; False while it is busy (a file open for writing blocks ``ro``)."""
    import subprocess

    done = subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0 or "busy" in done.stderr, done.stderr
    return done.returncode == 0


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def test_a_full_then_read_only_snapshot_dir_is_waited_out_and_publishing_resumes(
    kafka_bootstrap, unique_topic, tmp_path: Path, snapshot_fs: Path, monkeypatch
) -> None:
    # Retry sooner than in production (1 s doubling to 60 s), so that the phases below fit a short stream.
    monkeypatch.setattr(reporter, "PUBLISH_BACKOFF_S", 0.05)
    monkeypatch.setattr(reporter, "PUBLISH_BACKOFF_MAX_S", 0.5)
    config, impressions, n_events = audited_backlog(tmp_path, kafka_bootstrap, unique_topic, seed=11,
                                                    n_requests=4000, every=EVERY, batch=BATCH)
    snapshots = snapshot_fs / "snapshots"
    learner = replace(config.learner, cadence=replace(config.learner.cadence, snapshot_every_steps=1))
    config = replace(config, snapshot_dir=snapshots, learner=learner, read_ahead_batches=2)

    worker = TrainerWorker(config)
    thread = threading.Thread(target=worker.run, name="trainer", daemon=True)
    thread.start()
    trained = lambda: sum(_trained(tmp_path).values())  # noqa: E731
    stats = worker.loop.stats
    filler = None
    try:
        _until(lambda: (snapshots / "LATEST").exists(), 120, "a first snapshot", thread)
        failures_before = stats()["publish_failures"]
        filler = fill(snapshot_fs)
        full_at, trained_at_full = time.monotonic(), trained()
        # a publish under way when the disk filled may still land: LATEST is read once one has failed on it
        _until(lambda: stats()["publish_failures"] > failures_before, 120, "a failed publish on a full disk", thread)
        latest_at_full = (snapshots / "LATEST").read_text()
        _until(lambda: stats()["publish_failures"] >= 3 and trained() > trained_at_full + 3 * BATCH, 120,
               "failed publishes on a full disk while training goes on", thread)
        full_error, full_failures = stats()["last_publish_error"], stats()["publish_failures"]
        full_leftovers, latest_while_full = _leftovers(snapshots), (snapshots / "LATEST").read_text()
        # A publish that fails takes its partial files with it, and the bytes they held may take a smaller one: LATEST
        # may move while the disk is full, but only ever to a whole version, which reads back and verifies.
        whole_while_full, _ = SnapshotStore(snapshots).load(int(latest_while_full))
        fill(snapshot_fs)  # again: the bytes failed publishes freed
        # Still full, but a read-only file system refuses even the lock's open. A publish writing a file at that
        # moment makes the mount busy: the remount is tried again until none is.
        _until(lambda: _remounted(snapshot_fs, "ro"), 60, "the snapshot directory remounted read-only", thread)
        trained_at_ro = trained()
        _until(lambda: "Errno 30" in (stats()["last_publish_error"] or "") and trained() > trained_at_ro + 3 * BATCH,
               120, "failed publishes on a read-only directory while training goes on", thread)
        ro_error, outage = stats()["last_publish_error"], stats()["snapshot_outage_s"]
        remount(snapshot_fs, "rw")
        filler.unlink()
        filler = None
        fixed_at, published_at_fix = time.monotonic(), len(stats()["snapshots"])
        _until(lambda: len(stats()["snapshots"]) > published_at_fix, 120, "a snapshot once the directory is fixed",
               thread)
        resumed_s = time.monotonic() - fixed_at
        progress = _Progress(tmp_path, after=0, most=int(0.9 * len(impressions)))
        _until(progress.settled, 180, "the trainer to train the rest and go idle", thread)
    finally:
        remount(snapshot_fs, "rw")
        if filler is not None:
            filler.unlink()
        worker.stop()
        thread.join(120)
    final = worker.stats()
    worker.close()
    assert not thread.is_alive()

    lost, duplicates = _delivery(tmp_path, impressions)
    print(f"\nunwritable snapshots: {n_events} events produced, {len(impressions)} impressions, trained "
          f"{trained()}, lost {len(lost)}, duplicates {duplicates}; {full_failures} failed publishes on a full disk, "
          f"{final['publish_failures']} in all over {fixed_at - full_at:.1f} s (outage {outage:.1f} s when fixed); "
          f"publishing again {resumed_s:.2f} s after the fix; {len(final['snapshots'])} snapshots published; .tmp files left "
          f"{full_leftovers}\nfull: {full_error}\nread-only: {ro_error}")
    assert "[Errno 28] ENOSPC" in full_error and str(snapshots) in full_error
    assert "[Errno 30] EROFS" in ro_error
    assert full_leftovers == [] and _leftovers(snapshots) == []
    assert int(latest_while_full) >= int(latest_at_full) and whole_while_full.version == int(latest_while_full)
    assert final["snapshot_outage_s"] == 0.0 and final["refused_snapshots"] == {}
    assert final["checkpoint_failures"] == 0
    assert not lost
    assert duplicates == 0  # no restart: every impression trained exactly once
