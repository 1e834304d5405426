"""Scoring of ranking requests in batches: one feature lookup and one forward pass for all their candidates.

``RankingService.score`` takes the requests that ``@serve.batch`` gathered from concurrent callers, looks
up the features of every (user, candidate) pair of all of them in one ``OnlineFeatures.lookup_batch``
(each distinct user and item read once), runs the model once under ``torch.inference_mode``, fuses the
task probabilities into one score with the configured weights, and splits the result back per request.
The model is read from the weight follower once per batch, under its lock (deltas are applied to the live model
between batches), so a whole batch is scored by one version and every request reports the version that scored
it. Users and items the store does not know get the
store's defaults, and hashed ID embeddings need no vocabulary, so unknown IDs are scored like any other.

Item rows are read through the replica's item cache (``serving.item_cache_ttl_ms``; ``features.cache``): an
item read within the TTL is not read again, so a row the trainer pushes is served at most that long after
the push. Users are read on every batch. Scores are the same with the cache on and off for the same rows.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from features.store import FeatureStoreConfig, OnlineFeatures
from serving.config import ServingConfig
from serving.metrics import ServingMetrics
from serving.weights import LoadedModel, RaySource, Sources, StoreSource, VersionSource, WeightFollower


class NoModelYet(RuntimeError):
    """No snapshot has been served yet: none published, or every one published was refused. The message goes to
    clients, so it says which without naming the server's paths."""


@dataclass(frozen=True)
class RankQuery:
    user_id: int
    candidates: np.ndarray  # (n,) int64, distinct


@dataclass(frozen=True)
class Ranking:
    """One request's scores, candidates in the order asked; ``order`` sorts them by fused score, best first."""

    version: int
    family: str
    batch: int
    """Sequence number of the batch on this replica: a later batch never reports an older version."""
    tasks: tuple[str, ...]
    items: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float32
    probabilities: np.ndarray  # (n, T) float32, columns in ``tasks`` order

    @property
    def order(self) -> np.ndarray:
        return np.argsort(-self.scores, kind="stable")


def batch_of(queries: Sequence[RankQuery]) -> tuple[np.ndarray, np.ndarray]:
    """Each request's candidate count ``(R,)`` and all their candidates one request after the other ``(N,)``."""
    lengths = np.fromiter((len(q.candidates) for q in queries), np.int64, len(queries))
    return lengths, np.concatenate([q.candidates for q in queries])


def candidates_of(queries: Sequence[RankQuery]) -> int:
    """Batch size for ``@serve.batch``: batches are bounded by candidates, not by requests."""
    return sum(len(q.candidates) for q in queries)


SERVING_OUTAGE_S = 1.0
"""Longest a ranking request waits for an unreachable online store before it is answered 503."""


def version_source(snapshots: Path | str, weight_store: str | None) -> VersionSource:
    """Where a replica finds versions: the run's weight-store actor through Ray when it is named (any node, no
    shared filesystem), and the durable snapshot store (a directory or a ``pyarrow.fs`` URI) for what the
    actor does not hold."""
    from learner.snapshots import SnapshotStore

    store = StoreSource(SnapshotStore(snapshots))
    if weight_store is None:
        return store
    from learner.weight_store import weight_store as attach

    return Sources(RaySource(attach(weight_store), store), store)


class RankingService:
    def __init__(self, snapshots: Path | str, features: FeatureStoreConfig, config: ServingConfig = ServingConfig(),
                 metrics: ServingMetrics | None = None, weight_store: str | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServingMetrics()
        # A request does not wait out a feature-store outage as the trainer does: it gets a 503 within a second.
        self.features = OnlineFeatures(replace(features, outage_timeout_s=min(features.outage_timeout_s, SERVING_OUTAGE_S)),
                                       apply=False)
        self.item_cache = (self.features.item_cache(config.item_cache_size, config.item_cache_ttl_ms)
                           if config.item_cache_ttl_ms > 0 else None)
        """Item rows read within ``serving.item_cache_ttl_ms``, kept in this replica (``features.cache``)."""
        self.batches = 0
        self._batch_seq = itertools.count(1)  # next() is atomic: batches scored on any thread get distinct numbers
        self.weights = WeightFollower(version_source(snapshots, weight_store), config.poll_s, on_swap=self._swapped,
                                      handoff=True, nice=config.follower_nice,
                                      nice_scope=config.follower_nice_scope)

    def _swapped(self, loaded: LoadedModel) -> None:
        self.metrics.swapped(loaded.version)

    def task_weights(self, tasks: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(self.config.task_weights.get(t, 0.0)) for t in tasks])  # (T,)

    def score(self, queries: Sequence[RankQuery]) -> list[Ranking]:
        """Score a batch of requests with one snapshot. Raises :class:`NoModelYet` before the first one."""
        if self.weights.current is None:
            raise NoModelYet(self.not_ready())
        batch = self.next_batch()
        lengths, items = batch_of(queries)
        users = np.repeat(np.fromiter((q.user_id for q in queries), np.int64, len(queries)), lengths)  # (N,)
        features = self.features.lookup_batch(users, items, item_cache=self.item_cache)
        with self.weights.lock:  # no delta is applied while the batch is scored: it sees one version, whole
            self.weights.install_handed()  # a delta the follower prepared goes in here, between two batches
            current = self.weights.current
            ids = {name: torch.from_numpy(features.ids[name]) for name in current.model.encoder.id_fields}
            tasks = current.model.tasks
            with torch.inference_mode():
                per_task = current.model.predict_proba(ids, torch.from_numpy(features.dense))
                probs = torch.stack([per_task[t].float() for t in tasks], dim=1)  # (N, T)
                scores = probs @ self.task_weights(tasks)  # (N,)
        if self.item_cache is not None:
            self.metrics.observe_cache(*self.item_cache.report(), entries=self.item_cache.occupied)
        return self.rankings(current, batch, tasks, lengths, items, scores.numpy(), probs.numpy())

    def next_batch(self) -> int:
        """The next batch's sequence number on this replica (:attr:`Ranking.batch`)."""
        self.batches = next(self._batch_seq)
        return self.batches

    def rankings(self, current: LoadedModel, batch: int, tasks: tuple[str, ...], lengths: np.ndarray,
                 items: np.ndarray, scores: np.ndarray, probs: np.ndarray) -> list[Ranking]:
        """A scored batch (``items`` ``(N,)``, ``scores`` ``(N,)``, ``probs`` ``(N, T)``, requests of ``lengths``
        candidates one after the other) observed in the metrics and split back into one ranking per request."""
        self.metrics.observe_batch(len(lengths), len(items), len(self.weights.rejected))
        bounds = np.cumsum(lengths)[:-1]
        return [
            Ranking(current.version, current.family, batch, tasks, i, s, p)
            for i, s, p in zip(np.split(items, bounds), np.split(scores, bounds), np.split(probs, bounds))
        ]

    def model_info(self) -> dict:
        current = self.weights.current
        if current is None:
            raise NoModelYet(self.not_ready())
        manifest = current.manifest
        return {
            "family": current.family,
            "version": current.version,
            "tasks": list(current.model.tasks),
            "task_weights": {t: float(self.config.task_weights.get(t, 0.0)) for t in current.model.tasks},
            "event_time_hwm_ms": manifest.data.get("event_time_hwm_ms"),
            "snapshot_created_at": manifest.created_at,
            "snapshot_age_s": max(0.0, time.time() - manifest.created_at),
            "step": manifest.data.get("step"),
            "examples": manifest.data.get("examples"),
            "offsets": {str(p): int(o) for p, o in (manifest.data.get("offsets") or {}).items()},
            "rollback_of": manifest.data.get("rollback_of"),
        }

    def not_ready(self) -> str:
        """Why no model is served (the replica is up; the learner has not published one it can use)."""
        if self.weights.rejected:
            return (f"no model published yet that verifies: snapshot(s) {sorted(self.weights.rejected)} were refused "
                    "(the replica's log says why); waiting for the learner's next one")
        return "no model published yet: the learner has not published its first snapshot"

    def health(self) -> dict:
        current = self.weights.current
        return {
            "ok": current is not None,
            "reason": None if current is not None else self.not_ready(),
            "model_version": current.version if current else None,
            "swaps": self.weights.swaps,
            "weights": self.weights.figures(),
            "rejected_versions": sorted(self.weights.rejected),
            "batches": self.batches,
            "pid": os.getpid(),
            "switch_interval_ms": sys.getswitchinterval() * 1000,
            "item_cache": self.item_cache.figures() if self.item_cache is not None else None,
        }

    def close(self) -> None:
        self.weights.close()


__all__ = ["NoModelYet", "RankQuery", "Ranking", "RankingService", "batch_of", "candidates_of"]
