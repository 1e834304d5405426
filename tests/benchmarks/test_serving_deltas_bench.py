"""``bench serving`` while deltas arrive, at a tiny size: the staged deltas form a valid chain on the base that a
replica's follower applies one by one, and the whole scenario (real Ray Serve, real HTTP, the publisher process)
reports its rows with sane values. No timed assertion: the figures are the benchmark's."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.harness import Report
from benchmarks.delta_chain import prepare_chain, publish_one
from benchmarks.serving import prepare
from benchmarks.serving_deltas import Plan, add_rows, delta_bytes, measure
from learner.snapshots import SnapshotStore
from serving.weights import WeightFollower

IDS = 2_000
STEPS = 2
"""Steps per delta (the benchmark takes the learner's default cadence, 20)."""


def test_staged_deltas_chain_onto_the_base_and_a_follower_applies_each_in_place(tmp_path: Path) -> None:
    chain = prepare_chain(tmp_path, IDS, n_deltas=3, steps_per_delta=STEPS)
    store = SnapshotStore(chain.store)
    base = store.latest_manifest()
    assert base.kind == "base" and base.bytes == chain.base_bytes
    assert base.data["learner_config"]["tables"]["user_id"] == {"capacity": IDS // 2, "dim": 32}
    follower = WeightFollower(chain.store, poll_s=3600.0)  # refreshed by hand below
    try:
        assert follower.current.version == base.version
        for path in chain.staged:
            manifest = publish_one(store, path)
            follower.refresh()
            assert follower.current.version == manifest.version
        assert follower.deltas_applied == 3 and follower.rebuilds == 0 and not follower.rejected
    finally:
        follower.close()
    sizes = delta_bytes(chain.store)
    assert len(sizes) == 3 and all(0 < size < chain.base_bytes for size in sizes)


@pytest.mark.integration
def test_the_scenario_reports_latency_with_and_without_deltas_apply_times_and_sizes(ray_session, tmp_path: Path
                                                                                    ) -> None:
    plan = Plan(IDS, rounds=1, seconds=1.0, warmup_s=0.25, interval_s=0.2, replicas=1, steps_per_delta=STEPS)
    features, _ = prepare(tmp_path, n_events=2_000)
    chain = prepare_chain(tmp_path / "deltas", plan.ids, plan.deltas, plan.steps_per_delta)
    outcome = measure({}, features, chain, plan)
    report = Report("serving")
    add_rows(report, "serve proxy", plan, chain, outcome)
    rows = {r.name.removeprefix("serve proxy: while deltas arrive (2,000 IDs, emb 32): "): r for r in report.rows}
    cell = "100 candidates, concurrency 8"
    p50, p99 = rows[f"{cell}: p50"], rows[f"{cell}: p99"]
    unpublished = rows[f"{cell}: p99 against no publisher"]
    assert 0 < p50.value <= p99.value and 0 < p50.anchor_value <= unpublished.anchor_value
    assert rows[f"{cell}: throughput"].value > 0
    alone = rows[f"{cell}: p99, the publisher alone (its store followed by no replica)"]
    assert alone.value > 0 and alone.anchor_value == unpublished.anchor_value and unpublished.value == p99.value
    assert p99.goal.startswith("unchanged") and p99.anchor_value == alone.value, "read against the publisher alone"
    assert p99.met == (p99.value <= alone.value + max(0.1 * alone.value, 2.0))
    assert len(outcome.publisher_only) == plan.rounds
    assert not (chain.store.parent / f"{chain.store.name}-unfollowed").exists(), "the unfollowed copy is removed"
    published = rows["deltas applied per replica"].anchor_value
    assert 1 <= rows["deltas applied per replica"].value <= published <= plan.deltas
    for what in ("apply time on a replica (lock held)", "prepare time on a replica (checks, map merges; no lock)"):
        assert 0 < rows[f"{what}: p50"].value <= rows[f"{what}: p99"].value
    assert 0 < rows["bytes per delta (median)"].value < rows["base"].value
    assert 0 < rows["delta / base (median)"].value < 100
    assert rows["publisher CPU per delta"].value > 0
    assert not any("failed requests" in note for note in report.notes)


@pytest.mark.parametrize(("argv", "message"), [
    (["--switch-interval-ms", "0"], "serving.switch_interval_ms must be >= 0.01"),
    (["--follower-nice", "25"], "serving.follower_nice must be <= 19"),
    (["--follower-nice-scope", "some"], "serving.follower_nice_scope must be one of ['bulk', 'all'], got 'some'"),
])
def test_bad_serving_settings_are_refused_with_the_config_s_message(argv: list[str], message: str,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from benchmarks.serving_deltas import main

    with pytest.raises(SystemExit) as info:
        main(argv)  # refused before minutes of preparation
    assert info.value.code == 2 and message in capsys.readouterr().err
