"""The Prometheus sink's map from telemetry keys to metrics: consistent with the metrics it declares, complete
for what a real training loop logs, and documented. Exporting through Ray and scraping it back is
tests/infra/test_prometheus.py."""

from __future__ import annotations

import re
from pathlib import Path

from features.memory import InMemoryFeatures
from learner.config import CadenceConfig, LearnerConfig
from learner.loop import TrainingLoop
from learner import prometheus
from learner.prometheus import ALERTS, METRICS, ROUTES, SPECS, exported_names, left_out, route
from learner.snapshots import SnapshotStore
from learner.telemetry import Telemetry, TelemetryConfig
from tests.learner.test_health import _batch

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_every_metric_is_well_named() -> None:
    for spec in METRICS:
        assert NAME.match(spec.name) and spec.name.startswith("moestream_"), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), f"{spec.name}: _total is for counters only"
        assert not spec.name.endswith("_s") and not spec.name.endswith("_ms"), f"{spec.name}: durations in _seconds"
        assert (spec.kind == "histogram") == bool(spec.boundaries), spec.name
        assert spec.help.isascii(), f"{spec.name}: Ray's metrics take ASCII descriptions only"
    assert len(SPECS) == len(METRICS), "two metrics share a name"


def test_every_route_fills_exactly_its_metrics_labels_and_every_metric_is_fed() -> None:
    for key, metric, fixed in ROUTES:
        fields = set(re.findall(r"\{(\w+)\}", key))
        assert metric in SPECS, f"{key} goes to an undeclared metric {metric}"
        assert not fields & set(fixed) and fields | set(fixed) == set(SPECS[metric].labels), key
    assert {metric for _, metric, _ in ROUTES} | {ALERTS} == set(SPECS)


def test_keys_become_metrics_with_labels() -> None:
    assert route("progressive/click/window_auc") == ("moestream_progressive_auc", {"task": "click", "span": "window"})
    assert route("progressive/click/auc") == ("moestream_progressive_auc", {"task": "click", "span": "cumulative"})
    assert route("health/share/like/task:like/0") == ("moestream_expert_routing_share",
                                                      {"task": "like", "expert": "task:like/0"})
    assert route("kafka/partition_lag/3") == ("moestream_consumer_lag", {"partition": "3"})
    assert route("loss/total") == ("moestream_training_loss", {})
    assert route("loss/click") == ("moestream_task_loss", {"task": "click"})
    assert route("progressive/click/window_n") is None and left_out("progressive/click/window_n")
    assert route("made/up") is None and not left_out("made/up")


def test_what_a_training_loop_logs_is_exported_or_deliberately_left_out(tmp_path: Path) -> None:
    """Every key a real loop logs (losses, step time, progressive metrics, health, snapshots, figures) is a
    metric or in LEFT_OUT: a key added later must be mapped, or listed with its reason."""

    class KeysSink:
        def __init__(self) -> None:
            self.keys: set[str] = set()

        def log(self, metrics: dict[str, float], step: int) -> None:
            self.keys |= set(metrics)

        def alert(self, title: str, text: str, level: str) -> None: ...

        def summarise(self, values: dict) -> None: ...

        def finish(self) -> None: ...

    config = LearnerConfig(family="ple", hparams={"n_experts": 1, "expert_dims": (8,), "tower_dims": ()},
                           n_buckets=256, emb_dim=4,
                           cadence=CadenceConfig(snapshot_every_steps=3, health_every_steps=2, stats_every_steps=2))
    telemetry = Telemetry(TelemetryConfig(mode="disabled"), run_config={})
    keys = KeysSink()
    telemetry.sinks.append(keys)
    loop = TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(tmp_path / "run" / "snapshots"),
                              telemetry=telemetry)
    for step in range(4):
        loop.step(_batch(step))
    loop.close()

    assert {"time/step_s", "learner/examples", "learner/event_time_hwm_s", "health/load_balance",
            "snapshot/version"} <= keys.keys
    unmapped = sorted(k for k in keys.keys if route(k) is None and not left_out(k))
    assert not unmapped, f"logged but neither a metric nor in learner.prometheus.LEFT_OUT: {unmapped}"


def test_the_docs_list_every_metric() -> None:
    text = (ROOT / "docs" / "telemetry.md").read_text()
    documented = set(re.findall(r"^\| `(moestream_\w+)`", text, re.M))
    assert documented == set(SPECS), (f"missing from docs/telemetry.md: {sorted(set(SPECS) - documented)}; "
                                      f"not exported: {sorted(documented - set(SPECS))}")
    assert "ray_moestream_events_consumed_total" in exported_names()
    histogram = {"ray_moestream_step_duration_seconds_bucket", "ray_moestream_step_duration_seconds_count"}
    assert histogram <= exported_names()


def test_the_keeper_sets_every_gauge_series_again_with_its_newest_value(monkeypatch) -> None:
    """Ray's agent drops a gauge series not set for two report intervals; the keeper sets each one again with
    the newest value any sink of the process gave it (the real agent: tests/infra/test_prometheus.py)."""
    sets: list[tuple[str, float, tuple]] = []

    class Gauge:
        def __init__(self, name: str) -> None:
            self.name = name

        def set(self, value: float, tags: dict | None = None) -> None:
            sets.append((self.name, value, tuple(sorted((tags or {}).items()))))

    monkeypatch.setattr(prometheus, "_metric", Gauge)
    keeper = prometheus._GaugeKeeper(every_s=3600.0)  # refreshed by hand below, not by its thread
    lag0, lag1 = keeper.setter("lag", {"partition": "0"}), keeper.setter("lag", {"partition": "1"})
    lag0(5.0), lag1(7.0), lag0(3.0)
    again = keeper.setter("lag", {"partition": "0"})  # a second sink of the process, same series
    again(2.0)
    sets.clear()
    keeper.refresh()
    assert sorted(sets) == [("lag", 2.0, (("partition", "0"),)), ("lag", 7.0, (("partition", "1"),))]
