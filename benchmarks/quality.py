"""``moestream bench quality``: how good the models moestream trains on a stream are, between an oracle and a floor.

Per seed, the simulator draws a long drifting stream (popularity cycles, new items, interests on a random walk)
into a log while handing its true probabilities to the benchmark (``benchmarks.quality_stream``). Every family
of ``learner.models.FAMILIES`` is trained on that log by the production loop, ``replay --direct``, with
``moestream.yaml``'s configuration (``benchmarks.quality_train``), and every example's progressive score (taken
before the update that learns from it) is kept. Beside them, on the same examples in the same order:

- the **oracle**: the probabilities the labels were drawn with, the best any model can do;
- the **floor**: online logistic matrix factorisation on user × item, one per task, row-wise Adagrad, tuned per
  task on a seed of its own (``benchmarks.quality_floor``).

Figures per task, exact (``learner.metrics.binary_auc``, ``group_auc``): AUC and GAUC (per-user AUC weighted by
impressions, users with both classes) over the whole stream and over its last quarter; window AUC curves.
Rows: each family's AUC against the oracle's, with the issue's goals (#21) where they apply: every MoE family at
or above the floor on every task (shared_bottom, which has no experts, is shown without a goal), and on click and
long_view the last quarter closing at least half of the floor-to-oracle gap (read on the full run).

For one family (the configured one) the same run also scores each batch with older versions of the model:
a copy frozen at a quarter of the stream, and the versions ``STALENESS_S`` old in event time (serving
staleness). Their rows are anchored on the live model's AUC over the same events.

Full: 500k requests (2 M impressions) per seed, seeds 0, 1, 2. Quick: 50k requests (200k impressions), seed 0
only, every family. PNGs, every figure per seed (``figures.json``) and markdown tables go to
``benchmarks/results/quality`` (quick: ``quality-quick``) beside the report, which ``--json`` writes as usual.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import quality_plots
from benchmarks.harness import Report
from benchmarks.quality_checkpoints import Checkpoints, Provenance, commit, run_key
from benchmarks.quality_floor import GRID, Tuning, floor_scores, tune
from benchmarks.quality_rows import FLOOR, LAST, ORACLE, add_rows, markdown_tables
from benchmarks.quality_stream import QualityStream, simulate
from benchmarks.quality_train import CONFIG_FILE, FamilyRun, train_family, worker_config
from infra.config import load_config
from learner.metrics import binary_auc, group_auc
from learner.models import FAMILIES
from stream.events import TASKS

RESULTS = Path(__file__).parent / "results"
CHECKPOINTS = "checkpoints"
"""Under the results directory: finished seeds and the floor's tuning, for a later run to resume from."""
STALENESS_S: tuple[int, ...] = (1, 10, 60, 600)


@dataclass(frozen=True)
class QualityPlan:
    n_requests: int
    """Simulator requests per seed (4 impressions each)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    families: tuple[str, ...] = FAMILIES
    tuning_seed: int = 1000
    """The floor's hyper-parameters are chosen on this seed's stream, never on a reported one."""
    staleness_s: tuple[int, ...] = STALENESS_S
    freeze_fraction: float = 0.25
    windows: int = 40
    """Points on each learning curve (windows of ``examples / windows``)."""
    study_family: str | None = None
    """The family of the frozen and staleness study; None: the configured one (``learner.family``)."""


QUICK = QualityPlan(50_000, seeds=(0,))
FULL = QualityPlan(500_000)


def task_figures(scores: np.ndarray, stream: QualityStream, rows: slice = slice(None)) -> dict[str, dict[str, float]]:
    """Per task: AUC and GAUC over ``rows`` and over the stream's last quarter."""
    n = len(stream)
    last = slice(n - int(n * LAST), n)
    out = {}
    for i, t in enumerate(TASKS):
        s, y = scores[rows, i], stream.labels[rows, i]
        out[t] = {"auc": binary_auc(s, y), "gauc": group_auc(s, y, stream.users[rows]),
                  "auc_last": binary_auc(scores[last, i], stream.labels[last, i]),
                  "gauc_last": group_auc(scores[last, i], stream.labels[last, i], stream.users[last])}
    return out


def window_auc(scores: np.ndarray, labels: np.ndarray, windows: int) -> tuple[list[int], dict[str, list[float]]]:
    """Window ends (examples) and per task the AUC of each window (NaN for a window without both classes or
    without scores)."""
    bounds = np.linspace(0, len(labels), windows + 1).astype(int)
    curves: dict[str, list[float]] = {t: [] for t in TASKS}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for i, t in enumerate(TASKS):
            s, y = scores[lo:hi, i], labels[lo:hi, i]
            known = ~np.isnan(s)
            curves[t].append(binary_auc(s[known], y[known]) if known.any() else float("nan"))
    return bounds[1:].tolist(), curves


@dataclass
class SeedFigures:
    seed: int
    examples: int
    figures: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Scorer (family, oracle, floor) -> task -> auc, gauc, auc_last, gauc_last."""
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    window_ends: list[int] = field(default_factory=list)
    frozen: dict = field(default_factory=dict)
    """freeze_at; per task: frozen and continuous AUC after the freeze and over the last quarter; curves."""
    staleness: dict[int, dict] = field(default_factory=dict)
    """Lag (s) -> events scored, mean age (s), per task the lagged version's AUC and the live model's."""
    train_seconds: dict[str, float] = field(default_factory=dict)
    sections: dict[str, float] = field(default_factory=dict)
    """Seconds this seed took to simulate, train, score the floor and compute the figures."""


SECTIONS = ("simulate", "train", "floor", "figures")


@dataclass
class QualityResult:
    plan: QualityPlan
    study_family: str
    seeds: list[SeedFigures] = field(default_factory=list)
    tuning: Tuning | None = None
    batch: int = 512
    tuning_sections: dict[str, float] = field(default_factory=dict)
    """Seconds the floor's tuning took: simulating its stream, running the grid."""
    resumed: dict[int, Provenance] = field(default_factory=dict)
    """Seeds taken from checkpoints, with the commit and time they were computed at."""
    elapsed: float = 0.0
    """Wall seconds of this run (resumed seeds cost it nothing)."""
    files: list[Path] = field(default_factory=list)

    @property
    def sections(self) -> dict[str, float]:
        """Seconds spent simulating, training, on the floor and on the figures, over every seed and the tuning,
        whichever run computed them."""
        parts = [self.tuning_sections, *(s.sections for s in self.seeds)]
        return {k: sum(p.get(k, 0.0) for p in parts) for k in SECTIONS}

    @property
    def seconds(self) -> float:
        return sum(self.sections.values())


def study_figures(run: FamilyRun, stream: QualityStream, plan: QualityPlan) -> tuple[dict, dict]:
    """The frozen copy against the continuous model, and each lagged version against the live model, each
    pair on the same events."""
    n = len(stream)
    after, last = slice(run.freeze_at, n), slice(n - int(n * LAST), n)
    frozen: dict = {"freeze_at": run.freeze_at}
    for i, t in enumerate(TASKS):
        y = stream.labels[:, i]
        frozen[t] = {
            "frozen_after": binary_auc(run.frozen[after, i], y[after]),
            "continuous_after": binary_auc(run.scores[after, i], y[after]),
            "frozen_last": binary_auc(run.frozen[last, i], y[last]),
            "continuous_last": binary_auc(run.scores[last, i], y[last]),
        }
    frozen["curves"] = {name: window_auc(scores, stream.labels, plan.windows)[1] for name, scores in
                        (("continuous", run.scores), ("frozen", run.frozen))}
    stale: dict = {}
    for lag in plan.staleness_s:
        lagged = run.lagged[lag * 1000]
        known = ~np.isnan(lagged[:, 0])
        if not known.any():
            continue
        stale[lag] = {"events": int(known.sum()), "mean_age_s": float(np.mean(run.ages_ms[lag * 1000][known]) / 1000)}
        for i, t in enumerate(TASKS):
            y = stream.labels[known, i]
            stale[lag][t] = {"lagged": binary_auc(lagged[known, i], y), "live": binary_auc(run.scores[known, i], y)}
    return frozen, stale


def measure(plan: QualityPlan, progress: Progress | None = None, config_file: Path = CONFIG_FILE,
            checkpoints: Checkpoints | None = None) -> QualityResult:
    """Every scorer on every seed of ``plan``; the floor tuned first on its own seed. With ``checkpoints``, a seed
    (or the tuning) they hold for this run's key is taken from them, and each one computed is saved there as soon
    as it is done."""
    started = time.perf_counter()
    configured = load_config(config_file).learner
    study = plan.study_family or configured.family
    if study not in plan.families:
        raise ValueError(f"the study family {study!r} is not among the plan's families {plan.families}")
    base_rates = np.array([configured.base_rates[t] for t in TASKS])
    progress = progress or Progress(transient=True)
    with TemporaryDirectory(prefix="moestream-quality-") as tmp:
        root = Path(tmp)
        trainer = worker_config(root, study, 0, config_file)
        joiner, batch = trainer.joiner, trainer.batch_size
        result = QualityResult(plan, study, batch=batch)

        def stream_of(seed: int, sections: dict[str, float]) -> QualityStream:
            t0 = time.perf_counter()
            task = progress.add_task(f"quality: simulating seed {seed}", total=plan.n_requests * 4)
            stream = simulate(seed, plan.n_requests, root, joiner, on_impressions=lambda n: progress.advance(task, n))
            progress.remove_task(task)
            sections["simulate"] += time.perf_counter() - t0
            return stream

        cached = checkpoints.tuning() if checkpoints else None
        if cached:
            result.tuning, tuning_sections = cached
        else:
            tuning_sections = dict.fromkeys(SECTIONS, 0.0)
            tuning_stream = stream_of(plan.tuning_seed, tuning_sections)
            t0 = time.perf_counter()
            task = progress.add_task(f"quality: tuning the floor on seed {plan.tuning_seed}", total=len(GRID))
            result.tuning = tune(tuning_stream.users, tuning_stream.items, tuning_stream.labels, batch, base_rates,
                                 on_point=lambda: progress.advance(task))
            progress.remove_task(task)
            tuning_sections["floor"] += time.perf_counter() - t0
            tuning_stream.log.unlink()
            del tuning_stream
            if checkpoints:
                checkpoints.save_tuning(result.tuning, tuning_sections)
        result.tuning_sections = tuning_sections
        kept = {seed: got for seed in plan.seeds if checkpoints and (got := checkpoints.seed(seed, result.tuning))}
        for seed in plan.seeds:
            if seed in kept:
                figures, result.resumed[seed] = kept[seed]
                result.seeds.append(SeedFigures(**figures))
                continue
            sections = dict.fromkeys(SECTIONS, 0.0)
            stream = stream_of(seed, sections)
            seed_figures = SeedFigures(seed, len(stream), sections=sections)
            t0 = time.perf_counter()
            floor = floor_scores(stream.users, stream.items, stream.labels, batch, result.tuning.chosen, base_rates,
                                 seed)
            sections["floor"] += time.perf_counter() - t0
            for name, scores in ((ORACLE, stream.oracle), (FLOOR, floor)):
                _score(seed_figures, name, scores, stream, plan, sections)
            for family in plan.families:
                studied = family == study
                task = progress.add_task(f"quality: seed {seed}, {family}", total=len(stream))
                t0 = time.perf_counter()
                run = train_family(stream, family, seed, root / f"{family}-{seed}",
                                   freeze_at=int(len(stream) * plan.freeze_fraction) if studied else None,
                                   lags_ms=tuple(s * 1000 for s in plan.staleness_s) if studied else (),
                                   on_examples=lambda n, task=task: progress.advance(task, n), config_file=config_file)
                seed_figures.train_seconds[family] = run.seconds
                sections["train"] += time.perf_counter() - t0
                progress.remove_task(task)
                _score(seed_figures, family, run.scores, stream, plan, sections)
                if studied:
                    t0 = time.perf_counter()
                    seed_figures.frozen, seed_figures.staleness = study_figures(run, stream, plan)
                    sections["figures"] += time.perf_counter() - t0
                del run
                gc.collect()
            result.seeds.append(seed_figures)
            if checkpoints:
                checkpoints.save_seed(seed, asdict(seed_figures), result.tuning)
            stream.log.unlink()
    result.elapsed = time.perf_counter() - started
    return result


def _score(seed_figures: SeedFigures, name: str, scores: np.ndarray, stream: QualityStream, plan: QualityPlan,
           sections: dict[str, float]) -> None:
    t0 = time.perf_counter()
    seed_figures.figures[name] = task_figures(scores, stream)
    seed_figures.window_ends, seed_figures.curves[name] = window_auc(scores, stream.labels, plan.windows)
    sections["figures"] += time.perf_counter() - t0


def mean_curves(result: QualityResult) -> dict[str, dict[str, list[float]]]:
    names = result.seeds[0].curves
    return {name: {t: np.nanmean([s.curves[name][t] for s in result.seeds], axis=0).tolist() for t in TASKS}
            for name in names}


def write_files(result: QualityResult, out_dir: Path, quick: bool) -> list[Path]:
    """PNGs per task, the frozen and staleness figures, every figure as JSON and the markdown tables."""
    plan, seeds = result.plan, result.seeds
    mode = f"{'quick' if quick else 'full'}, {seeds[0].examples:,} examples, {len(seeds)} seed(s)"
    curves = mean_curves(result)
    ordered = {name: curves[name] for name in (*plan.families, ORACLE, FLOOR)}
    files = [quality_plots.learning_curves(out_dir / f"curve-{t}.png", t, seeds[0].window_ends, ordered,
                                           (ORACLE, FLOOR), f"{t}: progressive window AUC ({mode}); oracle and floor "
                                           "(logistic MF) dashed") for t in TASKS]
    frozen = [s.frozen for s in seeds]
    files.append(quality_plots.frozen_curves(
        out_dir / "frozen.png", seeds[0].window_ends,
        {t: np.nanmean([f["curves"]["continuous"][t] for f in frozen], axis=0) for t in TASKS},
        {t: np.nanmean([f["curves"]["frozen"][t] for f in frozen], axis=0) for t in TASKS},
        frozen[0]["freeze_at"], f"{result.study_family}: continuous vs frozen at {plan.freeze_fraction:.0%} ({mode})"))
    lags = [lag for lag in plan.staleness_s if all(lag in s.staleness for s in seeds)]
    if lags:
        lost = {t: [float(np.mean([s.staleness[lag][t]["lagged"] - s.staleness[lag][t]["live"] for s in seeds]))
                    for lag in lags] for t in TASKS}
        files.append(quality_plots.staleness(out_dir / "staleness.png", lags, lost,
                                             f"{result.study_family}: AUC lost to serving staleness ({mode})"))
    body = {"plan": asdict(plan), "study_family": result.study_family, "batch": result.batch,
            "seconds": result.seconds, "sections": result.sections, "elapsed": result.elapsed,
            "resumed": {seed: asdict(p) for seed, p in result.resumed.items()},
            "floor_tuning": {"chosen": {t: asdict(c) for t, c in zip(TASKS, result.tuning.chosen)},
                             "grid_auc": {f"lr={lr},dim={dim},initial_accumulator={a}": v
                                          for (lr, dim, a), v in result.tuning.auc.items()}},
            "seeds": [asdict(s) for s in seeds]}
    files.append(out_dir / "figures.json")
    files[-1].write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                       | orjson.OPT_NON_STR_KEYS))
    files.append(out_dir / "tables.md")
    files[-1].write_text(markdown_tables(result, (*plan.families, ORACLE, FLOOR)))
    return files


def run(quick: bool = False, out_dir: Path | None = None, plan: QualityPlan | None = None,
        config_file: Path = CONFIG_FILE, resume: bool = True) -> Report:
    """The benchmark. Each finished seed and the floor's tuning are kept under ``out_dir/checkpoints``; with
    ``resume`` (the default; ``bench quality --fresh`` turns it off) a later run of the same plan, configuration
    and code takes them from there (``benchmarks.quality_checkpoints``), so a full run can be spread over several
    sittings."""
    plan = plan or (QUICK if quick else FULL)
    out_dir = out_dir or RESULTS / ("quality-quick" if quick else "quality")
    report = Report("quality")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    checkpoints = Checkpoints(out_dir / CHECKPOINTS, run_key(asdict(plan), config_file), commit())
    if not resume:
        shutil.rmtree(checkpoints.directory, ignore_errors=True)  # computed again, and checkpointed again
    with Progress(*columns, transient=True) as progress:
        result = measure(plan, progress, config_file, checkpoints)
    result.files = write_files(result, out_dir, quick)
    add_rows(report, result, quick, (QUICK, FULL))
    return report


if __name__ == "__main__":
    run(quick=True).print()


__all__ = ["FLOOR", "FULL", "ORACLE", "QUICK", "QualityPlan", "QualityResult", "SeedFigures", "measure", "run",
           "task_figures", "window_auc"]
