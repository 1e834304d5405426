"""A model version chain to serve while deltas arrive: a learner's base at N live IDs, then deltas made as the trainer
makes them, staged to be published later, one after the other, by a process of their own.

:func:`prepare_chain` builds a :class:`~learner.step.Learner` with the learner's default family and hparams and a
collisionless table of dim 32 per ID field, admits the whole population (``Learner.admit``, 10^6 IDs a call; each
field's capacity is its population, so the tables are full), publishes it as a base, then trains and stages deltas:
``STEPS_PER_DELTA`` steps (the learner's default ``snapshot_every_steps``) of batch 512 each, IDs drawn Zipf-like
over the population (log-uniform ranks, P(k) ~ 1/k, as ``bench embeddings`` draws them; rank k is raw ID k - 1)
with 1% brand-new IDs, which evict the least recently seen (the first eviction frees 1% of a field at once,
``learner.idmap``), then ``Learner.delta()`` and ``mark_published()``. The invariant: published in staging order onto
the base, each delta's parent is the version before it, as the trainer's would be; the learner is gone by then.

:func:`publish_staged` is that publisher, at ``PUBLISHER_NICE``: while told to, a delta every ``interval_s``
(``SnapshotStore.publish_delta``), counting what it published and the CPU it took.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from benchmarks.timing import load_average

DIM = 32
ADMIT_CHUNK = 10**6
BATCH = 512
STEPS_PER_DELTA = 20
"""Steps per delta: the learner's default ``learner.cadence.snapshot_every_steps``."""
NEW_ID_SHARE = 0.01
ZIPF_SEED = 7
PUBLISHER_NICE = 15
"""The publisher's niceness: Ray's worker niceness (``RAY_worker_niceness``, 15 by default), at which the trainer's
actor publishes in a deployment and the replicas serve. Until 2026-12-07 it was 10, above the replicas' priority."""


@dataclass
class Chain:
    """A store holding the base, and the deltas staged to publish onto it in order."""

    store: Path
    staged: list[Path]
    base_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    """Preparation: admitting the population, publishing the base, training and staging the deltas."""
    load: str = "?"
    """The load average when the preparation began (what the machine was doing before this benchmark)."""


def learner_config(ids: int):
    from learner.config import LearnerConfig

    per_field = ids // 2
    return LearnerConfig(tables={f: {"capacity": per_field, "dim": DIM} for f in ("user_id", "item_id")})


class Traffic:
    """Batches of ``BATCH`` examples over a population of raw IDs ``0..n-1`` per field, Zipf-like, with
    ``NEW_ID_SHARE`` of each field's IDs never seen before (numbered on from ``n``)."""

    def __init__(self, n: int, seed: int = ZIPF_SEED) -> None:
        from features.definitions import FEATURE_COLUMNS
        from stream.events import TASKS, TYPICAL_POSITIVE_RATES

        self.n, self.rng = n, np.random.default_rng(seed)
        self.next_new = {f: n for f in ("user_id", "item_id")}
        self.n_new = max(1, int(BATCH * NEW_ID_SHARE))
        self.n_dense = len(FEATURE_COLUMNS)
        self.rates = {t: TYPICAL_POSITIVE_RATES.get(t, 0.1) for t in TASKS}

    def ids(self, name: str) -> np.ndarray:
        ranks = np.floor(float(self.n) ** self.rng.random(BATCH - self.n_new)).astype(np.int64)  # log-uniform
        new = np.arange(self.next_new[name], self.next_new[name] + self.n_new, dtype=np.int64)
        self.next_new[name] += self.n_new
        return np.concatenate([np.clip(ranks, 1, self.n) - 1, new])

    def batch(self, ts_ms: int):
        import pyarrow as pa

        columns = {"user_id": self.ids("user_id"), "item_id": self.ids("item_id"),
                   "ts_ms": np.full(BATCH, ts_ms, np.int64)}
        columns |= {t: (self.rng.random(BATCH) < rate).astype(np.float32) for t, rate in self.rates.items()}
        return pa.table(columns), self.rng.standard_normal((BATCH, self.n_dense), dtype=np.float32)


def prepare_chain(root: Path, ids: int, n_deltas: int, steps_per_delta: int = STEPS_PER_DELTA, progress=None
                  ) -> Chain:
    """A learner with ``ids`` live IDs publishes its base into ``root/snapshots``, then trains and stages
    ``n_deltas`` deltas of ``steps_per_delta`` steps each in ``root/staged``; the learner is freed on return."""
    from safetensors.torch import save_file

    from features.definitions import FEATURE_COLUMNS, ID_FIELDS
    from learner.delta import to_tensors
    from learner.snapshots import SnapshotStore
    from learner.step import Learner

    seconds, load = {}, load_average()
    learner = Learner(learner_config(ids), list(ID_FIELDS), len(FEATURE_COLUMNS))
    per_field, now_ms = ids // 2, 1_000_000
    started = time.perf_counter()
    task = progress.add_task(f"deltas: admitting {ids:,} IDs", total=per_field) if progress else None
    for start in range(0, per_field, ADMIT_CHUNK):
        chunk = np.arange(start, min(per_field, start + ADMIT_CHUNK), dtype=np.int64)
        learner.admit({name: chunk for name in ID_FIELDS}, now_ms)
        if progress is not None:
            progress.advance(task, len(chunk))
    seconds["admit"] = time.perf_counter() - started
    started = time.perf_counter()
    store = SnapshotStore(root / "snapshots")
    base = store.publish(learner.weights(), learner.manifest())
    learner.mark_published()
    seconds["base"] = time.perf_counter() - started
    started = time.perf_counter()
    staged_dir = root / "staged"
    staged_dir.mkdir(parents=True, exist_ok=True)
    traffic, staged = Traffic(per_field), []
    if progress is not None:
        progress.update(task, description=f"deltas: staging {n_deltas}", completed=0, total=n_deltas)
    for k in range(n_deltas):
        for _ in range(steps_per_delta):
            now_ms += 25
            learner.learn(*traffic.batch(now_ms))
        path = staged_dir / f"{k:05d}.safetensors"
        save_file(to_tensors(learner.delta()), path)
        path.with_suffix(".json").write_bytes(orjson.dumps(learner.manifest()))
        learner.mark_published()  # as the publisher would, once the version is durable
        staged.append(path)
        if progress is not None:
            progress.advance(task)
    seconds["deltas"] = time.perf_counter() - started
    if progress is not None:
        progress.remove_task(task)
    return Chain(root / "snapshots", staged, base.bytes or 0, seconds, load)


def publish_one(snapshots, path: Path):
    """Publish the staged delta at ``path`` onto the version ``LATEST`` names; its manifest."""
    from safetensors.torch import load_file

    from learner.delta import from_tensors

    return snapshots.publish_delta(from_tensors(load_file(path)), orjson.loads(path.with_suffix(".json").read_bytes()))


def publish_staged(store: str, staged: list[str], interval_s: float, go, stop, ready, published, cpu_s) -> None:
    """The publisher process: while ``go`` is set, publish the next staged delta every ``interval_s``; counts what
    it published and the CPU it took (loading, verifying, writing) in ``published`` and ``cpu_s``."""
    os.nice(PUBLISHER_NICE)
    import torch

    from learner.snapshots import SnapshotStore

    torch.set_num_threads(1)
    snapshots = SnapshotStore(store)
    ready.set()
    for path in staged:
        while not go.wait(0.05):
            if stop.is_set():
                return
        if stop.is_set():
            return
        started, cpu = time.monotonic(), time.process_time()
        publish_one(snapshots, Path(path))
        cpu_s.value += time.process_time() - cpu
        published.value += 1
        stop.wait(max(0.0, started + interval_s - time.monotonic()))


__all__ = ["Chain", "Traffic", "learner_config", "prepare_chain", "publish_one", "publish_staged"]
