"""The ranking API's response bodies: the fast full response says what the obvious one says."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from serving.api import RankResponse
from serving.encode import (compact_response, full_response, rank_message, reference_full_response,
                            reference_rank_message)
from serving.ranker import Ranking


def _ranking(n: int, tasks: tuple[str, ...], seed: int, scale: float = 1.0) -> Ranking:
    rng = np.random.default_rng(seed)
    probabilities = (rng.random((n, len(tasks))) * scale).astype(np.float32)
    scores = probabilities.sum(axis=1, dtype=np.float32)
    items = rng.choice(np.iinfo(np.int64).max, n, replace=False).astype(np.int64)
    return Ranking(7, "mmoe", 3, tasks, items, scores, probabilities)


def _as_float32(body: dict) -> dict:
    """``body`` with every number of the items read back as float32, the precision the model computed in (null
    stays None)."""
    def f32(value: float | None) -> np.float32 | None:
        return None if value is None else np.float32(value)
    return {**body, "items": [{"item_id": it["item_id"], "score": f32(it["score"]),
                               "probabilities": {t: f32(p) for t, p in it["probabilities"].items()}}
                              for it in body["items"]]}


@pytest.mark.parametrize("n", [0, 1, 2, 1000])
@pytest.mark.parametrize("tasks", [("click", "long_view", "like", "comment", "follow", "forward"), ("watch_time",),
                                   ('say "%s"', "50%", "naïve\\", "")])
def test_full_response_holds_the_reference_values(n: int, tasks: tuple[str, ...]) -> None:
    ranking = _ranking(n, tasks, seed=n)
    fast = orjson.loads(full_response(ranking, 'replica "%d"', 4242))
    reference = orjson.loads(reference_full_response(ranking, 'replica "%d"', 4242))
    assert _as_float32(fast) == _as_float32(reference)
    assert [it["item_id"] for it in fast["items"]] == ranking.items[ranking.order].tolist()
    RankResponse.model_validate(fast)  # the documented schema


def test_full_response_writes_each_value_as_its_float32_round_trip() -> None:
    ranking = _ranking(50, ("click", "like"), seed=1, scale=1e-6)  # small values: exponent notation
    ranking.probabilities[0, 0] = -0.0
    ranking.probabilities[1, 1] = 12345678.0  # a regression task's value
    body = full_response(ranking, "r", 1)
    items = orjson.loads(body)["items"]
    written = np.array([[it["probabilities"][t] for t in ranking.tasks] for it in items], np.float32)
    assert np.array_equal(written, ranking.probabilities[ranking.order])
    assert np.signbit(written[list(ranking.order).index(0), 0])  # -0.0 stays -0.0
    assert len(body) < len(reference_full_response(ranking, "r", 1))  # float32's digits, not float64's


def test_non_finite_values_are_null_as_in_the_reference() -> None:
    ranking = _ranking(3, ("click", "like"), seed=2)
    ranking.probabilities[0, 1] = np.nan
    ranking.scores[2] = np.inf
    fast = orjson.loads(full_response(ranking, "r", 1))
    assert _as_float32(fast) == _as_float32(orjson.loads(reference_full_response(ranking, "r", 1)))
    nulls = sum((it["score"] is None) + sum(p is None for p in it["probabilities"].values()) for it in fast["items"])
    assert nulls == 2


def test_compact_response_lists_ids_and_scores_best_first() -> None:
    ranking = _ranking(20, ("click",), seed=3)
    body = orjson.loads(compact_response(ranking, "r", 1))
    order = ranking.order
    assert body["item_ids"] == ranking.items[order].tolist()
    assert [np.float32(s) for s in body["scores"]] == ranking.scores[order].tolist()
    assert (body["model_version"], body["family"], body["batch"]) == (7, "mmoe", 3)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 1000])
@pytest.mark.parametrize("tasks", [("click", "long_view", "like", "comment", "follow", "forward"), ("watch_time",), ()])
def test_rank_message_is_the_reference_message(n: int, tasks: tuple[str, ...], compact: bool) -> None:
    ranking = _ranking(n, tasks or ("x",), seed=n)
    if not tasks:
        ranking = Ranking(7, "mmoe", 3, (), ranking.items, ranking.scores, ranking.probabilities[:, :0])
    fast, reference = rank_message(ranking, "replica", compact), reference_rank_message(ranking, "replica", compact)
    assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
    assert [i.item_id for i in fast.items] == ranking.items[ranking.order].tolist()


def test_rank_message_writes_any_int64_id_and_non_finite_scores() -> None:
    """Ids of every varint length (1 to 10 bytes: negative ones take 10), zero, and scores NaN, infinite, -0.0."""
    items = np.array([0, 1, 127, 128, 16_383, 16_384, 2**31, 2**53 + 1, 2**63 - 1, -1, -(2**63), -300], np.int64)
    n = len(items)
    probabilities = np.random.default_rng(4).random((n, 2)).astype(np.float32)
    scores = np.linspace(1, 0, n).astype(np.float32)
    scores[[0, 1, 2]] = [np.nan, np.inf, -0.0]
    ranking = Ranking(1, "mmoe", 1, ("click", "like"), items, scores, probabilities)
    for compact in (False, True):
        fast, reference = rank_message(ranking, "r", compact), reference_rank_message(ranking, "r", compact)
        assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
    assert sorted(i.item_id for i in rank_message(ranking, "r", False).items) == sorted(items.tolist())


def test_rank_message_with_items_over_127_bytes_and_ten_thousand_candidates() -> None:
    """Forty tasks make each item's size and its probabilities' length two-byte varints; 10,000 candidates, a size
    past the default cap (``serving.max_candidates`` may be raised)."""
    tasks = tuple(f"task{k}" for k in range(40))
    ranking = _ranking(10_000, tasks, seed=5)
    for compact in (False, True):
        fast, reference = rank_message(ranking, "r", compact), reference_rank_message(ranking, "r", compact)
        assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
    body = orjson.loads(full_response(ranking, "r", 1))
    assert _as_float32(body) == _as_float32(orjson.loads(reference_full_response(ranking, "r", 1)))
