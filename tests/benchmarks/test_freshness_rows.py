"""`bench freshness`'s sized rows from one run's figures: goals read at the largest size on the deltas run, the
replica's whole apply (prepare + install) against its goal, and percentiles among never-covered events inf."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.freshness import (GOAL_APPLY_P99_MS, SIZES, Measured, Produced, age_at, freshness, sized_rows, stages,
                                  timeline)
from benchmarks.harness import Report


def _measured(ages: list[float], prepare_ms: float, apply_ms: float) -> Measured:
    published = {"base": {"bytes_p50": 1e9, "seconds_p50": 9.0, "seconds_p99": 9.0},
                 "delta": {"bytes_p50": 2e5, "seconds_p50": 0.02, "seconds_p99": 0.1}}
    weights = {"apply_ms_p50": apply_ms / 2, "apply_ms_p99": apply_ms, "prepare_ms_p50": prepare_ms / 2,
               "prepare_ms_p99": prepare_ms, "deltas_applied": 3}
    return Measured(np.asarray(ages), np.arange(len(ages)) / 10, [(0.5, 3, False), (1.5, 9, True)], 0,
                    {"published_versions": published, "steps": 4, "snapshots": [1, 2, 3, 4]},
                    {"weights": weights, "swaps": 4, "rejected_versions": []}, {1: ("base", None), 2: ("delta", 1)},
                    {}, [3, 9], 10, 4, 0, 0)


def test_the_goals_are_read_on_the_largest_deltas_run_with_the_whole_apply() -> None:
    report = Report("freshness")
    full = _measured([1.5] * 50 + [math.inf] * 50, 0.0, 0.0)
    sized_rows(report, SIZES[-1], "deltas", _measured([1.0] * 99 + [2.5], 30.0, 25.0), full)
    rows = {r.name.split(" (")[0]: r for r in report.rows}
    apply = rows["replica delta apply p99, prepare + install"]
    assert apply.value == 55.0 and apply.goal == f"<= {GOAL_APPLY_P99_MS:g} ms" and apply.met is False
    assert rows["replica delta install p99, lock held"].value == 25.0
    assert rows["freshness p99"].met is True and rows["freshness p99"].anchor_value == math.inf
    assert rows["delta bytes / base bytes"].value == 0.02 and rows["delta bytes / base bytes"].met is True

    smaller = Report("freshness")
    sized_rows(smaller, SIZES[0], "deltas", _measured([1.0] * 100, 1.0, 1.0), None)
    assert all(r.goal is None for r in smaller.rows), "goals are read at the largest size only"


def test_a_percentile_among_never_covered_events_is_inf_not_nan() -> None:
    ages = np.asarray([1.0] * 98 + [math.inf] * 2)
    assert age_at(ages, 50) == 1.0 and age_at(ages, 99) == math.inf


def test_the_compaction_run_is_held_to_the_goals_and_reports_what_a_base_took_of_the_training_thread() -> None:
    m = _measured([1.0] * 99 + [3.5], 1.0, 1.0)
    m.stats["published_versions"]["capture"] = {"n": 2, "bytes_p50": 0.0, "seconds_p50": 0.3, "seconds_p99": 0.4,
                                                "seconds_max": 0.4}
    report = Report("freshness")
    sized_rows(report, SIZES[-1], "compaction", m, None)
    rows = {r.name.split(" (")[0]: r for r in report.rows}
    copies = rows["base copies on the training thread, max"]
    assert copies.value == 400.0 and copies.anchor_value == 9000.0
    assert rows["freshness p99"].met is False and rows["freshness p50"].met is True
    assert "2 bases written beside training" in report.notes[-1]


def test_the_timeline_draws_every_event_even_one_never_covered(tmp_path) -> None:
    m = _measured([1.0] * 98 + [2.5, math.inf], 1.0, 1.0)
    path = timeline(tmp_path / "timeline.png", m, "freshness, a test", goal_s=3.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_each_event_is_split_at_the_first_version_covering_it_its_write_and_its_first_response() -> None:
    produced = Produced(partitions=[0, 0, 1, 1], offsets=[0, 1, 0, 1], sent_at=[10.0, 10.5, 10.2, 11.0])
    offsets = {1: {0: 1, 1: 0}, 2: {0: 2, 1: 2}, 3: {0: 2, 1: 2}}  # v1 covers p0's first event, v2 every event
    times = {1: (11.0, 11.1), 2: (12.0, 12.4), 3: (13.0, 13.1)}
    parts = stages(produced, offsets, times)
    np.testing.assert_allclose(parts["trained"], [1.0, 1.5, 1.8, 1.0])
    np.testing.assert_allclose(parts["written"], [1.1, 1.9, 2.2, 1.4])
    # v1 is never served: its events are first served by v2's first response; v9's manifest was never read
    ages, unknown = freshness(produced, [(12.6, 2), (12.3, 9), (13.5, 3)], offsets)
    np.testing.assert_allclose(ages, [2.6, 2.1, 2.4, 1.6])
    assert unknown == 1

    report = Report("freshness")
    m = _measured(list(ages), 1.0, 1.0)
    m.stages = parts
    sized_rows(report, SIZES[0], "deltas", m, None)
    rows = {r.name.split(" (")[0]: r for r in report.rows}
    trained = rows["freshness p99 until its version's manifest time"]
    assert math.isclose(trained.value, 1.8) and math.isclose(trained.anchor_value, 2.6)
    assert math.isclose(rows["freshness p50 until its version read from the store"].value, 1.9)  # "higher": of 1.1, 1.4, 1.9, 2.2


def test_the_longest_steps_are_named_with_their_phases_and_drawn(tmp_path) -> None:
    from learner.step_log import COLUMNS

    m = _measured([1.0] * 100, 1.0, 1.0)  # the first event was sent at 0.0
    n = 6
    m.steps = {c: [0.0] * n for c in COLUMNS}
    m.steps["at"] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    m.steps["total"] = [0.05, 2.0, 0.06, 0.9, 0.05, 0.05]
    m.steps["publish"] = [0.0, 1.6, 0.0, 0.0, 0.0, 0.0]
    m.steps["learn"] = [0.04, 0.3, 0.05, 0.85, 0.04, 0.04]
    m.steps["waited"] = [0.0, 0.01, 0.02, 0.01, 1.5, 0.01]
    report = Report("freshness")
    sized_rows(report, SIZES[0], "deltas", m, None)
    rows = {r.name.split(" (")[0]: r for r in report.rows}
    assert rows["longest training step"].value == 2.0 and rows["longest training step"].anchor_value == 0.055
    named = next(n for n in report.notes if "the longest steps" in n)
    assert "at 2.0 s, 2.00 s (publish 1.60 s, learn 0.30 s)" in named
    assert named.index("at 2.0 s") < named.index("at 4.0 s, 0.90 s (learn 0.85 s)")
    assert "the longest wait for a batch 1.50 s, before the step at 5.0 s" in named
    path = timeline(tmp_path / "t.png", m, "steps")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_processes_are_labelled_by_what_they_are_and_the_busiest_named_beside_their_average() -> None:
    from benchmarks.freshness import busiest, process_label

    assert process_label("ray::TrainerAct", ["ray::TrainerActor.run", ""]) == "ray::TrainerActor"
    assert process_label("ray::ServeRepli", ["ray::ServeReplica:moestream:Ranker"]) == "ray::ServeReplica:moestream:Ranker"
    assert process_label("kworker/u4:2-events_unbound", []) == "kernel: kworker"
    assert process_label("java", ["/usr/bin/java", "-cp", "kafka.jar"]) == "java"
    assert process_label("python3.11", ["/v/bin/python", "-m", "learner.plot_process", "x.npz"]) == "python learner.plot_process"
    assert process_label("python", ["python", "-u", "/tmp/s/fresh.py", "tag"]) == "python fresh.py"
    samples = [(10.0, {"a": 0.5, "b": 0.1}), (11.0, {"a": 0.5}), (12.0, {"b": 0.9, "a": 0.1})]
    assert busiest(samples, 11.5, 12.5, n=2) == "b 0.90 (0.33), a 0.10 (0.37)"
    assert busiest(samples, 100.0, 101.0) == ""


def test_the_worst_window_is_the_one_whose_events_were_stalest() -> None:
    from benchmarks.freshness import worst_window

    ages = [1.0] * 100
    ages[70:80] = [4.0] * 10  # sent at 7.0-7.9 s
    m = _measured(ages, 1.0, 1.0)
    assert worst_window(m, width_s=1.0) == (7.0, 8.0)



def test_the_replica_counts_as_caught_up_within_a_few_versions_of_the_newest() -> None:
    from types import SimpleNamespace

    from benchmarks.freshness import READY_VERSIONS, replica_caught_up

    watcher = SimpleNamespace(kinds={1: ("base", None), 40: ("delta", 39)})
    assert not replica_caught_up(SimpleNamespace(seen=[]), watcher)
    assert not replica_caught_up(SimpleNamespace(seen=[(0.0, 40 - READY_VERSIONS - 1)]), watcher)
    assert replica_caught_up(SimpleNamespace(seen=[(0.0, 40 - READY_VERSIONS)]), watcher)
    assert not replica_caught_up(SimpleNamespace(seen=[(0.0, 3)]), SimpleNamespace(kinds={}))
