"""``bench quality``'s report: the rows (with the goals of issue #21), the notes, and markdown tables.

Every figure is a mean over the run's seeds; a row's name carries the spread (min..max) or the one seed it was
measured on. Anchors: the oracle's figure on the same events for the families and the floor; the continuous
model's on the same events for the frozen copy; the live model's on the same events for a stale version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from benchmarks.harness import Report, Row
from stream.events import TASKS

if TYPE_CHECKING:
    from benchmarks.quality import QualityPlan, QualityResult

ORACLE, FLOOR = "oracle", "floor"
LAST = 0.25
"""The closing share of the stream that the "last 25%" figures are read on."""
GAP_TASKS = ("click", "long_view")
GAP_GOAL = 0.5
"""Issue #21: over the last quarter, each MoE family closes at least this share of the floor-to-oracle gap."""
NO_EXPERTS = frozenset({"shared_bottom"})
"""Families the goals do not apply to (not mixtures of experts)."""
LABELS = {ORACLE: "oracle (true probabilities)", FLOOR: "floor (online logistic MF)"}
METRICS = (("auc", "AUC"), ("gauc", "GAUC"), ("auc_last", "AUC, last 25%"), ("gauc_last", "GAUC, last 25%"))


def spread(values: list[float], seeds: list[int]) -> str:
    if len(values) == 1:
        return f"seed {seeds[0]}"
    return f"mean of {len(values)} seeds, {min(values):.4f}..{max(values):.4f}"


def add_rows(report: Report, result: QualityResult, quick: bool, plans: tuple[QualityPlan, QualityPlan]) -> None:
    seeds = [s.seed for s in result.seeds]

    def figure(name: str, task: str, key: str) -> tuple[float, str]:
        values = [s.figures[name][task][key] for s in result.seeds]
        return float(np.mean(values)), spread(values, seeds)

    for t in TASKS:
        oracle = {key: figure(ORACLE, t, key) for key, _ in METRICS}
        floor = {key: figure(FLOOR, t, key) for key, _ in METRICS}
        for key, label in METRICS[:3]:
            report.add(Row(f"{t} {label}: {LABELS[ORACLE]} ({oracle[key][1]})", oracle[key][0], "AUC"))
        for key, label in METRICS[:3]:
            report.add(Row(f"{t} {label}: {LABELS[FLOOR]} ({floor[key][1]})", floor[key][0], "AUC",
                           anchor=f"oracle {label}", anchor_value=oracle[key][0]))
        for family in result.plan.families:
            moe = family not in NO_EXPERTS
            auc, auc_spread = figure(family, t, "auc")
            report.add(Row(f"{t} AUC: {family} ({auc_spread})", auc, "AUC", anchor="oracle AUC",
                           anchor_value=oracle["auc"][0], goal=f">= floor's {floor['auc'][0]:.4f}" if moe else None,
                           met=auc >= floor["auc"][0] if moe else None))
            gauc, gauc_spread = figure(family, t, "gauc")
            report.add(Row(f"{t} GAUC: {family} ({gauc_spread})", gauc, "AUC", anchor="oracle GAUC",
                           anchor_value=oracle["gauc"][0]))
            last, last_spread = figure(family, t, "auc_last")
            gap = oracle["auc_last"][0] - floor["auc_last"][0]
            closes = (last - floor["auc_last"][0]) / gap if gap > 0 else float("nan")
            goal = t in GAP_TASKS and moe
            target = floor["auc_last"][0] + GAP_GOAL * gap
            report.add(Row(
                f"{t} AUC, last 25%: {family} ({last_spread}); closes {closes:.0%} of the floor-to-oracle gap",
                last, "AUC", anchor="oracle AUC, last 25%", anchor_value=oracle["auc_last"][0],
                goal=f">= {target:.4f}: {GAP_GOAL:.0%} of the gap closed" if goal else None,
                met=last >= target if goal else None))
    _study_rows(report, result)
    _rate_rows(report, result)
    _notes(report, result, quick, plans)


def _study_rows(report: Report, result: QualityResult) -> None:
    seeds, family = [s.seed for s in result.seeds], result.study_family
    share = f"{result.plan.freeze_fraction:.0%}"
    for t in TASKS:
        for when, label in (("after", f"after the freeze (last {1 - result.plan.freeze_fraction:.0%})"),
                            ("last", "last 25%")):
            frozen = [s.frozen[t][f"frozen_{when}"] for s in result.seeds]
            continuous = [s.frozen[t][f"continuous_{when}"] for s in result.seeds]
            report.add(Row(f"{t} AUC {label}: {family} frozen at {share} ({spread(frozen, seeds)})",
                           float(np.mean(frozen)), "AUC", anchor="trained on, same events",
                           anchor_value=float(np.mean(continuous))))
    for lag in result.plan.staleness_s:
        if not all(lag in s.staleness for s in result.seeds):
            continue
        age = np.mean([s.staleness[lag]["mean_age_s"] for s in result.seeds])
        for t in TASKS:
            lagged = [s.staleness[lag][t]["lagged"] for s in result.seeds]
            live = [s.staleness[lag][t]["live"] for s in result.seeds]
            report.add(Row(f"{t} AUC served {_lag(lag)} stale: {family} (versions {age:.3g} s old on average; "
                           f"{spread(lagged, seeds)})", float(np.mean(lagged)), "AUC", anchor="live model, same events",
                           anchor_value=float(np.mean(live))))


def _rate_rows(report: Report, result: QualityResult) -> None:
    for family in result.plan.families:
        seconds = sum(s.train_seconds[family] for s in result.seeds)
        examples = sum(s.examples for s in result.seeds)
        extra = ", scoring the frozen and stale versions too" if family == result.study_family else ""
        if result.resumed:
            extra += f"; seeds {', '.join(map(str, sorted(result.resumed)))} timed in an earlier run"
        report.add(Row(f"replay --direct training: {family}{extra}", examples / seconds, "examples/s"))


def _lag(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds > 60 and seconds % 60 == 0 else f"{seconds} s"


def _short(commit: str | None) -> str:
    if not commit:
        return "unknown"
    head, _, dirty = commit.partition("+")
    return head[:12] + (f"+{dirty}" if dirty else "")


def estimate_seconds(result: QualityResult, plan: QualityPlan) -> float:
    """``plan``'s run time, extrapolated linearly from the time this result's parts took (every seed and the
    tuning, whichever run computed them: resumed seeds bring their own times): training per example trained, the
    rest per impression simulated (the floor's tuning stream included)."""
    done = result.plan
    trained = sum(s.examples for s in result.seeds)
    train = result.sections.get("train", 0.0)
    rest = result.seconds - train
    wanted = plan.n_requests * 4 * len(plan.seeds) * len(plan.families) / len(done.families)
    simulated = done.n_requests * (len(done.seeds) + 1)
    return train / trained * wanted + rest * plan.n_requests * (len(plan.seeds) + 1) / simulated


def _notes(report: Report, result: QualityResult, quick: bool, plans: tuple[QualityPlan, QualityPlan]) -> None:
    plan, first = result.plan, result.seeds[0]
    quick_plan, full_plan = plans
    event_s = first.examples / 4 / 100  # the simulator's 4 impressions per request, 100 requests per event-time second
    report.notes.append(
        f"{'quick' if quick else 'full'}: {first.examples:,} examples per seed ({plan.n_requests:,} simulator "
        f"requests, "
        f"{event_s:,.0f} s of event time: item popularity cycles every 600 s, new items arrive, interests drift), "
        f"seeds {', '.join(str(s.seed) for s in result.seeds)} (simulator draw and learner init); every family of "
        f"learner.models trained by replay --direct with moestream.yaml, the family's default hparams unless it is the "
        f"configured one; batches of {result.batch}; progressive scores, exact AUC and GAUC")
    chosen = ", ".join(f"{t} lr {c.lr:g} dim {c.dim} accumulator {c.initial_accumulator:g}"
                       for t, c in zip(TASKS, result.tuning.chosen))
    report.notes.append(f"floor: online logistic MF per task, row-wise Adagrad, chosen per task by progressive AUC "
                        f"on seed {plan.tuning_seed} (not a reported seed) from a grid of {len(result.tuning.auc)} "
                        f"(lr, dim, initial accumulator) points: {chosen}")
    skipped = [_lag(lag) for lag in plan.staleness_s if not all(lag in s.staleness for s in result.seeds)]
    report.notes.append(
        f"frozen and stale versions: {result.study_family}"
        f"{' (the configured family)' if plan.study_family is None else ''}, scored on each batch before its "
        f"update, in training mode without gradients, ids mapped through the ID maps published with the version; a "
        f"version is taken every lag/10 of event time, so an event is scored by one between the lag and about 1.1x "
        f"the lag plus one batch old (the rows give the mean age)"
        + (f"; no event is {', '.join(skipped)} into the stream, so no row for that staleness" if skipped else ""))
    if quick:
        report.notes.append(f"quick: {len(result.seeds)} seed(s) of {first.examples:,} examples (full: "
                            f"{len(full_plan.seeds)} of {full_plan.n_requests * 4:,}); the issue's goals are read "
                            f"on the full run")
    other = full_plan if quick else quick_plan
    sections = ", ".join(f"{k} {v:.0f} s" for k, v in result.sections.items())
    if result.resumed:
        sources = "; ".join(f"seed {seed} on {p.written_at} at commit {_short(p.commit)}"
                            + (f" ({p.machine})" if p.machine else "") for seed, p in sorted(result.resumed.items()))
        report.notes.append(f"resumed from checkpoints (same plan, configuration and code): {sources}; this run took "
                            f"{result.elapsed / 60:.1f} min")
    report.notes.append(f"{result.seconds / 60:.1f} min of computing, every seed and the tuning "
                        f"({sections}); {'full' if quick else 'quick'} mode "
                        f"({other.n_requests * 4:,} examples x {len(other.seeds)} seed(s)) estimated at "
                        f"{estimate_seconds(result, other) / 60:.0f} min on this machine")
    report.notes.append(f"learning curves, frozen.png, staleness.png, figures.json and tables.md in "
                        f"{result.files[0].parent if result.files else '-'}")


def markdown_tables(result: QualityResult, names: tuple[str, ...]) -> str:
    """Per task: every scorer's figures (means, spreads in brackets); the frozen and staleness figures."""
    seeds = result.seeds

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.4f}" + (f" ({min(values):.4f}..{max(values):.4f})" if len(values) > 1 else "")

    lines = [f"Seeds {', '.join(str(s.seed) for s in seeds)}; {seeds[0].examples:,} examples per seed.", ""]
    for t in TASKS:
        lines += [f"**{t}**", "", "| scorer | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for name in names:
            lines.append(f"| {LABELS.get(name, name)} | "
                         + " | ".join(cell([s.figures[name][t][key] for s in seeds]) for key, _ in METRICS) + " |")
        lines.append("")
    family, share = result.study_family, f"{result.plan.freeze_fraction:.0%}"
    lines += [f"**{family}: continuous vs frozen at {share}** (AUC on the same events)", "",
              "| task | continuous, after the freeze | frozen, after the freeze | continuous, last 25% "
              "| frozen, last 25% |",
              "|---|---|---|---|---|"]
    for t in TASKS:
        keys = ("continuous_after", "frozen_after", "continuous_last", "frozen_last")
        lines.append(f"| {t} | " + " | ".join(cell([s.frozen[t][key] for s in seeds]) for key in keys) + " |")
    lags = [lag for lag in result.plan.staleness_s if all(lag in s.staleness for s in seeds)]
    lines += ["", f"**{family}: AUC served stale minus AUC of the live model, same events**", "",
              "| staleness | mean age (s) | events | " + " | ".join(TASKS) + " |",
              "|---|---|---|" + "---|" * len(TASKS)]
    for lag in lags:
        lost = [cell([s.staleness[lag][t]["lagged"] - s.staleness[lag][t]["live"] for s in seeds]) for t in TASKS]
        lines.append(f"| {_lag(lag)} | {np.mean([s.staleness[lag]['mean_age_s'] for s in seeds]):.3g} | "
                     f"{np.mean([s.staleness[lag]['events'] for s in seeds]):,.0f} | " + " | ".join(lost) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["FLOOR", "GAP_GOAL", "GAP_TASKS", "LAST", "ORACLE", "add_rows", "estimate_seconds", "markdown_tables"]
