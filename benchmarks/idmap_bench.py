"""ID-map throughput and footprint: training lookups (lookup + insert) of Zipf-distributed batches.

``measure`` fills a collisionless ``learner.idmap.IdMap`` with ``n_live`` random 63-bit IDs, then times
training lookups of batches drawn Zipf-like (exponent 1.1) over those IDs, 1% of each batch brand-new IDs
so that every call also inserts. The capacity holds every ID, as in ``moestream bench embeddings``; the
memory figure is the map's bytes per row of that capacity, i.e. per live ID once the table is full.
Run as a script for the figures at 10^5, 10^6 and 10^7 live IDs.
"""

from __future__ import annotations

import time

import numpy as np

from learner.idmap import IdMap, IdMapConfig

NEW_FRACTION = 0.01
FILL_CHUNK = 1 << 16
ZIPF_EXPONENT = 1.1
DISTINCT_BATCHES = 64
MAX_RATE = 10e6
"""IDs/s the pool of new IDs is sized for: beyond it, late calls find their "new" IDs already admitted."""


def measure(n_live: int, batch: int, seconds: float, seed: int = 0) -> dict:
    """IDs per second for training lookups, and the map's bytes per live ID at full capacity."""
    rng = np.random.default_rng(seed)
    n_new = max(1, int(batch * NEW_FRACTION))
    max_calls = int(seconds * MAX_RATE / batch) + DISTINCT_BATCHES
    fresh_ids = rng.integers(0, 2**63 - 1, (max_calls, n_new), dtype=np.int64)
    capacity = n_live + fresh_ids.size
    idmap = IdMap(IdMapConfig(capacity=capacity))
    universe = rng.integers(0, 2**63 - 1, n_live, dtype=np.int64)
    start = time.perf_counter()
    for i in range(0, n_live, FILL_CHUNK):
        idmap.rows(universe[i:i + FILL_CHUNK], 0)
    fill_s = time.perf_counter() - start
    ranks = np.minimum(rng.zipf(ZIPF_EXPONENT, (DISTINCT_BATCHES, batch - n_new)), n_live) - 1
    batches = [np.concatenate([universe[ranks[i % DISTINCT_BATCHES]], fresh_ids[i]]) for i in range(max_calls)]
    calls = 0
    start = time.perf_counter()
    while ((elapsed := time.perf_counter() - start) < seconds or calls < DISTINCT_BATCHES) and calls < max_calls:
        idmap.rows(batches[calls], 1 + calls)
        calls += 1
    stats = idmap.stats()
    return {"n_live": n_live, "batch": batch, "ids_per_s": calls * batch / elapsed, "calls": calls,
            "fill_ids_per_s": n_live / fill_s, "bytes_per_live_id": idmap.nbytes / capacity,
            "capacity": capacity, "live": stats["live"], "collisions": stats["collisions"]}


def main() -> None:
    for n_live in (10**5, 10**6, 10**7):
        for batch in (1024, 4096, 8192):
            r = measure(n_live, batch, seconds=3.0)
            print(f"{n_live:>10,} live  batch {batch:>5}: {r['ids_per_s'] / 1e6:5.2f} M IDs/s lookup+insert, "
                  f"{r['bytes_per_live_id']:5.1f} B/live ID (map), fill {r['fill_ids_per_s'] / 1e6:4.2f} M IDs/s, "
                  f"collisions {r['collisions']}", flush=True)


if __name__ == "__main__":
    main()
