"""What a training run tells the world: guarded snapshots, expert-health reports, losses and heatmaps.

- :meth:`Reporter.publish` writes a snapshot unless the guard refuses it (non-finite weights, or a recent
  progressive AUC more than ``guard.max_auc_drop`` below the last published one); a refusal is counted and
  logged with its reason, never fatal.
- :meth:`Reporter.observe` takes every step's forward pass (the health monitor accumulates its gates) and
  logs its losses; :meth:`Reporter.report`, at the health cadence, logs the progressive metrics and writes
  the expert-health report (``<run>/health/experts.json``, read by ``moestream experts``) with a
  task x expert utilisation heatmap drawn on a thread of its own, so a drawing never holds up a step.

Only one worker of a data-parallel group reports health and publishes (rank 0): each rank sees only its own
gates, and one writer keeps the files consistent.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import orjson

from learner.config import LearnerConfig
from learner.health import HealthMonitor, report_metrics
from learner.models import MultiTaskModel
from learner.snapshots import Manifest, SnapshotError, SnapshotRefused, SnapshotStore, write_atomic
from learner.step import StepResult
from learner.telemetry import Telemetry, load_plotting, plot_utilisation


class Reporter:
    def __init__(self, config: LearnerConfig, model: MultiTaskModel, snapshots: SnapshotStore,
                 telemetry: Telemetry | None = None, writes_health: bool = True) -> None:
        self.config = config
        self.snapshots = snapshots
        self.telemetry = telemetry
        self.writes_health = writes_health
        latest = snapshots.latest_manifest()
        self.health = HealthMonitor(config.health, config.tasks, model, latest.data.get("experts") if latest else None)
        self.health_dir = snapshots.directory.parent / "health"
        self.published: list[int] = []
        self.refused: dict[str, int] = {}
        """Refused publishes by reason (``non-finite``, ``auc-drop``, ``error``)."""
        self.last_publish_attempt = time.monotonic()
        self._plotter = ThreadPoolExecutor(1, thread_name_prefix="moestream-plot")
        self._plot: Future | None = None
        """The heatmap being drawn."""
        load_plotting()  # at start-up, not while the first steps train

    def observe(self, step: int, result: StepResult) -> None:
        """One step's forward pass and losses."""
        if result.output is None:
            return
        self.health.observe(result.output)
        self._log({"loss/total": result.loss, **{f"loss/{t}": v for t, v in result.task_losses.items()}}, step)

    def report(self, step: int, summary: dict[str, dict[str, float]], positive_rates: dict[str, float]) -> None:
        """The progressive metrics and, on the health-writing worker, the expert-health report."""
        record = {f"progressive/{task}/{k}": v for task, m in summary.items() for k, v in m.items() if np.isfinite(v)}
        if self.writes_health:
            record.update(self._health_report(step, positive_rates))
        self._log(record, step)

    def publish(self, weights: dict, data: dict, step: int) -> Manifest | None:
        """Publish ``weights`` with manifest ``data`` (offsets, metrics, ...) unless the guard refuses."""
        self.last_publish_attempt = time.monotonic()
        try:
            manifest = self.snapshots.publish(weights, {**data, "experts": self.health.record()},
                                              guard=self.config.guard)
        except SnapshotError as exc:
            reason = exc.reason if isinstance(exc, SnapshotRefused) else "error"
            self.refused[reason] = self.refused.get(reason, 0) + 1
            if self.telemetry:
                self.telemetry.log({f"snapshot/refused/{reason}": float(self.refused[reason])}, step=step)
                self.telemetry.summarise({"snapshot/last_refusal": f"step {step}: {exc}"})
            print(f"moestream: snapshot refused at step {step} ({reason}): {exc}", flush=True)
            return None
        self.published.append(manifest.version)
        self.health.published(manifest.data.get("experts"))
        self._log({"snapshot/version": float(manifest.version)}, step)
        return manifest

    def close(self, step: int) -> None:
        """Wait for a heatmap being drawn and log it (before the W&B run ends)."""
        if self._plot is not None:
            wait([self._plot])
            self._log_heatmap(step)
        self._plotter.shutdown()

    def _log(self, record: dict, step: int) -> None:
        if self.telemetry is not None and record:
            self.telemetry.log(record, step=step)

    def _health_report(self, step: int, positive_rates: dict[str, float]) -> dict[str, float]:
        """Expert health (``learner.health``): JSON for ``moestream experts``, W&B metrics and alerts, heatmap."""
        now = time.time()
        report = self.health.report(step, positive_rates, now)
        if report is None:
            return {}
        latest = self.snapshots.latest_manifest()
        report["snapshot"] = {
            "version": latest.version if latest else None,
            "staleness_s": now - latest.created_at if latest else None,
            "staleness_steps": step - latest.data.get("step", 0) if latest else None,
            "refused": dict(self.refused),
        }
        report["family"] = self.config.family
        self.health_dir.mkdir(parents=True, exist_ok=True)
        self._log_heatmap(step)
        heatmap = self.health_dir / "utilisation.png"
        if (self.health.reports - 1) % self.config.health.heatmap_every_reports == 0 and self._plot is None:
            self._draw(heatmap, report)
        report["heatmap"] = str(heatmap) if heatmap.exists() else None  # the latest one drawn, if any yet
        write_atomic(self.health_dir / "experts.json", orjson.dumps(report, option=orjson.OPT_INDENT_2))
        record = report_metrics(report)
        if latest:
            record.update({"snapshot/version": float(latest.version), "snapshot/staleness_s": now - latest.created_at})
        if self.telemetry is not None:
            for a in report["alerts"]:
                self.telemetry.alert(f"expert {a['kind']}", f"step {step}: {a['subject']}: {a['detail']}")
            self.telemetry.summarise({"health/anomalies": [f"{a['kind']}: {a['subject']}: {a['detail']}"
                                                           for a in report["anomalies"]]})
        return record

    def _draw(self, path: Path, report: dict) -> None:
        """The first report, then every N: one drawing at a time, on the plot thread."""
        steps = [s for s, _ in self.health.history]
        shares = np.stack([share for _, share in self.health.history])  # (R, T, E), a copy
        self._plot = self._plotter.submit(plot_utilisation, steps, shares, report["tasks"], report["experts"], path)

    def _log_heatmap(self, step: int) -> None:
        """Log a heatmap drawn since the last report to W&B (from the training thread, at the current step)."""
        plot = self._plot
        if plot is None or not plot.done():
            return
        self._plot = None
        try:
            png = plot.result()
        except Exception as exc:  # a figure that failed to draw costs the figure, not the training
            print(f"moestream: the utilisation heatmap failed to draw: {type(exc).__name__}: {exc}", flush=True)
            return
        if self.telemetry is not None:
            self.telemetry.log_image("health/utilisation", png, step=step)
