"""The run history sink: what it writes, when it reaches the file, and how it reads back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from learner.history import HistorySink, read_history
from learner.telemetry import Telemetry, TelemetryConfig


def _lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_losses_are_averaged_other_records_alerts_and_changed_summaries_written_as_they_come(tmp_path: Path) -> None:
    path = tmp_path / "telemetry" / "history.jsonl"
    sink = HistorySink(path, {"learner": {"family": "home"}}, loss_every_steps=4, flush_every_s=3600)
    for step in range(1, 9):
        sink.log({"loss/total": float(step), "loss/click": 2.0 * step}, step)
    sink.log({"progressive/click/auc": 0.61, "snapshot/version": np.float32(3)}, 8)
    sink.alert("expert underfitting", "step 8: task follow: ...", "WARN")
    sink.summarise({"health/anomalies": ["underfitting: task follow: x"]})
    sink.summarise({"health/anomalies": ["underfitting: task follow: x"]})  # unchanged: not written again
    sink.summarise({"health/anomalies": []})
    assert len(_lines(path)) == 1  # only the start line is flushed before the cadence or finish
    sink.log({"loss/total": 9.0}, 9)  # a partial window, written at finish
    sink.finish()

    lines = _lines(path)
    assert lines[0]["start"] == {"config": {"learner": {"family": "home"}}} and "t" in lines[0]
    losses = [(line["step"], line["metrics"]) for line in lines if "loss/total" in line.get("metrics", {})]
    assert losses == [(4, {"loss/total": 2.5, "loss/click": 5.0}), (8, {"loss/total": 6.5, "loss/click": 13.0}),
                      (9, {"loss/total": 9.0})]
    assert {"step": 8, "metrics": {"progressive/click/auc": 0.61, "snapshot/version": 3.0}}.items() <= lines[3].items()
    alerts = [line for line in lines if "alert" in line]
    assert alerts[0]["step"] == 8 and alerts[0]["alert"]["title"] == "expert underfitting"
    assert [line["summary"] for line in lines if "summary" in line] == [
        {"health/anomalies": ["underfitting: task follow: x"]}, {"health/anomalies": []}]

    history = read_history(path)
    assert history.series["loss/total"].steps == [4, 8, 9] and history.series["progressive/click/auc"].last == 0.61
    assert len(history.starts) == 1 and len(history.alerts) == 1 and len(history.summaries) == 2
    assert history.last_step == 9 and history.first_t <= history.last_t


def test_lines_reach_the_file_at_the_flush_cadence(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    sink = HistorySink(path, {}, flush_every_s=0.0)
    sink.log({"kafka/lag": 3.0}, 1)
    assert _lines(path)[-1]["metrics"] == {"kafka/lag": 3.0}  # no finish needed


def test_a_resumed_trainer_repeats_steps_and_the_latest_pass_wins(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    first = HistorySink(path, {})
    for step in (10, 20, 30):
        first.log({"progressive/click/auc": step / 100}, step)
    first.finish()
    with open(path, "ab") as f:
        f.write(b'{"t": 1, "step": 40, "metr')  # killed mid-write
    resumed = HistorySink(path, {})  # restarted from the checkpoint of step 20
    for step in (25, 35):
        resumed.log({"progressive/click/auc": step / 1000}, step)
    resumed.finish()

    history = read_history(path)
    assert history.series["progressive/click/auc"].steps == [10, 20, 25, 35]
    assert history.series["progressive/click/auc"].values == [0.1, 0.2, 0.025, 0.035]
    assert len(history.starts) == 2 and history.unreadable == 1


def test_a_history_that_cannot_be_written_costs_the_history_not_the_run(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "taken"
    path.mkdir()  # a directory where the file should be
    sink = HistorySink(path, {}, flush_every_s=0.0)
    sink.log({"loss/total": 1.0}, 1)
    sink.finish()
    assert "cannot write the run history" in capsys.readouterr().out


def test_telemetry_writes_the_history_whatever_the_wandb_mode(tmp_path: Path) -> None:
    config = TelemetryConfig(mode="disabled", directory=tmp_path / "wandb", history=tmp_path / "history.jsonl")
    telemetry = Telemetry(config, run_config={"x": 1})
    assert telemetry.run is None
    telemetry.log({"health/load_balance": 1.5}, step=2)
    telemetry.finish()
    assert read_history(tmp_path / "history.jsonl").series["health/load_balance"].last == 1.5
    Telemetry(TelemetryConfig(mode="disabled", directory=tmp_path / "wandb"), run_config={}).finish()
    assert [p.name for p in tmp_path.iterdir()] == ["history.jsonl"]  # no history configured: none written
