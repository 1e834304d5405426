"""A replica following a chain of versions (issue 22): deltas applied in place to the live model, equal to the
version materialised from the store; tombstoned ids scored with the default row; a bad delta refused while
the previous version keeps serving; a gap rebuilt from the next base; a late replica loading base and chain;
and the same through Ray's weight-store actor for a replica whose filesystem has none of the store."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from learner.delta import DeltaError, map_keys, rows_key
from infra.pipeline import wait_for
from learner.snapshots import SnapshotStore
from serving.weights import RaySource, WeightFollower
from tests.serving.conftest import Publisher

NEVER = 3600.0  # these tests call refresh() themselves


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots", max_deltas=1000)


@contextmanager
def following(source) -> Iterator[WeightFollower]:
    follower = WeightFollower(source, poll_s=NEVER)
    try:
        yield follower
    finally:
        follower.close()


def assert_serves(follower: WeightFollower, store: SnapshotStore, version: int) -> None:
    """The replica's model is, entry for entry, ``version`` as the store materialises it."""
    assert follower.current.version == version
    _, expected = store.load(version)
    served = follower.current.model.state_dict()
    assert set(served) == set(expected)
    for key, value in expected.items():
        assert torch.equal(served[key], value), key


def test_deltas_are_applied_in_place_and_equal_the_materialised_version(store: SnapshotStore) -> None:
    publisher = Publisher(store)
    publisher.base()
    with following(store.directory) as follower:
        model = follower.current.model
        for _ in range(5):
            version = publisher.delta()
            follower.refresh()
            assert_serves(follower, store, version)
        assert follower.current.model is model, "deltas go into the live model, not a new one"
        assert follower.deltas_applied == 5 and follower.rebuilds == 0 and not follower.rejected
        assert follower.figures()["apply_ms_p99"] is not None


def test_a_replica_reads_the_manifests_of_the_versions_it_lacks_not_the_whole_chain(
        store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain grows to ``learner.publish.max_deltas`` (1000 by default): a replica that walked it back to its base
    for every delta would pay for the chain's depth on every apply."""
    publisher = Publisher(store)
    publisher.base()
    with following(store.directory) as follower:
        reads = []
        real = SnapshotStore.manifest
        monkeypatch.setattr(SnapshotStore, "manifest", lambda self, version: reads.append(version) or real(self, version))
        for depth in range(1, 25):
            served = follower.current.version
            version = publisher.delta()
            reads.clear()
            follower.refresh()
            assert follower.current.version == version
            assert sorted(set(reads)) == [served, version], f"at depth {depth}"
        assert follower.deltas_applied == 24 and follower.rebuilds == 0
        assert_serves(follower, store, version)


def test_a_store_that_started_over_past_the_version_served_is_loaded_from_its_base_not_applied_on_top(
        store: SnapshotStore) -> None:
    """The store is emptied and published into again up to beyond the version the replica serves: its v3 is another
    v3 (another sha256), so v4 is not the change from the model served and the replica loads the new chain."""
    publisher = Publisher(store)
    publisher.base()
    publisher.delta()
    with following(store.directory) as follower:
        served = publisher.delta()
        follower.refresh()
        assert follower.current.version == served == 3
        for path in store.directory.iterdir():
            path.unlink()
        again = Publisher(store)
        again.step()  # other weights from the start: every version below differs from the old one of its number
        again.base()
        again.delta()
        assert again.delta() == served and store.manifest(served).sha256 != follower.current.manifest.sha256
        newest = again.delta()
        follower.refresh()
        assert_serves(follower, store, newest)
        assert follower.deltas_applied == 1, "nothing of the new store was applied on the old model"


@pytest.mark.parametrize("scope", ["bulk", "all"])
def test_a_replica_reads_and_writes_versions_below_the_requests_priority_and_installs_at_theirs(
        store: SnapshotStore, monkeypatch: pytest.MonkeyPatch, scope: str) -> None:
    """``serving.follower_nice``: the follower's bulk work (a version's bytes read and hashed, a delta's rows written,
    a base's load) runs on a thread of its own made nicer by that many steps; with ``serving.follower_nice_scope``
    "all" a delta's decoding and preparation run there too, with "bulk" at the requests' priority; what holds the
    lock a batch is scored under (the install, a fold's) runs at the requests' priority either way."""
    import serving.weights

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if own > 16:
        pytest.skip(f"this test runs at niceness {own}: no room for 3 steps below it")
    seen: dict[str, set[int]] = {}

    def recorded(stage: str, owner, name: str):
        fn = getattr(owner, name)

        def run(*args, **kwargs):
            seen.setdefault(stage, set()).add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return fn(*args, **kwargs)
        monkeypatch.setattr(owner, name, run)

    for stage, owner, name in (("fetch", SnapshotStore, "payload"), ("parse", serving.weights, "parse"),
                               ("prepare", serving.weights, "prepare_delta"),
                               ("settle", serving.weights, "settle_delta"),
                               ("install", serving.weights, "install_delta"),
                               ("read a base", serving.weights, "materialise")):
        recorded(stage, owner, name)
    publisher = Publisher(store)
    publisher.base()
    follower = WeightFollower(store.directory, poll_s=NEVER, handoff=True, nice=3, nice_scope=scope)
    try:
        with scoring(follower):
            for _ in range(3):
                version = publisher.delta()
                follower.refresh()
                assert_serves(follower, store, version)
        version = publisher.delta()
        follower.refresh()  # no batch comes: the follower's own thread installs it, at the requests' priority
        assert_serves(follower, store, version)
        publisher.base()
        newest = publisher.delta()
        follower.refresh()  # a new model from the new base and its delta
        assert_serves(follower, store, newest)
        python = own + 3 if scope == "all" else own
        # a base's (and its chain's) parsing is part of its load: bulk work, on the worker either way
        assert seen == {"fetch": {own + 3}, "parse": {python, own + 3}, "prepare": {python}, "settle": {own + 3},
                        "install": {own}, "read a base": {own + 3}}
        assert follower.figures()["nice"] == own + 3 and follower.figures()["nice_scope"] == scope
        assert follower.deltas_applied == 4
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    finally:
        follower.close()


def test_a_follower_refuses_an_unknown_scope_of_its_niceness(store: SnapshotStore) -> None:
    with pytest.raises(ValueError, match=r"nice_scope must be one of \['bulk', 'all'\], got 'some'"):
        WeightFollower(store.directory, poll_s=NEVER, nice=3, nice_scope="some")


@contextmanager
def scoring(follower: WeightFollower) -> Iterator[list[int]]:
    """A thread scoring batches as the ranker does: the lock held, a handed delta installed first; yields the
    versions its batches saw."""
    stop, seen = threading.Event(), []

    def batches() -> None:
        while not stop.wait(0.001):
            with follower.lock:
                follower.install_handed()
                seen.append(follower.current.version)

    thread = threading.Thread(target=batches, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)


def test_a_replica_installs_each_delta_on_its_scoring_thread_between_two_batches(store: SnapshotStore) -> None:
    publisher = Publisher(store)
    publisher.base()
    follower = WeightFollower(store.directory, poll_s=NEVER, handoff=True)
    try:
        with scoring(follower) as seen:
            for _ in range(4):
                version = publisher.delta()
                follower.refresh()
                assert_serves(follower, store, version)
        assert follower.installed_by_scorer == 4 and follower.deltas_applied == 4
        assert seen == sorted(seen) and seen[-1] == version, "batches see versions in order, each whole"
        version = publisher.delta()
        follower.refresh()  # no batch comes: the follower installs it itself
        assert_serves(follower, store, version)
        assert follower.installed_by_scorer == 4 and follower.deltas_applied == 5
    finally:
        follower.close()


def test_an_install_that_fails_on_the_scoring_thread_refuses_the_version_not_the_batch(
        store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.weights

    publisher = Publisher(store)
    publisher.base()
    follower = WeightFollower(store.directory, poll_s=NEVER, handoff=True)
    try:
        served = follower.current.version

        def fails(model, prepared) -> None:
            raise DeltaError("maps changed since the delta was prepared")
        monkeypatch.setattr(serving.weights, "install_delta", fails)
        with scoring(follower) as seen:
            bad = publisher.delta()
            follower.refresh()
        assert follower.current.version == served and "maps changed" in follower.rejected[bad]
        assert seen and set(seen) == {served}
    finally:
        follower.close()


def test_a_tombstoned_id_is_scored_with_the_default_row_never_its_old_one(store: SnapshotStore) -> None:
    publisher = Publisher(store)
    publisher.base()
    with following(store.directory) as follower:
        key = next(k for k in map_keys(follower.current.model.state_dict()) if k.endswith("user_id"))
        field = "user_id"
        mapped_before = follower.current.model.state_dict()[key].clone()
        tombstoned = set()
        for _ in range(6):  # ttl 3 ms of event time, one ms per step: ids of the base expire
            publisher.delta()
            follower.refresh()
            tombstoned |= {int(i) for m in [store.read_delta(follower.current.version)[1].maps[key]]
                           for i in m.tombstones}
        gone = sorted(tombstoned - set(follower.current.model.state_dict()[key].tolist()))
        assert gone and set(gone) & set(mapped_before.tolist()), "ids the base mapped were tombstoned"
        encoder = follower.current.model.encoder
        rows = encoder.map_rows(field, torch.tensor(gone))
        assert rows.eq(0).all(), "a tombstoned id reads the default row"
        state = follower.current.model.state_dict()
        assert not torch.isin(torch.tensor(gone), state[key]).any()
        assert state[rows_key(key)].ne(0).all()


def test_a_corrupt_delta_is_refused_and_the_previous_version_keeps_serving(store: SnapshotStore) -> None:
    publisher = Publisher(store)
    publisher.base()
    good = publisher.delta()
    with following(store.directory) as follower:
        assert follower.current.version == good
        bad = publisher.delta()
        payload = store.directory / f"v{bad:06d}.delta.safetensors"
        corrupted = bytearray(payload.read_bytes())
        corrupted[len(corrupted) // 2] ^= 0xFF
        payload.write_bytes(bytes(corrupted))
        follower.refresh()
        assert follower.current.version == good and "sha256" in follower.rejected[bad]
        after = publisher.delta()  # its parent is the refused one: unreachable until the next base
        follower.refresh()
        assert follower.current.version == good and after > bad
        newest = publisher.base()
        follower.refresh()
        assert_serves(follower, store, newest)


def test_a_gap_in_the_chain_keeps_the_version_serving_until_a_base_arrives(store: SnapshotStore) -> None:
    publisher = Publisher(store)
    publisher.base()
    with following(store.directory) as follower:
        served = follower.current.version
        lost, after = publisher.delta(), publisher.delta()
        (store.directory / f"v{lost:06d}.json").unlink()
        (store.directory / f"v{lost:06d}.delta.safetensors").unlink()
        follower.refresh()
        assert follower.current.version == served and "gap" in follower.rejected[after]
        newest = publisher.base()
        follower.refresh()
        assert_serves(follower, store, newest)


def test_a_late_replica_loads_the_newest_base_and_its_chain(store: SnapshotStore) -> None:
    publisher = Publisher(store)
    publisher.base()
    for _ in range(3):
        publisher.delta()
    publisher.base()
    versions = [publisher.delta() for _ in range(4)]
    with following(store.directory) as follower:
        assert_serves(follower, store, versions[-1])
        assert follower.swaps == 1 and follower.deltas_applied == 0


@pytest.mark.integration
def test_a_replica_without_the_store_follows_every_version_through_the_weight_store(ray_session, tmp_path: Path,
                                                                                  store: SnapshotStore) -> None:
    """The replica's source is Ray only (its own filesystem has no snapshots): base and deltas arrive through the
    weight-store actor; after the actor restarts empty, the publisher's next offer brings the chain back."""
    import ray

    from learner.weight_store import offer, weight_store

    actor = weight_store(f"test-{tmp_path.name}")
    try:
        publisher = Publisher(store)

        def offered(version: int) -> bool:
            """Offer ``version`` as learner.reporter does (its chain to an actor that lost its state); False while
            the actor is restarting (after the kill below, or after Ray's memory monitor killed it), which the
            reporter survives and makes up for with its next offer."""
            try:
                manifest, payload = store.payload(version)
                if not offer(actor, version, manifest.base, manifest.to_json(), payload):
                    for link in store.chain(version):
                        offer(actor, link.version, link.base, link.to_json(), store.payload(link.version)[1])
            except ray.exceptions.ActorUnavailableError:
                return False
            return True

        def publish(kind) -> int:
            version = kind()
            wait_for(lambda: offered(version), 60, f"the weight store to take v{version}")
            return version

        publish(publisher.base)
        with following(RaySource(actor)) as follower:
            for _ in range(3):
                version = publish(publisher.delta)
                follower.refresh()
                assert_serves(follower, store, version)
            assert follower.deltas_applied == 3
            assert [v for v, _, _ in ray.get(actor.chain_to.remote(version, version - 1))] == [version - 1, version]
            ray.kill(actor, no_restart=False)  # restarts empty (max_restarts=-1)

            def restarted_empty() -> bool:
                try:
                    return ray.get(actor.held.remote(), timeout=10) == []
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    return False

            wait_for(restarted_empty, 60, "the weight store to restart")
            version = publish(publisher.delta)
            wait = [ray.get(actor.held.remote())]
            assert wait[0][-1] == version and len(wait[0]) >= 2, "the chain was offered again"
            follower.refresh()
            assert_serves(follower, store, version)
    finally:
        ray.kill(actor, no_restart=True)


@pytest.mark.integration
def test_a_version_over_ray_max_bytes_reaches_replicas_from_the_durable_store(ray_session, tmp_path: Path,
                                                                               store: SnapshotStore) -> None:
    """A large model's base goes to the weight store as its manifest only (``learner.publish.ray_max_bytes``):
    a replica reads it from the durable store and its deltas through Ray; a replica with no store refuses it,
    saying why, and serves nothing rather than something half-loaded."""
    from learner.weight_store import offer, weight_store
    from serving.weights import StoreSource

    actor = weight_store(f"test-large-{tmp_path.name}")
    try:
        publisher = Publisher(store)
        base = publisher.base()
        manifest = store.manifest(base)
        assert offer(actor, base, base, manifest.to_json(), None)  # as learner.reporter offers one over the cap
        versions = []
        for _ in range(3):
            versions.append(publisher.delta())
            manifest, payload = store.payload(versions[-1])
            assert offer(actor, manifest.version, manifest.base, manifest.to_json(), payload)
        import ray

        held = ray.get(actor.chain_to.remote(versions[-1]))
        assert [len(payload) for _, _, payload in held] == [0, 1, 1, 1]
        with following(RaySource(actor, StoreSource(store))) as follower:
            assert_serves(follower, store, versions[-1])
            assert follower.rebuilds + follower.swaps >= 1 and not follower.rejected
        with following(RaySource(actor)) as follower:
            assert follower.current is None
            assert "durable store only" in follower.rejected[base]
    finally:
        import ray

        ray.kill(actor, no_restart=True)


def test_the_reporter_offers_a_version_over_ray_max_bytes_as_its_manifest_only(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """learner.reporter reads no payload for a version over the cap and hands the actor its manifest only."""
    from dataclasses import replace

    import learner.weight_store
    from features.memory import InMemoryFeatures
    from learner.config import PublishConfig
    from learner.loop import TrainingLoop
    from tests.learner.test_read_ahead import CONFIG

    offers: list[tuple[int, bytes | None]] = []

    def offer(actor, version, base, manifest, payload) -> bool:  # the actor's side is the test above's
        offers.append((version, payload))
        return True

    monkeypatch.setattr(learner.weight_store, "offer", offer)
    for cap, expect_payload in ((0, False), (1 << 30, True)):
        offers.clear()
        config = replace(CONFIG, publish=PublishConfig(ray_max_bytes=cap))
        loop = TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(tmp_path / str(cap)))
        loop.reporter.weight_store = object()  # a handle: only the patched offer sees it
        try:
            assert loop.publish() is not None
        finally:
            loop.close()
        assert len(offers) == 1 and (offers[0][1] is not None) == expect_payload, cap
