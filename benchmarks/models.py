"""``moestream bench models``: training throughput of our model zoo against the peer libraries.

Four comparisons, every figure measured beside its anchor in the same process (see
docs/benchmarks-models.md for how to read the table):

1. Streaming-sized MMoE (batch 256, input 128, 32 experts [64, 32], towers [16], 2 tasks) against
   torch-rechub's and DeepCTR-Torch's MMOE: forward + backward + Adam, examples/s. Goal >= 2.5x both.
   Then the same race over a grid of streaming sizes (``streaming_grid``: the corners of batch 256-1024,
   8-32 experts, expert widths 32-128, 2-6 tasks, its centre and the issue's probe point), one row per
   point and peer; goal >= 2x both peers at the worst point.
2. Large MMoE (batch 2048, input 256, 16 experts [256, 128], towers [64]): FLOP-bound, so also
   achieved GFLOP/s against a GEMM peak measured in the same run; bf16 autocast where the CPU does
   bf16 natively (goal >= 1.5x both peers, progressive AUC within 0.002 of fp32).
3. SMES with 64 experts (k_shared 4, k_private 1, 6 tasks) against our dense MMoE with the same 64
   experts, at the large regime's sizes (batch 2048, input 256, experts [256, 128], towers [64]): goal
   >= 4x, plus how many experts each instance actually executed; and the same at batch 1024, no goal.

All contenders run with 2 intra-op threads, alternating A, B, C, A, B, C after a warm-up; each row is
the median over rounds.

``python -m benchmarks.models [--quick] [--json PATH] [SECTION ...]`` runs only the sections named
(``SECTIONS``), e.g. ``grid``; ``moestream bench models`` runs them all.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks.harness import Report, Row
from learner.allocator import retain_freed_memory
from benchmarks.peers import MMoESize, contenders, ours, parameter_count, structure
from benchmarks.precision import ClickStream, auc_gap, progressive_auc
from benchmarks.timing import (
    TrainingRun,
    bf16_support,
    expert_gemm_seconds,
    gemm_peak,
    interleave,
    load_average,
    random_batches,
    threads,
)

THREADS = 2
STREAMING = MMoESize(n_inputs=128, n_experts=32, expert_dims=(64, 32), tower_dims=(16,))
STREAMING_BATCH = 256
LARGE = MMoESize(n_inputs=256, n_experts=16, expert_dims=(256, 128), tower_dims=(64,))
LARGE_BATCH = 2048
SPARSE = MMoESize(n_inputs=256, n_experts=64, expert_dims=(256, 128), tower_dims=(64,), n_tasks=6)
SPARSE_BATCH = LARGE_BATCH
"""The large regime's sizes with the issue's 64 experts and 6 tasks. Fixed costs per step (Adam over all 64
experts' weights, routing and dispatch, one call per op) weigh more on a smaller batch, so the comparison
is also run, without a goal, at ``SPARSE_HALF_BATCH``."""
SPARSE_HALF_BATCH = LARGE_BATCH // 2
SMES_HPARAMS = {"k_shared": 4, "k_private": 1}
AUC_TOLERANCE = 0.002
GRID_GOAL = 2.0


@dataclass(frozen=True)
class GridPoint:
    """One streaming size of the grid and why it is there: a ``corner`` of the box, its ``centre`` or the
    issue's ``probe``."""

    size: MMoESize
    batch: int
    kind: str


def streaming_grid() -> list[GridPoint]:
    """The streaming box (batch 256-1024, 8-32 experts, first expert layer 32-128 wide and the second half
    of it, 2-6 tasks; input 128, towers [16], as at the streaming size): its 16 corners, where a ratio is
    most likely to be extreme since each factor sits at an end, its centre (batch 512, 16 experts [64, 32],
    4 tasks), and the issue's probe (batch 512, input 96, 24 experts [48, 24], 2 tasks)."""
    corners = [
        GridPoint(MMoESize(n_inputs=128, n_experts=e, expert_dims=(w, w // 2), tower_dims=(16,), n_tasks=t), b,
                  "corner")
        for b, e, w, t in itertools.product((256, 1024), (8, 32), (32, 128), (2, 6))
    ]
    return [
        *corners,
        GridPoint(MMoESize(n_inputs=128, n_experts=16, expert_dims=(64, 32), tower_dims=(16,), n_tasks=4), 512,
                  "centre"),
        GridPoint(MMoESize(n_inputs=96, n_experts=24, expert_dims=(48, 24), tower_dims=(16,), n_tasks=2), 512,
                  "probe"),
    ]


@dataclass(frozen=True)
class Repeats:
    """How long each comparison runs: ``warmup`` untimed steps, then ``rounds`` x ``steps`` timed."""

    warmup: int
    rounds: int
    steps: int


@dataclass(frozen=True)
class GridRepeats:
    """The grid's timing: ``warmup`` untimed steps, then ``rounds`` blocks per contender, each of as many
    steps as take about ``block_s`` (a step takes from about 2.5 ms, ours at the smallest point, to 100 ms,
    a peer's at the largest, so one fixed step count would not fit every point)."""

    warmup: int
    rounds: int
    block_s: float


@dataclass(frozen=True)
class Plan:
    streaming: Repeats
    grid: GridRepeats
    large: Repeats
    sparse: Repeats  # ``steps`` are SMES's; a dense 64-expert step is several SMES steps long, so it
    sparse_dense_steps: int  # takes this many per round instead
    auc_batches: int  # stream length of the bf16-vs-fp32 AUC check (only where bf16 is native)


FULL = Plan(Repeats(5, 21, 10), GridRepeats(3, 15, 0.05), Repeats(2, 11, 2), Repeats(1, 15, 2),
            sparse_dense_steps=1, auc_batches=60)
QUICK = Plan(Repeats(5, 7, 5), GridRepeats(2, 5, 0.02), Repeats(1, 2, 1), Repeats(1, 2, 1),
             sparse_dense_steps=1, auc_batches=15)
SECTIONS = ("streaming", "grid", "large", "sparse")


def run(quick: bool = False, sections: Sequence[str] = SECTIONS) -> Report:
    """Every section in ``SECTIONS`` order, or only those named in ``sections``."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    plan = QUICK if quick else FULL
    report = Report(benchmark="models")
    retained = retain_freed_memory()
    report.notes.append(
        f"{'QUICK mode: fewer rounds, same sizes' if quick else 'full mode'}; sections "
        f"{', '.join(s for s in SECTIONS if s in sections) or 'none'}; {THREADS} intra-op threads for "
        f"every contender; load average at start {load_average()} (a shared machine: contenders alternate "
        "so a busy neighbour slows all of them alike); glibc keeps freed memory for reuse "
        f"(learner.allocator, the same process for every contender): {'yes' if retained else 'no'}."
    )
    started = time.perf_counter()
    seconds = {}
    with threads(THREADS), _progress() as progress:
        for section, measure in (
            ("streaming", lambda: versus_peers(report, STREAMING, STREAMING_BATCH, plan.streaming, "streaming",
                                               progress, goal=2.5)),
            ("grid", lambda: grid(report, streaming_grid(), plan.grid, progress)),
            ("large", lambda: large(report, plan, progress)),
            ("sparse", lambda: sparse(report, plan, progress)),
        ):
            if section not in sections:
                continue
            t0 = time.perf_counter()
            measure()
            seconds[section] = time.perf_counter() - t0
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    report.notes.append(
        f"load average at end {load_average()}; wall time {time.perf_counter() - started:.0f} s ({spent})."
    )
    return report


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    )


def _describe(size: MMoESize, batch: int) -> str:
    experts = ", ".join(map(str, size.expert_dims))
    towers = ", ".join(map(str, size.tower_dims))
    return f"B={batch}, in={size.n_inputs}, {size.n_experts}x[{experts}], towers [{towers}], {size.n_tasks} tasks"


def versus_peers(
    report: Report,
    size: MMoESize,
    batch: int,
    repeats: Repeats,
    regime: str,
    progress: Progress | None = None,
    *,
    goal: float | None = None,
    autocast: torch.dtype | None = None,
) -> list[TrainingRun]:
    """Our MMoE against both peers at one size; adds one row per peer (examples/s, ratio ours/peer)."""
    runs = [TrainingRun(c, random_batches(size.n_inputs, size.n_tasks, batch), autocast=autocast)
            for c in contenders(size)]
    task = None
    if progress is not None:
        task = progress.add_task(f"{regime}: ours vs peers", total=len(runs) * (1 + repeats.rounds))
    interleave(runs, rounds=repeats.rounds, steps=repeats.steps, warmup=repeats.warmup, progress=progress, task=task)
    mine, *peers = runs
    for peer in peers:
        ratio = mine.median() / peer.median()
        report.add(Row(
            name=f"{regime}: ours MMoE train ex/s ({_describe(size, batch)})",
            value=mine.median(), unit="ex/s", anchor=peer.name, anchor_value=peer.median(),
            goal=None if goal is None else f">= {goal}x", met=None if goal is None else ratio >= goal,
        ))
    counts = ", ".join(
        f"{r.name} {parameter_count(r.contender.model):,} in {len(list(r.contender.model.parameters()))} tensors"
        for r in runs
    )
    shapes = "; ".join(f"{r.name} {structure(r.contender)}" for r in runs)
    report.notes.append(f"{regime}: parameters {counts}; layout {shapes}.")
    return runs


def grid(
    report: Report, points: Sequence[GridPoint], repeats: GridRepeats, progress: Progress | None = None
) -> dict[str, float]:
    """Our MMoE against both peers at every point, each point its own interleaved race on its own batches:
    one row per point and peer (no goal), then per peer the worst point's row again with the goal. Returns
    the minimum ratio per peer."""
    task = progress.add_task("grid: ours vs peers", total=len(points)) if progress is not None else None
    ratios: dict[str, list[tuple[float, Row, GridPoint]]] = {}
    for point in points:
        runs = [TrainingRun(c, random_batches(point.size.n_inputs, point.size.n_tasks, point.batch))
                for c in contenders(point.size)]
        steps = [_steps_per_block(run, repeats.warmup, repeats.block_s) for run in runs]
        interleave(runs, rounds=repeats.rounds, steps=steps, warmup=0)
        mine, *peers = runs
        for peer in peers:
            row = report.add(Row(
                name=f"grid {point.kind}: ours MMoE train ex/s ({_describe(point.size, point.batch)})",
                value=mine.median(), unit="ex/s", anchor=peer.name, anchor_value=peer.median(),
            ))
            ratios.setdefault(peer.name, []).append((mine.median() / peer.median(), row, point))
        if progress is not None and task is not None:
            progress.advance(task)
    minima = {}
    floors: dict[GridPoint, float] = {}
    for anchor, measured in ratios.items():
        ratio, worst, at = min(measured, key=lambda entry: entry[0])
        minima[anchor] = ratio
        report.add(replace(
            worst, name=f"grid minimum over {len(points)} sizes: ours MMoE train ex/s at the worst point "
                        f"({_describe(at.size, at.batch)})",
            goal=f">= {GRID_GOAL:g}x", met=ratio >= GRID_GOAL,
        ))
        tightest: tuple[float, float, GridPoint] | None = None  # (floor / budget, budget, point)
        for point_ratio, row, point in measured:
            if point_ratio >= GRID_GOAL:
                continue
            if point not in floors:
                size = point.size
                floors[point] = expert_gemm_seconds(size.n_experts, size.n_inputs, size.expert_dims, point.batch)
            budget = point.batch / float(row.anchor_value or 0.0) / GRID_GOAL
            if tightest is None or floors[point] / budget > tightest[0]:
                tightest = (floors[point] / budget, budget, point)
        if tightest is not None:
            _, budget, point = tightest
            report.add(Row(
                name=f"grid: the expert GEMMs alone where they leave the least of the goal's step "
                     f"({_describe(point.size, point.batch)})",
                value=floors[point] * 1e3, unit="ms/step",
                anchor=f"the {GRID_GOAL:g}x budget: {anchor}'s step / {GRID_GOAL:g}", anchor_value=budget * 1e3,
            ))
    if floors:
        report.notes.append(
            "grid: at every point under the goal, the expert GEMMs that every implementation of that point runs "
            "(forward, weight and input gradients, the faster of batched and per-expert GEMMs; "
            "benchmarks.timing.expert_gemm_seconds) are timed against the step the goal allows there, and the "
            "point where they leave the least of it gets a row per peer; a ratio near or above 1 "
            "means no removal of overhead reaches the goal there, only GEMMs faster than the peers' GEMMs of the "
            "same shapes from the same BLAS. Every such point: " + "; ".join(
                f"{_describe(p.size, p.batch)} {seconds * 1e3:.1f} ms" for p, seconds in floors.items()) + "."
        )
    report.notes.append(
        f"grid: {len(points)} sizes ({', '.join(sorted({p.kind for p in points}))}), {repeats.rounds} rounds of "
        f"blocks of about {repeats.block_s * 1e3:.0f} ms per contender after {repeats.warmup} warm-up steps; "
        "minimum ratio " + ", ".join(f"vs {anchor} {r:.2f}x" for anchor, r in minima.items()) + "."
    )
    return minima


def _steps_per_block(run: TrainingRun, warmup: int, block_s: float) -> int:
    """Warm ``run`` up and say how many of its steps fill about ``block_s`` (its fastest warm-up step,
    the one least disturbed by a neighbour, sets the pace)."""
    fastest = float("inf")
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        run.step()
        fastest = min(fastest, time.perf_counter() - start)
    return max(1, round(block_s / fastest))


def large(report: Report, plan: Plan, progress: Progress | None = None) -> None:
    """The FLOP-bound size in fp32 (and bf16 where native), read against the GEMM peak."""
    peak_fp32, n32 = gemm_peak(torch.float32, budget_s=20.0)
    peak_bf16, n16 = gemm_peak(torch.bfloat16, budget_s=3.0)
    support = bf16_support()
    report.add(Row(name=f"GEMM peak fp32 (torch.mm {n32}x{n32}, best of 5)", value=peak_fp32, unit="GFLOP/s"))
    report.add(Row(name=f"GEMM bf16 (torch.mm {n16}x{n16}, best of 5)", value=peak_bf16, unit="GFLOP/s",
                   anchor="GEMM peak fp32", anchor_value=peak_fp32))
    report.notes.append(f"bf16: {support.describe()}.")

    runs = versus_peers(report, LARGE, LARGE_BATCH, plan.large, "large fp32", progress)
    flops = LARGE.train_flops()
    for run in runs:
        report.add(Row(name=f"large fp32: {run.name} achieved", value=run.median() * flops / 1e9, unit="GFLOP/s",
                       anchor="GEMM peak fp32", anchor_value=peak_fp32))
    report.notes.append(
        f"large: {flops / 1e6:.2f} MFLOP per example (matmuls of experts, gates, mix, towers; forward x3 for "
        "forward + backward), the same count for all three contenders."
    )
    if not support.native:
        report.add(Row(
            name="large bf16 autocast: ours vs both peers, AUC vs fp32", value=0.0, unit="(not run)",
            goal=">= 1.5x both peers (as shipped) in bf16 and AUC within 0.002: not applicable, no native bf16 "
                 "on this CPU",
            met=None,
        ))
        report.notes.append(
            f"bf16 not run: this CPU lacks AVX512-BF16 and AMX; a bf16 GEMM runs at {peak_bf16:.2f} GFLOP/s here "
            f"against {peak_fp32:.1f} in fp32, so autocast would only slow training down."
        )
        return
    mine = bf16_versus_peers(report, LARGE, LARGE_BATCH, plan.large, progress)
    report.add(Row(name="large bf16: ours achieved", value=mine.median() * flops / 1e9, unit="GFLOP/s",
                   anchor="GEMM bf16", anchor_value=peak_bf16))
    bf16_auc(report, plan, progress)


def bf16_versus_peers(
    report: Report, size: MMoESize, batch: int, repeats: Repeats, progress: Progress | None = None
) -> TrainingRun:
    """Ours under bf16 autocast against each peer as it ships (fp32: neither library has a precision
    option) for the goal, and against each peer under the same autocast, for reference, in one
    interleaved block. Returns our run."""
    batches = random_batches(size.n_inputs, size.n_tasks, batch)
    mine, *shipped = contenders(size)
    _, *cast = contenders(size)
    runs = [TrainingRun(replace(mine, name="ours (mmoe), bf16 autocast"), batches, autocast=torch.bfloat16)]
    runs += [TrainingRun(replace(p, name=f"{p.name}, fp32 as shipped"), batches) for p in shipped]
    runs += [TrainingRun(replace(p, name=f"{p.name}, bf16 autocast"), batches, autocast=torch.bfloat16) for p in cast]
    task = progress.add_task("large bf16: ours vs peers", total=len(runs) * (1 + repeats.rounds)) if progress else None
    interleave(runs, rounds=repeats.rounds, steps=repeats.steps, warmup=repeats.warmup, progress=progress, task=task)
    ours_run, *peers = runs
    for peer in peers:
        as_shipped = peer.autocast is None
        ratio = ours_run.median() / peer.median()
        report.add(Row(
            name=f"large bf16: ours MMoE (bf16 autocast) train ex/s vs peer {'as shipped' if as_shipped else 'also in bf16'}",
            value=ours_run.median(), unit="ex/s", anchor=peer.name, anchor_value=peer.median(),
            goal=">= 1.5x" if as_shipped else None, met=ratio >= 1.5 if as_shipped else None,
        ))
    return ours_run


def bf16_auc(report: Report, plan: Plan, progress: Progress | None = None) -> None:
    """Progressive AUC of our large MMoE trained in fp32 and under bf16 autocast on one stream."""
    stream = ClickStream(n_inputs=LARGE.n_inputs, n_tasks=LARGE.n_tasks)
    task = progress.add_task("bf16 vs fp32 AUC", total=2 * plan.auc_batches) if progress is not None else None

    def tick() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    aucs = {
        dtype: progressive_auc(lambda: ours(LARGE), stream, batch=LARGE_BATCH, n_batches=plan.auc_batches,
                               autocast=dtype, tick=tick)
        for dtype in (None, torch.bfloat16)
    }
    gap = auc_gap(aucs[None], aucs[torch.bfloat16])
    report.add(Row(name="large bf16: progressive AUC gap to fp32 (max over tasks)", value=gap, unit="AUC",
                   goal=f"<= {AUC_TOLERANCE}", met=gap <= AUC_TOLERANCE))
    report.notes.append(
        f"progressive AUC over {plan.auc_batches} x {LARGE_BATCH} examples: fp32 {aucs[None]}, "
        f"bf16 {aucs[torch.bfloat16]}."
    )


def sparse(report: Report, plan: Plan, progress: Progress | None = None) -> None:
    """SMES (64 experts, k_shared 4, k_private 1, 6 tasks) against our dense MMoE with the same experts:
    at the large regime's batch (the goal) and, for how the ratio falls with the batch, at half of it."""
    dense, smes = _sparse_pair(SPARSE_BATCH, plan, progress)
    ratio = smes.median() / dense.median()
    report.add(Row(
        name=f"smes train ex/s (k_shared 4, k_private 1; {_describe(SPARSE, SPARSE_BATCH)})",
        value=smes.median(), unit="ex/s", anchor="ours dense MMoE, same 64 experts", anchor_value=dense.median(),
        goal=">= 4x", met=ratio >= 4.0,
    ))
    executed = executed_experts(smes)
    bound = int(smes.contender.model.max_executed)  # type: ignore[arg-type]
    report.add(Row(name="smes executed experts per instance, mean", value=executed["mean"], unit="experts",
                   anchor="dense MMoE (all experts)", anchor_value=float(SPARSE.n_experts)))
    report.add(Row(name="smes executed experts per instance, max", value=executed["max"], unit="experts",
                   anchor="bound k_shared + T*k_private", anchor_value=float(bound),
                   goal=f"<= {bound}", met=executed["max"] <= bound))
    half_dense, half_smes = _sparse_pair(SPARSE_HALF_BATCH, plan, progress)
    half_ratio = half_smes.median() / half_dense.median()
    report.add(Row(
        name=f"smes train ex/s at half the batch, no goal ({_describe(SPARSE, SPARSE_HALF_BATCH)})",
        value=half_smes.median(), unit="ex/s", anchor="ours dense MMoE, same 64 experts",
        anchor_value=half_dense.median(),
    ))
    ideal = SPARSE.n_experts / executed["mean"]
    report.notes.append(
        f"sparse: expert FLOPs alone would allow {ideal:.1f}x ({SPARSE.n_experts} / {executed['mean']:.2f} experts "
        f"per row); measured {ratio:.2f}x at batch {SPARSE_BATCH}, {half_ratio:.2f}x at {SPARSE_HALF_BATCH} (the "
        "per-step costs that do not shrink with the batch, Adam over every expert's weights among them, weigh "
        f"more there). Executed-experts figures are over the timing batches after "
        f"{plan.sparse.rounds * plan.sparse.steps + plan.sparse.warmup} training steps. Both with fused Adam, "
        "as our learner trains (the peer comparisons above use torch's default Adam for every contender). "
        "Parameters: "
        f"dense {parameter_count(dense.contender.model):,}, smes {parameter_count(smes.contender.model):,}."
    )


def _sparse_pair(batch: int, plan: Plan, progress: Progress | None) -> tuple[TrainingRun, TrainingRun]:
    """Dense MMoE and SMES from the same seed on the same batches, timed alternately."""
    batches = random_batches(SPARSE.n_inputs, SPARSE.n_tasks, batch)
    # Both are ours, so both train as our learner does: fused Adam (learner.step.build_optimizer).
    torch.manual_seed(0)
    dense = TrainingRun(ours(SPARSE), batches, fused_adam=True)
    torch.manual_seed(0)
    smes = TrainingRun(ours(SPARSE, "smes", **SMES_HPARAMS), batches, fused_adam=True)
    total = 2 * (1 + plan.sparse.rounds)
    task = progress.add_task(f"smes vs dense mmoe, batch {batch}", total=total) if progress else None
    interleave([dense, smes], rounds=plan.sparse.rounds, steps=(plan.sparse_dense_steps, plan.sparse.steps),
               warmup=plan.sparse.warmup, progress=progress, task=task)
    return dense, smes


def executed_experts(run: TrainingRun) -> dict[str, float]:
    """Experts SMES ran per instance on the run's batches (routing as trained so far)."""
    model = run.contender.model
    counts = []
    with torch.no_grad():
        for x, _ in run.batches:
            counts.append(model(x).extras["executed_per_instance"].float())
    every = torch.cat(counts)
    return {"mean": float(every.mean()), "max": float(every.max()), "median": statistics.median(every.tolist())}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n")[0])
    parser.add_argument("sections", nargs="*", default=list(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, same sizes")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    report = run(quick=args.quick, sections=args.sections)
    report.print()
    if args.json:
        report.write_json(args.json)


if __name__ == "__main__":
    main()
