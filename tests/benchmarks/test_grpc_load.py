"""The serving benchmark's gRPC load generator against a real grpc.aio server on loopback that serves
``moestream.v1.Ranking`` as Serve's proxy registers it: calls answered OK are timed, refused ones counted."""

from __future__ import annotations

import asyncio

import grpc

from benchmarks.grpc_load import closed_loop_grpc
from serving.grpc_service import add_ranking_servicer
from serving.proto import ranking_pb2 as pb


class Ranking:
    """Answers every request, except that a user id of 13 is refused; records what it was sent."""

    def __init__(self) -> None:
        self.users: list[int] = []
        self.metadata: list[dict] = []

    async def Rank(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.RankResponse:  # noqa: N802
        request = pb.RankRequest.FromString(raw)  # bytes: the servicer function leaves parsing to the replica
        self.users.append(request.user_id)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.user_id == 13:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unlucky")
        return pb.RankResponse(model_version=1, items=[pb.ScoredItem(item_id=i) for i in request.candidates])

    async def Health(self, raw: bytes, context) -> pb.HealthResponse:  # noqa: N802
        return pb.HealthResponse(ok=True)


def test_calls_are_timed_and_refusals_counted() -> None:
    payloads = [pb.RankRequest(user_id=u, candidates=[1, 2, 3]).SerializeToString() for u in (1, 2, 13, 4)]
    servicer = Ranking()

    async def run():
        server = grpc.aio.server()
        add_ranking_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await closed_loop_grpc(f"127.0.0.1:{port}", payloads, concurrency=4, seconds=0.5, warmup_s=0.1,
                                          metadata=(("application", "ranker"),))
        finally:
            await server.stop(None)

    sample = asyncio.run(run())
    assert sample.latencies_s and sample.errors > 0
    # Four workers, each cycling from its own start with a stride of four: one of them always sends user 13.
    assert set(servicer.users) == {1, 2, 13, 4}
    assert sample.errors <= servicer.users.count(13) and len(sample.latencies_s) <= len(servicer.users) - sample.errors
    assert all(m.get("application") == "ranker" for m in servicer.metadata)
    assert sample.rate == len(sample.latencies_s) / sample.seconds
