"""``moestream report``: a run directory from a short real training, rendered to one self-contained page; read by
headless Chromium as a person would (not blank, no console errors, plots with data)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from features.memory import InMemoryFeatures
from infra.cli import app
from infra.layout import RunLayout
from infra.report import ReportError, write_report
from learner.config import CadenceConfig, HealthConfig, LearnerConfig
from learner.history import HistorySink
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from learner.telemetry import Telemetry, TelemetryConfig
from tests.learner.test_health import _batch

PLOTS = {"auc", "loss", "utilisation", "drift", "anomalies", "snapshots"}
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""", re.I)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunLayout:
    """A run trained for a few steps, W&B off: history, expert health with an anomaly, snapshots."""
    layout = RunLayout(tmp_path_factory.mktemp("data") / "runs" / "r1")
    health = HealthConfig(underfit_shared_mass=0.0)  # any shared weight of a sparse task: flagged
    config = LearnerConfig(family="ple", hparams={"n_experts": 1, "expert_dims": (8,), "tower_dims": ()},
                           n_buckets=256, emb_dim=4, health=health,
                           cadence=CadenceConfig(snapshot_every_steps=3, health_every_steps=2))
    telemetry = Telemetry(TelemetryConfig(mode="disabled", directory=layout.wandb, history=layout.history),
                          run_config={"learner": {"family": "ple"}})
    loop = TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(layout.snapshots), telemetry=telemetry)
    for step in range(12):
        loop.step(_batch(step))  # health at every 2nd step, a snapshot at every 3rd
    loop.close()
    return layout


def _figures(page: str) -> dict[str, str]:
    return dict(re.findall(r'<figure class="plot"><svg class="plot" role="img" aria-label="(\w+)"(.*?)</figure>',
                           page, re.S))


def test_a_trained_run_renders_to_one_page_with_every_section_and_data_in_every_plot(run: RunLayout) -> None:
    path = write_report(run.root)
    assert path == run.root / "report.html"
    page = path.read_text()
    for section in ("quality", "experts", "anomalies", "snapshots", "configuration"):
        assert f'<section id="{section}">' in page
    figures = _figures(page)
    assert set(figures) >= PLOTS
    for name, svg in figures.items():
        assert re.search(rf'id="{name}-data-\d+"', svg), f"{name} has no data"
    assert "<image" in figures["utilisation"]  # the heatmap, as a PNG data URI inside its SVG
    assert "underfitting" in page and "task follow" in page and "expert underfitting" in page  # timeline, alerts
    assert "v4" in page and "ple" in page and "off for this run" in page  # snapshots (steps 3..12), family, no W&B
    assert not EXTERNAL.search(page) and "<script" not in page  # opens offline: nothing to fetch


def test_the_command_writes_the_report_of_a_run_given_by_path_or_name_and_prints_where(run: RunLayout,
                                                                                       tmp_path: Path) -> None:
    runner = CliRunner()
    by_path = runner.invoke(app, ["report", str(run.root), "--output", str(tmp_path / "out" / "r.html")])
    assert by_path.exit_code == 0, by_path.output
    assert str(tmp_path / "out" / "r.html") in by_path.output.replace("\n", "")
    assert (tmp_path / "out" / "r.html").read_text().startswith("<!DOCTYPE html>")
    data_root = run.root.parent.parent
    by_name = runner.invoke(app, ["report", "r1"], env={"MOESTREAM_PATHS__DATA_ROOT": str(data_root)})
    assert by_name.exit_code == 0, by_name.output
    assert (run.root / "report.html").exists()


def test_a_missing_run_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no run directory at" in missing.output
    assert "Traceback" not in missing.output and not isinstance(missing.exception, ReportError)
    empty = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert empty.exit_code == 1 and "holds no run files" in empty.output
    (tmp_path / "health").mkdir()
    (tmp_path / "health" / "experts.json").write_text('{"step": 3}')
    (tmp_path / "a-file").write_text("")
    unwritable = CliRunner().invoke(app, ["report", str(tmp_path), "--output", str(tmp_path / "a-file" / "r.html")])
    assert unwritable.exit_code == 1 and "cannot write the report" in unwritable.output
    page = write_report(tmp_path).read_text()
    assert "is not an expert-health report" in page


def test_a_run_without_history_still_reports_its_snapshots_and_health(run: RunLayout, tmp_path: Path) -> None:
    old = RunLayout(tmp_path / "old")
    shutil.copytree(run.snapshots, old.snapshots)  # a run from before the history: manifests only
    page = write_report(old.root).read_text()
    assert "No run history" in page and "No expert-health report yet" in page
    assert "Kept versions" in page and "Latest figures from the manifest" in page
    assert "No anomalies" in page


def test_a_young_run_with_no_snapshot_and_no_anomaly_says_so(tmp_path: Path) -> None:
    young = RunLayout(tmp_path / "young")
    sink = HistorySink(young.history, {"learner": {"family": "mmoe"}})
    for step in range(1, 21):
        sink.log({"loss/total": 1.0 / step, "loss/click": 0.5 / step}, step)
        if step % 10 == 0:
            sink.log({"progressive/click/auc": 0.5 + step / 100, "health/load_balance": 1.2,
                      "health/share/click/e0": 0.7, "health/share/click/e1": 0.3,
                      "health/anomalies/collapse": 0.0}, step)
            sink.summarise({"health/anomalies": []})
    sink.finish()
    page = write_report(young.root).read_text()
    assert "No snapshot in this run yet" in page and "No anomalies in 2 health reports" in page
    assert set(_figures(page)) == {"auc", "loss", "utilisation", "drift"}


@pytest.mark.integration
def test_chromium_shows_the_report_offline_with_no_console_error_and_data_in_every_plot(run: RunLayout) -> None:
    from tests.infra import browser

    path = write_report(run.root)
    marks = ("Array.from(document.querySelectorAll('figure.plot svg')).map(svg => [svg.getAttribute('aria-label'), "
             "svg.querySelectorAll('[id*=\"-data-\"] path, [id*=\"-data-\"] use, image[id*=\"-data-\"]').length, "
             "svg.getBoundingClientRect().width])")
    page = browser.load(path.as_uri(), {"marks": marks, "title": "document.title"})

    assert page.errors == []
    assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests
    assert page.values["title"] == "moestream run r1"
    shown = {name: (marks, width) for name, marks, width in page.values["marks"]}
    assert set(shown) >= PLOTS
    assert all(marks > 0 and width > 100 for marks, width in shown.values()), shown

    from PIL import Image
    import io

    pixels = np.asarray(Image.open(io.BytesIO(page.screenshot)).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 1000 and pixels.std() > 10  # text, tables and plots, not one colour
    assert (pixels < 128).mean() > 0.01


def test_the_demo_summary_shows_each_tasks_top_experts_drift_and_anomalies(run: RunLayout,
                                                                           capsys: pytest.CaptureFixture) -> None:
    from infra.cli import _print_health

    report = orjson.loads((run.root / "health" / "experts.json").read_bytes())
    _print_health(report)
    shown = capsys.readouterr().out
    assert f"expert health at step {report['step']}" in shown and "ple" in shown
    share = report["routing_share"][report["tasks"].index("click")]
    top = report["experts"][int(np.argmax(share))]
    assert f"{top} {max(share):.0%}" in shown
    assert "anomalies: underfitting" in shown and "(task follow" in shown
