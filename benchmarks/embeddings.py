"""``moestream bench embeddings``: a training step with collisionless ID maps and row-wise tables, against table size.

The step is the learner's with the embedding path of issue #20: per ID field (user, item) an ``IdMap`` gives each
raw 64-bit ID its own row of a ``RowwiseTable`` (emb 32); rows handed to a new ID are reset; the two fields'
embeddings and the dense features (random floats, the learner's feature width) feed the default family (MMoE,
the learner's default hparams, its 6 tasks); loss, backward, fused Adam on the dense network, row-wise Adagrad
on the rows the batch touched. Batch 1024, IDs drawn Zipf-like (log-uniform ranks, P(k) ~ 1/k) over N distinct
raw IDs per field, 1% of each batch never seen before (so every step also inserts and resets rows). Each map is
filled with all N IDs before timing, its capacity N plus the new IDs the timed calls bring: the timed steps run
at N live IDs and measure lookup + insert, not eviction.

Rows:

- **step at 10^5, 10^6, 10^7 live IDs**, ms; anchor the same step at 10^5, goal: 10^7 <= 1.2x.
- **hashed reference**: the step the learner took before 1c96301, one ``nn.Embedding`` of N rows shared by both
  fields (``encoder.hash_ids``, mod N) trained with the dense network by fused Adam, so every row moves every
  step; anchor the new path at the same N. At a size where a warm-up step takes over ``DENSE_CAP_S`` it is
  not run (a note says so).
- **ID-map lookup + insert** at the largest size, IDs/s of one field's batch of 1024; goal >= 2 M IDs/s.
- **memory per live ID** at the largest size: (table rows + row-wise state + map) bytes / live IDs, against
  the row's own 32 x 4 bytes; goal <= 2.5x.
- **learning quality** (``benchmarks.embeddings_quality``): per task, progressive AUC of the new path against
  the hashed one on the same simulator events, mean of 3 seeds, and the difference, goal >= -0.002.

The two paths are ``benchmarks.embedding_paths``. Each timed figure is the median of the timed calls after
warm-up, with the trainer's torch threads (``learner.worker``: cores - 1), as are the quality rows. Sizes run one
after the other, each path freed before the next is built.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.embedding_paths import Batch, HashedAdamPath, RowwisePath, size_name
from benchmarks.embeddings_quality import QualityPlan, add_quality_rows, measure_quality
from benchmarks.harness import Report, Row
from benchmarks.timing import load_average, threads
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.allocator import retain_freed_memory
from learner.config import LearnerConfig

EMB_DIM = 32
NEW_FRACTION = 0.01
DENSE_CAP_S = 5.0
GOAL_STEP_RATIO = 1.2
GOAL_IDS_PER_S = 2e6
GOAL_BYTES_RATIO = 2.5
ROW_BYTES = EMB_DIM * 4


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    batch: int = 1024
    warmup: int = 3
    steps: int = 60
    dense_steps: int = 8
    map_calls: int = 1000
    budget_s: float = 30.0
    """A contender stops timing after this long (with at least 3 samples): the hashed path at 10^7 is slow."""
    dense_cap_s: float = DENSE_CAP_S
    quality: QualityPlan | None = None
    """The learning-quality rows' plan (``benchmarks.embeddings_quality``); None: no quality rows."""


FULL = Plan((10**5, 10**6, 10**7), quality=QualityPlan(n_requests=100_000))
QUICK = Plan((10**4, 10**5, 10**6), steps=8, dense_steps=3, map_calls=100, budget_s=5.0,
             quality=QualityPlan(n_requests=10_000))


def trainer_threads() -> int:
    """Intra-op threads the trainer runs with by default (``learner.worker``: every core but one)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


class Traffic:
    """N distinct raw IDs per field and batches drawn over them Zipf-like, each with a share of brand-new IDs."""

    def __init__(self, n: int, batch: int, seed: int = 0) -> None:
        self.n, self.size = n, batch
        self.rng = np.random.default_rng(seed)
        self.universe = {f: self.rng.integers(0, 2**63 - 1, n, dtype=np.int64) for f in ID_FIELDS}
        self.n_new = max(1, int(batch * NEW_FRACTION))
        self.tasks = LearnerConfig().tasks
        self.gen = torch.Generator().manual_seed(seed)

    def ids(self) -> dict[str, np.ndarray]:
        """One batch of raw IDs per field: log-uniform ranks over the universe, then the new IDs."""
        out = {}
        for f in ID_FIELDS:
            ranks = np.floor(float(self.n) ** self.rng.random(self.size - self.n_new)).astype(np.int64)
            seen = self.universe[f][np.clip(ranks, 1, self.n) - 1]
            out[f] = np.concatenate([seen, self.rng.integers(0, 2**63 - 1, self.n_new, dtype=np.int64)])
        return out

    def batches(self, count: int) -> list[Batch]:
        n_dense = len(FEATURE_COLUMNS)
        return [(self.ids(), torch.rand(self.size, n_dense, generator=self.gen),
                 {t: (torch.rand(self.size, generator=self.gen) < 0.2).float() for t in self.tasks})
                for _ in range(count)]


def time_calls(call: Callable[[int], object], warmup: int, calls: int, budget_s: float,
               cap_s: float | None = None) -> list[float]:
    """Seconds of each timed ``call(i)`` after ``warmup`` untimed ones; empty when a warm-up call after the first
    (which also allocates the optimizer's state) takes over ``cap_s``."""
    for i in range(warmup):
        t0 = time.perf_counter()
        call(i)
        if cap_s is not None and i >= 1 and time.perf_counter() - t0 > cap_s:
            return []
    samples: list[float] = []
    start = time.perf_counter()
    for i in range(warmup, warmup + calls):
        t0 = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(samples) >= 3:
            break
    return samples


@dataclass
class SizeResult:
    n: int
    step_ms: float
    hashed_ms: float | None
    fill_s: float
    map_ids_per_s: float | None = None
    bytes_per_live_id: float | None = None
    live_ids: int = 0


def measure(n: int, plan: Plan, progress: Progress | None = None, *, largest: bool = False,
            hashed: bool = True) -> SizeResult:
    """Both paths at ``n`` distinct IDs per field; at the largest size also the map alone and the memory."""
    traffic = Traffic(n, plan.batch, seed=n)
    step_calls = plan.warmup + max(plan.steps, plan.dense_steps)
    batches = traffic.batches(step_calls)
    map_batches = [traffic.ids() for _ in range(plan.map_calls if largest else 0)]
    path = RowwisePath(n + traffic.n_new * (step_calls + len(map_batches)), EMB_DIM, len(FEATURE_COLUMNS))
    started = time.perf_counter()
    path.fill(traffic.universe, progress)
    result = SizeResult(n, 0.0, None, time.perf_counter() - started)
    task = progress.add_task(f"{size_name(n)}: timing steps", total=None) if progress else None
    step_s = time_calls(lambda i: path.step(batches[i], 1 + i), plan.warmup, plan.steps, plan.budget_s)
    result.step_ms = 1e3 * statistics.median(step_s)
    if largest:
        field = ID_FIELDS[0]
        map_s = time_calls(lambda i: path.maps[field].rows(map_batches[i][field], 10**6 + i), 0, len(map_batches),
                           plan.budget_s)
        result.map_ids_per_s = plan.batch / statistics.median(map_s)
        result.bytes_per_live_id = path.bytes_per_live_id()
        result.live_ids = path.live_ids()
    path = None  # the tables go before the next size's are built (a lambda above still names it)
    gc.collect()
    if hashed:
        reference = HashedAdamPath(n, EMB_DIM, len(FEATURE_COLUMNS))
        dense_s = time_calls(lambda i: reference.step(batches[i], 1 + i), plan.warmup, plan.dense_steps,
                             plan.budget_s, cap_s=plan.dense_cap_s)
        result.hashed_ms = 1e3 * statistics.median(dense_s) if dense_s else None
        del reference
        gc.collect()
    if progress is not None and task is not None:
        progress.remove_task(task)
    return result


def bench(plan: Plan, progress: Progress | None = None) -> Report:
    """The rows of ``plan``'s sizes (the first the anchor, the last the largest), with the trainer's threads."""
    report = Report("embeddings")
    results: list[SizeResult] = []
    load_at_start = load_average()
    with threads(trainer_threads()):
        report.machine["torch_threads"] = torch.get_num_threads()
        hashed = True
        for n in plan.sizes:
            results.append(measure(n, plan, progress, largest=n == plan.sizes[-1], hashed=hashed))
            hashed = results[-1].hashed_ms is not None  # over the cap here: a larger table is slower still
        quality = measure_quality(plan.quality, progress) if plan.quality is not None else None
    add_rows(report, results, plan)
    report.notes[-1] += f" (at start {load_at_start})"
    if plan.quality is not None and quality is not None:
        add_quality_rows(report, quality, plan.quality)
    return report


def add_rows(report: Report, results: list[SizeResult], plan: Plan) -> None:
    anchor, largest = results[0], results[-1]
    anchor_name = f"the same step at {size_name(anchor.n)}"
    for r in results:
        is_largest = r is largest and r is not anchor
        report.add(Row(
            f"step, ID maps + row-wise, {size_name(r.n)} IDs/field", r.step_ms, "ms",
            anchor=None if r is anchor else anchor_name, anchor_value=None if r is anchor else anchor.step_ms,
            goal=f"<= {GOAL_STEP_RATIO}x the step at {size_name(anchor.n)}" if is_largest else None,
            met=r.step_ms <= GOAL_STEP_RATIO * anchor.step_ms if is_largest else None))
    for r in results:
        if r.hashed_ms is not None:
            report.add(Row(f"step, hashed + dense Adam (reference), {size_name(r.n)} rows", r.hashed_ms,
                           "ms", anchor=f"ID maps + row-wise at {size_name(r.n)}", anchor_value=r.step_ms))
        else:
            report.notes.append(f"hashed nn.Embedding + dense Adam at {size_name(r.n)} rows not run: a warm-up step "
                                f"took over {plan.dense_cap_s:g} s (here or at a smaller size)")
    if largest.map_ids_per_s is None or largest.bytes_per_live_id is None:
        raise ValueError("the largest size was measured without the map and memory figures (largest=False)")
    report.add(Row(f"ID map lookup + insert, {size_name(largest.n)} live IDs", largest.map_ids_per_s, "IDs/s",
                   goal=f">= {GOAL_IDS_PER_S / 1e6:g} M IDs/s", met=largest.map_ids_per_s >= GOAL_IDS_PER_S))
    report.add(Row(f"memory per live ID (row + state + map), {size_name(largest.n)} IDs/field",
                   largest.bytes_per_live_id, "B", anchor=f"the row's own bytes ({EMB_DIM} x 4)",
                   anchor_value=ROW_BYTES,
                   goal=f"<= {GOAL_BYTES_RATIO}x", met=largest.bytes_per_live_id <= GOAL_BYTES_RATIO * ROW_BYTES))
    config = LearnerConfig()
    fills = ", ".join(f"{size_name(r.n)} {r.fill_s:.1f} s" for r in results)
    report.notes += [
        f"batch {plan.batch}, fields {', '.join(ID_FIELDS)} (emb {EMB_DIM} each), {len(FEATURE_COLUMNS)} dense "
        f"features; {config.family} {dict(config.hparams) or 'default hparams'}, {len(config.tasks)} tasks; IDs "
        f"log-uniform (P(k) ~ 1/k) over N per field, {NEW_FRACTION:.0%} of each batch new; medians of {plan.steps} "
        f"steps (hashed: {plan.dense_steps}) after {plan.warmup} warm-up; map alone: {plan.map_calls} calls of one "
        f"field's {plan.batch} IDs",
        f"maps filled with all N IDs before timing ({fills}); {largest.live_ids:,} live IDs over both fields at "
        f"{size_name(largest.n)}; capacity N plus the timed calls' new IDs; at {size_name(largest.n)} the two "
        f"fields' map calls are about {2e3 * plan.batch / largest.map_ids_per_s:.2f} ms of the step",
        f"{report.machine['torch_threads']} torch threads (the trainer's default: cores - 1); load average at end "
        f"{load_average()}",
    ]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def run(quick: bool = False) -> Report:
    retain_freed_memory()  # as the trainer process does (learner.worker)
    with _progress() as progress:
        return bench(QUICK if quick else FULL, progress)


if __name__ == "__main__":
    run(quick=True).print()


__all__ = ["FULL", "QUICK", "Plan", "Traffic", "bench", "measure", "run"]
