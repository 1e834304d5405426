"""The papers' mechanisms on ``bench quality``'s stream (issue #21, item 3): does each one do what its paper says?

Per seed, on the simulator log of ``bench quality`` (``benchmarks.quality_stream.simulate``), each variant below is
trained by the production loop (``replay --direct``, ``moestream.yaml`` with the variant's family and hparams) with
``bench quality``'s score tap (``benchmarks.quality_train.ScoreTap``: progressive scores, taken before the update):

- **mmoe**, the baseline whose anomalies HoME names (Wang et al. 2024, section 1);
- **home** with its defaults, then with each of its switches off, one at a time (``expert_norm``, ``hierarchy``,
  ``feature_gate``, ``self_gate``: ``learner.models.home``);
- **smes** with its load-balancing regulariser (``lb_coef`` 0.01, the default) and without it (``lb_coef`` 0).

Beside the tap, a :class:`MechanismProbe` keeps every report the run's health monitor builds (``learner.health``,
at ``learner.cadence.health_every_steps``, with the configured thresholds: what ``experts.json`` holds one at a time)
and, for SMES, the experts each row executed (``extras["executed_per_instance"]``) and the routing choices per
expert (``lb_stats``). Per run it records:

- AUC per task over the whole stream and its last quarter (``benchmarks.quality.task_figures``);
- per anomaly kind, the reports showing it (over the run and over its second half) and the subjects (expert or
  task) with how many reports named each; whether the underfitting check applies to the family at all; and how
  near the run came to the collapse and degradation thresholds (:func:`margins`), so that "none" can be read;
- the expert load spread per task: the run's mean routing share over the experts the task can see, its
  coefficient of variation and max/min ratio; the monitor's load-balance score ``N·Σ f_i·P_i`` (1: uniform);
- SMES: executed experts per instance (mean, max) against its bound ``min(E, k_shared + T·k_private)``, and the
  spread of routing choices over all experts (the distribution its regulariser flattens).

``python -m benchmarks.quality_mechanisms [--quick] [--seeds 0 1 2] [--json PATH]``; quick (the default size):
50k requests (200k impressions) per seed. Results are written to ``--json`` after every run, so an interrupted
sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass, field, replace
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import orjson
import yaml

from benchmarks.quality import QUICK, FULL, task_figures
from benchmarks.quality_stream import QualityStream, simulate
from benchmarks.quality_train import CONFIG_FILE, FamilyRun, train_family, worker_config
from learner.health import GateWindow, detect_degradation, detect_underfitting
from stream.events import TASKS

ANOMALY_KINDS: tuple[str, ...] = ("collapse", "degradation", "underfitting")


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    hparams: dict = field(default_factory=dict)
    """Set over the family's defaults (``learner.hparams``)."""


VARIANTS: tuple[Variant, ...] = (
    Variant("mmoe", "mmoe"),
    Variant("home", "home"),
    *(Variant(f"home {switch}=off", "home", {switch: False})
      for switch in ("expert_norm", "hierarchy", "feature_gate", "self_gate")),
    Variant("smes", "smes"),
    Variant("smes lb_coef=0", "smes", {"lb_coef": 0.0}),
)


def variant_config(variant: Variant, directory: Path, base: Path = CONFIG_FILE) -> Path:
    """``base`` with the variant's family and hparams, written into ``directory`` (one file per variant)."""
    raw = yaml.safe_load(base.read_text())
    raw["learner"] = {**raw.get("learner", {}), "family": variant.family, "hparams": dict(variant.hparams)}
    path = directory / f"{variant.name.replace(' ', '_').replace('=', '-')}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class MechanismProbe:
    """Beside the score tap on one loop: the health monitor's reports, and what SMES reports of its routing.

    It wraps the loop's reporter the way ``bench quality`` wraps the learner (instance attributes, before the loop
    runs): the monitor builds each report as always, and the probe keeps a copy."""

    def __init__(self, loop) -> None:
        reporter, health = loop.reporter, loop.reporter.health
        self.names, self.visible = list(health.names), health.visible.copy()  # (T, E) bool
        self.health_config = health.config
        self.budget: int | None = getattr(loop.learner.multitask, "max_executed", None)
        self.reports: list[dict] = []
        self.executed_sum, self.executed_max, self.rows = 0.0, 0, 0
        self.choices: np.ndarray | None = None  # (E,) routing choices per expert, sparse families only
        self._window: GateWindow | None = None
        build, observe, take = health.report, reporter.observe, health.gates.take

        def take_window() -> GateWindow | None:  # the report's window: the mixing weights underfitting reads
            self._window = take()
            return self._window

        def report(step: int, positive_rate, now: float) -> dict | None:
            built = build(step, positive_rate, now)
            if built is not None:
                kept = {k: built[k] for k in ("step", "routing_share", "load_balance", "anomalies", "skipped")}
                self.reports.append(kept | {"margins": self._margins(built, positive_rate)})
            return built

        def observe_step(step: int, result, *timing) -> None:
            self._observe(result.output)
            observe(step, result, *timing)

        health.report, reporter.observe, health.gates.take = report, observe_step, take_window

    def _margins(self, report: dict, positive_rate) -> dict[str, float]:
        """How near the report came to each anomaly's threshold: the largest zero fraction, the largest
        ratio of an expert's output scale to the median's (either way), the largest one-task share of a shared
        expert's gate mass and the largest share of a sparse task's mixing weight on shared experts (the
        monitor's own checks with their thresholds at 0)."""
        zero = np.asarray(report["zero_frac"])
        scale = None if report["output_scale"] is None else np.asarray(report["output_scale"])
        ratio = scale / np.median(scale) if scale is not None and np.median(scale) > 0 else None
        shares = detect_degradation(np.asarray(report["mean_gate"]), self.visible, TASKS,
                                    replace(self.health_config, degradation_share=0.0), self.names)
        window = self._window
        leaning = detect_underfitting(window.mixing_sums / window.rows, self.visible, TASKS, positive_rate,
                                      replace(self.health_config, underfit_shared_mass=0.0))
        return {"zero_frac": float(zero.max()),
                "scale_ratio": float(np.maximum(ratio, 1 / ratio).max()) if ratio is not None else float("nan"),
                "degradation_share": max((a.value for a in shares), default=float("nan")),
                "underfit_shared_mass": max((a.value for a in leaning or ()), default=float("nan"))}

    def _observe(self, output) -> None:
        executed = output.extras.get("executed_per_instance")
        if executed is not None:
            executed = executed.detach().float()  # (B,)
            self.executed_sum += float(executed.sum())
            self.executed_max = max(self.executed_max, int(executed.max()))
            self.rows += executed.numel()
        if output.lb_stats is not None:
            counts = output.lb_stats[0].detach().double().cpu().numpy()  # (E,)
            self.choices = counts if self.choices is None else self.choices + counts


def train_probed(stream: QualityStream, variant: Variant, seed: int, root: Path, base: Path = CONFIG_FILE
                 ) -> tuple[FamilyRun, MechanismProbe]:
    """``variant`` trained on ``stream``'s log by ``benchmarks.quality_train.train_family``, with a
    :class:`MechanismProbe` attached to the loop beside the score tap; ``root`` must be fresh."""
    root.mkdir(parents=True)
    probes: list[MechanismProbe] = []
    run = train_family(stream, variant.family, seed, root, config_file=variant_config(variant, root, base),
                       attach=lambda loop: probes.append(MechanismProbe(loop)))
    return run, probes[0]


def anomaly_counts(reports: list[dict]) -> dict[str, dict]:
    """Per kind: reports showing it (all, second half), and each subject with the reports that named it."""
    half = len(reports) // 2
    out: dict[str, dict] = {}
    for kind in ANOMALY_KINDS:
        subjects: dict[str, int] = {}
        for report in reports:
            for subject in {a["subject"] for a in report["anomalies"] if a["kind"] == kind}:
                subjects[subject] = subjects.get(subject, 0) + 1
        showing = [any(a["kind"] == kind for a in r["anomalies"]) for r in reports]
        out[kind] = {"reports": sum(showing), "reports_second_half": sum(showing[half:]),
                     "checked": not any(kind in r["skipped"] for r in reports),
                     "subjects": dict(sorted(subjects.items(), key=lambda s: -s[1]))}
    return out


def spread(share: np.ndarray) -> dict[str, float]:
    """How unevenly ``share`` (one distribution over experts) spreads: CV, max/min ratio, extremes."""
    lo, hi = float(share.min()), float(share.max())
    return {"cv": float(share.std() / share.mean()), "max_over_min": hi / lo if lo > 0 else float("inf"),
            "max": hi, "min": lo, "experts": int(share.size)}


def margins(reports: list[dict]) -> dict[str, dict[str, float]]:
    """Per margin (see :meth:`MechanismProbe._margins`): its largest value over the run and its median."""
    out = {}
    for name in ("zero_frac", "scale_ratio", "degradation_share", "underfit_shared_mass"):
        values = np.array([r["margins"][name] for r in reports], dtype=float)
        known = values[~np.isnan(values)]
        out[name] = {"max": float(known.max()), "median": float(np.median(known))} if known.size else {}
    return out


def load_spread(reports: list[dict], visible: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Per task: the spread of its run-mean routing share over the experts it can see."""
    mean_share = np.mean([r["routing_share"] for r in reports], axis=0)  # (T, E)
    out = {}
    for t, task in enumerate(TASKS):
        seen = visible[t]
        out[task] = {**spread(mean_share[t, seen]),
                     "share": dict(zip([n for n, s in zip(names, seen) if s], mean_share[t, seen].round(4).tolist()))}
    return out


def record(variant: Variant, run: FamilyRun, probe: MechanismProbe, stream: QualityStream) -> dict:
    figures = task_figures(run.scores, stream)
    load = load_spread(probe.reports, probe.visible, probe.names) if probe.reports else {}
    out = {
        "variant": variant.name, "family": variant.family, "hparams": variant.hparams, "seed": run.seed,
        "examples": len(stream), "seconds": run.seconds,
        "auc": {t: figures[t]["auc"] for t in TASKS}, "auc_last": {t: figures[t]["auc_last"] for t in TASKS},
        "reports": len(probe.reports), "anomalies": anomaly_counts(probe.reports),
        "load": load, "load_cv_mean": float(np.mean([v["cv"] for v in load.values()])) if load else float("nan"),
        "load_balance_score": float(np.mean([r["load_balance"] for r in probe.reports])) if probe.reports
        else float("nan"),
        "margins": margins(probe.reports),
        "experts": probe.names,
    }
    if probe.rows:
        out["executed"] = {"mean": probe.executed_sum / probe.rows, "max": probe.executed_max, "budget": probe.budget}
    if probe.choices is not None:
        out["routing_choices"] = {**spread(probe.choices / probe.choices.sum()),
                                  "share": (probe.choices / probe.choices.sum()).round(4).tolist()}
    return out


def measure(seeds: tuple[int, ...], n_requests: int, variants: tuple[Variant, ...] = VARIANTS,
            base: Path = CONFIG_FILE, json_path: Path | None = None, directory: Path | None = None) -> list[dict]:
    """Every variant on every seed's stream; the records so far go to ``json_path`` after each run."""
    records: list[dict] = []
    with TemporaryDirectory(prefix="moestream-mechanisms-", dir=directory) as tmp:
        root = Path(tmp)
        joiner = worker_config(root / "plan", variants[0].family, 0, base).joiner
        for seed in seeds:
            stream = simulate(seed, n_requests, root, joiner)
            for variant in variants:
                run, probe = train_probed(stream, variant, seed, root / f"{seed}-{len(records)}", base)
                records.append(record(variant, run, probe, stream))
                print(summary_line(records[-1]), flush=True)
                if json_path is not None:
                    json_path.write_bytes(orjson.dumps(records, option=orjson.OPT_INDENT_2))
                del run, probe
                gc.collect()
            stream.log.unlink()
    return records


def summary_line(r: dict) -> str:
    """One run on one line: AUCs, reports showing each anomaly, the nearest approach to each threshold, load."""
    kinds = " ".join(f"{k}={a['reports']}/{r['reports']}" if a["checked"] else f"{k}=n/a"
                     for k, a in r["anomalies"].items())
    nearest = " ".join(f"{name}<={r['margins'][name].get('max', float('nan')):.2f}" for name in r["margins"])
    executed = (f" executed mean {r['executed']['mean']:.2f} max {r['executed']['max']} of {r['executed']['budget']}"
                if "executed" in r else "")
    return (f"seed {r['seed']} {r['variant']:<20} click {r['auc']['click']:.4f} long_view {r['auc']['long_view']:.4f}"
            f" {kinds} {nearest} load_cv={r['load_cv_mean']:.3f} lb={r['load_balance_score']:.3f}{executed}"
            f" ({r['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="50k requests (200k impressions) per seed (the default)")
    size.add_argument("--full", action="store_true", help="500k requests (2M impressions) per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", help="variant names to run (default: all)")
    parser.add_argument("--json", type=Path, help="write the records here (after every run)")
    args = parser.parse_args()
    variants = tuple(v for v in VARIANTS if args.variants is None or v.name in args.variants)
    measure(tuple(args.seeds), (FULL if args.full else QUICK).n_requests, variants, json_path=args.json)


if __name__ == "__main__":
    main()


__all__ = ["VARIANTS", "MechanismProbe", "Variant", "anomaly_counts", "load_spread", "margins", "measure", "record",
           "train_probed", "variant_config"]
