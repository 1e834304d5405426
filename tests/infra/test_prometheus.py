"""The trainer's Prometheus metrics, end to end: a short real run (Kafka -> trainer actor in Ray), then Ray's
metrics endpoint scraped over HTTP, then Debian's prometheus running the shipped scrape configuration against
it and answering the dashboard's queries. Ray serves what its agent last aggregated, so every check polls
with a deadline."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from features.store import OnlineFeatures
from infra.pipeline import RunLayout, start_trainer, wait_for, worker_config
from infra.prometheus_server import PrometheusServerConfig, running, scrape_config
from infra.runtime import metrics_targets, write_service_discovery
from learner.prometheus import exported_names
from learner.snapshots import SnapshotStore
from stream.kafka_io import EventSink, ensure_topics
from stream.simulator import Simulator, SimulatorConfig
from tests.conftest import free_port
from tests.infra.test_grafana import dashboard_queries, metric_names

pytestmark = pytest.mark.integration
SCRAPE_TIMEOUT_S = 120


@dataclass
class Run:
    config: object
    stats: dict
    worker_id: str
    """The trainer actor's Ray worker: Ray's ``WorkerId`` label on every series it exports."""
    event_times_s: tuple[float, float]
    """The first and the last event time produced."""
    stopped_at: float
    """``time.monotonic()`` when the run had ended: no gauge was set by the run after it."""


@pytest.fixture(scope="module")
def trained(ray_session, kafka_bootstrap, tmp_path_factory) -> Run:
    """A trainer actor that trained on a backlog and stopped; kept alive, so Ray keeps serving its metrics."""
    ray = ray_session
    root = tmp_path_factory.mktemp("prometheus")
    topic = f"test.prometheus.{os.getpid()}.{free_port()}"
    config = worker_config(RunLayout(root), bootstrap=kafka_bootstrap, topic=topic, family="home", window_ms=1_500,
                           snapshot_every_steps=4, batch_size=128, wandb_mode="disabled")
    cadence = replace(config.learner.cadence, health_every_steps=2, stats_every_steps=2)
    config = replace(config, learner=replace(config.learner, cadence=cadence))
    ensure_topics(config.kafka)
    OnlineFeatures(config.features).apply()
    events = list(Simulator(SimulatorConfig(seed=3, max_delay_s=1.0)).events(int(time.time() * 1000), 700))
    sink = EventSink(config.kafka)
    sink.send_all(events)
    sink.close()

    actor, run_ref = start_trainer(config, max_restarts=0)
    try:
        wait_for(lambda: ray.get(actor.stats.remote())["consumed"] >= len(events), 240, "the backlog consumed")
        actor.stop.remote()
        stats = ray.get(run_ref, timeout=180)
        stopped_at = time.monotonic()
        worker_id = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_worker_id()))
        times = [e["ts_ms"] / 1000 for e in events]
        yield Run(config, stats, worker_id, (min(times), max(times)), stopped_at)
    finally:
        ray.get(actor.close.remote(), timeout=120)
        ray.kill(actor)


def scrape(worker_id: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The moestream series one worker exports, from every node's metrics endpoint: name -> (labels, value)."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for target in metrics_targets():
        text = httpx.get(f"http://{target}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_moestream_") and sample.labels.get("WorkerId") == worker_id:
                    found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def by(samples: list[tuple[dict[str, str], float]], *labels: str) -> dict:
    return {tuple(ls[label] for label in labels) if len(labels) > 1 else ls[labels[0]]: v for ls, v in samples}


def test_ray_serves_the_trainers_metrics(trained: Run) -> None:
    stats, config = trained.stats, trained.config
    final = {}

    def complete() -> bool:  # the run's last figures, as Ray's agent aggregated them
        final.clear()
        final.update(scrape(trained.worker_id))
        trained_total = final.get("ray_moestream_examples_trained_total", [({}, 0)])[0][1]
        version = final.get("ray_moestream_snapshot_version", [({}, 0)])[0][1]
        return (trained_total == stats["examples_trained"] and version == stats["snapshots"][-1]
                and "ray_moestream_expert_routing_share" in final)

    wait_for(complete, SCRAPE_TIMEOUT_S, "Ray's metrics endpoint to serve the run's final figures", every_s=1.0)
    assert set(final) <= exported_names()

    one = {name: samples[0][1] for name, samples in final.items() if len(samples) == 1}
    assert stats["examples_trained"] > 0
    assert one["ray_moestream_events_consumed_total"] == stats["consumed"]
    lag = by(final["ray_moestream_consumer_lag"], "partition")
    assert set(lag) == {str(p) for p in range(config.kafka.partitions)} and all(v >= 0 for v in lag.values())
    assert 0 < one["ray_moestream_step_duration_seconds_count"] <= stats["steps"]
    assert one["ray_moestream_step_duration_seconds_sum"] > 0
    buckets = by(final["ray_moestream_step_duration_seconds_bucket"], "le")
    assert buckets["+Inf"] == one["ray_moestream_step_duration_seconds_count"]

    manifest = SnapshotStore(config.snapshot_dir).latest_manifest()
    assert one["ray_moestream_snapshot_version"] == manifest.version == stats["snapshots"][-1]
    first, last = trained.event_times_s
    assert manifest.data["event_time_hwm_ms"] / 1000 <= one["ray_moestream_trained_event_time_seconds"] <= last
    assert one["ray_moestream_trained_event_time_seconds"] >= first

    auc = by(final["ray_moestream_progressive_auc"], "task", "span")
    assert ("click", "window") in auc and ("click", "cumulative") in auc
    assert all(0.0 <= v <= 1.0 for v in auc.values())
    assert all(0.0 <= v <= 1.0 for v in by(final["ray_moestream_progressive_gauc"], "task", "span").values())
    assert one["ray_moestream_expert_load_balance"] >= 1.0 - 1e-6  # 1 is a perfectly even load
    shares = by(final["ray_moestream_expert_routing_share"], "task", "expert")
    for task in {t for t, _ in shares}:
        assert sum(v for (t, _), v in shares.items() if t == task) == pytest.approx(1.0, abs=1e-4)
    assert any("/" in expert for _, expert in shares), "HoME's experts are named <pool>/<i>"
    assert set(by(final["ray_moestream_expert_anomalies"], "kind")) == {"collapse", "degradation", "underfitting"}

    tables = stats["id_tables"]  # the run's ID maps (user_id and item_id by default), at the end of the run
    assert tables and by(final["ray_moestream_id_table_live"], "field") == {f: t["live"] for f, t in tables.items()}
    assert by(final["ray_moestream_id_table_admitted_total"], "field") == {f: t["admitted"] for f, t in tables.items()}
    assert all(t["live"] > 0 for t in tables.values())


def test_gauges_stay_served_after_the_run_while_the_process_lives(trained: Run) -> None:
    """Ray's agent drops a gauge not set for two report intervals; the sink's keeper sets them again, so an
    ended (or idle) run's lag, version and AUC stay on the dashboard as long as its counters."""
    import ray

    ttl_s = 2 * max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    gauges = ("ray_moestream_snapshot_version", "ray_moestream_consumer_lag", "ray_moestream_progressive_auc",
              "ray_moestream_expert_routing_share", "ray_moestream_id_table_live")
    seen: dict = {}

    def served_past_the_ttl() -> bool:
        after_s = time.monotonic() - trained.stopped_at
        seen.clear()
        seen.update(scrape(trained.worker_id))
        return after_s > ttl_s + 2 and all(name in seen for name in gauges)

    wait_for(served_past_the_ttl, SCRAPE_TIMEOUT_S, f"the run's gauges served {ttl_s:.0f} s after it ended",
             every_s=1.0)
    assert seen["ray_moestream_snapshot_version"][0][1] == trained.stats["snapshots"][-1]


def test_the_shipped_prometheus_config_scrapes_the_run_and_answers_the_dashboard(trained: Run, tmp_path: Path) -> None:
    targets = write_service_discovery(tmp_path / "ray_targets.json")  # Ray's format, for this session's node
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(scrape_config(targets))
    server = PrometheusServerConfig(port=free_port(), data_dir=tmp_path / "prometheus", config_file=config_file)
    with running(server) as url:
        def up() -> bool:
            active = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            return bool(active) and all(t["health"] == "up" for t in active)

        wait_for(up, SCRAPE_TIMEOUT_S, "prometheus to scrape Ray's metrics agent", every_s=1.0)

        def query(expr: str) -> list[dict]:
            answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        series = f'ray_moestream_examples_trained_total{{WorkerId="{trained.worker_id}"}}'
        wait_for(lambda: bool(query(series)), SCRAPE_TIMEOUT_S, "the series in prometheus", every_s=1.0)
        (result,) = query(series)
        assert float(result["value"][1]) == trained.stats["examples_trained"]
        assert result["metric"]["job"] == "ray"  # the shipped job, through the service-discovery file

        silent: list[str] = []

        def every_panel_answers() -> bool:
            silent.clear()
            for expr in dashboard_queries():  # Grafana's variables, as Grafana would substitute them
                result = query(expr.replace("$__rate_interval", "1m").replace("$task", "click"))  # valid PromQL
                # A rate needs two scrapes, and Ray exports a counter once it has counted something (a refusal,
                # a stall); every other panel shows the run once Ray's agent has exported its gauges (each on
                # its own interval) and Prometheus has scraped them.
                if not result and "[" not in expr and not any(n.endswith("_total") for n in metric_names(expr)):
                    silent.append(expr)
            return not silent

        try:
            wait_for(every_panel_answers, SCRAPE_TIMEOUT_S, "every dashboard query to have data", every_s=2.0)
        except TimeoutError:
            pytest.fail(f"dashboard queries without data for a run that trained: {silent}")
