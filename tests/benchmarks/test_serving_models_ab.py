"""The A/B of the model ``bench serving`` served before against the learner's: both deployed, both answer, rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.harness import Report
from benchmarks.serving_models_ab import HASHED, add_rows, main, measure


@pytest.mark.integration
def test_both_models_answer_every_request_and_the_rows_anchor_the_learners_on_the_hashed(ray_session, tmp_path: Path
                                                                                         ) -> None:
    cells = measure(tmp_path, rounds=2, seconds=0.5, warmup_s=0.1, n_events=2_000, cells=((20, 2),))
    samples = cells[(20, 2)]
    assert set(samples) == {"hashed", "learner"}
    for side in samples.values():
        assert len(side) == 2 and all(s.errors == 0 and len(s.latencies_s) > 0 for s in side)
    report = Report("serving models A/B")
    add_rows(report, cells)
    rows = {r.name: r for r in report.rows}
    p99 = rows["20 candidates, concurrency 2, the learner's model: p99"]
    assert p99.anchor == HASHED and p99.value > 0 and p99.anchor_value > 0
    assert rows["20 candidates, concurrency 2, the learner's model: throughput"].value > 0
    assert not report.notes


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--seconds", "0"], ["--seconds", "nan"], ["--rounds", "x"]])
def test_rounds_and_seconds_that_measure_nothing_are_refused_with_a_message(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and ("--rounds" in capsys.readouterr().err)
