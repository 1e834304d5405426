"""``moestream bench features``: batch lookup latency and push throughput on SQLite and Redis, beside Feast.

Per online store (SQLite file; a real redis-server on loopback, started for the run):

- push: ``StreamAggregator`` rows of simulator traffic pushed in batches of 1024 events with
  ``PushMode.ONLINE_AND_OFFLINE`` (entity rows/s, the offline Parquet append included);
- lookup: ``OnlineFeatures.lookup`` of a 1024-pair batch of simulator traffic (p50 and p99);
- the anchor: Feast's own ``get_online_features`` called once per (user, item) pair, every view of the repo
  requested, timed on a sample of pairs and scaled to 1024;
- capacity: pairs/s one reader sustains at the p50 latency, against the 20k events/s the pipeline must take.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.progress import Progress

from benchmarks.harness import Report, Row
from features.aggregates import StreamAggregator
from features.definitions import ENTITY_KEYS, STATIC_VIEWS, STREAM_VIEWS
from features.store import FeatureStoreConfig, OnlineFeatures
from stream.events import EXAMPLE_SCHEMA, LABELS, TASKS
from stream.simulator import Simulator, SimulatorConfig

BATCH = 1024
GOAL_P50_MS = 25.0
DEMAND_EVENTS_PER_S = 20_000


@contextlib.contextmanager
def _redis(root: Path) -> Iterator[str]:
    from infra.redis_server import RedisServerConfig, running

    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with running(RedisServerConfig(port=port, data_dir=root / "redis")) as server:
        yield server.connection_string


def _traffic(n_events: int) -> pa.Table:
    """Joined examples shaped like simulator traffic: impressions with random labels, Zipf-like users."""
    sim = Simulator(SimulatorConfig(seed=3))
    rng = np.random.default_rng(3)
    impressions = [e for e in sim.events(1_700_000_000_000, n_events // 4 + 1) if e["type"] == "impression"][:n_events]
    n = len(impressions)
    cols = {
        "request_id": [e["request_id"] for e in impressions],
        "user_id": [e["user_id"] for e in impressions],
        "item_id": [e["item_id"] for e in impressions],
        "ts_ms": [e["ts_ms"] for e in impressions],
        **{t: (rng.random(n) < 0.3).astype(np.float32) for t in TASKS},
        "play_time": rng.gamma(2.0, 3000.0, n).astype(np.float32),
        "partition": np.zeros(n, np.int32),
        "offset": np.arange(n),
        "is_correction": np.zeros(n, bool),
    }
    assert set(LABELS) <= set(cols)
    return pa.Table.from_pydict(cols, schema=EXAMPLE_SCHEMA)


def _measure(store: OnlineFeatures, traffic: pa.Table, reps: int, anchor_pairs: int, progress, task) -> dict:
    agg = StreamAggregator()
    rows, start = 0, time.perf_counter()
    for offset in range(0, traffic.num_rows, BATCH):
        users, items = agg.update(traffic.slice(offset, BATCH))
        store.push(users, items)
        rows += len(users) + len(items)
    push_rate = rows / (time.perf_counter() - start)
    progress.advance(task)

    last = traffic.slice(traffic.num_rows - BATCH, BATCH)
    user_ids = last.column("user_id").to_numpy()
    item_ids = last.column("item_id").to_numpy()
    store.lookup(user_ids, item_ids)  # warm the connection
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        store.lookup(user_ids, item_ids)
        times.append(time.perf_counter() - t)
    progress.advance(task)

    refs = [f"{STREAM_VIEWS[k]}:stats" for k in ENTITY_KEYS]
    refs += [f"{STATIC_VIEWS[k]}:{f}" for k in ENTITY_KEYS for f in ("dense", "cats")]
    t = time.perf_counter()
    for u, i in zip(user_ids[:anchor_pairs].tolist(), item_ids[:anchor_pairs].tolist()):
        store.store.get_online_features(features=refs, entity_rows=[{"user_id": u, "item_id": i}],
                                         full_feature_names=True).to_dict()
    naive_ms = (time.perf_counter() - t) / anchor_pairs * BATCH * 1000
    progress.advance(task)
    ms = np.asarray(times) * 1000
    return {"push": push_rate, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "naive": naive_ms, "users": len(np.unique(user_ids)), "items": len(np.unique(item_ids))}


def run(quick: bool = False) -> Report:
    n_events, reps, anchor_pairs = (8 * BATCH, 30, 64) if quick else (48 * BATCH, 200, 256)
    report = Report("features")
    traffic = _traffic(n_events)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp, Progress(transient=True) as progress:
        root = Path(tmp)
        task = progress.add_task("features benchmark", total=6)
        results["sqlite"] = _measure(OnlineFeatures(FeatureStoreConfig(data_dir=root / "sqlite")), traffic,
                                     reps, anchor_pairs, progress, task)
        with _redis(root) as connection:
            config = FeatureStoreConfig(data_dir=root / "redis-repo", online_store="redis", redis_connection=connection)
            results["redis"] = _measure(OnlineFeatures(config), traffic, reps, anchor_pairs, progress, task)

    anchor = "Feast get_online_features, one call per pair"
    for name, r in results.items():
        goal = f"<= {GOAL_P50_MS:g} ms" if name == "redis" else None
        report.add(Row(f"{name}: lookup {BATCH} pairs p50", r["p50"], "ms", anchor=anchor, anchor_value=r["naive"],
                       goal=goal, met=(r["p50"] <= GOAL_P50_MS) if goal else None))
        report.add(Row(f"{name}: lookup {BATCH} pairs p99", r["p99"], "ms", anchor=anchor, anchor_value=r["naive"]))
        capacity = BATCH / (r["p50"] / 1000)
        report.add(Row(f"{name}: lookup capacity (one reader)", capacity, "pairs/s", anchor="pipeline demand",
                       anchor_value=DEMAND_EVENTS_PER_S, goal=f">= {DEMAND_EVENTS_PER_S:,} pairs/s",
                       met=capacity >= DEMAND_EVENTS_PER_S))
        report.add(Row(f"{name}: push (online + offline)", r["push"], "rows/s"))
    r = results["redis"]
    report.notes.append(f"{n_events:,} simulator impressions with random labels pushed in batches of {BATCH}; the "
                        f"looked-up batch holds {r['users']} distinct users and {r['items']} distinct items; "
                        f"{reps} timed lookups; the anchor timed on {anchor_pairs} pairs and scaled to {BATCH}")
    report.notes.append("ratio = value / anchor: below 1 is faster than Feast's per-row calls (lookup rows); "
                        "above 1 is spare capacity over the demand (capacity rows)")
    return report
