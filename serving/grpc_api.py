"""The ranking service over gRPC (``moestream.v1.Ranking``, ``serving/proto/ranking.proto``), beside the HTTP API.

Ray Serve's gRPC proxy calls the ranking deployment's ``Rank`` and ``Health`` methods, which hand the request
to :class:`RankingGrpc`: the same replicas, the same ``@serve.batch`` scoring and the same hot-swapped model
as ``POST /v1/rank``, so an HTTP and a gRPC request batch together and report the same version.

The HTTP API's rules hold here with the same words. A request is checked by the very pydantic model that
checks ``POST /v1/rank`` (``serving.api.request_models``), and refused with the text HTTP puts in its 422
``message``; the status codes are gRPC's for the same cases:

============================================================  ============  ===================
case                                                          HTTP          gRPC
============================================================  ============  ===================
no or wrong bearer token (``authorization`` metadata)          401           UNAUTHENTICATED
request larger than ``serving.max_body_bytes``                 413           RESOURCE_EXHAUSTED
bytes that are not a ``RankRequest``; a field of the wrong     400, 422      INVALID_ARGUMENT
wire type or one the server does not know (as HTTP refuses
unknown keys); ids out of range; no, too many or repeated
candidates; task weights of unknown tasks, not finite, or
beyond +-1e6
no model served yet; feature store unreachable                 503           UNAVAILABLE
============================================================  ============  ===================

Requests reach the replica as bytes and are parsed here, not in the proxy (``serving.grpc_service`` says
why). Errors are set on Serve's gRPC context and returned with an empty message: raising would log a
traceback in the proxy for every bad request.

gRPC adds one thing HTTP has not: ``task_weights``, per-request fused-score weights over the configured ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any, Literal

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from pydantic import BaseModel, Field, StrictBool, StrictFloat, ValidationError, field_validator

from features.backends import FeatureStoreUnavailable
from serving.api import Rank, _summary, request_models
from serving.auth import token_matches
from serving.encode import rank_message
from serving.proto import ranking_pb2 as pb
from serving.ranker import NoModelYet, Ranking, RankingService, RankQuery
from stream.events import TASKS

RANK_ROUTE = "/moestream.v1.Ranking/Rank"
"""The ``route`` of gRPC ranking calls in the request-latency metric, beside ``/v1/rank``."""
TaskName = Literal[TASKS]  # type: ignore[valid-type]
MAX_TASK_WEIGHT = 1e6
"""Largest weight (in magnitude) a request may give a task: fused scores are float32, and a weight of 1e39 or a
few of 1e38 would make them infinite (Hypothesis found it); a million times a probability is still exact enough
to order by."""
Weight = Annotated[StrictFloat, Field(allow_inf_nan=False, ge=-MAX_TASK_WEIGHT, le=MAX_TASK_WEIGHT)]


def grpc_request_model(max_candidates: int, configured: Mapping[str, float]) -> type[BaseModel]:
    """HTTP's ``RankRequest`` (its ids, its candidates, its messages) plus the fields only gRPC has."""
    HttpRankRequest, _ = request_models(max_candidates)

    class GrpcRankRequest(HttpRankRequest):  # type: ignore[valid-type,misc]
        task_weights: dict[TaskName, Weight] = {}
        compact: StrictBool = False

        @field_validator("task_weights")
        @classmethod
        def _some_weight(cls, weights: dict[str, float]) -> dict[str, float]:
            if weights and not any({**configured, **weights}.values()):
                raise ValueError("would leave every task a weight of 0; some task must count")
            return weights

    return GrpcRankRequest


class Refusal(Exception):
    """A request answered with a gRPC status other than OK, and why (the status details)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details

    def answer(self, context, empty):
        """Set the status on Serve's gRPC context; the proxy sends it, not ``empty``."""
        context.set_code(self.code)
        context.set_details(self.details)
        return empty


class RankingGrpc:
    """One replica's ``moestream.v1.Ranking``: ``rank`` scores one query, as for the HTTP API."""

    def __init__(self, service: RankingService, rank: Rank, replica: str, tokens: tuple[bytes, ...] = ()) -> None:
        self.service, self.rank_query, self.replica, self.tokens = service, rank, replica, tokens
        self.config = service.config
        self.request_model = grpc_request_model(self.config.max_candidates, self.config.task_weights)

    async def rank(self, raw: bytes, context) -> pb.RankResponse:
        """``Rank``: the candidates best first, or an empty message with the status set on ``context``."""
        started = time.perf_counter()
        try:
            request = self._read(raw, context)
            ranking = await self.rank_query(RankQuery(request.user_id, np.asarray(request.candidates, dtype=np.int64)))
        except Refusal as refusal:
            return refusal.answer(context, pb.RankResponse())
        except (NoModelYet, FeatureStoreUnavailable) as exc:
            return Refusal(grpc.StatusCode.UNAVAILABLE, str(exc)).answer(context, pb.RankResponse())
        if request.task_weights:
            ranking = reweighted(ranking, {**self.config.task_weights, **request.task_weights})
        response = rank_message(ranking, self.replica, request.compact)
        self.service.metrics.observe_request(RANK_ROUTE, time.perf_counter() - started)
        return response

    def _read(self, raw: bytes, context) -> Any:  # a GrpcRankRequest, a class built per configured cap
        """The request, checked as HTTP checks it: token, size, then the fields; raises :class:`Refusal`."""
        if self.tokens:
            header = dict(context.invocation_metadata()).get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                              "this API needs a bearer token: send the metadata `authorization: Bearer <token>`")
            if not token_matches(token.strip().encode(), self.tokens):
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid for this API")
        if len(raw) > self.config.max_body_bytes:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"request message of {len(raw)} bytes exceeds the limit of {self.config.max_body_bytes}")
        try:
            message = pb.RankRequest.FromString(raw)
        except DecodeError:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          "the request is not a valid moestream.v1.RankRequest message") from None
        unknown = sorted({field.field_number for field in UnknownFieldSet(message)})
        if unknown:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"field(s) {unknown} of the request are not fields of moestream.v1.RankRequest, or were sent "
                          "with the wrong wire type (a mistyped field would otherwise read as 0)")
        try:
            return self.request_model.model_validate(
                {"user_id": message.user_id, "candidates": list(message.candidates),
                 "task_weights": dict(message.task_weights), "compact": message.compact})
        except ValidationError as exc:
            errors = [{"type": e["type"], "loc": ["request", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, _summary(errors)) from None

    async def health(self, raw: bytes, context) -> pb.HealthResponse:
        """``Health``: always open, as ``/healthz`` is; UNAVAILABLE with the reason before the first model."""
        health = self.service.health()
        if not health["ok"]:
            return Refusal(grpc.StatusCode.UNAVAILABLE, health["reason"]).answer(context, pb.HealthResponse())
        return pb.HealthResponse(ok=True, model_version=health["model_version"], swaps=health["swaps"],
                                 rejected_versions=health["rejected_versions"], batches=health["batches"],
                                 pid=os.getpid(), replica=self.replica)


def reweighted(ranking: Ranking, weights: Mapping[str, float]) -> Ranking:
    """``ranking`` with its fused scores recomputed from its probabilities under ``weights`` (a task left out
    weighs 0), as ``RankingService.score`` fuses them."""
    w = np.asarray([float(weights.get(t, 0.0)) for t in ranking.tasks], dtype=np.float32)  # (T,)
    return replace(ranking, scores=(ranking.probabilities @ w).astype(np.float32))  # (n,)


__all__ = ["MAX_TASK_WEIGHT", "RANK_ROUTE", "RankingGrpc", "Refusal", "grpc_request_model", "reweighted"]
