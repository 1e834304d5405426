"""Schemathesis fuzzes the ranking API against its own OpenAPI spec: requests generated from the schema, valid
and deliberately invalid, every response checked by Schemathesis' default checks (never a 5xx, status codes,
content types and bodies as documented, invalid data rejected, valid data accepted). In-process over ASGI,
with a real snapshot and a real Feast store.

The cases come from each operation's Hypothesis strategy inside an ordinary test, because Schemathesis'
pytest loader for fixture-built schemas (``schemathesis.pytest.from_fixture``) fails on pytest 9
(``'Function' object has no attribute '_nodeid'``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from features.store import FeatureStoreConfig
from serving.api import build_api, unbatched
from serving.config import ServingConfig
from serving.ranker import RankingService

OPERATIONS = [("POST", "/v1/rank"), ("POST", "/predict"), ("GET", "/v1/model"), ("GET", "/healthz")]


@pytest.fixture
def ranking_api(snapshot_dir: Path, feature_config: FeatureStoreConfig):
    service = RankingService(snapshot_dir, feature_config, ServingConfig(max_candidates=64, poll_s=3600.0))
    yield schemathesis.openapi.from_asgi("/openapi.json", build_api(service, unbatched(service), replica="local"))
    service.close()


def test_every_operation_is_fuzzed(ranking_api) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in ranking_api.get_all_operations()}
    assert found == set(OPERATIONS)


CASES = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (*op, GenerationMode.NEGATIVE) for op in OPERATIONS if op[0] == "POST"  # a GET without parameters has no invalid form
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_conforms_to_its_spec_on_any_input(ranking_api, method: str, path: str, mode: GenerationMode) -> None:
    operation = ranking_api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        case.call_and_validate()

    check()
