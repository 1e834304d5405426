"""A closed-loop gRPC load generator: ``benchmarks.http_load``'s loop over one HTTP/2 channel.

Each worker sends its next ``Rank`` when the previous answer has arrived, so ``concurrency`` calls are in flight
at all times and the latency of each is recorded. Requests are serialized before the run and responses are
received as bytes, not parsed, as the HTTP client sends prepared bytes and reads bodies by their framing: the
client spends its CPU on the calls alone. All workers share one channel (one HTTP/2 connection, calls
multiplexed on it), as a gRPC client normally does.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from benchmarks.http_load import REQUEST_TIMEOUT_S, Sample, Tally

RANK = "/moestream.v1.Ranking/Rank"


async def closed_loop_grpc(target: str, payloads: list[bytes], concurrency: int, seconds: float, warmup_s: float,
                           metadata: tuple[tuple[str, str], ...] = ()) -> Sample:
    """``concurrency`` workers each call ``Rank`` at ``target`` (``host:port``) one call after the other for
    ``seconds`` (after a warm-up), cycling through the serialized ``payloads`` (worker ``k`` starts at
    ``payloads[k]``). A call that ends in a status other than OK, or takes over 30 s, counts as an error."""
    async with grpc.aio.insecure_channel(target) as channel:
        rank = channel.unary_unary(RANK)  # bytes in, bytes out
        await asyncio.wait_for(channel.channel_ready(), REQUEST_TIMEOUT_S)
        tally = Tally(warmup_s, seconds)

        async def worker(k: int) -> None:
            i = k
            while (now := time.perf_counter()) < tally.stop_at:
                raw = payloads[i % len(payloads)]
                i += concurrency
                try:
                    await rank(raw, metadata=metadata, timeout=REQUEST_TIMEOUT_S)
                    ok = True
                except grpc.RpcError:
                    ok = False
                tally.record(now, ok)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return tally.sample()


__all__ = ["closed_loop_grpc"]
