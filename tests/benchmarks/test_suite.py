"""``bench all``'s wiring: running benchmarks in turn, recording failures, writing and printing the results.

The benchmarks are replaced by tiny fakes here (each still draws its own progress bar, as the real ones do):
this tests the aggregation, not any figure; ``moestream bench all --quick`` is the benchmark run.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from rich.progress import Progress
from typer.testing import CliRunner

import benchmarks
from benchmarks import suite
from benchmarks.harness import Report, Row


def fake(name: str, quick: bool, failing: tuple[str, ...] = ("learner",)) -> Report:
    if name in failing:
        raise RuntimeError("the broker went away")
    report = Report(name)
    with Progress(transient=True) as progress:  # nested under run_all's own display
        task = progress.add_task(name, total=2)
        report.add(Row(f"{name} rate", 300.0 if quick else 900.0, "events/s", anchor="raw", anchor_value=100.0,
                       goal=">= 200 events/s", met=True))
        progress.advance(task, 2)
    report.add(Row(f"{name} size", 7.0, "MB"))
    report.notes.append(f"{name} note")
    return report


@pytest.fixture
def no_broker(monkeypatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # run_all starts no broker for the fakes


def test_every_benchmark_runs_and_a_failure_is_recorded_not_raised(no_broker) -> None:
    result = suite.run_all(quick=True, runner=fake)  # on rich's global console, as the fakes' own bars
    assert [o.name for o in result.outcomes] == list(suite.ALL)
    assert [o.name for o in result.failed] == ["learner"]
    assert result.failed[0].error == "RuntimeError: the broker went away"
    assert all(o.seconds >= 0 for o in result.outcomes)
    ok = [o for o in result.outcomes if o.ok]
    assert [r.ratio for o in ok for r in o.report.rows] == [3.0, None] * len(ok)


def test_results_are_written_as_json_and_markdown(no_broker, tmp_path: Path) -> None:
    result = suite.run_all(quick=True, names=("stream", "learner"), runner=fake)
    json_path, md_path = result.write(tmp_path)
    assert json_path.name == f"{result.started_at[:10]}-{result.stem[11:]}.json" and md_path.suffix == ".md"
    assert result.stem.endswith(f"-{result.machine['cpus']}cpu")
    body = orjson.loads(json_path.read_bytes())
    assert body["quick"] is True and body["machine"]["cpus"] == result.machine["cpus"]
    stream, learner = body["benchmarks"]
    assert stream["ok"] and stream["report"]["benchmark"] == "stream"
    assert stream["report"]["rows"][0] == {"name": "stream rate", "value": 300.0, "unit": "events/s", "anchor": "raw",
                                           "anchor_value": 100.0, "goal": ">= 200 events/s", "met": True, "ratio": 3.0}
    assert not learner["ok"] and learner["report"] is None and "broker went away" in learner["error"]
    text = md_path.read_text()
    assert "| stream | stream rate | 300 events/s | raw | 100 | 3.00x | >= 200 events/s | yes |" in text
    assert "| stream | stream size | 7 MB | - | - | - | - | - |" in text
    assert "| learner | **failed** after" in text and "RuntimeError: the broker went away" in text
    assert "(--quick)" in text and result.machine["hostname"] in text
    assert body["source"]["commit"] and f"commit {body['source']['commit'][:10]}" in text  # the tests run in the repo


def test_the_command_prints_the_table_writes_the_files_and_exits_1_on_a_failure(
    no_broker, tmp_path: Path, monkeypatch
) -> None:
    from infra import cli

    monkeypatch.setattr(benchmarks, "run", lambda name, quick=False: fake(name, quick))
    monkeypatch.setattr(suite, "RESULTS", tmp_path / "results")
    outcome = CliRunner().invoke(cli.app, ["bench", "all", "--quick", "--json", str(tmp_path / "all.json")])
    assert outcome.exit_code == 1, outcome.output
    written = sorted(p.suffix for p in (tmp_path / "results").iterdir())
    assert written == [".json", ".md"]
    assert orjson.loads((tmp_path / "all.json").read_bytes())["benchmarks"][0]["benchmark"] == "models"
    n = len(suite.ALL)
    assert f"{n - 1} of {n} benchmarks ran" in outcome.output and "failed: learner" in outcome.output
    assert "freshness rate" in outcome.output and "3.00x" in outcome.output

    monkeypatch.setattr(benchmarks, "run", lambda name, quick=False: fake(name, quick, failing=()))
    outcome = CliRunner().invoke(cli.app, ["bench", "all"])
    assert outcome.exit_code == 0, outcome.output
    n = len(suite.ALL + suite.FULL_ONLY)  # full mode runs the full-only benchmarks too
    assert f"{n} of {n} benchmarks ran" in outcome.output and "900 events/s" in outcome.output


def test_fresh_reaches_bench_quality_and_is_refused_elsewhere(monkeypatch) -> None:
    from infra import cli

    calls: list[tuple[str, bool, bool]] = []

    def record(name: str, quick: bool = False, fresh: bool = False) -> Report:
        calls.append((name, quick, fresh))
        return Report(name)

    monkeypatch.setattr(benchmarks, "run", record)
    outcome = CliRunner().invoke(cli.app, ["bench", "quality", "--quick", "--fresh"])
    assert outcome.exit_code == 0, outcome.output
    assert calls == [("quality", True, True)]
    outcome = CliRunner().invoke(cli.app, ["bench", "all", "--fresh"])
    assert outcome.exit_code == 2 and "--fresh applies to bench quality only" in outcome.output
