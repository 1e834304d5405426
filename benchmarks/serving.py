"""``moestream bench serving``: ranking latency and throughput over HTTP and gRPC, beside Ray Serve's own overhead.

The ranking app (``serving.app``, default ``ServingConfig``) serves a snapshot of the model the learner's defaults
train (``learner.step.build_model``: MMoE, a collisionless table per ID field, the wide part), every user and item of
the requests admitted into its ID maps, with features from a real Feast SQLite store that holds streaming aggregates
of simulator traffic, so candidates are a mix of items with aggregates and items without. A
closed-loop client (``benchmarks.http_load``, in this process) keeps ``concurrency`` requests in flight,
each ranking ``candidates`` distinct items of a 20k-item catalog for a Zipf-drawn user, and records every
latency. Beside that grid, the 1000-candidate cell at concurrency 8 (issue #24's goal: p99 <= 30 ms, >= 400k
candidates/s) is measured again with compact responses and against a second ranker with the item cache off
(``VARIANTS``), and each replica's cache hit rate and staleness (``/healthz``) go into the notes.

Anchor: an echo deployment behind the same Serve proxy, sent the same bodies at the same concurrency, that
returns the body it got (no parsing): what Ray Serve's HTTP path costs by itself on this machine. The two
alternate in short rounds so a busy neighbour hits both alike. With ``RAY_SERVE_ENABLE_HA_PROXY=1`` Serve puts
HAProxy in front instead of its Python proxy; that mode is measured the same way in a fresh Ray instance.

gRPC: the same requests, as ``moestream.v1.Ranking/Rank`` messages, through Serve's gRPC proxy to the same
replicas, at the same concurrency, in the same rounds (``benchmarks.grpc_load``); its rows are anchored on the
HTTP ranking of the same cell, so their ratio is gRPC's over HTTP's.

While deltas arrive (issue #22, ``benchmarks.serving_deltas``): the goal's cell (100 candidates, concurrency 8) again,
in a Ray instance of its own, on replicas of a model with 10^7 live IDs (10^5 quick) in tables of dim 32, with and
without a publisher writing a delta every half second into their store, and with the publisher writing into a copy
no replica follows (the goal is read against that: the replicas' cost of following deltas); the replicas' apply
times and the deltas' bytes beside it.

The client shares the machine's CPUs with the proxy and the replicas: on a 2-core box it is part of what
is measured, which is why it is a lean HTTP/1.1 client rather than aiohttp (a third of the CPU per request;
see ``benchmarks.http_load``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from rich.progress import Progress

from benchmarks.grpc_load import closed_loop_grpc
from benchmarks.harness import Report, Row
from benchmarks.http_load import Sample, closed_loop
from benchmarks.timing import load_average

GOAL_P99_MS = 25.0
GOAL_AT = (100, 8)
"""The goal's cell: 100 candidates at concurrency 8."""
GOAL_1000_P99_MS = 30.0
GOAL_1000_CANDIDATES_S = 400_000.0
GOAL_1000_AT = (1000, 8)
"""Issue #24's cell: 1000 candidates at concurrency 8, p99 <= 30 ms and >= 400k candidates/s."""
VARIANTS = {
    "compact": ("/v1/rank", True),
    "item cache off": ("/nocache/v1/rank", False),
    "item cache off, compact": ("/nocache/v1/rank", True),
}
"""Beside each mode's grid (default ServingConfig: item cache on, full responses), the goal's 1000-candidate cell
again with compact responses, and against a second ranker with the item cache off (``item_cache_ttl_ms: 0``,
as many replicas, idle while the others are measured)."""
REPLICAS = 2
"""One replica per core of the 2-core machine these figures are for; the echo anchor gets as many."""
CANDIDATES = (100, 1000)
CONCURRENCY = (1, 8, 32)
N_USERS, N_ITEMS = 5_000, 20_000
TRAFFIC, TRAFFIC_QUICK = 40_000, 10_000
"""Simulator impressions whose aggregates fill the feature store before the run."""
MODES = {"serve proxy": {}, "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}}
QUICK_MODES = ("haproxy",)
"""The ingress a quick run measures: the faster of the two here, the one the latency goal is read on."""
DELTAS_MODE = "haproxy"
"""The ingress the goal's cell is measured on again while deltas arrive (``benchmarks.serving_deltas``)."""


def messages(bodies_: list[bytes]) -> list[bytes]:
    """The same requests as serialized ``RankRequest`` messages."""
    from serving.proto.ranking_pb2 import RankRequest

    return [RankRequest(user_id=b["user_id"], candidates=b["candidates"]).SerializeToString()
            for b in map(orjson.loads, bodies_)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bodies(n_candidates: int, count: int, seed: int, compact: bool = False) -> list[bytes]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, N_USERS + 1) ** 0.8
    users = rng.choice(N_USERS, count, p=weights / weights.sum())
    extra = {"compact": True} if compact else {}
    return [orjson.dumps({"user_id": int(u), "candidates": rng.choice(N_ITEMS, n_candidates, replace=False).tolist(),
                          **extra}) for u in users]


@dataclass
class Cell:
    ranker: list[Sample]
    echo: list[Sample]
    grpc: list[Sample]


def _pct(samples: list[Sample], q: float) -> float:
    pooled = np.concatenate([s.latencies_s for s in samples]) if samples else np.zeros(0)
    return float(np.percentile(pooled, q) * 1000) if len(pooled) else float("nan")


def _rate(samples: list[Sample]) -> float:
    return statistics.median(s.rate for s in samples)


def served_model() -> str:
    """What :func:`prepare` publishes, in words: the learner's defaults' family, tables and wide part."""
    from learner.config import LearnerConfig

    learner = LearnerConfig()
    tables = ", ".join(f"{f} {t['capacity']:,} x {t['dim']}" for f, t in (learner.tables or {}).items())
    wide = (f"wide part dim {learner.wide.dim}{', shared' if learner.wide.shared else ''}" if learner.wide.dim
            else "no wide part")
    embedded = f"per-field tables ({tables})" if tables else f"one hashed table of {learner.n_buckets:,} rows"
    hparams = f" {dict(learner.hparams)}" if learner.hparams else ""
    return f"the learner's model: {learner.family}{hparams}, {embedded}, {wide}"


def prepare(root: Path, n_events: int = 40_000):
    """A Feast store with aggregates of simulator traffic stamped now, and a snapshot of the model the learner's
    defaults train (``learner.step.Learner``: collisionless per-field tables, the wide part), every user and item of
    the requests admitted."""
    from benchmarks.features import _traffic
    from features.aggregates import StreamAggregator
    from features.definitions import FEATURE_COLUMNS, ID_FIELDS
    from features.store import FeatureStoreConfig, OnlineFeatures
    from learner.config import LearnerConfig
    from learner.snapshots import SnapshotStore
    from learner.step import Learner

    import pyarrow as pa
    import pyarrow.compute as pc

    features = FeatureStoreConfig(data_dir=root / "features", push_offline=False, clock="wall")
    store = OnlineFeatures(features)
    traffic = _traffic(n_events)
    ts = traffic.column("ts_ms")
    shift = int(time.time() * 1000) - 1000 - pc.max(ts).as_py()
    traffic = traffic.set_column(traffic.schema.get_field_index("ts_ms"), "ts_ms",
                                 pc.add(ts, pa.scalar(shift, pa.int64())))
    aggregator = StreamAggregator()
    for start in range(0, traffic.num_rows, 4096):
        store.push(*aggregator.update(traffic.slice(start, 4096)))
    learner = Learner(LearnerConfig(), list(ID_FIELDS), len(FEATURE_COLUMNS))  # the model the trainer ships
    # Every user and item of the requests is a live ID: each maps to a row of its own, as in a trained model.
    items = np.arange(N_ITEMS, dtype=np.int64)
    learner.admit({"user_id": items % N_USERS, "item_id": items}, int(time.time() * 1000))
    SnapshotStore(root / "snapshots").publish(learner.weights(), learner.manifest())
    return features, root / "snapshots"


def measure_mode(env: dict[str, str], features, snapshots: Path, quick: bool, progress: Progress) -> dict:
    """Start Ray (with ``env``), deploy the ranker and the echo anchor, run every cell; shut everything down
    (:func:`serve_on_free_port`)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    from serving.app import build_app
    from serving.config import ServingConfig
    from serving.grpc_service import SERVICER_FUNCTION

    @serve.deployment(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                      logging_config={"log_level": "WARNING", "enable_access_log": False})
    class EchoDeployment:
        async def __call__(self, request: Request) -> Response:
            return Response(await request.body(), media_type="application/json")

    grpc_port = free_port()
    grpc_options = {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    # logical CPUs: the two rankers' and the echo's replicas
    with serve_on_free_port(env, 3 * REPLICAS, grpc_options) as port:
        no_cache = ServingConfig(num_replicas=REPLICAS, item_cache_ttl_ms=0)
        serve.run_many([  # all at once: their replicas start side by side
            serve.RunTarget(build_app(snapshots, features, ServingConfig(num_replicas=REPLICAS)), name="ranker",
                            route_prefix="/"),
            serve.RunTarget(build_app(snapshots, features, no_cache), name="ranker-nocache", route_prefix="/nocache"),
            serve.RunTarget(EchoDeployment.bind(), name="echo", route_prefix="/echo"),
        ])
        base = f"http://127.0.0.1:{port}"
        rounds, seconds, warmup = (1, 1.0, 0.25) if quick else (3, 5.0, 1.0)
        cells: dict[tuple[int, int], Cell] = {}
        task = progress.add_task(f"serving ({','.join(env) or 'serve proxy'})",
                                 total=(len(CANDIDATES) * len(CONCURRENCY) + len(VARIANTS)) * rounds)
        target, metadata = f"127.0.0.1:{grpc_port}", (("application", "ranker"),)
        grid = [(n, c, "/v1/rank", False) for n in CANDIDATES for c in CONCURRENCY]
        grid += [(*GOAL_1000_AT, route, compact) for route, compact in VARIANTS.values()]
        for n, c, route, compact in grid:
            payloads = bodies(n, 256, seed=n, compact=compact)
            grpc = route == "/v1/rank" and not compact  # gRPC beside HTTP in the grid's own cells
            protos = messages(payloads) if grpc else None
            cell = cells[(n, c, route, compact)] = Cell([], [], [])
            for _ in range(rounds):
                cell.echo.append(asyncio.run(closed_loop(f"{base}/echo", payloads, c, seconds, warmup)))
                cell.ranker.append(asyncio.run(closed_loop(f"{base}{route}", payloads, c, seconds, warmup)))
                if grpc:
                    cell.grpc.append(asyncio.run(closed_loop_grpc(target, protos, c, seconds, warmup, metadata)))
                progress.advance(task)
        return {"cells": cells, "rounds": rounds, "seconds": seconds, "item_cache": _cache_figures(base)}


def replica_health(base: str, replicas: int | None = None, asks: int = 16) -> dict[str, dict]:
    """``/healthz`` of each ranking replica, by replica name: the proxy picks which one answers, so it is asked
    ``asks`` times at most, or until ``replicas`` were seen."""
    import httpx

    seen: dict[str, dict] = {}
    for _ in range(asks):
        try:
            health = httpx.get(f"{base}/healthz", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            continue
        seen[health["replica"]] = health
        if replicas is not None and len(seen) >= replicas:
            break
    return seen


def _cache_figures(base: str) -> dict[str, dict]:
    """The item cache's figures of each ranking replica."""
    return {replica: health["item_cache"] for replica, health in replica_health(base).items()
            if health.get("item_cache")}


def _stop_serve(timeout_s: float = 5.0) -> None:
    """``serve.shutdown()`` with a shorter wait: under HAProxy its controller's graceful shutdown ran into the
    30 s timeout after every run here, though no request was in flight; the Ray instance is this run's own
    and goes down right after, with every actor in it."""
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        _get_global_client().shutdown(timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 - a private helper that may change; the public call still works
        serve.shutdown()


@contextmanager
def serve_on_free_port(env: dict[str, str], num_cpus: int, grpc_options: dict | None = None) -> Iterator[int]:
    """Ray with ``env`` in the environment (started here, or the instance already running, used as it is) and Serve
    on a free loopback port, which is yielded; on exit Serve is stopped, Ray shut down if it was started here, and
    the environment restored."""
    import ray
    from ray import serve

    from infra.runtime import init_ray

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    owns_ray = not ray.is_initialized()
    port = free_port()
    try:
        init_ray(num_cpus=num_cpus, quiet=True)
        if not owns_ray:
            serve.shutdown()  # Serve binds its HTTP port once per instance
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"},
                    **({"grpc_options": grpc_options} if grpc_options else {}))
        yield port
    finally:
        if ray.is_initialized():
            _stop_serve()
            if owns_ray:
                ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rounds_main(description: str, run: Callable[[int, float], Report], argv: list[str] | None = None) -> None:
    """The command line of a side-by-side serving benchmark (``benchmarks.serving_models_ab``,
    ``benchmarks.serving_floor``): ``--rounds``, ``--seconds`` (refused with a message when they would measure
    nothing), ``--json``; the report printed, and written as JSON if asked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not args.seconds > 0:
        parser.error(f"--rounds must be at least 1 and --seconds above 0, got {args.rounds} and {args.seconds}")
    report = run(args.rounds, args.seconds)
    report.print()
    if args.json:
        report.write_json(args.json)


def add_rows(report: Report, mode: str, cells: dict) -> None:
    variants = {(route, compact): name for name, (route, compact) in VARIANTS.items()}
    for (n, c, route, compact), cell in cells.items():
        variant = variants.get((route, compact))
        label = f"{mode}: {n} candidates, concurrency {c}" + (f", {variant}" if variant else "")
        errors = sum(s.errors for s in cell.ranker)
        echo_errors = sum(s.errors for s in cell.echo)
        grpc_errors = sum(s.errors for s in cell.grpc)
        if errors or echo_errors or grpc_errors:
            report.notes.append(f"{label}: {errors} failed ranking requests, {echo_errors} failed echo requests, "
                                f"{grpc_errors} failed gRPC calls")
        goal_100 = (n, c) == GOAL_AT and variant is None
        goal_1000 = (n, c) == GOAL_1000_AT and variant is None
        goal_ms = GOAL_P99_MS if goal_100 else GOAL_1000_P99_MS if goal_1000 else None
        report.add(Row(f"{label}: p50", _pct(cell.ranker, 50), "ms", anchor="echo, same proxy",
                       anchor_value=_pct(cell.echo, 50)))
        p99 = _pct(cell.ranker, 99)
        report.add(Row(f"{label}: p99", p99, "ms", anchor="echo, same proxy", anchor_value=_pct(cell.echo, 99),
                       goal=f"<= {goal_ms:g} ms" if goal_ms else None, met=p99 <= goal_ms if goal_ms else None))
        report.add(Row(f"{label}: throughput", _rate(cell.ranker), "req/s", anchor="echo, same proxy",
                       anchor_value=_rate(cell.echo)))
        if n == GOAL_1000_AT[0] and c == GOAL_1000_AT[1]:
            rate = _rate(cell.ranker) * n
            report.add(Row(f"{label}: candidates", rate, "candidates/s",
                           goal=f">= {GOAL_1000_CANDIDATES_S:,.0f} candidates/s" if goal_1000 else None,
                           met=rate >= GOAL_1000_CANDIDATES_S if goal_1000 else None))
    for (n, c, route, compact), cell in cells.items():  # gRPC after HTTP, each against HTTP's ranking of the same cell
        if not cell.grpc:
            continue
        label = f"{mode}: gRPC, {n} candidates, concurrency {c}"
        for q in (50, 99):
            report.add(Row(f"{label}: p{q}", _pct(cell.grpc, q), "ms", anchor="HTTP ranking, same cell",
                           anchor_value=_pct(cell.ranker, q)))
        report.add(Row(f"{label}: throughput", _rate(cell.grpc), "req/s", anchor="HTTP ranking, same cell",
                       anchor_value=_rate(cell.ranker)))


def cache_note(mode: str, figures: dict[str, dict]) -> str:
    if not figures:
        return f"{mode}: no ranking replica reported its item cache"
    parts = [f"hit rate {f['hit_rate']:.0%}" if f["hit_rate"] is not None else "no lookups" for f in figures.values()]
    worst = max(f["max_staleness_served_ms"] for f in figures.values())
    ttl = next(iter(figures.values()))["ttl_ms"]
    return (f"{mode}: item cache (TTL {ttl:g} ms) of the default ranker's replicas over the whole run: "
            f"{', '.join(parts)}; oldest row served {worst:.0f} ms after its read")


def run(quick: bool = False) -> Report:
    from benchmarks import serving_deltas  # which builds on this module
    from serving.config import ServingConfig

    report = Report("serving")
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        features, snapshots = prepare(Path(tmp), n_events=TRAFFIC_QUICK if quick else TRAFFIC)
        modes = {m: MODES[m] for m in QUICK_MODES} if quick else MODES
        if quick:
            report.notes.append(f"quick: {', '.join(QUICK_MODES)} only (each mode starts its own Ray instance and "
                                f"replicas, about 40 s); a full run measures {' and '.join(MODES)}")
        for mode, env in modes.items():
            try:
                result = measure_mode(env, features, snapshots, quick, progress)
            except Exception as exc:  # a mode that cannot run here is reported, the other still counts
                report.notes.append(f"{mode}: could not be measured: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            add_rows(report, mode, result["cells"])
            report.notes.append(cache_note(mode, result["item_cache"]))
            report.notes.append(f"{mode}: {result['rounds']} round(s) of {result['seconds']:g} s per cell, echo, HTTP "
                                "ranking and (in the grid's cells) gRPC ranking in turn; p50/p99 pooled over rounds, "
                                "throughput the median round")
        # Its own Ray instance: 10^7 IDs' replicas load a 1.5 GB base each, which the grid's replicas need not hold.
        serving_deltas.measure_into(report, features, Path(tmp) / "deltas", serving_deltas.QUICK if quick else
                                    serving_deltas.FULL, DELTAS_MODE, MODES[DELTAS_MODE], progress)
    defaults = ServingConfig()
    report.notes.append(f"{', '.join(VARIANTS)}: the {GOAL_1000_AT[0]}-candidate cell at concurrency {GOAL_1000_AT[1]} "
                        "with compact responses (\"compact\": true) and against a second ranker of as many replicas "
                        "with the item cache off; the other rows are the default ServingConfig (item cache on, "
                        f"TTL {defaults.item_cache_ttl_ms:g} ms; full responses)")
    report.notes.append(f"{REPLICAS} ranking replicas (num_cpus {defaults.num_cpus:g}, torch threads "
                        f"{defaults.torch_threads} each), otherwise the default ServingConfig (batches of up to "
                        f"{defaults.max_batch_candidates} candidates, batch wait {defaults.batch_wait_timeout_s * 1000:g} ms); "
                        f"echo: {REPLICAS} replicas; {served_model()}; {N_USERS:,} users, "
                        f"{N_ITEMS:,} items, aggregates of {TRAFFIC_QUICK if quick else TRAFFIC:,} impressions in the feature store; client in the same process (benchmarks.http_load, HTTP/1.1 keep-alive; "
                        f"benchmarks.grpc_load, one grpc.aio channel); load average at the end "
                        f"{load_average()}")
    return report


if __name__ == "__main__":
    run(quick=True).print()


__all__ = ["bodies", "closed_loop", "rounds_main", "run"]
