"""``bench embeddings`` at tiny sizes: both paths train, the maps hold every ID before timing, the rows carry
the figures they claim. No timed assertions: speed is the benchmark's job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import BENCHMARKS
from benchmarks.embeddings import (
    EMB_DIM,
    ROW_BYTES,
    HashedAdamPath,
    Plan,
    RowwisePath,
    Traffic,
    bench,
)
from benchmarks.suite import ALL
from features.definitions import ID_FIELDS
from learner.models.encoder import hash_ids

TINY = Plan((50, 100, 200), batch=32, warmup=1, steps=2, dense_steps=2, map_calls=3)


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
    path = RowwisePath(capacity=100 + 2 * traffic.n_new)
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
    path = RowwisePath(capacity=64)
    path.fill(traffic.universe)
    tables = sum((64 + 1) * (EMB_DIM + 1) * 4 for _ in ID_FIELDS)
    maps = sum(m.nbytes for m in path.maps.values())
    assert path.bytes_per_live_id() == pytest.approx((tables + maps) / (2 * 64))


def test_hashed_reference_keeps_moving_rows_the_batch_did_not_touch() -> None:
    traffic = Traffic(50, batch=16)
    path = HashedAdamPath(50)
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
    assert any("docs/embeddings.md" in note for note in report.notes)


def test_a_hashed_step_over_the_cap_is_a_note_not_a_row() -> None:
    report = bench(Plan((50, 100), batch=16, warmup=2, steps=1, dense_steps=1, map_calls=1, dense_cap_s=0.0))
    assert [r.name for r in report.rows if "hashed" in r.name] == []
    assert sum("not run" in note for note in report.notes) == 2
