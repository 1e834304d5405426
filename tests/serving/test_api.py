"""The ranking API in-process (ASGI): real snapshots from learner.snapshots, a real Feast store, no Serve.

The Serve deployment wraps this very app (``serving.app``); tests/serving/test_serve.py drives it over HTTP.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from features.store import FeatureStoreConfig, defaults
from learner.snapshots import SnapshotStore
from serving.api import BodyLimit, build_api, unbatched
from serving.config import ServingConfig
from serving.ranker import RankingService, RankQuery
from stream.events import TASKS
from tests.serving.conftest import KNOWN_ITEMS, KNOWN_USERS, publish

NEVER = 3600.0
UNKNOWN = 10**15  # no such user or item in the store


@pytest.fixture
def service(snapshot_dir: Path, feature_config: FeatureStoreConfig):
    service = RankingService(snapshot_dir, feature_config, ServingConfig(max_candidates=50, poll_s=NEVER))
    yield service
    service.close()


@pytest.fixture
def client(service: RankingService):
    with TestClient(build_api(service, unbatched(service), replica="local")) as client:
        yield client


def test_rank_sorts_candidates_by_the_fused_score(client: TestClient) -> None:
    candidates = [*KNOWN_ITEMS, 77, UNKNOWN]
    response = client.post("/v1/rank", json={"user_id": KNOWN_USERS[0], "candidates": candidates,
                                             "context": {"surface": "feed", "page": 2}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == 1 and body["family"] == "mmoe" and body["replica"] == "local"
    weights = client.get("/v1/model").json()["task_weights"]
    items = body["items"]
    assert sorted(i["item_id"] for i in items) == sorted(candidates)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    for item in items:
        assert set(item["probabilities"]) == set(TASKS)
        assert all(0.0 < p < 1.0 for p in item["probabilities"].values())
        fused = sum(weights[t] * p for t, p in item["probabilities"].items())
        assert item["score"] == pytest.approx(fused, rel=1e-5)


def test_task_weights_decide_the_order(snapshot_dir: Path, feature_config: FeatureStoreConfig) -> None:
    """Only-click and only-like weights order the same candidates by those tasks' probabilities."""
    candidates = list(range(40))
    for task in ("click", "like"):
        service = RankingService(snapshot_dir, feature_config, ServingConfig(task_weights={task: 1.0}, poll_s=NEVER))
        try:
            with TestClient(build_api(service, unbatched(service), replica="local")) as client:
                items = client.post("/v1/rank", json={"user_id": 2, "candidates": candidates}).json()["items"]
        finally:
            service.close()
        by_task = [i["probabilities"][task] for i in items]
        assert by_task == sorted(by_task, reverse=True)
        assert [i["score"] for i in items] == pytest.approx(by_task)


def test_whole_numbers_written_as_floats_are_ids(client: TestClient) -> None:
    """JSON Schema's integer includes 1800.0; so does the API (Schemathesis found the difference)."""
    response = client.post("/v1/rank", content=b'{"user_id": 3.0, "candidates": [1800.0, 2]}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert sorted(i["item_id"] for i in response.json()["items"]) == [2, 1800]


def test_predict_keeps_request_order_and_agrees_with_rank(client: TestClient) -> None:
    items = [13, UNKNOWN, 10, 5]
    predicted = client.post("/predict", json={"user_id": 3, "item_ids": items})
    assert predicted.status_code == 200, predicted.text
    body = predicted.json()
    assert [i["item_id"] for i in body["items"]] == items and body["model_version"] == 1
    ranked = {i["item_id"]: i["probabilities"] for i in
              client.post("/v1/rank", json={"user_id": 3, "candidates": items}).json()["items"]}
    for item in body["items"]:
        assert item["probabilities"] == pytest.approx(ranked[item["item_id"]])


def test_unknown_users_and_items_are_scored_on_default_features(service: RankingService) -> None:
    lookup = service.features.lookup_batch(np.array([UNKNOWN, KNOWN_USERS[0]]), np.array([UNKNOWN, KNOWN_ITEMS[0]]))
    assert np.allclose(lookup.dense[0], defaults())
    assert not np.allclose(lookup.dense[1], defaults()), "the fixture's known entities must have features"
    (ranking,) = service.score([RankQuery(UNKNOWN, np.array([UNKNOWN, KNOWN_ITEMS[0]], dtype=np.int64))])
    model = service.weights.current.model
    reference = service.features.lookup_batch(np.array([UNKNOWN, UNKNOWN]), np.array([UNKNOWN, KNOWN_ITEMS[0]]))
    with torch.inference_mode():
        expected = model.predict_proba({k: torch.from_numpy(v) for k, v in reference.ids.items()},
                                       torch.from_numpy(reference.dense))
    assert np.allclose(ranking.probabilities, torch.stack([expected[t] for t in ranking.tasks], 1).numpy(), atol=1e-6)
    assert np.isfinite(ranking.scores).all()


def test_a_batch_scores_each_request_as_it_would_be_scored_alone(service: RankingService) -> None:
    rng = np.random.default_rng(0)
    queries = [RankQuery(int(u), rng.choice(1000, n, replace=False).astype(np.int64))
               for u, n in ((1, 5), (UNKNOWN, 30), (2, 1), (1, 12))]
    together = service.score(queries)
    assert len({r.batch for r in together}) == 1
    for query, batched in zip(queries, together):
        (alone,) = service.score([query])
        assert np.array_equal(batched.items, query.candidates)
        assert np.allclose(batched.probabilities, alone.probabilities, atol=1e-6)
        assert np.allclose(batched.scores, alone.scores, atol=1e-6)


def test_model_and_health_describe_the_served_snapshot(client: TestClient) -> None:
    model = client.get("/v1/model").json()
    assert model["version"] == 1 and model["family"] == "mmoe" and model["tasks"] == list(TASKS)
    assert model["event_time_hwm_ms"] == 1_763_900_000_001 and model["offsets"] == {"0": 1}
    assert 0 <= model["snapshot_age_s"] < 600
    health = client.get("/healthz").json()
    assert health["ok"] and health["model_version"] == 1 and health["swaps"] == 1 and health["rejected_versions"] == []
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()["components"]["schemas"]["RankRequest"]["properties"]["candidates"]
    assert schema["maxItems"] == 50 and schema["uniqueItems"] is True


def test_a_new_snapshot_is_served_and_a_corrupt_one_refused(client: TestClient, service: RankingService,
                                                            snapshot_dir: Path) -> None:
    store = SnapshotStore(snapshot_dir)
    publish(store, seed=2)
    service.weights.refresh()
    assert client.post("/v1/rank", json={"user_id": 1, "candidates": [1]}).json()["model_version"] == 2
    bad = publish(store, seed=3)
    (snapshot_dir / f"v{bad.version:06d}.safetensors").write_bytes(b"not safetensors")
    service.weights.refresh()
    assert client.post("/v1/rank", json={"user_id": 1, "candidates": [1]}).json()["model_version"] == 2
    assert client.get("/healthz").json()["rejected_versions"] == [3]


def test_no_snapshot_yet_is_a_503_that_says_so_without_server_paths(tmp_path: Path,
                                                                    feature_config: FeatureStoreConfig) -> None:
    """Before the first snapshot the replica is up but not ready: ``/healthz`` says so with 503, as does every
    scoring call, and no answer names a directory of the server."""
    directory = tmp_path / "empty"
    service = RankingService(directory, feature_config, ServingConfig(poll_s=NEVER))
    try:
        with TestClient(build_api(service, unbatched(service), replica="local")) as client:
            response = client.post("/v1/rank", json={"user_id": 1, "candidates": [1, 2]})
            assert response.status_code == 503 and "no model published yet" in response.json()["detail"]
            assert response.headers["retry-after"] == "1"
            model = client.get("/v1/model")
            assert model.status_code == 503
            health = client.get("/healthz")
            assert health.status_code == 503, health.text
            assert health.json()["ok"] is False and health.json()["model_version"] is None
            assert "no model published yet" in health.json()["reason"]
            for answer in (response, model, health):
                assert str(directory) not in answer.text and "snapshots" not in answer.text

            publish(SnapshotStore(directory), seed=1)
            service.weights.refresh()
            health = client.get("/healthz")
            assert health.status_code == 200 and health.json()["ok"] is True and health.json()["reason"] is None
    finally:
        service.close()


def test_a_replica_whose_every_snapshot_was_refused_says_so(tmp_path: Path, feature_config: FeatureStoreConfig) -> None:
    directory = tmp_path / "refused"
    store = SnapshotStore(directory)
    bad = publish(store, seed=1)
    (directory / f"v{bad.version:06d}.safetensors").write_bytes(b"not safetensors")
    service = RankingService(directory, feature_config, ServingConfig(poll_s=NEVER))
    try:
        with TestClient(build_api(service, unbatched(service), replica="local")) as client:
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["rejected_versions"] == [bad.version]
            assert f"[{bad.version}] were refused" in health.json()["reason"]
            response = client.post("/v1/rank", json={"user_id": 1, "candidates": [1]})
            assert response.status_code == 503 and "were refused" in response.json()["detail"]
            assert str(directory) not in response.text + health.text
    finally:
        service.close()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"user_id": 1, "candidates": [1, 2', 422, "body is not valid JSON"),
        (b"[1, 2, 3]", 422, "body: Input should be a valid dictionary"),
        (b'{"candidates": [1]}', 422, "user_id: Field required"),
        (b'{"user_id": 1}', 422, "candidates: Field required"),
        (b'{"user_id": "7", "candidates": [1]}', 422, "user_id: Value error, must be an integer id"),
        (b'{"user_id": 1.5, "candidates": [1]}', 422, "user_id: Value error, must be an integer id, not a fraction"),
        (b'{"user_id": -1, "candidates": [1]}', 422, "user_id: Input should be greater than or equal to 0"),
        (b'{"user_id": 1, "candidates": [true]}', 422, "candidates: Value error, item 0 must be an integer id"),
        (b'{"user_id": 1, "candidates": [1, 2.5]}', 422, "candidates: Value error, item 1 must be an integer id, not a fraction"),
        (b'{"user_id": 1, "candidates": [1, -2]}', 422, "candidates.1: Input should be greater than or equal to 0"),
        (b'{"user_id": 1, "candidates": []}', 422, "candidates: List should have at least 1 item"),
        (b'{"user_id": 1, "candidates": [3, 4, 3]}', 422, "candidates: Value error, must be distinct; repeated: [3]"),
        (orjson.dumps({"user_id": 1, "candidates": list(range(51))}), 422, "List should have at most 50 items"),
        (b'{"user_id": 1, "candidates": [1], "extra": 1}', 422, "extra: Extra inputs are not permitted"),
        (b'{"user_id": 1, "candidates": [1], "context": {"a": [1]}}', 422, "context.a"),
        (b'{"user_id": 1, "candidates": [1], "context": {"a": NaN}}', 422, "context.a: Value error, must be a finite number, got NaN"),
        (b'{"user_id": 1, "candidates": [1], "context": {"a": 1e400}}', 422, "context.a: Value error, must be a finite number, got 1e400 (overflows)"),
        (b'{"user_id": 1e400, "candidates": [1]}', 422, "user_id: Value error, must be a finite number, got 1e400 (overflows)"),
        (b'{"user_id": -1e999, "candidates": [1]}', 422, "user_id: Value error, must be a finite number, got -1e999 (overflows)"),
        (b'{"user_id": NaN, "candidates": [1]}', 422, "user_id: Value error, must be a finite number, got NaN"),
        (b'{"user_id": 1, "candidates": [1, Infinity]}', 422, "candidates: Value error, item 1 must be a finite number, got Infinity"),
        (b'{"user_id": 1, "candidates": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 422, "body nests deeper than 1024 levels"),
        (b'{"user_id": 1, "candidates": [1, 2] "context": {}}', 422, "body is not valid JSON (error at character"),
        (b'{"user_id": 99999999999999999999999, "candidates": [1]}', 422, "user_id: Input should be less than or equal to 9007199254740991"),
    ],
)
def test_bad_requests_get_4xx_with_the_reason(client: TestClient, body: bytes, status: int, message: str) -> None:
    response = client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["message"]


def test_bodies_over_the_limit_are_refused_before_parsing(client: TestClient) -> None:
    huge = b'{"user_id": 1, "candidates": [' + b"1," * 40_000 + b"1]}"
    response = client.post("/v1/rank", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "exceeds the limit of 65536" in response.json()["detail"]
    bad_length = client.post("/v1/rank", content=b"{}", headers={"content-length": "ten"})
    assert bad_length.status_code == 400


def test_body_limit_counts_streamed_chunks_without_a_declared_length() -> None:
    """Chunked transfer: no Content-Length, the limit is enforced on the bytes as they arrive."""
    reached: list[bytes] = []

    async def app(scope, receive, send) -> None:
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def drive(chunks: list[bytes]) -> int:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent: list[dict] = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await BodyLimit(app, max_bytes=1024)({"type": "http", "headers": []}, receive, send)
        return sent[0]["status"]

    assert asyncio.run(drive([b"a" * 600, b"b" * 600])) == 413 and reached == []
    assert asyncio.run(drive([b"a" * 500, b"b" * 500])) == 200 and reached == [b"a" * 500 + b"b" * 500]


def test_a_body_that_is_not_text_is_a_400_that_says_so(client: TestClient) -> None:
    response = client.post("/v1/rank", content=b"\x17\xff{\xfe", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"] == "body is not UTF-8 text (invalid byte at position 1)"


@pytest.mark.parametrize(("content_type", "named"), [
    ("text/plain", "text/plain"),
    ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),  # curl -d without -H
    ("text/plain; charset=utf-8", "text/plain"),
    (None, "none"),
])
@pytest.mark.parametrize("path", ["/v1/rank", "/predict"])
def test_a_body_that_is_not_json_is_a_415_that_names_its_type(client: TestClient, path: str,
                                                               content_type: str | None, named: str) -> None:
    body = orjson.dumps({"user_id": 1, "candidates" if path == "/v1/rank" else "item_ids": [1]})
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(path, content=body, headers=headers)
    assert response.request.headers.get("content-type") == content_type
    assert response.status_code == 415, response.text
    assert response.json()["detail"] == f"Content-Type must be application/json, got {named}"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.moestream+json"])
def test_json_media_types_with_parameters_or_suffixes_are_json(client: TestClient, content_type: str) -> None:
    response = client.post("/v1/rank", content=b'{"user_id": 1, "candidates": [1]}', headers={"content-type": content_type})
    assert response.status_code == 200, response.text


def test_docs_load_nothing_from_outside_the_server(client: TestClient) -> None:
    """Swagger UI and ReDoc come from this server, so ``/docs`` works on a machine without internet."""
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        assert not re.findall(r"(?:https?:)?//[\w.-]+", html.text), f"{page} references another host"
        assets = re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", html.text)
        assert any(a.endswith(".js") for a in assets), html.text
        for asset in assets:
            fetched = client.get(asset)
            assert fetched.status_code == 200 and len(fetched.content) > 1000, asset
