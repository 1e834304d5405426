"""Where a ranking request's time goes inside a replica, stage by stage (``python -m benchmarks.serving_profile``).

The in-process half of ``docs/serving.md``'s profile: the same store and model as ``bench serving``
(``benchmarks.serving.prepare``: a Feast SQLite store with aggregates of simulator traffic, the learner's default
MMoE) and the same request bodies, each stage's CPU time (``time.thread_time``) summed over many requests, one thread,
no HTTP: the body's parsing and validation (the app's pydantic model), the feature lookup (the SQLite read, the
decoding of its blobs, the rest), the forward pass, and the response's encoding, full and compact. What HTTP
costs (client, proxy, Serve's replica plumbing) is measured by ``bench serving``'s echo anchor, not here.

A batch of ``k`` requests is scored as ``@serve.batch`` would score it. With the item cache on, the cache's clock
is advanced by ``1 / rate`` per request, as a replica answering ``rate`` requests a second would see it, so the
hit rate is that of such a replica (a loop as fast as it can go would see every item hit).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from serving.encode import compact_response, full_response

CLOCK = time.thread_time
"""CPU time of this thread: the machine may be busy with other work, and a stage's CPU is what it costs the
replica (one thread scores, and torch runs on one intra-op thread here)."""
WARMUP = 8
STAGES = ("parse + validate", "lookup: store read", "lookup: decode + assemble", "forward", "encode: full",
          "encode: compact")


def profile(n_candidates: int = 1000, batch_requests: tuple[int, ...] = (1, 4), rate: float = 150.0,
            ttl_ms: tuple[float, ...] = (0.0, 500.0), batches: int = 60, quick: bool = False) -> list[dict]:
    from benchmarks.serving import TRAFFIC, TRAFFIC_QUICK, bodies, prepare
    from serving.api import request_models
    from serving.app import set_threads
    from serving.config import ServingConfig
    from serving.ranker import RankingService, RankQuery

    set_threads(1)  # a replica's one CPU
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        features, snapshots = prepare(Path(tmp), n_events=TRAFFIC_QUICK if quick else TRAFFIC)
        RankRequest, _ = request_models(ServingConfig().max_candidates)
        for ttl in ttl_ms:
            service = RankingService(snapshots, features, ServingConfig(item_cache_ttl_ms=ttl, poll_s=3600.0))
            deadline = time.monotonic() + 30
            while service.weights.current is None and time.monotonic() < deadline:
                time.sleep(0.05)
            gc.collect()
            gc.freeze()  # as Serve does once a replica has started (RAY_SERVE_FREEZE_GC_ON_STARTUP): without it a full
            # collection scans every module's objects, and the encoding's containers set one off every few hundred requests
            clock = [time.monotonic_ns()]  # advanced by 1/rate per request
            if service.item_cache is not None:
                service.item_cache.clock_ns = lambda: clock[0]
            store, timer = service.features, _Timer()
            store.rows.read = timer.wrap("lookup: store read", store.rows.read)
            store.lookup_batch = timer.wrap("lookup", store.lookup_batch)
            for k in batch_requests:
                payloads = bodies(n_candidates, (batches + WARMUP) * k, seed=n_candidates + k)
                for b in range(batches + WARMUP):  # the first batches warm up (and fill the cache)
                    if b == WARMUP:
                        timer.reset()
                        counted = _counts(service)
                    chunk = payloads[b * k : (b + 1) * k]
                    t0 = CLOCK()
                    requests = [RankRequest.model_validate(orjson.loads(p)) for p in chunk]
                    queries = [RankQuery(r.user_id, np.asarray(r.candidates, dtype=np.int64)) for r in requests]
                    t1 = CLOCK()
                    clock[0] += int(k * 1e9 / rate)
                    rankings = service.score(queries)
                    t2 = CLOCK()
                    timer.add("parse + validate", t1 - t0)
                    timer.add("score", t2 - t1)
                    for ranking in rankings:
                        timer.add("encode: full", _time(lambda: _full(ranking)))
                        timer.add("encode: compact", _time(lambda: _compact(ranking)))
                hits, misses = np.subtract(_counts(service), counted)
                ms = {stage: seconds / (batches * k) * 1000 for stage, seconds in timer.total.items()}
                results.append({
                    "ttl_ms": ttl, "requests_per_batch": k, "candidates": n_candidates,
                    "hit_rate": float(hits / (hits + misses)) if hits + misses else None,
                    "parse + validate": ms["parse + validate"],
                    "lookup: store read": ms["lookup: store read"],
                    "lookup: decode + assemble": ms["lookup"] - ms["lookup: store read"],
                    "forward": ms["score"] - ms["lookup"],
                    "encode: full": ms["encode: full"],
                    "encode: compact": ms["encode: compact"],
                })
            service.close()
            gc.unfreeze()  # this service's objects may go
    return results


class _Timer:
    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def reset(self) -> None:
        self.total = {}

    def add(self, stage: str, seconds: float) -> None:
        self.total[stage] = self.total.get(stage, 0.0) + seconds

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            started = CLOCK()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, CLOCK() - started)

        return timed


def _counts(service) -> tuple[int, int]:
    cache = service.item_cache
    return (cache.hits, cache.misses) if cache is not None else (0, 0)


def _time(fn) -> float:
    started = CLOCK()
    fn()
    return CLOCK() - started


def _full(ranking) -> bytes:
    return full_response(ranking, "r", 1)


def _compact(ranking) -> bytes:
    return compact_response(ranking, "r", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=150.0, help="requests/s a replica answers (the cache's clock)")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="the quick run's smaller store")
    args = parser.parse_args()
    rows = profile(args.candidates, rate=args.rate, batches=args.batches, quick=args.quick)
    header = ["cache TTL", "requests/batch", "hit rate", *STAGES, "total (full)", "total (compact)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        core = sum(row[s] for s in STAGES[:4])
        cells = [f"{row['ttl_ms']:g} ms", str(row["requests_per_batch"]),
                 "-" if row["hit_rate"] is None else f"{row['hit_rate']:.0%}",
                 *(f"{row[s]:.2f}" for s in STAGES), f"{core + row['encode: full']:.2f}",
                 f"{core + row['encode: compact']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(orjson.dumps(rows).decode())


if __name__ == "__main__":
    main()


__all__ = ["profile"]
