"""``moestream bench synthetic``: the MMoE paper's synthetic experiment over every family in the zoo.

Ma et al., KDD 2018, section 3.2 (constants as in the PLE paper's reproduction): two regression tasks
whose correlation is set by the cosine ``p`` between their weight vectors,

    u1, u2 orthonormal in R^d;  w1 = c·u1;  w2 = c·(p·u1 + sqrt(1 - p²)·u2)
    x ~ N(0, I_d);  y_i = w_iᵀx + Σ_{k=1..m} sin(α_k·w_iᵀx + β_k) + ε_i,  ε_i ~ N(0, 0.01)

with ``c = 1``, ``m = 10``, ``α, β ~ N(0, 1)`` shared by both tasks and ``d = 100``. ``p`` is the Pearson
correlation of the linear parts ``w_iᵀx``; the labels correlate less because of the sines.

Each (correlation, seed) draws its own ``u``, ``α``, ``β`` and model initialisation; every family sees
the same data for a given seed. Training reads a fresh batch each step (a single pass, as in a stream),
so the held-out loss measures generalisation with no overfitting confound. Sizes follow the paper's
(8 single-layer experts of 16 units, towers of one 8-unit layer, a 113-unit Shared-Bottom to match
their 13,056 parameters); the newer families are sized to the same budget. Details, figures and the
reading: docs/synthetic.md.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

import orjson
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from benchmarks.harness import Report, Row
from learner.models import FAMILIES, build, loss_terms

TASKS = ("y1", "y2")
CORRELATIONS = (0.5, 0.9, 1.0)
SIZES: dict[str, dict] = {
    "shared_bottom": {"expert_dims": (113,), "tower_dims": (8,)},
    "omoe": {"n_experts": 8, "expert_dims": (16,), "tower_dims": (8,)},
    "mmoe": {"n_experts": 8, "expert_dims": (16,), "tower_dims": (8,)},
    "ple": {"n_experts": 2, "n_levels": 2, "expert_dims": (16,), "tower_dims": (8,)},
    "home": {"n_experts": 2, "expert_dims": (16,), "tower_dims": (8,)},
    "smes": {"n_experts": 8, "k_shared": 2, "k_private": 1, "expert_dims": (16,), "tower_dims": (8,)},
}


class SyntheticTasks:
    """The paper's generator for one correlation and seed: ``sample(n, generator)`` -> ``(x, y, linear)``.

    ``noise_std = 0.1``: the paper's N(0, 0.01) is a variance.
    """

    def __init__(
        self, correlation: float, seed: int = 0, *, n_inputs: int = 100, c: float = 1.0, m: int = 10,
        noise_std: float = 0.1,
    ) -> None:
        if not -1.0 <= correlation <= 1.0:
            raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
        if n_inputs < 2:
            raise ValueError("need at least 2 inputs for two orthogonal task directions")
        self.correlation, self.seed, self.n_inputs, self.noise_std = correlation, seed, n_inputs, noise_std
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(n_inputs, 2, generator=g, dtype=torch.float64))
        u1, u2 = basis[:, 0], basis[:, 1]  # orthonormal
        p = correlation
        self.weights = torch.stack([c * u1, c * (p * u1 + math.sqrt(1 - p * p) * u2)], dim=1).float()  # (d, 2)
        self.alpha = torch.randn(m, generator=g)  # shared by both tasks
        self.beta = torch.randn(m, generator=g)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``x (n, d)``, labels ``y (n, 2)`` and the linear parts ``w_iᵀx (n, 2)``."""
        x = torch.randn(n, self.n_inputs, generator=generator)
        linear = x @ self.weights  # (n, 2)
        waves = torch.sin(self.alpha * linear[:, :, None] + self.beta).sum(dim=-1)  # (n, 2)
        noise = self.noise_std * torch.randn(n, 2, generator=generator)
        return x, linear + waves + noise, linear


@dataclass(frozen=True)
class Schedule:
    """Training and evaluation budget of one model."""

    steps: int
    batch: int = 256
    lr: float = 3e-3
    n_test: int = 10_000
    seeds: int = 5


FULL = Schedule(steps=1000)
QUICK = Schedule(steps=100, seeds=2, n_test=4_000)


def train_and_test(family: str, correlation: float, seed: int, schedule: Schedule) -> dict:
    """Train one model on fresh batches and return its held-out MSE per task (and the mean)."""
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation
    data = SyntheticTasks(correlation, seed=seed)
    train_stream = torch.Generator().manual_seed(1_000_003 * seed + 1)
    x_test, y_test, _ = data.sample(schedule.n_test, torch.Generator().manual_seed(1_000_003 * seed + 2))
    torch.manual_seed(seed)
    model = build(family, n_inputs=data.n_inputs, tasks=TASKS, task_types={t: "regression" for t in TASKS},
                  **SIZES[family])
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr)
    started = time.perf_counter()
    for _ in range(schedule.steps):
        x, y, _ = data.sample(schedule.batch, train_stream)
        optimizer.zero_grad(set_to_none=True)
        total, _ = loss_terms(model(x), {t: y[:, i] for i, t in enumerate(TASKS)})
        total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(x_test)
        per_task = [float(((out.logits[t] - y_test[:, i]) ** 2).mean()) for i, t in enumerate(TASKS)]
    return {
        "family": family, "correlation": correlation, "seed": seed, "per_task": per_task,
        "loss": statistics.fmean(per_task), "seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _worker_init() -> None:
    torch.set_num_threads(1)


def _preload() -> None:
    """Import what every job needs once, before the workers fork: the first optimiser pulls in
    torch._dynamo, ten seconds on this machine, which each spawned worker would otherwise pay again."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def run(quick: bool = False, workers: int | None = None) -> Report:
    schedule = QUICK if quick else FULL
    workers = workers or min(2, os.cpu_count() or 1)
    jobs = [(f, p, s) for p in CORRELATIONS for s in range(schedule.seeds) for f in FAMILIES]
    started = time.perf_counter()
    results = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    _preload()
    with progress, ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_worker_init) as pool:
        task = progress.add_task("synthetic: train every family", total=len(jobs))
        futures = [pool.submit(train_and_test, f, p, s, schedule) for f, p, s in jobs]
        for future in as_completed(futures):
            results.append(future.result())
            progress.advance(task)
    report = summarise(results, schedule, quick)
    report.notes.append("held-out MSE, mean ± std over seeds (docs/synthetic.md):\n" + markdown(results))
    per_family = {f: statistics.fmean(r["seconds"] for r in results if r["family"] == f) for f in FAMILIES}
    report.notes.append(
        f"wall time {time.perf_counter() - started:.0f} s with {workers} worker processes; training seconds per "
        "model: " + ", ".join(f"{f} {s:.1f}" for f, s in per_family.items()) + "."
    )
    return report


def summarise(results: list[dict], schedule: Schedule, quick: bool) -> Report:
    """Rows: mean held-out MSE per (correlation, family), anchored on Shared-Bottom; the paper's claim
    (MMoE below Shared-Bottom and OMoE at low correlation) as the rows with a goal."""
    report = Report(benchmark="synthetic")
    label = "QUICK (not the published figures)" if quick else "full"
    report.notes.append(
        f"{label}: {schedule.seeds} seeds x {schedule.steps} Adam steps (lr {schedule.lr}, batch {schedule.batch}, "
        f"fresh batches), held-out MSE on {schedule.n_test:,} examples, mean over the two tasks and the seeds."
    )
    table = loss_table(results)
    for p in sorted(table):
        base = table[p]["shared_bottom"]
        for family in FAMILIES:
            if family not in table[p]:
                continue
            cell = table[p][family]
            claim = family == "mmoe" and p == min(table)
            report.add(Row(
                name=f"corr {p}: {family} test MSE (std {cell['std']:.3f}, n={cell['n']})",
                value=cell["mean"], unit="MSE", anchor="shared_bottom", anchor_value=base["mean"],
                goal="< shared_bottom (paper)" if claim else None,
                met=cell["mean"] < base["mean"] if claim else None,
            ))
        if "mmoe" in table[p] and "omoe" in table[p] and p == min(table):
            mmoe, omoe = table[p]["mmoe"], table[p]["omoe"]
            report.add(Row(name=f"corr {p}: mmoe test MSE vs omoe", value=mmoe["mean"], unit="MSE", anchor="omoe",
                           anchor_value=omoe["mean"], goal="< omoe (paper)", met=mmoe["mean"] < omoe["mean"]))
    for p in sorted(table):
        parts = []
        for other in ("shared_bottom", "omoe"):
            c = paired(results, p, "mmoe", other)
            parts.append(f"mmoe - {other} per seed {c['mean_diff']:+.4f} (std {c['std_diff']:.4f}), "
                         f"mmoe lower in {c['wins']}/{c['n']}")
        report.notes.append(f"corr {p}: " + "; ".join(parts) + ".")
    report.notes.append("held-out MSE per seed: " + orjson.dumps(per_seed(results)).decode())
    return report


def loss_table(results: list[dict]) -> dict[float, dict[str, dict]]:
    """correlation -> family -> {mean, std, n} of the held-out MSE over seeds."""
    table: dict[float, dict[str, list[float]]] = {}
    for r in results:
        table.setdefault(r["correlation"], {}).setdefault(r["family"], []).append(r["loss"])
    return {
        p: {f: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for f, v in fams.items()}
        for p, fams in table.items()
    }


def paired(results: list[dict], correlation: float, family: str, other: str) -> dict:
    """``family`` against ``other`` seed by seed (same data, same seed): how often it had the lower loss,
    and the mean and std of the per-seed difference ``loss(family) - loss(other)``."""
    by = {(r["family"], r["seed"]): r["loss"] for r in results if r["correlation"] == correlation}
    seeds = sorted(s for f, s in by if f == family and (other, s) in by)
    diffs = [by[(family, s)] - by[(other, s)] for s in seeds]
    return {
        "wins": sum(d < 0 for d in diffs), "n": len(diffs),
        "mean_diff": statistics.fmean(diffs) if diffs else float("nan"),
        "std_diff": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
    }


def per_seed(results: list[dict]) -> dict[str, dict[str, list[float]]]:
    """correlation -> family -> held-out MSE by seed, for anyone re-reading the JSON."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        out.setdefault(str(r["correlation"]), {}).setdefault(r["family"], []).append(round(r["loss"], 5))
    return out


def markdown(results: list[dict]) -> str:
    """The docs/synthetic.md table: mean ± std of held-out MSE, one row per family."""
    table = loss_table(results)
    cols = sorted(table)
    lines = ["| family | params | " + " | ".join(f"corr {p}" for p in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    params = {r["family"]: r["parameters"] for r in results}
    for family in FAMILIES:
        cells = [f"{table[p][family]['mean']:.4f} ± {table[p][family]['std']:.4f}" if family in table[p] else "-"
                 for p in cols]
        lines.append(f"| {family} | {params.get(family, '-'):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
