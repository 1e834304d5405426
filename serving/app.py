"""The ranking service as a Ray Serve deployment: replicas from ``ServingConfig``, batching across callers.

Each replica builds its FastAPI app (``serving.api``) around a ``@serve.batch`` method that gathers
concurrent requests for up to ``batch_wait_timeout_s`` (or until their candidates would exceed
``max_batch_candidates``) and scores them together. Scoring runs on the replica's user-code event loop, not on a
worker thread: handing each batch to one cost a thread hop and GIL hand-overs per batch, 12% fewer
requests/s at concurrency 8 on the 2-core machine (``docs/serving.md``). That loop is the replica's main
loop, beside its HTTP server, unless ``ServingConfig.user_code_thread`` asks for Ray Serve's default, a
thread of its own (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD``). Weights come from the snapshot directory through
:class:`serving.weights.WeightFollower`: new snapshots are swapped in without redeploying (redeploying would
restart replicas). Serve's gRPC proxy calls ``Rank`` and ``Health`` (``moestream.v1.Ranking``,
``serving.grpc_api``) on the same replicas: gRPC requests join the same batches and see the same swaps.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from features.store import FeatureStoreConfig
from learner.allocator import retain_freed_memory
from serving.api import build_api
from serving.auth import load_tokens
from serving.config import ServingConfig
from serving.grpc_api import RankingGrpc
from serving.proto.ranking_pb2 import HealthResponse, RankResponse
from serving.ranker import Ranking, RankingService, RankQuery, candidates_of


def set_threads(n: int) -> None:
    """Intra-op threads for this replica's CPUs; one inter-op thread (a batch is one forward pass)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; then it stays as it was
        pass


class _CandidatesAreNotRequests(logging.Filter):
    """``@serve.batch`` warns when ``max_batch_size`` exceeds ``max_ongoing_requests``; our batches are sized in
    candidates (``batch_size_fn``), not requests, so the comparison does not apply and the warning misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is larger than `max_ongoing_requests`" not in record.getMessage()


@serve.deployment
@serve.ingress()
class RankerDeployment:
    def __init__(self, snapshots: str, features: FeatureStoreConfig, config: ServingConfig,
                 weight_store: str | None = None) -> None:
        set_threads(config.torch_threads)
        sys.setswitchinterval(config.switch_interval_ms / 1000)  # the follower's Python beside the requests'
        retain_freed_memory()  # every batch re-allocates the same activations: keep them instead of page-faulting
        logging.getLogger("ray.serve").addFilter(_CandidatesAreNotRequests())
        self.service = RankingService(snapshots, features, config, weight_store=weight_store)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.rank_batch.set_max_batch_size(config.max_batch_candidates)
        self.rank_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.grpc = RankingGrpc(self.service, self.rank_batch, self.replica, load_tokens(config.api_tokens_file))

    def __serve_build_asgi_app__(self):
        return build_api(self.service, self.rank_batch, self.replica)

    async def Rank(self, request: bytes, grpc_context: RayServegRPCContext) -> RankResponse:  # noqa: N802
        """``moestream.v1.Ranking/Rank`` from Serve's gRPC proxy: batched with the HTTP requests."""
        return await self.grpc.rank(request, grpc_context)

    async def Health(self, request: bytes, grpc_context: RayServegRPCContext) -> HealthResponse:  # noqa: N802
        """``moestream.v1.Ranking/Health``: ``/healthz`` over gRPC."""
        return await self.grpc.health(request, grpc_context)

    @serve.batch(max_batch_size=ServingConfig.max_batch_candidates, batch_wait_timeout_s=ServingConfig.batch_wait_timeout_s,
                 batch_size_fn=candidates_of)
    async def rank_batch(self, queries: list[RankQuery]) -> list[Ranking]:
        return self.service.score(queries)  # on this loop's thread; see the module docstring

    def __del__(self) -> None:
        if hasattr(self, "service"):
            self.service.close()


def build_app(snapshots: Path | str, features: FeatureStoreConfig, config: ServingConfig = ServingConfig(),
              weight_store: str | None = None):
    """``snapshots``: the durable store (a directory, or a ``pyarrow.fs`` URI); ``weight_store``: the name of the
    run's weight-store actor, which replicas follow through Ray (``learner.weight_store``)."""
    where = str(snapshots) if "://" in str(snapshots) else str(Path(snapshots).absolute())
    return RankerDeployment.options(**config.deployment_options()).bind(where, features, config, weight_store)


__all__ = ["RankerDeployment", "build_app", "set_threads"]
