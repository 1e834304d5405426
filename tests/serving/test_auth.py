"""Bearer-token authentication of the ranking API, in-process (ASGI) with a real snapshot and Feast store.

Tokens reach the app as they reach a replica: from the process environment (``MOESTREAM_API_TOKENS``,
``MOESTREAM_API_TOKENS_FILE``) or from the file that ``serving.api_tokens_file`` names.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from features.store import FeatureStoreConfig
from serving import auth
from serving.api import build_api, unbatched
from serving.auth import API_TOKENS_ENV, API_TOKENS_FILE_ENV, TokenError, load_tokens, token_matches
from serving.config import ServingConfig
from serving.ranker import RankingService

TOKEN_A = "a" * 24 + "-first-token"
TOKEN_B = "b" * 24 + "-second-token"
RANK = {"user_id": 1, "candidates": [10, 11]}


@pytest.fixture(autouse=True)
def no_tokens_from_the_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_TOKENS_ENV, raising=False)
    monkeypatch.delenv(API_TOKENS_FILE_ENV, raising=False)


def api(snapshot_dir: Path, feature_config: FeatureStoreConfig, **config) -> tuple[TestClient, RankingService]:
    service = RankingService(snapshot_dir, feature_config, ServingConfig(poll_s=3600.0, **config))
    return TestClient(build_api(service, unbatched(service), replica="local")), service


@pytest.fixture
def locked(snapshot_dir: Path, feature_config: FeatureStoreConfig, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(API_TOKENS_ENV, f"{TOKEN_A}, {TOKEN_B}")
    client, service = api(snapshot_dir, feature_config)
    with client:
        yield client
    service.close()


def test_without_tokens_the_api_is_open(snapshot_dir: Path, feature_config: FeatureStoreConfig) -> None:
    client, service = api(snapshot_dir, feature_config)
    try:
        with client:
            assert client.post("/v1/rank", json=RANK).status_code == 200
    finally:
        service.close()


@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", TOKEN_A])
def test_a_request_without_a_bearer_token_is_a_401_with_a_challenge(locked: TestClient, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    for path, call in (("/v1/rank", locked.post), ("/predict", locked.post), ("/v1/model", locked.get)):
        response = call(path, headers=headers, **({"json": RANK} if call == locked.post else {}))
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == 'Bearer realm="moestream"'
        assert "Authorization: Bearer <token>" in response.json()["detail"]
        assert TOKEN_A not in response.text


def test_a_wrong_token_is_a_401_that_does_not_echo_it(locked: TestClient) -> None:
    wrong = TOKEN_A[:-1] + "X"
    response = locked.post("/v1/rank", json=RANK, headers={"authorization": f"Bearer {wrong}"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="moestream", error="invalid_token"'
    assert wrong not in response.text and TOKEN_A not in response.text


@pytest.mark.parametrize("token", [TOKEN_A, TOKEN_B])
def test_any_configured_token_lets_the_request_in(locked: TestClient, token: str) -> None:
    response = locked.post("/v1/rank", json=RANK, headers={"authorization": f"bearer {token}"})
    assert response.status_code == 200, response.text
    assert locked.get("/v1/model", headers={"authorization": f"Bearer {token}"}).status_code == 200


def test_health_and_docs_stay_open(locked: TestClient) -> None:
    assert locked.get("/healthz").status_code == 200
    assert locked.get("/openapi.json").status_code == 200
    docs = locked.get("/docs")
    assert docs.status_code == 200
    bundle = locked.get("/static-offline-docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200


def test_tokens_from_the_file_the_config_names(snapshot_dir: Path, feature_config: FeatureStoreConfig,
                                               tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# ranking clients\n{TOKEN_A}\n\n{TOKEN_B}  # the batch job\n")
    tokens.chmod(0o600)
    client, service = api(snapshot_dir, feature_config, api_tokens_file=str(tokens))
    try:
        with client:
            assert client.post("/v1/rank", json=RANK).status_code == 401
            for token in (TOKEN_A, TOKEN_B):
                assert client.post("/v1/rank", json=RANK, headers={"authorization": f"Bearer {token}"}).status_code == 200
    finally:
        service.close()


def test_tokens_from_the_file_the_environment_names(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN_B + "\n")
    digests = load_tokens(None, {API_TOKENS_FILE_ENV: str(tokens), API_TOKENS_ENV: TOKEN_A})
    assert token_matches(TOKEN_A.encode(), digests) and token_matches(TOKEN_B.encode(), digests)
    assert not token_matches(b"c" * 32, digests)


@pytest.mark.parametrize(
    ("environ", "tokens_file", "message"),
    [
        ({API_TOKENS_ENV: " , "}, None, f"{API_TOKENS_ENV} is set but holds no token"),
        ({API_TOKENS_FILE_ENV: "missing"}, None, f"(named by {API_TOKENS_FILE_ENV}): No such file or directory"),
        ({}, "missing", "(named by serving.api_tokens_file): No such file or directory"),
        ({}, "empty", "holds no token"),
        ({API_TOKENS_ENV: "short-secret"}, None, "1 API token(s) shorter than 16 characters"),
    ],
)
def test_a_token_source_that_is_set_but_unusable_stops_the_replica(tmp_path: Path, environ: dict,
                                                                   tokens_file: str | None, message: str) -> None:
    """Never silently open: a source that was meant to hold tokens and does not is an error naming it."""
    (tmp_path / "empty").write_text("# no tokens yet\n")
    environ = {k: str(tmp_path / v) if k == API_TOKENS_FILE_ENV else v for k, v in environ.items()}
    with pytest.raises(TokenError) as info:
        load_tokens(str(tmp_path / tokens_file) if tokens_file else None, environ)
    assert message in str(info.value)
    assert "short-secret" not in str(info.value)


def test_every_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check takes the same steps for the first token, the last and none: no early exit on a match."""
    digests = load_tokens(None, {API_TOKENS_ENV: f"{TOKEN_A} {TOKEN_B} {'c' * 32}"})
    compared: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(len(a))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for given in (TOKEN_A, "c" * 32, "not a token at all"):
        compared.clear()
        token_matches(given.encode(), digests)
        assert compared == [32, 32, 32], given  # every token, as fixed-length digests


def test_tokens_are_not_a_yaml_setting() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        ServingConfig.from_dict({"api_tokens": [TOKEN_A]})
    with pytest.raises(ValueError, match="serving.api_tokens_file must be a file path"):
        ServingConfig.from_dict({"api_tokens_file": ""})


def test_open_paths_are_open_under_a_route_prefix(snapshot_dir: Path, feature_config: FeatureStoreConfig,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve mounts an app under its route prefix (``root_path``); ``/healthz`` stays open there too."""
    monkeypatch.setenv(API_TOKENS_ENV, TOKEN_A)
    service = RankingService(snapshot_dir, feature_config, ServingConfig(poll_s=3600.0))
    try:
        with TestClient(build_api(service, unbatched(service), replica="local"), root_path="/ranking") as client:
            health = client.get("/ranking/healthz")
            assert health.status_code == 200 and health.json()["ok"] is True
            assert client.get("/ranking/v1/model").status_code == 401
            assert client.get("/ranking/v1/model", headers={"authorization": f"Bearer {TOKEN_A}"}).status_code == 200
    finally:
        service.close()
