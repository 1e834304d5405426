"""The ranker beside a zero-cost scorer: both deployed, both answer, the rows split each request's CPU."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.harness import Report
from benchmarks.serving_floor import FLOOR, add_rows, floor_score, main, measure
from serving.config import ServingConfig
from serving.ranker import NoModelYet, RankingService, RankQuery


@pytest.mark.integration
def test_the_floor_and_the_ranker_answer_every_request_and_the_rows_anchor_the_ranker_on_the_floor(
        ray_session, tmp_path: Path) -> None:
    cells = measure(tmp_path, rounds=2, seconds=0.5, warmup_s=0.1, n_events=2_000, cells=((20, 2, False), (20, 2, True)))
    for sides in cells.values():
        assert set(sides) == {"ranker", "floor"}
        for side in sides.values():
            assert len(side.samples) == 2 and all(s.errors == 0 and len(s.latencies_s) > 0 for s in side.samples)
            assert side.requests == sum(len(s.latencies_s) for s in side.samples)
            assert side.cpu_s["client (this process)"] > 0
    report = Report("serving floor")
    add_rows(report, cells)
    rows = {r.name: r for r in report.rows}
    p99 = rows["20 candidates, concurrency 2: p99"]
    assert p99.anchor == FLOOR and p99.value > 0 and p99.anchor_value > 0
    assert rows["20 candidates, concurrency 2, compact: throughput"].anchor_value > 0
    for app in ("ranker", "floor"):  # each app's own replicas did its work
        assert rows[f"20 candidates, concurrency 2, {app}: CPU per request, its replicas"].value > 0
        assert rows[f"20 candidates, concurrency 2, {app}: CPU per request, all"].value > 0
    assert not report.notes


class _Service(RankingService):
    """A ranking service's bookkeeping without its store and follower: what the floor reads of one."""

    def __init__(self, current) -> None:  # noqa: D107 - no store, no follower
        self.config = ServingConfig(task_weights={"click": 1.0, "like": 0.5})
        self.weights = SimpleNamespace(current=current, rejected=set())
        self.observed: list[tuple] = []
        self.metrics = SimpleNamespace(observe_batch=lambda *counts: self.observed.append(counts))
        self.batches, self._batch_seq = 0, itertools.count(1)


def test_the_floor_answers_every_candidate_once_in_the_order_asked_with_the_served_version() -> None:
    service = _Service(SimpleNamespace(version=7, family="mmoe", model=SimpleNamespace(tasks=("click", "like"))))
    queries = [RankQuery(1, np.array([5, 3, 9])), RankQuery(2, np.arange(5000, dtype=np.int64))]
    first, second = floor_score(service, queries)
    np.testing.assert_array_equal(first.items, [5, 3, 9])
    np.testing.assert_array_equal(second.items, np.arange(5000))
    assert second.probabilities.shape == (5000, 2) and second.scores.shape == (5000,)
    assert first.scores.dtype == first.probabilities.dtype == np.float32  # as the ranker's: the same encoding
    assert first.version == 7 and first.batch == second.batch == service.batches == 1
    assert first.tasks == ("click", "like") and service.observed == [(2, 5003, 0)]
    np.testing.assert_allclose(first.scores, first.probabilities @ np.array([1.0, 0.5], dtype=np.float32), rtol=1e-6)
    assert floor_score(service, queries[:1])[0].batch == 2


def test_the_floor_answers_no_model_yet_as_the_ranker_does() -> None:
    with pytest.raises(NoModelYet, match="no model published yet"):
        floor_score(_Service(None), [RankQuery(1, np.array([5]))])


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--seconds", "0"], ["--seconds", "nan"]])
def test_rounds_and_seconds_that_measure_nothing_are_refused_with_a_message(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "--rounds" in capsys.readouterr().err
