"""A base that compaction makes due is written beside training (issue 22): training and deltas go on along the old
chain meanwhile; the base then goes out with the delta that brings it up to date, ``LATEST`` straight to that
delta; a replica that went through the base's version applies the delta in place and never reads the base; a
cold one loads base and delta. A base given up (its file gone, a rollback in between) costs nothing but itself."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from features.memory import InMemoryFeatures
from infra.pipeline import wait_for
from learner.config import PublishConfig
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from learner.weight_store import WeightStore
from serving.weights import WeightFollower
from tests.learner.test_distributed import _batch
from tests.learner.test_read_ahead import CONFIG

BATCH = 48
NEVER = 3600.0  # the followers here refresh when told
DELTAS = 3
"""Deltas after which the store makes a base due."""


def _loop(tmp_path: Path, **publish) -> tuple[TrainingLoop, SnapshotStore]:
    config = replace(CONFIG, cadence=replace(CONFIG.cadence, snapshot_every_steps=1),  # a version every step
                     publish=PublishConfig(**publish))
    store = SnapshotStore(tmp_path / "snapshots", max_deltas=DELTAS, max_delta_bytes=2**40)
    return TrainingLoop.local(config, InMemoryFeatures(), store, batch_size=BATCH), store


class _Gate:
    """Holds the base's writing thread until opened: deltas go out while the base is being written."""

    def __init__(self, store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        write = store.write_pending

        def held(state, same_as):
            assert self.open.wait(60), "the gate was never opened"
            return write(state, same_as)
        monkeypatch.setattr(store, "write_pending", held)


def _step(loop: TrainingLoop) -> int:
    """One step (a version each); the version ``LATEST`` names after it."""
    loop.step(_batch(loop.learner.step, 0, BATCH))
    return loop.reporter.snapshots.latest_version()


def _until_base_due(loop: TrainingLoop) -> None:
    """The run's base (v1) and ``DELTAS`` deltas: the last one's publish starts a base beside training."""
    for _ in range(DELTAS + 1):
        _step(loop)
    assert loop.beside.running


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def _written(loop: TrainingLoop) -> None:
    wait_for(lambda: loop.beside._job is not None and loop.beside._job.done(), 60, "the base written beside")


def test_a_base_is_written_beside_training_and_a_following_replica_takes_it_through_its_delta_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop, store = _loop(tmp_path)
    gate = _Gate(store, monkeypatch)
    try:
        assert _step(loop) == 1 and store.manifest(1).kind == "base"  # a new run: the whole model, here
        follower = WeightFollower(store.directory, poll_s=NEVER)
        model = follower.current.model
        for version in (2, 3, 4):
            assert _step(loop) == version
        follower.refresh()  # the replica serves v4, whose state the base will hold
        assert loop.beside.running and store.manifest(4).kind == "delta"
        same_as = store.load(4)[1]
        assert _step(loop) == 5 and _step(loop) == 6  # the old chain goes on while the base is written
        assert store.manifest(6).kind == "delta" and store.manifest(6).depth == 5
        follower.refresh()
        assert follower.current.version == 6
        gate.open.set()
        _written(loop)
        assert _step(loop) == 8  # the base (v7) and its catch-up delta (v8) in one publish
        base, delta = store.manifest(7), store.manifest(8)
        assert base.kind == "base" and base.data["same_as"] == {"version": 4, "sha256": store.manifest(4).sha256}
        assert delta.kind == "delta" and delta.parent == 7 and delta.depth == 1
        _equal(store.load(7)[1], same_as)  # the base holds v4's state, entry for entry
        _equal(store.load(8)[1], loop.learner.weights())  # and base + delta are the trainer's state now

        follower.refresh()  # v6 -> v8 through the delta alone: the base is not read, no model is built
        assert follower.current.version == 8 and follower.current.model is model
        assert follower.adopted == 1 and follower.rebuilds == 0 and not follower.rejected
        _equal(follower.current.model.state_dict(), store.load(8)[1])
        assert _step(loop) == 9 and store.manifest(9).parent == 8  # the new chain goes on
        follower.refresh()
        assert follower.current.version == 9 and follower.deltas_applied == 7  # v2-v6, v8, v9
        _equal(follower.current.model.state_dict(), store.load(9)[1])
        follower.close()

        cold = WeightFollower(store.directory, poll_s=NEVER)  # a replica starting now loads base, then deltas
        assert cold.current.version == 9 and cold.adopted == 0
        _equal(cold.current.model.state_dict(), store.load(9)[1])
        cold.close()
        figures = loop.reporter.publish_figures()["published_versions"]
        assert figures["capture"]["n"] == 1 and figures["base"]["n"] == 2  # the run's first base, and this one
    finally:
        gate.open.set()
        loop.close()


def test_a_replica_on_a_version_before_the_bases_goes_through_the_base(tmp_path: Path) -> None:
    """A replica whose model never went through the version the base holds cannot take the delta alone."""
    loop, store = _loop(tmp_path)
    try:
        _step(loop)
        follower = WeightFollower(store.directory, poll_s=NEVER)  # serves v1
        for _ in range(3):
            _step(loop)
        _written(loop)
        assert _step(loop) == 6 and store.manifest(5).data["same_as"]["version"] == 4
        follower.refresh()
        assert follower.current.version == 6 and follower.adopted == 0
        _equal(follower.current.model.state_dict(), store.load(6)[1])
        follower.close()
    finally:
        loop.close()


def test_with_base_beside_off_a_base_due_is_written_on_the_training_thread(tmp_path: Path) -> None:
    loop, store = _loop(tmp_path, base_beside=False)
    try:
        versions = [_step(loop) for _ in range(5)]
        assert versions == [1, 2, 3, 4, 5] and store.manifest(5).kind == "base" and not loop.beside.running
        assert "same_as" not in store.manifest(5).data
    finally:
        loop.close()


def test_a_base_whose_file_another_writer_removed_is_given_up_and_the_chain_goes_on(tmp_path: Path) -> None:
    loop, store = _loop(tmp_path)
    try:
        _until_base_due(loop)
        _written(loop)
        pending = loop.beside._job.result()
        (store.directory / pending.name).unlink()  # a rollback from another process took it for a leftover
        assert _step(loop) == 4  # refused: nothing published
        assert loop.reporter.refused == {"error": 1} and not loop.beside.running
        assert _step(loop) == 5 and store.manifest(5).kind == "delta"  # the old chain goes on
        assert loop.beside.running  # and another base is on its way
        _written(loop)
        assert _step(loop) == 7 and store.manifest(6).data["same_as"]["version"] == 5
        _equal(store.load(7)[1], loop.learner.weights())
    finally:
        loop.close()


def test_a_rollback_while_the_base_is_written_gives_it_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop, store = _loop(tmp_path)
    gate = _Gate(store, monkeypatch)
    try:
        _until_base_due(loop)
        SnapshotStore(store.directory).rollback(2)  # v5: serving follows v2's state now
        gate.open.set()
        assert _step(loop) == 6 and store.manifest(6).kind == "base"  # no chain to continue: a whole base, here
        assert not loop.beside.running
        wait_for(lambda: not [p for p in store.directory.iterdir() if p.name.startswith(".base.tmp-")], 60,
                 "the given-up base's file to go")
    finally:
        gate.open.set()
        loop.close()


def test_a_killed_publisher_s_base_file_is_a_leftover_for_the_next(tmp_path: Path) -> None:
    loop, store = _loop(tmp_path)
    try:
        _until_base_due(loop)
        _written(loop)
        name = loop.beside._job.result().name
    finally:
        loop.beside._job = None  # as a SIGKILL would leave it: the file, and no process that wants it
        loop.close()
    assert (store.directory / name).exists()
    after = SnapshotStore(store.directory)  # the restarted trainer's store
    after.publish({"w": torch.ones(2)}, {"step": 0})
    assert not (store.directory / name).exists()


def test_the_weight_store_never_names_a_base_written_beside_training_as_the_newest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import orjson
    import ray

    monkeypatch.setattr(ray, "put", lambda value: value)  # the actor's bookkeeping, without a cluster
    actor = WeightStore(keep_bases=2)

    def manifest(version: int, **data) -> bytes:
        return orjson.dumps({"version": version, "created_at": float(version), **data})
    assert actor.offer(1, 1, manifest(1), b"base")
    assert actor.offer(2, 1, manifest(2), b"delta")
    assert actor.offer(3, 3, manifest(3, same_as={"version": 2, "sha256": "ab"}), None)
    assert actor.latest() == 2  # the base alone is no version to move to
    assert actor.offer(4, 3, manifest(4), b"catch-up")
    assert actor.latest() == 4 and [v for v, *_ in actor.chain_to(4)] == [3, 4]


def test_the_last_publish_of_a_run_gives_up_a_base_still_being_written(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    loop, store = _loop(tmp_path)
    gate = _Gate(store, monkeypatch)
    try:
        _until_base_due(loop)
        manifest = loop.publish(final=True)  # one version on the way out, not a wait for the base
        assert manifest.version == 5 and manifest.kind == "delta" and not loop.beside.running
        gate.open.set()
        wait_for(lambda: not [p for p in store.directory.iterdir() if p.name.startswith(".base.tmp-")], 60,
                 "the given-up base's file to go")
    finally:
        gate.open.set()
        loop.close()


class _Killed(BaseException):
    """A publisher killed at this point: no handler of the store's runs, as with SIGKILL."""


@pytest.mark.parametrize("at", range(5), ids=["move", "delta payload", "base manifest", "delta manifest", "LATEST"])
def test_a_publisher_killed_while_making_a_base_a_version_leaves_latest_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    loop, store = _loop(tmp_path)
    try:
        _until_base_due(loop)
        _written(loop)
        calls = []

        def dying(real):
            def call(*args):
                calls.append(args)
                if len(calls) == at + 1:
                    raise _Killed
                return real(*args)
            return call
        monkeypatch.setattr(store.files, "move", dying(store.files.move))
        monkeypatch.setattr(store.files, "write", dying(store.files.write))
        with pytest.raises(_Killed):
            _step(loop)
    finally:
        loop.beside._job = None  # the process is gone: nothing cleans up after it
        loop.close()
    after = SnapshotStore(store.directory)  # the restarted trainer's store
    assert after.latest_version() == 4
    state = after.load(4)[1]
    new = after.publish(state, {"step": 5}).version  # its first publish removes what the killed one left
    assert after.latest_version() == new and after.versions() == [1, 2, 3, 4, new]
    left = [p.name for p in store.directory.iterdir()
            if p.name.startswith(".base.tmp-") or (p.name.startswith("v") and not p.name.startswith(
                tuple(f"v{v:06d}." for v in after.versions())))]
    assert not left


def test_deltas_published_while_the_base_is_being_written_leave_its_file_be(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base's write goes through a temporary file of its own (``write_atomic``); every publish meanwhile
    removes leftovers of killed publishers, and must not take that file for one."""
    import os

    import learner.snapshot_files

    writing, gate = threading.Event(), threading.Event()
    real = learner.snapshot_files.write_atomic

    def slow(path: Path, payload) -> None:
        if not path.name.startswith(".base.tmp-"):
            return real(path, payload)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            for part in payload:  # the base goes as parts (learner.snapshots.safetensors_parts)
                f.write(part)
        writing.set()
        assert gate.wait(60)
        os.replace(tmp, path)
    monkeypatch.setattr(learner.snapshot_files, "write_atomic", slow)
    loop, store = _loop(tmp_path)
    try:
        _until_base_due(loop)
        assert writing.wait(60)
        assert _step(loop) == 5 and _step(loop) == 6  # each publish clears leftovers
        gate.set()
        _written(loop)
        assert _step(loop) == 8 and store.manifest(7).data["same_as"]["version"] == 4 and not loop.beside.failures
    finally:
        gate.set()
        loop.close()
