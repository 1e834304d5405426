"""The replica's item cache as a ranking request meets it: the same scores with it on and off, an item's
pushed update served within ``serving.item_cache_ttl_ms`` (at once with 0), its figures in ``/healthz``;
and the compact response of ``/v1/rank``. A real Feast SQLite store and real snapshots, no Serve."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from features.aggregates import StreamAggregator
from features.store import FeatureStoreConfig, OnlineFeatures
from serving.api import build_api, unbatched
from serving.config import ServingConfig
from serving.ranker import RankingService, RankQuery
from stream.events import TASKS
from tests.serving.conftest import KNOWN_ITEMS, KNOWN_USERS

NEVER = 3600.0
MS = 1_000_000
ITEM = KNOWN_ITEMS[0]


def ranking_service(snapshot_dir: Path, features: FeatureStoreConfig, ttl_ms: float) -> RankingService:
    config = ServingConfig(max_candidates=200, poll_s=NEVER, item_cache_ttl_ms=ttl_ms)
    return RankingService(snapshot_dir, features, config)


@pytest.fixture
def services(snapshot_dir: Path, feature_config: FeatureStoreConfig):
    made: list[RankingService] = []

    def make(ttl_ms: float) -> RankingService:
        made.append(ranking_service(snapshot_dir, feature_config, ttl_ms))
        return made[-1]

    yield make
    for service in made:
        service.close()


def push_item_update(features: FeatureStoreConfig, item: int, seed: int) -> None:
    """New aggregates for ``item`` alone (users untouched), as the trainer's push would write them."""
    rng = np.random.default_rng(seed)
    n = 32
    examples = pa.table({
        "user_id": np.full(n, 10**12, np.int64), "item_id": np.full(n, item, np.int64),
        "ts_ms": np.full(n, int(time.time() * 1000), np.int64),
        **{t: (rng.random(n) < 0.9).astype(np.float32) for t in TASKS},
        "play_time": rng.random(n).astype(np.float32) * 60_000,
    })
    users, items = StreamAggregator().update(examples)
    OnlineFeatures(features, apply=False).push(users.iloc[:0], items)


def query(user: int = KNOWN_USERS[0]) -> RankQuery:
    return RankQuery(user, np.array([*KNOWN_ITEMS, 77, 10**15], dtype=np.int64))


def score_of(service: RankingService, item: int = ITEM) -> float:
    (ranking,) = service.score([query()])
    return float(ranking.scores[list(ranking.items).index(item)])


def test_scores_are_the_same_with_the_cache_on_and_off(services) -> None:
    cached, uncached = services(60_000), services(0)
    rng = np.random.default_rng(0)
    pool = np.array([*KNOWN_ITEMS, *range(100, 160)], np.int64)
    for _ in range(4):  # the first batches fill the cache, the later ones are mostly hits
        queries = [RankQuery(int(u), rng.choice(pool, 40, replace=False)) for u in (*KNOWN_USERS, 999)]
        for on, off in zip(cached.score(queries), uncached.score(queries)):
            assert np.array_equal(on.items, off.items)
            assert np.array_equal(on.probabilities, off.probabilities)
            assert np.array_equal(on.scores, off.scores)
    figures = cached.health()["item_cache"]
    assert figures["hits"] > figures["misses"] > 0 and uncached.health()["item_cache"] is None


def test_a_pushed_item_is_served_after_the_ttl_and_not_before(services, feature_config: FeatureStoreConfig) -> None:
    """On the cache's own clock: the old row up to the TTL after it was read, the pushed one right after."""
    service, reference = services(500), services(0)
    clock_ns = [10**12]
    service.item_cache.clock_ns = lambda: clock_ns[0]
    old = score_of(service)
    push_item_update(feature_config, ITEM, seed=1)
    new = score_of(reference)
    assert new != old, "the update must change the item's score"
    clock_ns[0] += 500 * MS
    assert score_of(service) == old  # read 500 ms ago: still served
    clock_ns[0] += 1
    assert score_of(service) == new
    assert service.health()["item_cache"]["max_staleness_served_ms"] == 500.0


def test_a_pushed_item_reaches_a_serving_replica_within_the_ttl(services, feature_config: FeatureStoreConfig) -> None:
    """On the real clock, while the service keeps scoring: the update is served (the cache serves no row
    older than the TTL, so it arrives within the TTL of the push; the deadline only bounds a broken test)."""
    service, reference = services(200), services(0)
    old = score_of(service)
    push_item_update(feature_config, ITEM, seed=2)
    pushed = time.monotonic()
    new = score_of(reference)
    assert new != old
    deadline = pushed + 60.0
    while (served := score_of(service)) != new and time.monotonic() < deadline:
        pass
    assert served == new
    assert service.health()["item_cache"]["max_staleness_served_ms"] <= 200.0


def test_with_ttl_0_a_pushed_item_is_served_at_once(services, feature_config: FeatureStoreConfig) -> None:
    service = services(0)
    assert service.item_cache is None
    old = score_of(service)
    push_item_update(feature_config, ITEM, seed=3)
    assert score_of(service) != old


@pytest.fixture
def client(services):
    service = services(60_000)
    with TestClient(build_api(service, unbatched(service), replica="local")) as client:
        yield client


def test_healthz_reports_the_item_cache(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/v1/rank", json={"user_id": 1, "candidates": [*KNOWN_ITEMS, 5]}).status_code == 200
    cache = client.get("/healthz").json()["item_cache"]
    assert cache["ttl_ms"] == 60_000.0 and cache["capacity"] == ServingConfig().item_cache_size
    assert (cache["hits"], cache["misses"], cache["entries"]) == (10, 5, 5)
    assert cache["hit_rate"] == pytest.approx(2 / 3)
    assert 0.0 < cache["max_staleness_served_ms"] <= 60_000.0 and cache["bytes"] > 0


def test_compact_responses_are_the_full_ranking_without_probabilities(client: TestClient) -> None:
    candidates = [*KNOWN_ITEMS, 77, 3, 10**15]
    full = client.post("/v1/rank", json={"user_id": 2, "candidates": candidates}).json()
    response = client.post("/v1/rank", json={"user_id": 2, "candidates": candidates, "compact": True})
    assert response.status_code == 200, response.text
    compact = response.json()
    assert set(compact) == {"model_version", "family", "replica", "pid", "batch", "item_ids", "scores"}
    assert compact["item_ids"] == [i["item_id"] for i in full["items"]]
    # float32 scores: written shortest in the compact body, as doubles in the full one; the same numbers
    assert np.array_equal(np.float32(compact["scores"]), np.float32([i["score"] for i in full["items"]]))
    assert compact["scores"] == sorted(compact["scores"], reverse=True)
    assert client.post("/v1/rank", json={"user_id": 2, "candidates": candidates, "compact": False}).json()["items"]


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_compact_takes_only_a_boolean(client: TestClient, value) -> None:
    response = client.post("/v1/rank", json={"user_id": 2, "candidates": [1], "compact": value})
    assert response.status_code == 422 and "compact" in response.json()["message"]


def test_the_schema_describes_both_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["schemas"]["RankRequest"]["properties"]["compact"]["type"] == "boolean"
    ok = schema["paths"]["/v1/rank"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {r["$ref"].rsplit("/", 1)[-1] for r in ok["anyOf"]} == {"RankResponse", "CompactRankResponse"}
    assert "item_cache" in schema["components"]["schemas"]["Health"]["properties"]
