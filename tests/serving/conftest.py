"""Fixtures of the serving tests: a real Feast store (SQLite) and real snapshots written by learner.snapshots,
whole (:func:`publish`) or as chains of a base and deltas from a learning :class:`Publisher`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save as save_safetensors

from features.aggregates import StreamAggregator
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from features.store import FeatureStoreConfig, OnlineFeatures
from infra.pipeline import wait_for
from learner.delta import to_tensors
from learner.models import MultiTaskRanker
from learner.snapshots import Manifest, SnapshotError, SnapshotStore, write_atomic
from stream.events import TASKS
from tests.learner.test_id_tables import _batch, _dense, _learner

KNOWN_USERS = (1, 2, 3)
KNOWN_ITEMS = (10, 11, 12, 13)


def tiny_ranker(seed: int, family: str = "mmoe") -> MultiTaskRanker:
    torch.manual_seed(seed)
    return MultiTaskRanker(family, tasks=list(TASKS), id_fields=list(ID_FIELDS), n_dense=len(FEATURE_COLUMNS),
                           n_buckets=256, emb_dim=4, n_experts=2, expert_dims=(8,), tower_dims=(4,))


def publish(store: SnapshotStore, seed: int, **data) -> Manifest:
    """A real snapshot of a tiny model, as the learner publishes it (family, model config, offsets, ...)."""
    model = tiny_ranker(seed)
    return store.publish(model.state_dict(), {"family": "mmoe", "model_config": model.config, "step": seed,
                                              "examples": 10 * seed, "offsets": {"0": seed}, "event_time_hwm_ms":
                                              1_763_900_000_000 + seed, **data})


CORRUPTIONS = ("bit flip", "truncated copy", "truncated, sha256 of the truncated bytes", "non-finite weights")
"""Ways a newer snapshot can be bad: a flipped byte or a copy cut short (the sha256 in the manifest is the
whole file's), a writer that hashed what it wrote though it wrote half a file, and NaN weights with a
matching sha256 (a publisher without the finiteness guard)."""


def publish_corrupt(store: SnapshotStore, kind: str, seed: int) -> int:
    """Write a newer version that must be refused, files first and ``LATEST`` last as a publisher would;
    returns its version."""
    model = tiny_ranker(seed)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if kind == "non-finite weights":
        name = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    payload = bytearray(save_safetensors(tensors))
    digest = hashlib.sha256(payload).hexdigest()
    if kind == "bit flip":
        payload[len(payload) // 2] ^= 0xFF
    elif kind == "truncated copy":
        del payload[len(payload) // 2:]
    elif kind == "truncated, sha256 of the truncated bytes":
        del payload[len(payload) // 2:]
        digest = hashlib.sha256(payload).hexdigest()
    elif kind != "non-finite weights":
        raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")
    version = max([*store.versions(), store.latest_version() or 0]) + 1
    manifest = Manifest(version, digest, time.time(), {"family": "mmoe", "model_config": model.config, "step": seed})
    write_atomic(store.directory / f"v{version:06d}.safetensors", bytes(payload))
    write_atomic(store.directory / f"v{version:06d}.json", manifest.to_json())
    write_atomic(store.directory / "LATEST", str(version).encode())
    return version


class Publisher:
    """A learner with ID maps that admit, expire (ttl 3 ms of event time) and evict, publishing a base and then
    deltas as the trainer's loop does (mark only once a version is published). With a weight-store ``actor``,
    each version is then offered to it as ``learner.reporter`` offers: its payload read back verified from the
    store, so a version whose file does not verify never reaches Ray."""

    def __init__(self, store: SnapshotStore, actor=None) -> None:
        torch.manual_seed(0)
        self.store, self.actor, self.learner, self.steps = store, actor, _learner(), 0

    def step(self) -> None:
        batch = _batch(self.steps, 0, 64)
        self.learner.learn(batch, _dense(batch))
        self.steps += 1

    def data(self) -> dict:
        return {"family": "mmoe", **self.learner.manifest(), "offsets": {"0": self.steps}}

    def base(self) -> int:
        self.step()
        manifest = self.store.publish(self.learner.weights(), self.data())
        return self._published(manifest.version)

    def delta(self) -> int:
        self.step()
        manifest = self.store.publish_delta(self.learner.delta(), self.data())
        return self._published(manifest.version)

    def next(self) -> int:
        """The next version as ``learner.loop`` picks it: a base when the learner published nothing yet or the
        store says one is due, else a delta."""
        return self.base() if not self.learner.has_published_parent or self.store.base_due() else self.delta()

    def corrupt_delta(self) -> int:
        """The next delta, published with its manifest's sha256 taken over its true bytes and one byte of the
        payload flipped before it reaches the store (files first, ``LATEST`` last): a writer or a disk that
        corrupted it. The learner marks it published, as a trainer that trusted its write would, so the deltas
        after it are its children."""
        self.step()
        payload = bytearray(save_safetensors(to_tensors(self.learner.delta())))
        parent = self.store.latest_manifest()
        version = max([*self.store.versions(), parent.version]) + 1
        manifest = Manifest(version, hashlib.sha256(payload).hexdigest(), time.time(), self.data(), kind="delta",
                            parent=parent.version, parent_sha256=parent.sha256, base=parent.base,
                            depth=parent.depth + 1, bytes=len(payload), chain_bytes=parent.chain_bytes + len(payload))
        payload[len(payload) // 2] ^= 0xFF
        write_atomic(self.store.directory / f"v{version:06d}.delta.safetensors", bytes(payload))
        write_atomic(self.store.directory / f"v{version:06d}.json", manifest.to_json())
        write_atomic(self.store.directory / "LATEST", str(version).encode())
        return self._published(version)

    def _published(self, version: int) -> int:
        self.learner.mark_published()
        if self.actor is not None:
            from learner.weight_store import offer

            try:
                manifest, payload = self.store.payload(version)
            except SnapshotError:
                return version  # learner.reporter counts a failed offer; replicas read the store for it
            offer(self.actor, version, manifest.base, manifest.to_json(), payload)
        return version


def chain_store(directory: Path, max_deltas: int) -> SnapshotStore:
    """A store where a base is due after ``max_deltas`` deltas whatever their bytes: the :class:`Publisher`'s
    tiny model has tables of a few rows, so each of its deltas weighs about as much as its base, and the
    default budget (half the base's bytes) would make every other version a base."""
    return SnapshotStore(directory, max_deltas=max_deltas, max_delta_bytes=2**40)


def feature_store(directory: Path) -> FeatureStoreConfig:
    """A Feast repo with streaming aggregates for a few known users and items (the rest are unknown)."""
    config = FeatureStoreConfig(data_dir=directory, clock="wall")
    store = OnlineFeatures(config)
    n = 64
    rng = np.random.default_rng(0)
    examples = pa.table({
        "user_id": rng.choice(KNOWN_USERS, n), "item_id": rng.choice(KNOWN_ITEMS, n),
        "ts_ms": np.full(n, int(time.time() * 1000), dtype=np.int64),
        **{t: (rng.random(n) < 0.3).astype(np.float32) for t in TASKS},
        "play_time": rng.random(n).astype(np.float32) * 10_000,
    })
    store.push(*StreamAggregator().update(examples))
    return config


@pytest.fixture
def feature_config(tmp_path: Path) -> FeatureStoreConfig:
    return feature_store(tmp_path / "features")


@pytest.fixture
def snapshot_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "snapshots"
    publish(SnapshotStore(directory), seed=1)
    return directory


def deploy_locked(tmp_path: Path, name: str, route_prefix: str) -> tuple[SnapshotStore, str]:
    """A ranking app with an API token and no snapshot yet, deployed on the running Serve instance as ``name``:
    its snapshot store (publish to it to make it ready) and the token."""
    from ray import serve

    from serving.app import build_app
    from serving.config import ServingConfig

    token = "0123456789abcdef" * 4
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n")
    tokens.chmod(0o600)
    store = SnapshotStore(tmp_path / "snapshots")
    config = ServingConfig(num_cpus=0.5, poll_s=0.05, api_tokens_file=str(tokens))
    serve.run(build_app(store.directory, feature_store(tmp_path / "features"), config), name=name,
              route_prefix=route_prefix)
    return store, token


def publish_paced(answers: Sequence[Sequence[tuple]], publish: Callable[[], int], n: int) -> list[int]:
    """``n`` versions from ``publish``, each once a client was answered by the one before, so every version is
    served under load however fast or slow the machine. ``answers``: each client's rows so far, as ``(status,
    replica, version, batch, ...)``."""
    versions: list[int] = []
    for _ in range(n):
        versions.append(publish())
        wait_for(lambda: any(row[2] == versions[-1] for rows in answers for row in list(rows)), 60,
                 f"an answer from v{versions[-1]}", every_s=0.02)
    return versions


def assert_no_replica_went_back(answers: Sequence[Sequence[tuple]]) -> None:
    """No replica answered an older version after a newer one: in the order it scored its batches, and as each
    client, waiting for every answer before it asks again, saw them. Rows as in :func:`publish_paced`."""
    by_batch: dict[str, list[tuple[int, int]]] = {}
    for rows in answers:
        for _, replica, version, batch, *_ in rows:
            by_batch.setdefault(replica, []).append((batch, version))
    for replica, seen in by_batch.items():
        ordered = [version for _, version in sorted(seen)]
        assert ordered == sorted(ordered), f"replica {replica} went back a version"
    for rows in answers:
        last: dict[str, int] = {}
        for _, replica, version, *_ in rows:
            assert version >= last.get(replica, 0), f"replica {replica} answered v{version} after v{last[replica]}"
            last[replica] = version
