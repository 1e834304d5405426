"""Ray metrics of a ranking replica (exported by Ray's metrics agent, Prometheus format).

Inside a Serve replica every metric is tagged with the deployment, replica and application; outside Ray
(in-process tests) recording is a no-op. Serve adds its own per-request and ``@serve.batch`` metrics
(``serve_deployment_processing_latency_ms``, ``serve_actual_batch_size``, ...); these are the ranking ones.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 15, 20, 25, 35, 50, 75, 100, 150, 250, 500, 1000]
BATCH_REQUEST_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
BATCH_CANDIDATE_BOUNDARIES = [10, 50, 100, 250, 500, 1000, 2000, 4000, 8000]
STALENESS_BOUNDARIES_MS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


class ServingMetrics:
    def __init__(self) -> None:
        self.latency_ms = Histogram(
            "moestream_rank_latency_ms", description="Time in the replica per ranking request, parse to response.",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",),
        )
        self.batch_requests = Histogram(
            "moestream_rank_batch_requests", description="Requests scored together in one batch.",
            boundaries=BATCH_REQUEST_BOUNDARIES,
        )
        self.batch_candidates = Histogram(
            "moestream_rank_batch_candidates", description="Candidates scored together in one batch.",
            boundaries=BATCH_CANDIDATE_BOUNDARIES,
        )
        self.cache_hits = Counter("moestream_item_cache_hits", description="Candidate items read from the replica's "
                                  "item cache (each distinct item of a batch counts once).")
        self.cache_misses = Counter("moestream_item_cache_misses", description="Candidate items read from the online "
                                    "store because the item cache did not hold them fresh.")
        self.cache_staleness_ms = Histogram(
            "moestream_item_cache_staleness_ms", description="Per batch with cache hits, the age of the oldest item "
            "row served from the cache (at most serving.item_cache_ttl_ms).", boundaries=STALENESS_BOUNDARIES_MS,
        )
        self.cache_entries = Gauge("moestream_item_cache_entries",
                                   description="Items in the replica's item cache, fresh or not yet replaced.")
        self.model_version = Gauge("moestream_model_version", description="Snapshot version this replica serves.")
        self.swaps = Counter("moestream_model_swaps", description="Snapshots swapped in by this replica.")
        self.rejected = Gauge("moestream_snapshots_rejected",
                              description="Snapshots this replica refused (failed sha256 or finiteness).")

    def observe_cache(self, hits: int, misses: int, staleness_ms: float | None, entries: int | None = None) -> None:
        """One batch's item-cache lookup: its hits and misses, the oldest row it served from the cache."""
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)
        if staleness_ms is not None:
            self.cache_staleness_ms.observe(staleness_ms)
        if entries is not None:
            self.cache_entries.set(entries)

    def observe_request(self, route: str, seconds: float) -> None:
        self.latency_ms.observe(seconds * 1000.0, tags={"route": route})

    def observe_batch(self, requests: int, candidates: int, rejected: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_candidates.observe(candidates)
        self.rejected.set(rejected)

    def swapped(self, version: int) -> None:
        self.model_version.set(version)
        self.swaps.inc()


__all__ = ["ServingMetrics"]
