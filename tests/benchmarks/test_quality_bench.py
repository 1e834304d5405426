"""``bench quality``'s parts: the stream and its oracle, the floor, the score tap and its older versions, the
report. Tiny sizes and fixed seeds; no figure is asserted beyond what a fixed seed makes certain
(``moestream bench quality`` is the measurement)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

import benchmarks
from benchmarks import suite
from benchmarks.harness import Report, Row
from benchmarks.quality import QualityPlan, run
from benchmarks.quality_floor import FloorConfig, progressive_scores, tune
from benchmarks.quality_stream import QualityStream, simulate
from benchmarks.quality_structural import StructuralConfig, structural_scores
from benchmarks.quality_train import LaggedVersions, Version, train_family
from learner.metrics import binary_auc
from stream.events import TASKS
from stream.logfile import LOG_SCHEMA


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> QualityStream:
    return simulate(7, 400, tmp_path_factory.mktemp("quality"))


def test_the_stream_is_the_trainers_examples_with_the_oracle_beside_them_never_in_the_log(stream) -> None:
    assert len(stream) == 4 * 400  # every impression joined, once
    assert (np.diff(stream.ts_ms) >= 0).all()
    assert ((stream.oracle > 0) & (stream.oracle < 1)).all() and set(np.unique(stream.labels)) <= {0.0, 1.0}
    assert pq.read_schema(stream.log).names == LOG_SCHEMA.names  # the log holds events only: no oracle column
    assert (stream.positions(stream.request_ids[::-1], stream.items[::-1]) == np.arange(len(stream))[::-1]).all()
    assert stream.positions(np.array(["no such request"], object), np.array([1]))[0] == -1


def _bilinear(seed: int, n: int = 20_480) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(4 u·v) over 50 users and 80 items."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(0, 0.5, (50, 3)), rng.normal(0, 0.5, (80, 3))
    users, items = rng.integers(0, 50, n), rng.integers(0, 80, n)
    p = 1 / (1 + np.exp(-4 * np.einsum("nd,nd->n", u[users], v[items])))
    return users, items, (rng.random(n) < p).astype(np.float32)[:, None]


def test_the_floor_learns_a_bilinear_problem_and_scores_before_it_learns() -> None:
    users, items, labels = _bilinear(0)
    scores = progressive_scores(users, items, labels, 256, FloorConfig(lr=0.1, dim=4), base_rates=np.array([0.5]))
    assert np.allclose(scores[:256], 0.0, atol=0.05)  # the first batch sees the initial model: the prior
    half = len(labels) // 2
    assert binary_auc(scores[half:, 0], labels[half:, 0]) > 0.7  # the true affinity's AUC here is about 0.85
    flipped = labels.copy()
    flipped[-256:] = 1 - flipped[-256:]
    again = progressive_scores(users, items, flipped, 256, FloorConfig(lr=0.1, dim=4), base_rates=np.array([0.5]))
    assert np.array_equal(again, scores)  # the last batch (of 256) is scored before its labels are seen


def test_the_structural_learner_learns_its_form_and_scores_before_it_learns() -> None:
    users, items, labels = _bilinear(0)
    two = np.concatenate([labels, labels], axis=1)  # two tasks, one affinity: shared rows, a bilinear form each
    ts_ms = np.arange(len(labels), dtype=np.int64) * 10
    config = StructuralConfig(dim=3)
    scores = structural_scores(users, items, ts_ms, two, 256, np.array([0.5, 0.5]), config)
    assert np.allclose(scores[:256], 0.0, atol=0.15)  # the first batch sees the initial model: the prior (+ p·q)
    half = len(labels) // 2
    assert binary_auc(scores[half:, 0], labels[half:, 0]) > 0.75  # the true affinity's AUC here is about 0.85
    flipped = two.copy()
    flipped[-256:] = 1 - flipped[-256:]
    again = structural_scores(users, items, ts_ms, flipped, 256, np.array([0.5, 0.5]), config)
    assert np.array_equal(again, scores)  # the last batch is scored before its labels are seen


def test_tuning_picks_each_tasks_best_grid_point() -> None:
    users, items, labels = _bilinear(1, 4_096)
    grid = ((0.001, 4, 0.0), (0.1, 4, 0.0))
    tuning = tune(users, items, np.concatenate([labels, 1 - labels], axis=1), 256, grid=grid)
    assert [c.lr for c in tuning.chosen] == [0.1, 0.1]
    assert set(tuning.auc) == set(grid)


def test_lagged_versions_serve_the_newest_one_old_enough() -> None:
    taken: list[int] = []
    versions = LaggedVersions((1_000, 10_000))

    def take(stamp: int):
        return lambda: taken.append(stamp) or Version(stamp, None)

    for stamp in range(0, 30_001, 500):
        versions.keep(stamp, take(stamp))
    assert taken == list(range(0, 30_001, 500))  # the 1 s grid (100 ms) is finer than the steps: every step
    assert versions.version(10_000, 9_999) is None  # no version is that old yet
    assert versions.version(1_000, 30_000).stamp_ms == 29_000
    assert versions.version(10_000, 30_200).stamp_ms == 20_000
    coarse = LaggedVersions((10_000,))
    taken.clear()
    for stamp in range(0, 5_001, 250):
        coarse.keep(stamp, take(stamp))
    assert taken == list(range(0, 5_001, 1_000))  # one version per lag / 10 of event time


def test_a_run_scores_every_example_once_and_older_versions_change_nothing(stream, tmp_path: Path) -> None:
    plain = train_family(stream, "mmoe", 0, tmp_path / "plain")
    assert np.isfinite(plain.scores).all() and plain.stats["examples_trained"] == len(stream)
    studied = train_family(stream, "mmoe", 0, tmp_path / "studied", freeze_at=len(stream) // 4,
                           lags_ms=(1_000, 10_000))
    assert np.array_equal(studied.scores, plain.scores)  # taking and scoring versions leaves training alone
    assert len(stream) // 4 <= studied.freeze_at < len(stream)
    assert np.isnan(studied.frozen[: studied.freeze_at]).all() and np.isfinite(studied.frozen[studied.freeze_at:]).all()
    known = ~np.isnan(studied.lagged[1_000][:, 0])
    assert known.any() and (studied.ages_ms[1_000][known] >= 1_000).all()
    assert np.isnan(studied.lagged[10_000]).all()  # the stream is 4 s of event time: no version is 10 s old


def test_the_report_has_every_row_and_writes_curves_json_and_tables(tmp_path: Path) -> None:
    plan = QualityPlan(300, seeds=(0,), families=("mmoe", "home"), staleness_s=(1, 600), windows=4)
    report = run(quick=True, out_dir=tmp_path, plan=plan)
    names = [r.name for r in report.rows]
    for t in TASKS:
        for family in plan.families:
            assert any(n.startswith(f"{t} AUC: {family} (seed 0)") for n in names)
            assert any(n.startswith(f"{t} GAUC: {family}") for n in names)
        assert any(n.startswith(f"{t} AUC: oracle") for n in names)
        assert any(n.startswith(f"{t} AUC: floor") for n in names)
        assert any(n.startswith(f"{t} AUC served 1 s stale: mmoe") for n in names)
    assert not any("10 min stale" in n for n in names)  # the stream is 3 s of event time: nothing that old
    goals = [r for r in report.rows if r.goal is not None]
    assert len(goals) == len(TASKS) * 2 + 2 * 2 and all(isinstance(r.met, bool) for r in goals)
    for t in TASKS:
        png = tmp_path / f"curve-{t}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "frozen.png").exists() and (tmp_path / "staleness.png").exists()
    body = orjson.loads((tmp_path / "figures.json").read_bytes())
    assert [s["seed"] for s in body["seeds"]] == [0] and set(body["seeds"][0]["figures"]) == {"mmoe", "home", "oracle",
                                                                                              "floor"}
    assert "| oracle (true probabilities) |" in (tmp_path / "tables.md").read_text()
    assert isinstance(orjson.loads(report.to_json())["rows"][0]["value"], float)


def test_registered_and_in_the_full_suite_only(monkeypatch) -> None:
    assert benchmarks.BENCHMARKS["quality"] == "benchmarks.quality"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # run_all starts no broker for the fakes

    def fake(name: str, quick: bool) -> Report:
        report = Report(name)
        report.add(Row(name, 1.0, "x"))
        return report

    assert [o.name for o in suite.run_all(quick=False, runner=fake).outcomes] == [*suite.ALL, "quality"]
    assert "quality" not in [o.name for o in suite.run_all(quick=True, runner=fake).outcomes]
