"""What a training run tells the world: guarded snapshots, expert-health reports, losses and heatmaps.

- :meth:`Reporter.publish` writes a version (a base: the whole model; or a delta: the change since the last
  version, ``learner.delta``) unless the guard refuses it (non-finite weights, or a recent
  progressive AUC more than ``guard.max_auc_drop`` below the last published one); a refusal is counted and
  logged with its reason, never fatal. A directory that cannot take the write (full, read-only) is an
  outage, not a refusal: counted (``publish_failures``), logged once when it starts (the directory and the
  errno) and once when it ends, and publishing is tried again after an exponential backoff
  (``PUBLISH_BACKOFF_S`` doubling up to ``PUBLISH_BACKOFF_MAX_S``) until a write goes through. Training goes
  on meanwhile; offsets follow checkpoints, not snapshots, so nothing is lost.
- :meth:`Reporter.observe` takes every step's forward pass (the health monitor accumulates its gates) and
  logs its losses; :meth:`Reporter.report`, at the health cadence, logs the progressive metrics and writes
  the expert-health report (``<run>/health/experts.json``, read by ``moestream experts``) with a
  task x expert utilisation heatmap drawn in a process of its own (``learner.plot_process``), so a drawing never
  holds up a step, not even for the interpreter's lock.

A published version is then offered to the run's weight-store actor (``learner.weight_store``), through which
replicas on any node follow it (a version over ``learner.publish.ray_max_bytes`` as its manifest only: replicas read
its payload from the durable store); the durable store has it already, so an actor that cannot be reached (Ray
restarting it) costs replicas only the Ray path until the next offer: they read the store meanwhile. An actor
that lost its state (restarted) refuses a delta whose base it does not hold; the chain up to the new version
is then offered again from the store.

Only one worker of a data-parallel group reports health and publishes (rank 0): each rank sees only its own
gates, and one writer keeps the files consistent.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import orjson

from learner.config import LearnerConfig
from learner.delta import Delta
from learner.health import HealthMonitor, report_metrics
from learner.models import MultiTaskModel
from learner.snapshots import (
    Manifest, PendingBase, SnapshotError, SnapshotRefused, SnapshotStore, SnapshotUnwritable, write_atomic,
)
from learner.step import StepResult
from learner.plot_process import Plotter
from learner.telemetry import Telemetry

PUBLISH_BACKOFF_S = 1.0
"""Wait after the first failed write before publishing is tried again; doubled after every further failure."""
PUBLISH_BACKOFF_MAX_S = 60.0


class Reporter:
    def __init__(self, config: LearnerConfig, model: MultiTaskModel, snapshots: SnapshotStore,
                 telemetry: Telemetry | None = None, writes_health: bool = True, health_dir: Path | None = None,
                 weight_store=None) -> None:
        """``health_dir``: where the expert-health report goes (default: beside a local snapshot directory);
        ``weight_store``: the run's weight-store actor handle (None: the durable store only)."""
        self.config = config
        self.snapshots = snapshots
        self.weight_store = weight_store
        self.publish_times: dict[str, deque[tuple[int, float]]] = {
            "base": deque(maxlen=1000), "delta": deque(maxlen=1000), "capture": deque(maxlen=1000)}
        """Per kind, ``(bytes, seconds)`` of the latest versions published: reading the learner, writing the
        store, offering to the weight store (a base written beside training: its writing thread's time); and
        ``capture``, what a base written beside training took of the training thread (its copies)."""
        self.offer_failures = 0
        self.last_offer_error: str | None = None
        self.telemetry = telemetry
        self.writes_health = writes_health
        latest = snapshots.latest_manifest()
        self.health = HealthMonitor(config.health, config.tasks, model, latest.data.get("experts") if latest else None)
        if health_dir is None and snapshots.directory is None:
            raise ValueError("a snapshot store that is no local directory needs health_dir")
        self.health_dir = health_dir if health_dir is not None else snapshots.directory.parent / "health"
        self.published: list[int] = []
        self.refused: dict[str, int] = {}
        """Refused publishes by reason (``non-finite``, ``auc-drop``, ``error``)."""
        self.last_publish_attempt = time.monotonic()
        self.publish_failures = 0
        """Publishes the snapshot directory refused (full, read-only), over all outages."""
        self.last_publish_error: str | None = None
        self._outage_since: float | None = None
        """When the current outage of the snapshot directory began (monotonic; None: none now)."""
        self._outage_failures = 0
        self._retry_at = 0.0
        self._health_unwritable = False
        self._plotter = ThreadPoolExecutor(1, thread_name_prefix="moestream-plot")
        self._drawing = Plotter()
        """The heatmap's process, one for the run (``learner.plot_process``)."""
        self._plot: Future | None = None
        """The heatmap being drawn."""

    def observe(self, step: int, result: StepResult, seconds: float | None = None) -> None:
        """One step's forward pass and losses; ``seconds``: the step's wall time."""
        if result.output is None:
            return
        self.health.observe(result.output)
        record = {"loss/total": result.loss, **{f"loss/{t}": v for t, v in result.task_losses.items()}}
        if seconds is not None:
            record["time/step_s"] = seconds
        self._log(record, step)

    def report(self, step: int, summary: dict[str, dict[str, float]], positive_rates: dict[str, float]) -> None:
        """The progressive metrics and, on the health-writing worker, the expert-health report."""
        record = {f"progressive/{task}/{k}": v for task, m in summary.items() for k, v in m.items() if np.isfinite(v)}
        if self.writes_health:
            record.update(self._health_report(step, positive_rates))
        self._log(record, step)

    def publish_due(self) -> bool:
        """False while backing off after a failed write (the snapshot directory is full or read-only)."""
        return time.monotonic() >= self._retry_at

    def publish(self, content: dict | Delta, data: dict, step: int, beside: PendingBase | None = None) -> Manifest | None:
        """Publish ``content`` (a whole state: a base; or a :class:`~learner.delta.Delta`) with manifest ``data``
        (offsets, metrics, ...) unless the guard refuses it or the store cannot take it (an outage: see the
        module docstring). With ``beside`` (a base written beside training), ``content`` is the delta that brings
        it up to date and both become versions (``SnapshotStore.publish_beside``); the delta's manifest is
        returned."""
        self.last_publish_attempt = time.monotonic()
        data = {**data, "experts": self.health.record()}
        base, parent = None, self.published[-1] if self.published else None  # a delta is the change from it
        try:
            if beside is not None:
                base, manifest = self.snapshots.publish_beside(beside, content, data, guard=self.config.guard,
                                                               parent=parent)
            elif isinstance(content, Delta):
                manifest = self.snapshots.publish_delta(content, data, guard=self.config.guard, parent=parent)
            else:
                manifest = self.snapshots.publish(content, data, guard=self.config.guard)
        except SnapshotUnwritable as exc:
            self._publish_failed(exc, step)
            return None
        except SnapshotError as exc:
            reason = exc.reason if isinstance(exc, SnapshotRefused) else "error"
            self.refused[reason] = self.refused.get(reason, 0) + 1
            if self.telemetry:
                self.telemetry.log({f"snapshot/refused/{reason}": float(self.refused[reason])}, step=step)
                self.telemetry.summarise({"snapshot/last_refusal": f"step {step}: {exc}"})
            print(f"moestream: snapshot refused at step {step} ({reason}): {exc}", flush=True)
            return None
        if base is not None:
            self._offer(base)
            self.published.append(base.version)
        self._offer(manifest)
        self.published.append(manifest.version)
        self.health.published(manifest.data.get("experts"))
        self._log({"snapshot/version": float(manifest.version)}, step)
        if self._outage_since is not None:
            print(f"moestream: publishing snapshots to {self.snapshots.directory} again at step {step} (v"
                  f"{manifest.version}) after {self._outage_failures} failed attempts over "
                  f"{time.monotonic() - self._outage_since:.1f} s", flush=True)
            self._outage_since, self._outage_failures, self._retry_at = None, 0, 0.0
            self._log({"snapshot/outage_s": 0.0}, step)
        return manifest

    def published_in(self, manifest: Manifest, seconds: float) -> None:
        """Record how long ``manifest``'s version took to publish, from reading the learner to its offer."""
        self.timed(manifest.kind, manifest.bytes or 0, seconds)

    def timed(self, kind: str, size: int, seconds: float) -> None:
        """Record ``(size, seconds)`` under ``kind`` of :attr:`publish_times`."""
        self.publish_times[kind].append((size, seconds))

    def _offer(self, manifest: Manifest) -> None:
        """Hand the version to the weight-store actor; if it no longer holds the version's chain (restarted),
        the chain from the store. A failure is counted and logged once, never fatal."""
        if self.weight_store is None:
            return
        try:
            if not self._offer_one(manifest):
                for link in self.snapshots.chain(manifest.version):
                    self._offer_one(link)
        except Exception as exc:  # Ray down or restarting the actor: the durable store has the version
            self.offer_failures += 1
            if self.last_offer_error is None:
                print(f"moestream: WARNING: cannot offer v{manifest.version} to the weight store ({exc}); replicas "
                      f"read the snapshot store until it is back", flush=True)
            self.last_offer_error = str(exc)
        else:
            self.last_offer_error = None

    def _offer_one(self, manifest: Manifest) -> bool:
        from learner.weight_store import offer

        payload = None  # over the cap: the manifest only, replicas read the payload from the durable store
        if (manifest.bytes or 0) <= self.config.publish.ray_max_bytes:
            manifest, payload = self.snapshots.payload(manifest.version)  # verified against its sha256
        return offer(self.weight_store, manifest.version, manifest.base, manifest.to_json(), payload)

    def _publish_failed(self, exc: SnapshotUnwritable, step: int) -> None:
        now = time.monotonic()
        self.publish_failures += 1
        self.last_publish_error = str(exc)
        if self._outage_since is None:
            self._outage_since = now
            print(f"moestream: WARNING: {exc} (at step {step}); training goes on, publishing is retried with "
                  f"backoff until the directory takes writes again", flush=True)
            if self.telemetry:
                self.telemetry.alert("snapshot outage", f"step {step}: {exc}")
        self._outage_failures += 1
        self._retry_at = now + min(PUBLISH_BACKOFF_S * 2 ** (self._outage_failures - 1), PUBLISH_BACKOFF_MAX_S)
        if self.telemetry:
            self.telemetry.log({"snapshot/publish_failures": float(self.publish_failures),
                                "snapshot/outage_s": now - self._outage_since}, step=step)
            self.telemetry.summarise({"snapshot/last_publish_error": f"step {step}: {exc}"})

    def publish_figures(self) -> dict:
        """The snapshot store's outage figures (failed writes in all, how long the current outage has lasted: 0
        when publishing works), offers the weight store did not take, and per kind of version the count, median
        bytes and publish time percentiles (seconds)."""
        since = self._outage_since
        kinds = {}
        for kind, times in self.publish_times.items():
            if times:
                sizes, seconds = np.array([b for b, _ in times]), np.array([t for _, t in times])
                kinds[kind] = {"n": len(times), "bytes_p50": float(np.median(sizes)),
                               "seconds_p50": float(np.percentile(seconds, 50)),
                               "seconds_p99": float(np.percentile(seconds, 99)), "seconds_max": float(seconds.max())}
        return {"publish_failures": self.publish_failures,
                "snapshot_outage_s": 0.0 if since is None else time.monotonic() - since,
                "last_publish_error": self.last_publish_error,
                "offer_failures": self.offer_failures,
                "published_versions": kinds}

    def close(self, step: int) -> None:
        """Wait for a heatmap being drawn and log it (before the W&B run ends)."""
        if self._plot is not None:
            wait([self._plot])
            self._log_heatmap(step)
        self._plotter.shutdown()
        self._drawing.close()

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
            "publish_failures": self.publish_failures,
        }
        report["family"] = self.config.family
        with contextlib.suppress(OSError):  # the heatmap is drawn into it; a failure is _write_health's to report
            self.health_dir.mkdir(parents=True, exist_ok=True)
        self._log_heatmap(step)
        heatmap = self.health_dir / "utilisation.png"
        if (self.health.reports - 1) % self.config.health.heatmap_every_reports == 0 and self._plot is None:
            self._draw(heatmap, report)
        report["heatmap"] = str(heatmap) if heatmap.exists() else None  # the latest one drawn, if any yet
        self._write_health(report, step)
        record = report_metrics(report)
        if latest:
            record.update({"snapshot/version": float(latest.version), "snapshot/staleness_s": now - latest.created_at})
        if self.telemetry is not None:
            for a in report["alerts"]:
                self.telemetry.alert(f"expert {a['kind']}", f"step {step}: {a['subject']}: {a['detail']}")
            self.telemetry.summarise({"health/anomalies": [f"{a['kind']}: {a['subject']}: {a['detail']}"
                                                           for a in report["anomalies"]]})
        return record

    def _write_health(self, report: dict, step: int) -> None:
        """``experts.json`` for ``moestream experts``; a directory that cannot take it (full, read-only: the
        snapshots' disk, as a rule) costs the file, not the training, and is logged once until it can."""
        try:
            self.health_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.health_dir / "experts.json", orjson.dumps(report, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            if not self._health_unwritable:
                print(f"moestream: WARNING: cannot write the expert-health report to {self.health_dir} at step "
                      f"{step}: {exc}; training goes on", flush=True)
            self._health_unwritable = True
            return
        self._health_unwritable = False

    def _draw(self, path: Path, report: dict) -> None:
        """The first report, then every N: one drawing at a time, on the plot thread."""
        steps = [s for s, _ in self.health.history]
        shares = np.stack([share for _, share in self.health.history])  # (R, T, E), a copy
        self._plot = self._plotter.submit(self._drawing.draw, steps, shares, report["tasks"], report["experts"], path)

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
