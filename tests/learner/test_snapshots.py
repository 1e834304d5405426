from __future__ import annotations

import errno
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from features.memory import InMemoryFeatures
from infra.cli import app
from learner.config import CadenceConfig, LearnerConfig
from learner import reporter
from learner.loop import TrainingLoop
from learner.models import MultiTaskRanker
from learner.snapshots import PublishGuard, SnapshotError, SnapshotRefused, SnapshotStore, SnapshotUnwritable
from serving.weights import WeightFollower


def _weights(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) * scale, "b": torch.ones(3)}


def test_publish_load_round_trip_with_versions_and_latest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    m1 = store.publish(_weights(), {"step": 1})
    m2 = store.publish(_weights(2), {"step": 2, "offsets": {"0": 5}})
    assert (m1.version, m2.version, store.latest_version()) == (1, 2, 2)
    manifest, tensors = store.load()
    assert manifest.data == {"step": 2, "offsets": {"0": 5}}
    assert torch.equal(tensors["w"], _weights(2)["w"])
    assert [m.version for m in store.list()] == [1, 2]


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    bad = _weights()
    bad["w"][0, 0] = float("nan")
    with pytest.raises(SnapshotError, match="non-finite"):
        store.publish(bad, {})
    assert store.versions() == [] and store.latest_version() is None


def test_a_corrupted_weights_file_fails_the_sha256_check(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(_weights(), {})
    path = tmp_path / "v000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="sha256"):
        store.load(1)


def test_keeps_only_the_last_k(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    for i in range(5):
        store.publish(_weights(i + 1), {})
    assert store.versions() == [3, 4, 5]
    assert store.publish(_weights(), {}).version == 6


def _metrics(auc: float, positives: float = 1_000, n: float = 10_000) -> dict:
    return {"window_auc": auc, "window_positives": positives, "window_n": n}


def test_the_guard_refuses_an_auc_drop_and_accepts_a_small_dip(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    guard = PublishGuard(max_auc_drop=0.02)
    store.publish(_weights(), {"metrics": {"click": _metrics(0.75), "like": _metrics(0.70)}}, guard=guard)
    with pytest.raises(SnapshotRefused, match=r"like window_auc 0\.6700 < 0\.7000") as refused:
        store.publish(_weights(2), {"metrics": {"click": _metrics(0.76), "like": _metrics(0.67)}}, guard=guard)
    assert refused.value.reason == "auc-drop"
    assert store.versions() == [1] and store.latest_version() == 1  # nothing written
    dip = store.publish(_weights(3), {"metrics": {"click": _metrics(0.735), "like": _metrics(0.69)}}, guard=guard)
    assert dip.version == 2
    # The reference is the latest published: v2's 0.735, so 0.72 is a dip of 0.015, accepted.
    assert store.publish(_weights(4), {"metrics": {"click": _metrics(0.72), "like": _metrics(0.69)}}, guard=guard).version == 3


def test_the_guard_ignores_windows_with_too_few_examples_of_a_class() -> None:
    guard = PublishGuard(max_auc_drop=0.02, min_class_examples=500)
    before = {"follow": _metrics(0.80, positives=40)}
    assert guard.check({"follow": _metrics(0.60, positives=40)}, before) is None  # 40 positives: noise
    assert guard.check({"follow": _metrics(0.60, positives=600)}, {"follow": _metrics(0.80, positives=600)})
    assert guard.check({"click": _metrics(float("nan"))}, {"click": _metrics(0.8)}) is None
    with pytest.raises(ValueError, match="guard.max_auc_drop"):
        PublishGuard(max_auc_drop=-0.1)


def test_the_learner_counts_refusals_by_reason(tmp_path: Path) -> None:
    config = LearnerConfig(family="mmoe", hparams={"n_experts": 2, "expert_dims": (4,), "tower_dims": ()},
                           n_buckets=64, emb_dim=2)
    loop = TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(tmp_path / "snapshots"))
    assert loop.publish().version == 1
    with torch.no_grad():
        next(loop.learner.model.parameters())[0] = float("nan")
    assert loop.publish() is None
    assert loop.reporter.refused == {"non-finite": 1}
    assert SnapshotStore(tmp_path / "snapshots").versions() == [1]


def _ranker_snapshot(store: SnapshotStore, seed: int) -> int:
    torch.manual_seed(seed)
    model = MultiTaskRanker("mmoe", tasks=["click"], id_fields=["user_id"], n_dense=2, n_buckets=16, emb_dim=2,
                            n_experts=2, expert_dims=[4], tower_dims=[])
    return store.publish(model.state_dict(), {"family": "mmoe", "model_config": model.config, "step": seed}).version


def test_rollback_through_the_cli_is_picked_up_by_the_weight_follower(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    for seed in range(4):
        _ranker_snapshot(store, seed)  # v1 is pruned; v2..v4 kept
    follower = WeightFollower(tmp_path, poll_s=0.05)
    try:
        assert follower.current.version == 4
        runner = CliRunner()
        result = runner.invoke(app, ["snapshots", "rollback", "v2", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert store.latest_version() == 5
        rolled = store.manifest(5)
        assert rolled.data["rollback_of"] == 2 and rolled.sha256 == store.manifest(2).sha256
        deadline = time.monotonic() + 30
        while follower.current.version != 5:
            assert time.monotonic() < deadline, "the follower never picked up the rollback"
            time.sleep(0.05)
        _, v2 = store.load(2)
        assert all(torch.equal(follower.current.model.state_dict()[k], v) for k, v in v2.items())

        for bad in ("1", "v9"):  # pruned, never existed
            refused = runner.invoke(app, ["snapshots", "rollback", bad, str(tmp_path)])
            assert refused.exit_code == 1 and "no snapshot" in refused.output and "kept: v2" in refused.output
        assert runner.invoke(app, ["snapshots", "rollback", "latest", str(tmp_path)]).exit_code == 2
        listing = runner.invoke(app, ["snapshots", "list", str(tmp_path)], env={"COLUMNS": "200"})
        assert "rollback of v2" in listing.output and "v5 *" in listing.output
    finally:
        follower.close()
    assert store.latest_version() == 5  # refused rollbacks changed nothing


def test_rollback_refuses_a_corrupted_version(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(_weights(), {})
    store.publish(_weights(2), {})
    path = tmp_path / "v000001.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(SnapshotError, match="sha256"):
        store.rollback(1)
    assert store.latest_version() == 2


def test_a_snapshot_is_due_every_k_steps_or_every_s_seconds(tmp_path: Path) -> None:
    def loop(**kw) -> TrainingLoop:
        config = LearnerConfig(family="mmoe", hparams={"n_experts": 2, "expert_dims": (4,), "tower_dims": ()},
                               n_buckets=64, emb_dim=2, cadence=CadenceConfig(snapshot_every_steps=5, **kw))
        return TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(tmp_path / "snapshots"))

    by_steps, by_time, not_yet = loop(), loop(snapshot_every_s=0.0), loop(snapshot_every_s=3600.0)
    assert (by_steps.snapshot_due(1), by_time.snapshot_due(1), not_yet.snapshot_due(1)) == (False, True, False)
    assert by_steps.snapshot_due(5) and not_yet.snapshot_due(5)


def test_the_guard_treats_a_null_metric_from_a_manifest_as_not_comparable() -> None:
    guard = PublishGuard(max_auc_drop=0.02, min_class_examples=1)
    undefined = {"click": {"window_auc": None, "window_positives": None, "window_n": 10.0}}
    defined = {"click": {"window_auc": 0.7, "window_positives": 5.0, "window_n": 10.0}}
    assert guard.check(defined, undefined) is None
    assert guard.check(undefined, defined) is None


@pytest.mark.parametrize("version", ["²", "v-1", "three"])
def test_rollback_refuses_a_version_that_is_not_a_number(tmp_path: Path, version: str) -> None:
    result = CliRunner().invoke(app, ["snapshots", "rollback", version, str(tmp_path)])
    assert result.exit_code == 2
    assert "VERSION must be a number" in result.output


@pytest.mark.parametrize("columns", [None, "40"])
def test_experts_refuses_json_that_is_not_a_report(tmp_path: Path, columns: str | None) -> None:
    """The message names the file whole on one line, however long its path and whatever width the
    environment claims: off a terminal the CLI wraps nothing (it used to break at 80 columns, so the test
    passed or failed with the length of pytest's temporary directory)."""
    path = tmp_path / ("a-long-directory-name-" * 4) / "experts.json"
    path.parent.mkdir()
    path.write_text('{"hello": 1}')
    result = CliRunner().invoke(app, ["experts", str(path)], env={"COLUMNS": columns})
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if "not an expert-health report" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{path} is not an expert-health report"), result.output


@pytest.mark.parametrize("every_s", [-1.0, float("nan"), float("inf"), "10", True])
def test_snapshot_every_s_must_be_a_number_of_seconds(every_s) -> None:
    with pytest.raises(ValueError, match=r"learner\.cadence\.snapshot_every_s"):
        CadenceConfig(snapshot_every_s=every_s)


def test_concurrent_publishes_and_rollbacks_take_distinct_versions(tmp_path: Path) -> None:
    """The trainer publishing while `moestream snapshots rollback` runs: each writer numbers its version
    from the directory, so without the store's lock two could write the same number (and one manifest
    would describe the other's weights)."""
    from concurrent.futures import ThreadPoolExecutor

    store = SnapshotStore(tmp_path, keep=100)
    store.publish(_weights(0.0), {"step": 0})

    def publish(i: int) -> int:
        return SnapshotStore(tmp_path, keep=100).publish(_weights(float(i)), {"step": i}).version

    def rollback(_: int) -> int:
        return SnapshotStore(tmp_path, keep=100).rollback(1).version

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda i: publish(i) if i % 2 else rollback(i), range(1, 41)))
    assert sorted(versions) == list(range(2, 42))
    for version in versions:
        manifest, tensors = store.load(version)  # the sha256 of every manifest matches its own weights
        expected = 0.0 if "rollback_of" in manifest.data else float(manifest.data["step"])
        assert torch.equal(tensors["w"], _weights(expected)["w"])


# -- a full or read-only snapshot directory (issue 19, item 4) ------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up and really goes read-only (root ignores permission bits)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def remount(mount: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system; the filler, to remove when done."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_refuses_the_publish_and_leaves_nothing_behind(small_fs: Path) -> None:
    store = SnapshotStore(small_fs / "snapshots")
    store.publish(_weights(), {"step": 1})
    filler = fill(small_fs)
    with pytest.raises(SnapshotUnwritable, match=r"\[Errno 28\] ENOSPC") as raised:
        store.publish({"w": torch.randn(200_000)}, {"step": 2})
    assert raised.value.errno == errno.ENOSPC and str(small_fs / "snapshots") in str(raised.value)
    assert sorted(p.name for p in store.directory.iterdir()) == [".lock", "LATEST", "v000001.json", "v000001.safetensors"]
    assert store.latest_version() == 1
    filler.unlink()
    assert store.publish(_weights(3), {"step": 3}).version == 2


def test_a_read_only_directory_refuses_the_publish_at_its_lock(small_fs: Path) -> None:
    store = SnapshotStore(small_fs / "snapshots")
    store.publish(_weights(), {"step": 1})
    remount(small_fs, "ro")
    with pytest.raises(SnapshotUnwritable, match=r"\[Errno 30\] EROFS") as raised:
        store.publish(_weights(2), {"step": 2})
    assert raised.value.errno == errno.EROFS
    remount(small_fs, "rw")
    assert store.publish(_weights(3), {"step": 3}).version == 2


def test_the_loop_counts_failed_publishes_backs_off_and_publishes_again(small_fs: Path, monkeypatch, capsys) -> None:
    config = LearnerConfig(family="mmoe", hparams={"n_experts": 2, "expert_dims": (4,), "tower_dims": ()},
                           n_buckets=64, emb_dim=2)
    loop = TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(small_fs / "snapshots"))
    assert loop.publish().version == 1
    remount(small_fs, "ro")
    assert loop.publish() is None
    assert not loop.reporter.publish_due()  # backing off: the next cadence does not try again at once
    assert loop.publish() is None and loop.stats()["publish_failures"] == 1
    monkeypatch.setattr(reporter, "PUBLISH_BACKOFF_S", 0.0)  # no waiting in a unit test
    loop.reporter._retry_at = 0.0
    assert loop.publish() is None
    stats = loop.stats()
    assert stats["publish_failures"] == 2 and stats["snapshot_outage_s"] > 0 and stats["refused_snapshots"] == {}
    assert "Errno 30" in stats["last_publish_error"]
    remount(small_fs, "rw")
    assert loop.publish().version == 2
    assert loop.stats()["snapshot_outage_s"] == 0.0 and loop.reporter.published == [1, 2]
    log = capsys.readouterr().out
    assert log.count("WARNING: cannot write a snapshot to") == 1  # once per outage, with the directory
    assert log.count("publishing snapshots to") == 1 and "after 2 failed attempts" in log
