"""The weight follower: verified snapshots only, versions forward only, the previous model kept on a refusal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from learner.snapshots import SnapshotStore
from serving.weights import LoadedModel, WeightFollower
from tests.serving.conftest import CORRUPTIONS, publish, publish_corrupt

NEVER = 3600.0  # poll period: these tests call refresh() themselves, so the thread never interferes


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


@contextmanager
def following(store: SnapshotStore) -> Iterator[WeightFollower]:
    """A follower of ``store`` that polls only when told (``refresh``), closed afterwards."""
    follower = WeightFollower(store.directory, poll_s=NEVER)
    try:
        yield follower
    finally:
        follower.close()


def test_follows_new_versions_and_reports_each_swap(store: SnapshotStore) -> None:
    publish(store, seed=1)
    swapped: list[int] = []
    follower = WeightFollower(store.directory, poll_s=NEVER, on_swap=lambda m: swapped.append(m.version))
    try:
        assert follower.current.version == 1 and not follower.current.model.training
        publish(store, seed=2)
        follower.refresh()
        assert follower.current.version == 2 and follower.swaps == 2 and swapped == [1, 2]
        follower.refresh()  # nothing new: no swap
        assert follower.swaps == 2
    finally:
        follower.close()


def test_weights_match_the_published_snapshot(store: SnapshotStore) -> None:
    manifest = publish(store, seed=5)
    with following(store) as follower:
        _, tensors = store.load(manifest.version)
        loaded = follower.current.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_corrupt_snapshot_is_refused_and_the_previous_keeps_serving(store: SnapshotStore) -> None:
    publish(store, seed=1)
    with following(store) as follower:
        bad = publish(store, seed=2)
        weights = store.directory / f"v{bad.version:06d}.safetensors"
        payload = bytearray(weights.read_bytes())
        payload[-1] ^= 0xFF
        weights.write_bytes(bytes(payload))
        follower.refresh()
        assert follower.current.version == 1
        assert "sha256" in follower.rejected[bad.version]
        follower.refresh()  # remembered: not re-read every poll
        assert list(follower.rejected) == [bad.version]
        publish(store, seed=3)
        follower.refresh()
        assert follower.current.version == 3


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_kind_of_corrupt_snapshot_is_refused_and_remembered(store: SnapshotStore, kind: str) -> None:
    publish(store, seed=1)
    with following(store) as follower:
        bad = publish_corrupt(store, kind, seed=2)
        follower.refresh()
        follower.refresh()
        assert follower.current.version == 1 and list(follower.rejected) == [bad]


def test_a_follower_started_while_latest_is_corrupt_serves_the_newest_good_version(store: SnapshotStore) -> None:
    """A replica that starts (or restarts) after a bad publish has no previous model to keep: it takes the newest
    kept version that verifies, not nothing (it used to answer 503 until the next good publish)."""
    publish(store, seed=1)
    good = publish(store, seed=2).version
    bad = [publish_corrupt(store, kind, seed=3 + i) for i, kind in enumerate(CORRUPTIONS)]
    with following(store) as follower:
        assert follower.current.version == good
        assert sorted(follower.rejected) == bad  # each tried once, newest first, on the way down to the good one
        follower.refresh()
        assert follower.current.version == good and follower.swaps == 1
        newest = publish(store, seed=9).version
        follower.refresh()
        assert follower.current.version == newest


def test_a_good_version_published_just_before_a_corrupt_one_is_not_skipped(store: SnapshotStore) -> None:
    publish(store, seed=1)
    with following(store) as follower:
        good = publish(store, seed=2).version
        bad = publish_corrupt(store, "bit flip", seed=3)  # lands before the follower polls again
        follower.refresh()
        assert follower.current.version == good and list(follower.rejected) == [bad]


def test_a_snapshot_superseded_while_loading_is_skipped_not_refused(store: SnapshotStore, monkeypatch) -> None:
    """The publisher keeps 10 versions: one read just as a newer publish prunes it is not a bad snapshot."""
    publish(store, seed=1)
    with following(store) as follower:
        publish(store, seed=2)
        real_payload = store.payload

        def read_while_a_newer_lands(version):
            publish(store, seed=3)  # lands after we read LATEST, before we read the weights ...
            (store.directory / f"v{version:06d}.safetensors").unlink()  # ... and prunes the ones we wanted
            return real_payload(version)

        monkeypatch.setattr(follower.store, "payload", read_while_a_newer_lands)
        follower.refresh()
        assert follower.current.version == 1 and not follower.rejected
        monkeypatch.setattr(follower.store, "payload", real_payload)
        follower.refresh()
        assert follower.current.version == 3


def test_a_version_republished_under_its_number_after_it_was_listed_is_superseded_not_refused(
        store: SnapshotStore, tmp_path: Path) -> None:
    """A store that started over may hold another v1 by the time the listed one is fetched: its bytes verify against
    their own manifest, not the one listed, and are neither served under the listed one nor held against it."""
    from serving.weights import StoreSource, Superseded

    publish(store, seed=1)
    source = StoreSource(store)
    [listed] = source.chain(1)
    assert listed.parse(listed.fetch()).keys() == store.load(1)[1].keys()
    restarted = SnapshotStore(store.directory.parent / "restarted")
    publish(restarted, seed=2)
    for name in ("v000001.safetensors", "v000001.json", "LATEST"):  # the store, started over, holds another v1
        (store.directory / name).write_bytes((restarted.directory / name).read_bytes())
    with pytest.raises(Superseded):
        listed.fetch()


def test_loaded_model_names_its_family(store: SnapshotStore) -> None:
    publish(store, seed=1)
    with following(store) as follower:
        assert isinstance(follower.current, LoadedModel) and follower.current.family == "mmoe"


def test_a_follower_reports_its_workers_niceness_before_any_version_is_published(store: SnapshotStore) -> None:
    import os
    import threading

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if own > 16:
        pytest.skip(f"this test runs at niceness {own}: no room for 3 steps below it")
    follower = WeightFollower(store.directory, poll_s=NEVER, nice=3)
    try:
        assert follower.current is None and follower.figures()["nice"] == own + 3
    finally:
        follower.close()
    assert WeightFollower(store.directory, poll_s=NEVER).figures()["nice"] is None, "0 steps: no worker, none lowered"
