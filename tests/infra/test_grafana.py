"""The Grafana dashboard and its provisioning, checked without a Grafana: the JSON's structure, its panels, and
every query naming only series the trainer's Prometheus sink exports (the set derived from learner.prometheus)
with only their labels. tests/infra/test_prometheus.py runs the same queries against a real Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from learner.prometheus import METRICS, exported_names

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "moestream.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "moestream.yml"

RAY_LABELS = {"WorkerId", "NodeAddress", "SessionName", "Component", "Version", "job", "instance"}
"""Labels Ray's exporter (and Prometheus's scrape) add to every series."""
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
EXPECTED_PANELS = {
    "Pipeline": {"Events consumed / s", "Consumer lag by partition", "Step time", "Freshness"},
    "Quality (progressive validation)": {"Window AUC by task", "Window GAUC by task"},
    "Expert health": {"Load balance", "Anomalies by kind", "Utilisation: $task"},
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels_by_row(board: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    current = None
    for panel in sorted(board["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = []
        else:
            assert current is not None, f"panel {panel['title']!r} sits above every row"
            rows[current].append(panel)
    return rows


def dashboard_queries(board: dict | None = None) -> list[str]:
    """Every panel's PromQL expression."""
    board = board or dashboard()
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def _strip(expr: str) -> str:
    """The expression without strings, label matchers, ranges, and grouping clauses."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)


def metric_names(expr: str) -> set[str]:
    """The series an expression selects: identifiers that are neither functions, keywords nor numbers."""
    stripped = _strip(expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", stripped):
        if match.group(1) not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by."""
    labels = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in clause.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', matchers)))
    return labels


def test_the_dashboard_has_the_three_groups_of_panels() -> None:
    board = dashboard()
    assert board["uid"] == "moestream-trainer" and board["title"] and board["schemaVersion"] >= 36
    rows = panels_by_row(board)
    for row, titles in EXPECTED_PANELS.items():
        assert row in rows, f"no row {row!r}"
        assert titles <= {p["title"] for p in rows[row]}, f"{row}: missing {titles - {p['title'] for p in rows[row]}}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]


def test_every_query_names_exported_metrics_and_their_labels() -> None:
    exported = exported_names()
    labels_of = {name: set(spec.labels) for spec in METRICS for name in spec.scraped}
    board = dashboard()
    queries = dashboard_queries(board)
    variables = [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                 for v in board["templating"]["list"] if v["type"] == "query"]
    assert queries and variables
    used = set()
    for expr in queries + variables:
        labels = set()
        grafana = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", expr)  # Grafana's, not PromQL: (selector, label)
        if grafana:
            expr, labels = grafana.group(1), {grafana.group(2)}
        names = metric_names(expr)
        assert names, f"{expr!r} selects no series"
        assert names <= exported, f"{expr!r} names {sorted(names - exported)}, which moestream does not export"
        labels |= label_names(expr)
        known = set().union(*(labels_of[name] for name in names)) | RAY_LABELS
        known |= {"le"} if any(name.endswith("_bucket") for name in names) else set()
        assert labels <= known, f"{expr!r} uses labels {sorted(labels - known)} that its metrics do not have"
        used |= names
    # the dashboard covers the figures
    assert {"ray_moestream_events_consumed_total", "ray_moestream_consumer_lag",
            "ray_moestream_step_duration_seconds_bucket", "ray_moestream_trained_event_time_seconds",
            "ray_moestream_snapshot_age_seconds", "ray_moestream_progressive_auc", "ray_moestream_progressive_gauc",
            "ray_moestream_expert_load_balance", "ray_moestream_expert_anomalies",
            "ray_moestream_expert_routing_share"} <= used


def test_the_query_checker_catches_a_made_up_metric_or_label() -> None:
    assert metric_names('sum by (task) (rate(ray_moestream_made_up_total{task="click"}[5m])) / 2') == \
        {"ray_moestream_made_up_total"}
    assert metric_names("time() - max(ray_moestream_trained_event_time_seconds)") == \
        {"ray_moestream_trained_event_time_seconds"}
    assert metric_names("moestream_events_consumed_total") - exported_names(), "the ray_ prefix is required"
    assert label_names('sum by (taks) (x{span="window"})') == {"taks", "span"}


def test_every_panel_uses_the_provisioned_datasource() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus"
    board = dashboard()
    for panel in board["panels"]:
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if ref is not None:
                assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == source["uid"]


@pytest.mark.parametrize("path", [DATASOURCES, PROVIDERS])
def test_provisioning_files_are_grafana_provisioning(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert document["apiVersion"] == 1
    if path == PROVIDERS:
        (provider,) = document["providers"]
        assert provider["type"] == "file" and provider["options"]["path"]
