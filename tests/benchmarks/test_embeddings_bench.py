"""``bench embeddings`` at tiny sizes: both paths train, the maps hold every ID before timing, the rows carry
the figures they claim, the quality rows score each batch before learning from it. No timed assertions (speed
is the benchmark's job) and none on AUC values (a tiny stream's AUC is noise)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from benchmarks import BENCHMARKS
from benchmarks.embedding_paths import HashedAdamPath, RowwisePath
from benchmarks.embeddings import EMB_DIM, ROW_BYTES, Plan, Traffic, bench
from benchmarks.embeddings_quality import (
    GOAL_AUC_DROP,
    NEW,
    REFERENCE,
    START_MS,
    QualityPlan,
    QualityResult,
    add_quality_rows,
    build_path,
    measure_quality,
    simulated_examples,
)
from benchmarks.harness import Report
from benchmarks.suite import ALL
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.models.encoder import hash_ids
from stream.events import FEEDBACK, IMPRESSION, TASKS
from stream.simulator import Simulator, SimulatorConfig

TINY = Plan((50, 100, 200), batch=32, warmup=1, steps=2, dense_steps=2, map_calls=3)
TINY_QUALITY = QualityPlan(n_requests=1_500, seeds=(0, 1), batch=256)
"""6,000 impressions per seed: every task has positives in both seeds' streams (the simulator is seeded)."""
N_DENSE = len(FEATURE_COLUMNS)


def test_registered_and_in_bench_all() -> None:
    assert BENCHMARKS["embeddings"] == "benchmarks.embeddings"
    assert "embeddings" in ALL


def test_traffic_draws_from_the_universe_plus_new_ids() -> None:
    traffic = Traffic(100, batch=200, seed=1)
    ids = traffic.ids()
    for f in ID_FIELDS:
        known = np.isin(ids[f], traffic.universe[f])
        assert ids[f].shape == (200,) and known.sum() == 200 - traffic.n_new
        assert not known[-traffic.n_new:].any()


def test_rowwise_step_admits_new_ids_and_moves_only_the_touched_rows() -> None:
    traffic = Traffic(100, batch=32)
    path = RowwisePath(100 + 2 * traffic.n_new, EMB_DIM, N_DENSE)
    path.fill(traffic.universe)
    assert path.live_ids() == 2 * 100
    before = {f: t.weight.clone() for f, t in path.tables.items()}
    net_before = [p.detach().clone() for p in path.net.parameters()]
    batch = traffic.batches(1)[0]
    path.step(batch, now_ms=1)
    assert path.live_ids() == 2 * (100 + traffic.n_new)
    for f, table in path.tables.items():
        moved = torch.nonzero((table.weight != before[f]).any(dim=1)).flatten()
        touched = np.unique(path.maps[f].rows(batch[0][f], 2, train=False).rows)
        assert set(moved.tolist()) == set(touched.tolist())
    assert any(not torch.equal(a, p) for a, p in zip(net_before, path.net.parameters()))


def test_memory_per_live_id_counts_rows_state_and_maps() -> None:
    traffic = Traffic(64, batch=16)
    path = RowwisePath(64, EMB_DIM, N_DENSE)
    path.fill(traffic.universe)
    tables = sum((64 + 1) * (EMB_DIM + 1) * 4 for _ in ID_FIELDS)
    maps = sum(m.nbytes for m in path.maps.values())
    assert path.bytes_per_live_id() == pytest.approx((tables + maps) / (2 * 64))


def test_hashed_reference_keeps_moving_rows_the_batch_did_not_touch() -> None:
    traffic = Traffic(50, batch=16)
    path = HashedAdamPath(50, EMB_DIM, N_DENSE)
    first, second = traffic.batches(2)

    def rows(batch) -> set[int]:
        raw = torch.stack([torch.from_numpy(batch[0][f]) for f in ID_FIELDS], dim=-1)
        return set(hash_ids(raw, path.salts, 50).flatten().tolist())

    path.step(first, 1)
    before = path.embedding.weight.detach().clone()
    path.step(second, 2)
    moved = set(torch.nonzero((path.embedding.weight.detach() != before).any(dim=1)).flatten().tolist())
    assert rows(first) - rows(second) and rows(first) - rows(second) <= moved  # Adam's momentum, every step
    assert not moved - rows(first) - rows(second)


def test_rows_name_their_anchors_and_goals() -> None:
    report = bench(TINY)
    names = [r.name for r in report.rows]
    assert len(names) == 3 + 3 + 2
    steps, hashed, (idmap, memory) = report.rows[:3], report.rows[3:6], report.rows[6:]
    assert steps[0].anchor is None and steps[2].anchor == "the same step at 50"
    assert steps[2].ratio == pytest.approx(steps[2].value / steps[0].value)
    assert steps[2].met == (steps[2].value <= 1.2 * steps[0].value) and steps[1].met is None
    assert [h.anchor_value for h in hashed] == [s.value for s in steps]
    assert idmap.unit == "IDs/s" and idmap.value > 0 and idmap.met == (idmap.value >= 2e6)
    assert memory.anchor_value == ROW_BYTES and memory.met == (memory.value <= 2.5 * ROW_BYTES)


def test_a_hashed_step_over_the_cap_is_a_note_not_a_row() -> None:
    report = bench(Plan((50, 100), batch=16, warmup=2, steps=1, dense_steps=1, map_calls=1, dense_cap_s=0.0))
    assert [r.name for r in report.rows if "hashed" in r.name] == []
    assert sum("not run" in note for note in report.notes) == 2


def test_simulated_examples_are_the_impressions_in_time_order_with_their_feedback() -> None:
    examples = simulated_examples(3, 200)
    events = list(Simulator(SimulatorConfig(seed=3)).events(START_MS, 200))
    impressions = [e for e in events if e["type"] == IMPRESSION]
    feedback = [e for e in events if e["type"] == FEEDBACK]
    assert len(examples) == len(impressions) == 4 * 200
    assert [int(u) for u in examples.ids["user_id"]] == [e["user_id"] for e in impressions]
    assert np.all(np.diff(examples.ts_ms) >= 0)
    positives = [sum(t in e["labels"] for e in feedback) for t in TASKS]
    assert examples.labels.sum(axis=0).tolist() == positives and positives[0] > 0


def forward_only(path: RowwisePath | HashedAdamPath, batch) -> dict[str, torch.Tensor]:
    """The path's logits for ``batch`` without a training step."""
    ids, dense, _ = batch
    with torch.no_grad():
        if isinstance(path, RowwisePath):
            emb = torch.cat([path.embed(f, ids[f], 1) for f in ID_FIELDS], dim=1)
        else:
            raw = torch.stack([torch.from_numpy(ids[f]) for f in ID_FIELDS], dim=-1)
            emb = path.embedding(hash_ids(raw, path.salts, path.n_rows)).flatten(1)
        return path.net(torch.cat([emb, dense], dim=1)).logits


@pytest.mark.parametrize("name", [NEW, REFERENCE])
def test_a_step_returns_the_scores_of_the_weights_before_its_update(name: str) -> None:
    batch = simulated_examples(0, 64).batch(slice(0, 256))
    path = build_path(name, seed=0)
    before = copy.deepcopy(path)
    scored = path.step(batch, now_ms=1).logits
    expected, after = forward_only(before, batch), forward_only(path, batch)
    for t in TASKS:
        assert torch.allclose(scored[t], expected[t], atol=1e-6)
    assert any(not torch.allclose(scored[t], after[t]) for t in TASKS)  # the update came after the scores


def test_paths_of_one_seed_start_from_the_same_network() -> None:
    new, reference = build_path(NEW, seed=2), build_path(REFERENCE, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(new.net.parameters(), reference.net.parameters()))
    other = build_path(NEW, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(new.net.parameters(), other.net.parameters()))


def test_quality_gives_a_finite_auc_per_path_task_and_seed() -> None:
    result = measure_quality(TINY_QUALITY)
    assert result.examples == [4 * TINY_QUALITY.n_requests] * len(TINY_QUALITY.seeds)
    for name in (NEW, REFERENCE):
        assert set(result.auc[name]) == set(TASKS)
        for t in TASKS:
            assert len(result.auc[name][t]) == len(TINY_QUALITY.seeds)
            assert all(math.isfinite(a) and 0 <= a <= 1 for a in result.auc[name][t])


def test_quality_rows_carry_means_spreads_and_the_goal() -> None:
    result = QualityResult(examples=[100, 100], positives=[np.ones(len(TASKS))] * 2)
    for i, t in enumerate(TASKS):
        result.auc[NEW][t] = [0.70, 0.71]
        result.auc[REFERENCE][t] = [0.69, 0.715] if i else [0.703, 0.713]  # click: 0.003 worse per seed
    report = Report("embeddings")
    add_quality_rows(report, result, QualityPlan(n_requests=25, seeds=(0, 1)))
    aucs, diffs = report.rows[:len(TASKS)], report.rows[len(TASKS):]
    assert len(diffs) == len(TASKS) and [r.unit for r in report.rows] == ["AUC"] * 2 * len(TASKS)
    for t, auc, diff in zip(TASKS, aucs, diffs):
        assert t in auc.name and "(0.7000..0.7100)" in auc.name and t in diff.name
        assert auc.anchor_value is not None and auc.anchor_value == pytest.approx(np.mean(result.auc[REFERENCE][t]))
        assert auc.value == pytest.approx(0.705) and diff.value == pytest.approx(auc.value - auc.anchor_value)
        assert diff.goal == f">= -{GOAL_AUC_DROP}" and diff.met == (t != "click")
    assert "(per seed -0.0030..-0.0030)" in diffs[0].name and diffs[0].value == pytest.approx(-0.003)


def test_bench_adds_the_quality_rows_after_the_timing_rows() -> None:
    quality = QualityPlan(n_requests=100, seeds=(0,), batch=128)
    report = bench(Plan((50, 100), batch=16, warmup=1, steps=1, dense_steps=1, map_calls=1, quality=quality))
    assert [r.unit for r in report.rows] == ["ms"] * 4 + ["IDs/s", "B"] + ["AUC"] * 2 * len(TASKS)
    assert any(note.startswith("learning quality") for note in report.notes)
