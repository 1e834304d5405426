"""The HTTP API of the ranking service (FastAPI; OpenAPI at ``/openapi.json``, docs at ``/docs``).

- ``POST /v1/rank {user_id, candidates, context?, compact?}``: the candidates sorted by fused score, best
  first, each with its per-task probabilities, plus the model version that scored them and the replica that
  answered; with ``"compact": true`` only the sorted ids and their scores, as two parallel lists.
- ``POST /predict {user_id, item_ids}``: the walking skeleton's call, kept: probabilities in request order.
- ``GET /v1/model``: family, version, event-time high-water mark and age of the snapshot being served.
- ``GET /healthz``: readiness (200 once a model is served, 503 with the reason before), the served version,
  swaps, refused snapshots, the item cache's hit rate and staleness.

Bad input is the client's error, never the server's: bodies over ``max_body_bytes`` are refused with 413
before parsing, a ``Content-Type`` other than JSON with 415, bodies that are not UTF-8 text with 400;
malformed JSON, nesting deeper than 1024 levels, non-finite numbers (``NaN``, ``1e400``), wrong types,
missing or unknown fields, too many or repeated candidates get 422 with the reasons (``message`` sums them
up in one line; ``serving.body`` reads the bodies). With API tokens configured (``serving.auth``) every
route but ``/healthz`` and the docs needs a bearer token, else 401. The only 5xx is 503 before the first
snapshot is served. The docs pages load Swagger UI and ReDoc from this server, not from a CDN, so they work
offline. The app is built per replica around a ``rank`` coroutine (batched under Serve, direct in-process)
so tests can drive the very same app over ASGI.
"""


import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from features.backends import FeatureStoreUnavailable
from serving.auth import BearerAuth, load_tokens
from serving.body import TOO_DEEP, BodyLimit, JsonRoute, describe_non_finite
from serving.encode import compact_response, full_response
from serving.ranker import NoModelYet, Ranking, RankingService, RankQuery


def _whole_number(value: Any) -> Any:
    """JSON does not tell 7 from 7.0 (JSON Schema calls both an integer): take whole floats as ids, refuse
    fractions, non-finite numbers, strings and booleans (Python's ``True`` is an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer id")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {describe_non_finite(value)}")
        if not value.is_integer():
            raise ValueError("must be an integer id, not a fraction")
        return int(value)
    return value


MAX_ENTITY_ID = 2**53 - 1
"""Largest id the API takes: every JSON parser holds numbers up to 2**53 exactly (JavaScript's
``Number.MAX_SAFE_INTEGER``; many read every number as a double), so an id never silently changes on the
way. The event contract allows ids up to 2**62 (``stream.events.MAX_ID``); ids above 2**53 would need a
string form in the API."""
EntityId = Annotated[int, Field(ge=0, le=MAX_ENTITY_ID), BeforeValidator(_whole_number)]


def _whole_numbers(values: Any) -> Any:
    """``_whole_number`` for a whole list of ids in one call: a Python validator per element cost 0.55 us each,
    a fifth of the app's own time per request at 100 candidates. Elements left as ints are then range-checked
    by pydantic's core (``CandidateId``); anything but a list is left for the schema to refuse."""
    if not isinstance(values, list) or all(type(v) is int for v in values):
        return values
    whole = []
    for i, value in enumerate(values):
        try:
            whole.append(_whole_number(value))
        except ValueError as exc:
            raise ValueError(f"item {i} {exc}") from None
    return whole


def _finite(value: Any) -> Any:
    """Refuse ``NaN``, ``Infinity`` and overflowing numbers by name, before the union's four type errors."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {describe_non_finite(value)}")
    return value


CandidateId = Annotated[StrictInt, Field(ge=0, le=MAX_ENTITY_ID)]
ContextValue = Annotated[Annotated[StrictStr, Field(max_length=256)] | StrictInt
                         | Annotated[StrictFloat, Field(allow_inf_nan=False)] | StrictBool, BeforeValidator(_finite)]
MAX_CONTEXT_KEYS = 32

Rank = Callable[[RankQuery], Awaitable[Ranking]]


class ErrorMessage(BaseModel):
    detail: str


class ValidationErrorBody(BaseModel):
    message: str
    """The reasons in one line."""
    detail: list[dict[str, Any]]
    """Each reason: ``loc`` (where), ``msg`` (what), ``type``."""


class ScoredItem(BaseModel):
    item_id: int
    score: float
    """The fused score: ``sum_t w_t * p_t`` over the tasks (weights in ``GET /v1/model``)."""
    probabilities: dict[str, float]


class RankResponse(BaseModel):
    model_version: int
    family: str
    replica: str
    pid: int
    batch: int
    """The replica's batch sequence number; with ``replica`` it orders responses as they were scored."""
    items: list[ScoredItem]


class CompactRankResponse(BaseModel):
    """``/v1/rank`` with ``"compact": true``: the candidates best first and their fused scores, as two
    parallel lists, for callers that only sort (no per-task probabilities)."""

    model_version: int
    family: str
    replica: str
    pid: int
    batch: int
    item_ids: list[int]
    """The candidates, best first (ties in request order)."""
    scores: list[float]
    """The fused score of each of ``item_ids``, in the same order (non-increasing)."""


class ItemPrediction(BaseModel):
    item_id: int
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model_version: int
    family: str
    replica: str
    items: list[ItemPrediction]


class ModelInfo(BaseModel):
    family: str
    version: int
    tasks: list[str]
    task_weights: dict[str, float]
    event_time_hwm_ms: int | None
    """Newest event time the model has trained on (ms since the epoch)."""
    snapshot_created_at: float
    snapshot_age_s: float
    step: int | None
    examples: int | None
    offsets: dict[str, int]
    """Per source partition, the offset below which every event is covered by this snapshot."""
    rollback_of: int | None


class ItemCacheHealth(BaseModel):
    """The replica's item-feature cache (``serving.item_cache_ttl_ms``), since the replica started."""

    ttl_ms: float
    """Longest a cached item row is served after it was read from the store."""
    capacity: int
    entries: int
    """Items held and still fresh."""
    bytes: int
    hits: int
    """Distinct candidate items of a batch answered from the cache."""
    misses: int
    """Distinct candidate items of a batch read from the store."""
    hit_rate: float | None
    """``hits / (hits + misses)``; None before the first batch."""
    oldest_entry_age_ms: float
    """Age of the oldest fresh entry now."""
    max_staleness_served_ms: float
    """The oldest row ever served from the cache: how long after its read (at most ``ttl_ms``)."""


class Health(BaseModel):
    ok: bool
    """Ready: a model is served. False (with status 503) before the first snapshot is."""
    reason: str | None
    """Why the replica is not ready; None when it is."""
    model_version: int | None
    swaps: int
    rejected_versions: list[int]
    batches: int
    pid: int
    replica: str
    item_cache: ItemCacheHealth | None
    """None when the cache is off (``serving.item_cache_ttl_ms: 0``)."""


def request_models(max_candidates: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """The two request bodies, with the configured cap on candidates in their schema."""

    def distinct(values: list[int]) -> list[int]:
        if len(set(values)) == len(values):
            return values
        ids, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"must be distinct; repeated: {ids[counts > 1][:10].tolist()}")
        return values

    Candidates = Annotated[list[CandidateId], Field(min_length=1, max_length=max_candidates,
                                                     json_schema_extra={"uniqueItems": True}),
                           BeforeValidator(_whole_numbers)]

    class RankRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: EntityId
        candidates: Candidates
        context: Annotated[dict[Annotated[str, Field(max_length=64)], ContextValue] | None,
                           Field(max_length=MAX_CONTEXT_KEYS)] = None
        """Request context (surface, device, ...); accepted and validated, not yet a model input."""
        compact: StrictBool = False
        """Answer with the candidates best first and their scores only (``CompactRankResponse``), without the
        per-task probabilities: a smaller response, cheaper to encode, for callers that only sort."""

        _distinct = field_validator("candidates")(distinct)

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: EntityId
        item_ids: Candidates

        _distinct = field_validator("item_ids")(distinct)

    return RankRequest, PredictRequest


def _json(body: dict) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _summary(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        if e["type"] == "json_invalid" and e["msg"] == TOO_DEEP:
            parts.append(f"body {TOO_DEEP}")
            continue
        if e["type"] == "json_invalid":
            parts.append(f"body is not valid JSON (error at character {e['loc'][-1]}: {e['msg']})")
            continue
        where = ".".join(str(p) for p in e["loc"][1:]) or "body"
        parts.append(f"{where}: {e['msg']}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "The body is not text (UTF-8) or its Content-Length is not a number."},
    401: {"model": ErrorMessage, "description": "API tokens are configured and the request has no valid bearer token."},
    413: {"model": ErrorMessage, "description": "The request body is larger than the configured limit."},
    415: {"model": ErrorMessage, "description": "The body's Content-Type is not application/json."},
    422: {"model": ValidationErrorBody, "description": "The body is not valid JSON or does not match the schema."},
    503: {"model": ErrorMessage, "description": "No model snapshot is served yet."},
}


def build_api(service: RankingService, rank: Rank, replica: str) -> FastAPI:
    """The FastAPI app of one replica: ``rank`` scores one query (Serve batches it with others)."""
    config, pid = service.config, os.getpid()
    RankRequest, PredictRequest = request_models(config.max_candidates)
    tokens = load_tokens(config.api_tokens_file)  # before serving anything: a bad token source stops the replica
    app = FastAPIOffline(
        title="moestream ranking",
        version="1.0.0",
        description="Ranks candidate items for a user with the newest verified snapshot of a multi-task model.",
    )
    app.router.route_class = JsonRoute
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if tokens:
        app.add_middleware(BearerAuth, digests=tokens)  # added last: runs first, before the body is read

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"type": e["type"], "loc": list(e["loc"]),
                   "msg": e.get("ctx", {}).get("error", e["msg"]) if e["type"] == "json_invalid" else e["msg"]}
                  for e in exc.errors()]
        return JSONResponse({"message": _summary(errors), "detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # not UTF-8 text
            return JSONResponse({"detail": "the body could not be read: JSON text in UTF-8 expected"}, status_code=400)
        return await http_exception_handler(request, exc)

    @app.exception_handler(NoModelYet)
    async def no_model(_: Request, exc: NoModelYet) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(FeatureStoreUnavailable)
    async def no_features(_: Request, exc: FeatureStoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.post("/v1/rank", response_model=RankResponse | CompactRankResponse, responses=ERRORS,
              summary="Rank candidates for a user",
              description="The candidates best first with their fused scores and per-task probabilities "
                          "(`RankResponse`), or with `\"compact\": true` their ids and scores only, as two "
                          "parallel lists (`CompactRankResponse`).")
    async def rank_candidates(request: RankRequest) -> Response:  # type: ignore[valid-type]
        started = time.perf_counter()
        ranking = await rank(RankQuery(request.user_id, np.asarray(request.candidates, dtype=np.int64)))
        encode = compact_response if request.compact else full_response
        response = Response(encode(ranking, replica, pid), media_type="application/json")
        service.metrics.observe_request("/v1/rank", time.perf_counter() - started)
        return response

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Per-task probabilities of items, in request order (the skeleton's call)")
    async def predict(request: PredictRequest) -> Response:  # type: ignore[valid-type]
        started = time.perf_counter()
        ranking = await rank(RankQuery(request.user_id, np.asarray(request.item_ids, dtype=np.int64)))
        items = [{"item_id": i, "probabilities": dict(zip(ranking.tasks, p))}
                 for i, p in zip(ranking.items.tolist(), ranking.probabilities.tolist())]
        response = _json({"model_version": ranking.version, "family": ranking.family, "replica": replica,
                          "items": items})
        service.metrics.observe_request("/predict", time.perf_counter() - started)
        return response

    @app.get("/v1/model", response_model=ModelInfo, responses={503: ERRORS[503]}, summary="The model being served")
    async def model() -> dict:
        return service.model_info()

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "Not ready: no model "
             "is served yet (``reason`` says why)."}}, summary="Readiness and the served version")
    async def healthz() -> Response:
        health = {**service.health(), "replica": replica}
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    return app


def unbatched(service: RankingService) -> Rank:
    """Score each query on its own, off the event loop: the in-process (ASGI) counterpart of the Serve
    deployment's ``@serve.batch`` method, which needs a Serve replica around it."""

    async def rank(query: RankQuery) -> Ranking:
        return (await asyncio.to_thread(service.score, [query]))[0]

    return rank


__all__ = ["BodyLimit", "CompactRankResponse", "ModelInfo", "RankResponse", "build_api", "request_models", "unbatched"]
