from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.snapshots import SnapshotError, SnapshotStore


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
