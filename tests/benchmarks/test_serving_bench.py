"""``bench serving``'s rows: the 1000-candidate goal on the default cell, the variants beside it, and compact
request bodies (no Ray here: the cells are made up); and the snapshot it serves (a real Feast store and learner)."""

from __future__ import annotations

import orjson
import pytest

from benchmarks.harness import Report
from benchmarks.http_load import Sample
from benchmarks.serving import GOAL_1000_AT, VARIANTS, Cell, add_rows, bodies, cache_note


def cell(latency_s: float, count: int, grpc: bool = False) -> Cell:
    samples = [Sample([latency_s] * count, 1.0, 0)]
    return Cell(samples, [Sample([0.005] * 1000, 1.0, 0)], samples if grpc else [])


def test_the_1000_candidate_goal_is_read_on_the_default_cell_and_the_variants_sit_beside_it() -> None:
    cells = {(1000, 8, "/v1/rank", False): cell(0.020, 450, grpc=True)}
    cells |= {(*GOAL_1000_AT, route, compact): cell(0.040, 200) for route, compact in VARIANTS.values()}
    report = Report("serving")
    add_rows(report, "haproxy", cells)
    rows = {r.name: r for r in report.rows}
    default = "haproxy: 1000 candidates, concurrency 8"
    assert rows[f"{default}: p99"].met is True and rows[f"{default}: p99"].goal == "<= 30 ms"
    assert rows[f"{default}: candidates"].value == 450_000 and rows[f"{default}: candidates"].met is True
    for name in VARIANTS:
        assert rows[f"{default}, {name}: p99"].goal is None
        assert rows[f"{default}, {name}: candidates"].value == 200_000
    grpc = [name for name in rows if ": gRPC, " in name]  # beside the grid's own cell, not the variants
    assert grpc and all(name.startswith("haproxy: gRPC, 1000 candidates, concurrency 8: ") for name in grpc)
    assert rows["haproxy: gRPC, 1000 candidates, concurrency 8: p99"].anchor_value == rows[f"{default}: p99"].value
    slow = Report("serving")
    add_rows(slow, "haproxy", {(1000, 8, "/v1/rank", False): cell(0.040, 300)})
    assert [r.met for r in slow.rows if r.goal] == [False, False]


def test_compact_bodies_ask_for_compact_responses() -> None:
    full, compact = bodies(5, 3, seed=1), bodies(5, 3, seed=1, compact=True)
    assert [orjson.loads(b) | {"compact": True} for b in full] == [orjson.loads(b) for b in compact]


def test_the_cache_note_names_hit_rates_and_staleness() -> None:
    figures = {"a": {"hit_rate": 0.8, "max_staleness_served_ms": 480.0, "ttl_ms": 500.0},
               "b": {"hit_rate": 0.75, "max_staleness_served_ms": 499.0, "ttl_ms": 500.0}}
    note = cache_note("haproxy", figures)
    assert "80%, hit rate 75%" in note and "499 ms" in note and "TTL 500 ms" in note


@pytest.mark.integration
def test_the_served_snapshot_is_the_model_the_learner_trains_with_every_requested_id_mapped(tmp_path) -> None:
    import numpy as np
    import torch

    from benchmarks.serving import N_ITEMS, N_USERS, prepare, served_model
    from features.definitions import FEATURE_COLUMNS
    from learner.config import LearnerConfig
    from learner.models import MultiTaskRanker
    from learner.snapshots import SnapshotStore
    from learner.step import build_model

    _, snapshots = prepare(tmp_path, n_events=2_000)
    manifest, state = SnapshotStore(snapshots).load()
    learner = LearnerConfig()
    expected = build_model(learner, learner.embedded_fields(), len(FEATURE_COLUMNS)).config
    assert manifest.data["model_config"] == expected and expected["wide"]["dim"] > 0 and expected["tables"]
    model = MultiTaskRanker.from_config(manifest.data["model_config"])
    model.load_state_dict(state)  # as a replica loads it
    rows = {f: model.encoder.map_rows(f, torch.arange(n)) for f, n in (("user_id", N_USERS), ("item_id", N_ITEMS))}
    for f, r in rows.items():  # each id a row of its own, none the default row
        assert (r > 0).all() and len(np.unique(r.numpy())) == len(r), f
    user = learner.tables["user_id"]
    assert f"user_id {user['capacity']:,} x {user['dim']}" in served_model()
    assert f"wide part dim {learner.wide.dim}" in served_model()
