"""Training telemetry as Prometheus metrics, through Ray's metrics API (``ray.util.metrics``).

Ray's metrics agent on each node serves the metrics of every process on it at
``http://<node>:<metrics_export_port>/metrics``, each name prefixed ``ray_`` (:data:`EXPORTED_PREFIX`) and
labelled by Ray with the worker, node and session; Prometheus finds the nodes through the service-discovery
file a Ray head writes (``infra/prometheus/prometheus.yml``; docs/telemetry.md says where to scrape).

:class:`PrometheusSink` is one of :class:`~learner.telemetry.Telemetry`'s sinks. It maps every record key it
knows (:data:`ROUTES`) to a metric of :data:`METRICS`, the key's variable parts becoming labels:
``progressive/click/window_auc`` is ``moestream_progressive_auc{task="click", span="window"}``. Keys it does
not know are the other sinks' alone. A key is resolved once and cached with its metric and labels, so a
record costs a dict look-up and one ``set``, ``inc`` or ``observe`` per key; the Ray metric objects are made
once per process and shared by every sink in it. Counters are fed cumulative figures (events consumed so
far) and increase by the difference from the last figure the sink saw, so ``rate()`` gives events/s; Ray
takes only positive increments, so a counter that has counted nothing yet (no refusal, no stall) has no series.

Ray's agent drops a gauge series that its process has not set for two report intervals
(``metrics_report_interval_ms``, 10 s by default): a trainer waiting for events, or one whose run has ended,
would lose its lag, snapshot version and AUC from the dashboard while its counters stay. So the process keeps
the last value of every gauge it set (:class:`_GaugeKeeper`, one per process like the metric objects) and
sets it again every half interval, from a daemon thread, until the process ends: what a scrape sees is the
newest value of every series, as with an in-process ``prometheus_client`` registry.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Literal

EXPORTED_PREFIX = "ray_"
"""Ray's exporter prefixes every application metric with its namespace: what Prometheus really scrapes."""

STEP_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
"""Histogram boundaries of the training step's wall time, seconds."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name before Ray's prefix, its type, its help text (ASCII: Ray's metric objects take no
    other) and its labels."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = field(default=(), repr=False)

    @property
    def scraped(self) -> tuple[str, ...]:
        """The series names Prometheus scrapes for this metric (a histogram is three)."""
        name = EXPORTED_PREFIX + self.name
        if self.kind == "histogram":
            return tuple(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (name,)


METRICS: tuple[MetricSpec, ...] = (
    # pipeline
    MetricSpec("moestream_events_consumed_total", "counter",
               "Events the trainer consumed from Kafka (rate(): events/s)."),
    MetricSpec("moestream_consumer_lag", "gauge", "Messages of a partition not fetched yet.", ("partition",)),
    MetricSpec("moestream_joiner_pending", "gauge", "Impressions waiting in the joiner for their labels."),
    MetricSpec("moestream_examples_trained_total", "counter", "Examples the model trained on."),
    MetricSpec("moestream_step_duration_seconds", "histogram",
               "Wall time of one training step: read features, fold aggregates, predict, learn.",
               boundaries=STEP_BUCKETS_S),
    MetricSpec("moestream_trained_event_time_seconds", "gauge",
               "Event time (Unix seconds) of the newest example trained: time() minus it is the model's "
               "freshness."),
    MetricSpec("moestream_intake_stalls_total", "counter", "Times the intake watchdog found the consumer stalled."),
    MetricSpec("moestream_intake_stall_recoveries_total", "counter", "Stalls after which events arrived again."),
    MetricSpec("moestream_broker_retries_total", "counter", "Kafka fetches that failed and were retried."),
    MetricSpec("moestream_replay_position", "gauge",
               "Events of the log direct replay has read (learner.replay_source)."),
    # quality
    MetricSpec("moestream_training_loss", "gauge", "The step's total loss (all tasks and auxiliary losses)."),
    MetricSpec("moestream_task_loss", "gauge", "The step's loss of one task.", ("task",)),
    MetricSpec("moestream_progressive_auc", "gauge",
               "Progressive AUC of a task: over the last metric_window examples (span=window) or all of them "
               "(span=cumulative).", ("task", "span")),
    MetricSpec("moestream_progressive_gauc", "gauge", "Progressive per-user GAUC of a task.", ("task", "span")),
    MetricSpec("moestream_progressive_logloss", "gauge", "Progressive log loss of a task.", ("task", "span")),
    MetricSpec("moestream_progressive_calibration", "gauge",
               "Mean predicted over observed positive rate of a task (1 is calibrated).", ("task", "span")),
    MetricSpec("moestream_progressive_positive_rate", "gauge", "Observed positive rate of a task, cumulative.",
               ("task",)),
    # expert health
    MetricSpec("moestream_expert_load_balance", "gauge",
               "Load-balance score N * sum_i f_i * P_i (1 even, N one expert takes all)."),
    MetricSpec("moestream_expert_routing_share", "gauge", "Share of a task's routing that went to an expert.",
               ("task", "expert")),
    MetricSpec("moestream_expert_gate_weight", "gauge", "Mean gate weight a task gave an expert.", ("task", "expert")),
    MetricSpec("moestream_expert_zero_fraction", "gauge", "Fraction of an expert's activations that are zero.",
               ("expert",)),
    MetricSpec("moestream_expert_output_scale", "gauge", "RMS of an expert's output.", ("expert",)),
    MetricSpec("moestream_routing_drift", "gauge",
               "Jensen-Shannon drift of a task's routing share against the last published snapshot's "
               "(reference=published) or the previous reports' (reference=recent).", ("task", "reference")),
    MetricSpec("moestream_expert_anomalies", "gauge", "Anomalies of a kind found in the last health report.",
               ("kind",)),
    MetricSpec("moestream_alerts_total", "counter", "Alerts raised, by title.", ("title",)),
    # snapshots
    MetricSpec("moestream_snapshot_version", "gauge", "The snapshot version LATEST names."),
    MetricSpec("moestream_snapshot_age_seconds", "gauge", "Age of the LATEST snapshot at the last health report."),
    MetricSpec("moestream_snapshots_refused_total", "counter", "Snapshots the publish guard refused, by reason.",
               ("reason",)),
    MetricSpec("moestream_snapshot_publish_failures_total", "counter",
               "Snapshot writes the directory refused (full, read-only)."),
    MetricSpec("moestream_snapshot_outage_seconds", "gauge",
               "How long the snapshot directory has refused writes (0: publishing works)."),
    # ID tables
    MetricSpec("moestream_id_collision_rate", "gauge", "Share of ids that share an embedding row with another."),
    MetricSpec("moestream_id_keys", "gauge", "Distinct ids the embedding tables hold."),
    MetricSpec("moestream_id_table_live", "gauge", "Live ids in the field's ID map.", ("field",)),
    MetricSpec("moestream_id_table_capacity", "gauge", "Rows of the field's ID map.", ("field",)),
    MetricSpec("moestream_id_table_pending", "gauge", "Ids of the field waiting for admission.", ("field",)),
    MetricSpec("moestream_id_table_collisions", "gauge", "Live ids of the field sharing a row (hashed mode).",
               ("field",)),
    MetricSpec("moestream_id_table_bytes", "gauge", "Memory of the field's ID map.", ("field",)),
    MetricSpec("moestream_id_table_admitted_total", "counter", "Ids the field's map admitted.", ("field",)),
    MetricSpec("moestream_id_table_expired_total", "counter", "Ids of the field expired (ttl).", ("field",)),
    MetricSpec("moestream_id_table_evicted_total", "counter", "Ids of the field evicted for room.", ("field",)),
    MetricSpec("moestream_id_table_overflow_total", "counter", "Ids of the field that found no row.", ("field",)),
    MetricSpec("moestream_id_table_pending_dropped_total", "counter",
               "Ids of the field dropped while waiting for admission.", ("field",)),
)
SPECS = {spec.name: spec for spec in METRICS}

ROUTES: tuple[tuple[str, str, dict[str, str]], ...] = (
    # (record key, metric, fixed labels): a {field} of the key is the label of that name; the last field of
    # a key may hold slashes (expert names such as "global/1").
    ("kafka/consumed", "moestream_events_consumed_total", {}),
    ("kafka/partition_lag/{partition}", "moestream_consumer_lag", {}),
    ("joiner/pending", "moestream_joiner_pending", {}),
    ("learner/examples", "moestream_examples_trained_total", {}),
    ("time/step_s", "moestream_step_duration_seconds", {}),
    ("learner/event_time_hwm_s", "moestream_trained_event_time_seconds", {}),
    ("kafka/stalls", "moestream_intake_stalls_total", {}),
    ("kafka/stall_recoveries", "moestream_intake_stall_recoveries_total", {}),
    ("kafka/broker_retries", "moestream_broker_retries_total", {}),
    ("replay/position", "moestream_replay_position", {}),
    ("loss/total", "moestream_training_loss", {}),
    ("loss/{task}", "moestream_task_loss", {}),
    *((f"progressive/{{task}}/{prefix}{name}", f"moestream_progressive_{name}", {"span": span})
      for name in ("auc", "gauc", "logloss", "calibration")
      for prefix, span in (("", "cumulative"), ("window_", "window"))),
    ("progressive/{task}/positive_rate", "moestream_progressive_positive_rate", {}),
    ("health/load_balance", "moestream_expert_load_balance", {}),
    ("health/share/{task}/{expert}", "moestream_expert_routing_share", {}),
    ("health/gate/{task}/{expert}", "moestream_expert_gate_weight", {}),
    ("health/zero_frac/{expert}", "moestream_expert_zero_fraction", {}),
    ("health/output_scale/{expert}", "moestream_expert_output_scale", {}),
    ("health/drift_published/{task}", "moestream_routing_drift", {"reference": "published"}),
    ("health/drift_reference/{task}", "moestream_routing_drift", {"reference": "recent"}),
    ("health/anomalies/{kind}", "moestream_expert_anomalies", {}),
    ("snapshot/version", "moestream_snapshot_version", {}),
    ("snapshot/staleness_s", "moestream_snapshot_age_seconds", {}),
    ("snapshot/refused/{reason}", "moestream_snapshots_refused_total", {}),
    ("snapshot/publish_failures", "moestream_snapshot_publish_failures_total", {}),
    ("snapshot/outage_s", "moestream_snapshot_outage_seconds", {}),
    ("ids/collision_rate", "moestream_id_collision_rate", {}),
    ("ids/keys", "moestream_id_keys", {}),
    *((f"ids/{{field}}/{figure}", f"moestream_id_table_{figure}", {})
      for figure in ("live", "capacity", "pending", "collisions", "bytes")),
    *((f"ids/{{field}}/{counter}", f"moestream_id_table_{counter}_total", {})
      for counter in ("admitted", "expired", "evicted", "overflow", "pending_dropped")),
)
ALERTS = "moestream_alerts_total"
"""Fed by :meth:`PrometheusSink.alert`, not by a record key."""

LEFT_OUT: tuple[tuple[str, str], ...] = (
    # (record key, why it is W&B's only)
    ("kafka/lag", "the sum of moestream_consumer_lag over partitions"),
    ("progressive/{task}/n", "the count behind a task's figures; moestream_examples_trained_total counts examples"),
    ("progressive/{task}/window_n", "the window's size, learner.metric_window once it is full"),
    ("progressive/{task}/window_positives", "the count behind the window's figures"),
    ("progressive/{task}/window_gauc_users", "the count behind the window's GAUC"),
)
"""Keys the trainer logs that are deliberately no metric (tests/learner/test_prometheus.py holds every logged
key to be routed or listed here)."""


def _pattern(key: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", key)  # literal, field, literal, field, ..., literal
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            last = i == len(parts) - 2 and parts[-1] == ""
            out.append(f"(?P<{part}>{'.+' if last else '[^/]+'})")
    return re.compile("".join(out) + r"\Z")


_PATTERNS = tuple((_pattern(key), metric, fixed) for key, metric, fixed in ROUTES)


_LEFT_OUT = tuple(_pattern(key) for key, _ in LEFT_OUT)


def left_out(key: str) -> bool:
    """Whether ``key`` is one of :data:`LEFT_OUT`."""
    return any(pattern.match(key) for pattern in _LEFT_OUT)


def route(key: str) -> tuple[str, dict[str, str]] | None:
    """The metric a record key goes to and its labels; None for keys this sink leaves alone."""
    for pattern, metric, fixed in _PATTERNS:
        match = pattern.match(key)
        if match:
            return metric, {**match.groupdict(), **fixed}
    return None


def exported_names() -> frozenset[str]:
    """Every series name the sink's metrics are scraped under (``ray_moestream_...``)."""
    return frozenset(name for spec in METRICS for name in spec.scraped)


def ray_running() -> bool:
    """Whether this process is part of a Ray cluster (a Ray that was never imported is not running)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@cache
def _metric(name: str):
    """The process's one Ray metric object of that name."""
    from ray.util import metrics

    spec = SPECS[name]
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.help, tag_keys=spec.labels)
    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.help, tag_keys=spec.labels)
    return metrics.Histogram(spec.name, description=spec.help, boundaries=list(spec.boundaries), tag_keys=spec.labels)


class _Increments:
    """A counter fed cumulative figures: increased by the growth since the last one (a figure that went
    down restarted from zero)."""

    __slots__ = ("inc", "last")

    def __init__(self, counter, tags: dict[str, str] | None) -> None:
        self.inc = partial(counter.inc, tags=tags)
        self.last = 0.0

    def __call__(self, value: float) -> None:
        if not math.isfinite(value):
            return
        grown = value - self.last if value >= self.last else value
        self.last = value
        if grown > 0:
            self.inc(grown)


def _ignore(value: float) -> None:
    pass


def _report_interval_s() -> float:
    """How often this process's metrics reach Ray's agent (Ray floors the setting at 1 s)."""
    import ray

    return max(ray._config.metrics_report_interval_ms(), 1000) / 1000


class _GaugeKeeper:
    """The last value of every gauge series the process set, set again every ``every_s`` so that Ray's agent
    keeps serving it (see the module docstring)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[tuple, tuple[Callable[[float], None], float]] = {}
        self._thread = threading.Thread(target=self._run, name="moestream-gauge-keeper", daemon=True)
        self._thread.start()

    def setter(self, name: str, tags: dict[str, str] | None) -> Callable[[float], None]:
        """The ``set`` of one gauge series, remembering each value it sets (one slot per series, whichever
        sink of the process sets it)."""
        slot, last = (name, tuple(sorted((tags or {}).items()))), self._last
        set_value = partial(_metric(name).set, tags=tags)

        def set_and_keep(value: float) -> None:
            set_value(value)
            last[slot] = (set_value, value)

        return set_and_keep

    def refresh(self) -> None:
        for set_value, value in list(self._last.values()):
            set_value(value)

    def _run(self) -> None:
        while True:
            time.sleep(self.every_s)
            self.refresh()


@cache
def _keeper() -> _GaugeKeeper:
    return _GaugeKeeper(every_s=_report_interval_s() / 2)


class PrometheusSink:
    """Telemetry records as Ray metrics (see the module docstring)."""

    def __init__(self) -> None:
        for spec in METRICS:
            _metric(spec.name)  # made now: a record's first key costs no registration mid-step
        self._routes: dict[str, Callable[[float], None]] = {}
        self._alerts = _metric(ALERTS)

    def log(self, metrics: dict[str, float], step: int) -> None:
        routes = self._routes
        for key, value in metrics.items():
            record = routes.get(key)
            if record is None:
                record = routes[key] = self._resolve(key)
            record(value)

    def _resolve(self, key: str) -> Callable[[float], None]:
        found = route(key)
        if found is None:
            return _ignore
        name, labels = found
        metric, tags = _metric(name), labels or None
        kind = SPECS[name].kind
        if kind == "counter":
            return _Increments(metric, tags)
        if kind == "histogram":
            return partial(metric.observe, tags=tags)
        return _keeper().setter(name, tags)

    def alert(self, title: str, text: str, level: str) -> None:
        self._alerts.inc(1.0, tags={"title": title})

    def summarise(self, values: dict) -> None:
        """Run-summary values are text for a run page; a metric has them already."""

    def finish(self) -> None:
        """The last values stay served until the process ends (:class:`_GaugeKeeper`)."""


__all__ = ["EXPORTED_PREFIX", "LEFT_OUT", "METRICS", "MetricSpec", "PrometheusSink", "ROUTES", "exported_names",
           "left_out", "ray_running", "route"]
