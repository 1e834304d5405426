"""What the serving stack costs without the model: the ranker beside a zero-cost scorer (``python -m
benchmarks.serving_floor``).

Issue #24 asks for 1000 candidates at concurrency 8 with p99 <= 30 ms and >= 400k candidates/s on the 2-core
machine, through the same proxy. This measures the floor under that goal: the same app (``serving.app``, default
``ServingConfig``: FastAPI, the body's parsing and validation, ``@serve.batch``, the batch split into rankings, the
response encoded, Serve's replica plumbing, HAProxy, the client) deployed beside the ranker in one Ray instance, its
scoring replaced by fixed probabilities: no feature lookup, no forward pass (``FloorDeployment``). Whatever the floor
cannot reach, no model and no lookup can.

Both are sent the same request bodies in alternating rounds, the order turned every round, so that a busy neighbour
hits both alike. Each round also takes every process's CPU time (``psutil``), so the rows split one request's CPU over
the client, HAProxy, the replicas and Ray's other processes. docs/serving.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from benchmarks.harness import Report, Row
from benchmarks.http_load import Sample, closed_loop
from benchmarks.serving import (GOAL_1000_AT, GOAL_1000_CANDIDATES_S, GOAL_1000_P99_MS, GOAL_AT, GOAL_P99_MS, MODES,
                                REPLICAS, TRAFFIC, _pct, bodies, prepare, serve_on_free_port)
from serving.app import RankerDeployment
from serving.ranker import Ranking, RankingService, RankQuery

CELLS = ((1000, 8, False), (1000, 8, True), (100, 8, False))
"""(candidates, concurrency, compact): issue #24's cell with full and compact responses, and the 100-candidate goal."""
FLOOR = "zero-cost scorer (no lookup, no model)"
APPS = ("ranker", "floor")
PROBABILITIES = np.random.default_rng(0).random((4096, 16), dtype=np.float32)
"""What the floor answers: fixed probabilities, sliced (and tiled past 4096 candidates) per batch."""


def floor_score(service: RankingService, queries: Sequence[RankQuery]) -> list[Ranking]:
    """:meth:`RankingService.score` less the feature lookup and the forward pass: the batch numbered, the scores fused
    with the task weights, the metrics observed and the batch split into rankings as the ranker does."""
    current = service.weights.current
    if current is None:
        return service.score(queries)  # raises NoModelYet, as the ranker would
    batch = service.batches = next(service._batch_seq)
    lengths = np.fromiter((len(q.candidates) for q in queries), np.int64, len(queries))
    items = np.concatenate([q.candidates for q in queries])
    tasks = current.model.tasks
    probs = np.resize(PROBABILITIES[:, : len(tasks)], (len(items), len(tasks)))
    scores = probs @ service.task_weights(tasks).numpy()
    service.metrics.observe_batch(len(queries), len(items), len(service.weights.rejected))
    bounds = np.cumsum(lengths)[:-1]
    return [Ranking(current.version, current.family, batch, tasks, i, s, p)
            for i, s, p in zip(np.split(items, bounds), np.split(scores, bounds), np.split(probs, bounds))]


class FloorRanker(RankerDeployment.func_or_class):  # the ranker's class: its app, batching, gRPC and health
    """The ranking deployment with :func:`floor_score` in place of the lookup and the model."""

    async def __init__(self, *args, **kwargs) -> None:  # the ingress class's __init__ is a coroutine (Serve's rule)
        await super().__init__(*args, **kwargs)
        service = self.service
        service.score = lambda queries: floor_score(service, queries)


def floor_app(snapshots: Path, features, config):
    from ray import serve

    return serve.deployment(FloorRanker).options(**config.deployment_options()).bind(
        str(Path(snapshots).absolute()), features, config)


@dataclass
class Side:
    samples: list[Sample] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process group over this side's rounds (see :func:`_group`)."""
    requests: int = 0


def _group(name: str, cmdline: str, me: int, pid: int) -> str | None:
    if pid == me:
        return "client (this process)"
    for app in APPS:
        if f"ServeReplica:{app}:" in name or f"ServeReplica:{app}:" in cmdline:
            return f"replicas: {app}"
    if name == "haproxy":
        return "HAProxy"
    if "ray" in cmdline or name.startswith("ray::") or name in ("raylet", "gcs_server"):
        return "Ray's other processes"
    return None  # the machine's own daemons: not the service's


def cpu_times() -> dict[int, tuple[str, float]]:
    """Every process's group and CPU seconds (user + system)."""
    me, out = psutil.Process().pid, {}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            group = _group(p.info["name"] or "", " ".join(p.info["cmdline"] or []), me, p.pid)
            if group is not None:
                t = p.cpu_times()
                out[p.pid] = (group, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def measure(root: Path, rounds: int, seconds: float, warmup_s: float, n_events: int = TRAFFIC,
            cells: tuple[tuple[int, int, bool], ...] = CELLS) -> dict[tuple[int, int, bool], dict[str, Side]]:
    """Each cell's side per app (``ranker``, ``floor``), ``rounds`` rounds each. Ray is started (with HAProxy) unless
    an instance is running already, which is then used as it is and left running."""
    from ray import serve

    from serving.app import build_app
    from serving.config import ServingConfig

    features, snapshots = prepare(root, n_events=n_events)
    config = ServingConfig(num_replicas=REPLICAS)
    with serve_on_free_port(MODES["haproxy"], 2 * REPLICAS) as port:
        serve.run_many([serve.RunTarget(build_app(snapshots, features, config), name="ranker", route_prefix="/ranker"),
                        serve.RunTarget(floor_app(snapshots, features, config), name="floor", route_prefix="/floor")])
        out = {}
        for n, c, compact in cells:
            payloads = bodies(n, 256, seed=n, compact=compact)
            sides = {app: Side() for app in APPS}
            for r in range(rounds):
                for app in (APPS if r % 2 == 0 else APPS[::-1]):
                    url = f"http://127.0.0.1:{port}/{app}/v1/rank"
                    asyncio.run(closed_loop(url, payloads, c, warmup_s, 0.0))  # warm-up, not counted
                    before = cpu_times()
                    sample = asyncio.run(closed_loop(url, payloads, c, seconds, 0.0))
                    side = sides[app]
                    side.samples.append(sample)
                    side.requests += len(sample.latencies_s) + sample.errors
                    for pid, (group, cpu) in cpu_times().items():
                        if pid in before:
                            side.cpu_s[group] = side.cpu_s.get(group, 0.0) + cpu - before[pid][1]
            out[(n, c, compact)] = sides
        return out


def add_rows(report: Report, cells: dict[tuple[int, int, bool], dict[str, Side]]) -> None:
    for (n, c, compact), sides in cells.items():
        label = f"{n} candidates, concurrency {c}" + (", compact" if compact else "")
        ranker, floor = sides["ranker"], sides["floor"]
        goal_p99 = GOAL_1000_P99_MS if (n, c) == GOAL_1000_AT else GOAL_P99_MS if (n, c) == GOAL_AT else None
        for q in (50, 99):
            value, anchor = _pct(ranker.samples, q), _pct(floor.samples, q)
            goal = f"<= {goal_p99:g} ms" if q == 99 and goal_p99 and not compact else None
            report.add(Row(f"{label}: p{q}", value, "ms", anchor=FLOOR, anchor_value=anchor, goal=goal,
                           met=value <= goal_p99 if goal else None))
            if goal:
                report.add(Row(f"{label}: p99 of the {FLOOR}", anchor, "ms", goal=goal, met=anchor <= goal_p99))
        rates = [statistics.median(s.rate for s in side.samples) for side in (ranker, floor)]
        report.add(Row(f"{label}: throughput", rates[0], "req/s", anchor=FLOOR, anchor_value=rates[1]))
        if (n, c) == GOAL_1000_AT and not compact:
            goal = f">= {GOAL_1000_CANDIDATES_S / 1000:g}k candidates/s"
            for who, rate in ((None, rates[0]), (FLOOR, rates[1])):
                report.add(Row(f"{label}: candidates/s" + (f" of the {who}" if who else ""), rate * n, "candidates/s",
                               goal=goal, met=rate * n >= GOAL_1000_CANDIDATES_S))
        for app, side in sides.items():
            for group, cpu in sorted(side.cpu_s.items()):
                if side.requests:
                    group = ("its replicas" if group == f"replicas: {app}" else
                             "the other app's replicas (idle)" if group.startswith("replicas: ") else group)
                    report.add(Row(f"{label}, {app}: CPU per request, {group}", cpu / side.requests * 1000, "ms"))
            if side.requests:
                report.add(Row(f"{label}, {app}: CPU per request, all", sum(side.cpu_s.values()) / side.requests * 1000,
                               "ms"))
        errors = sum(s.errors for side in sides.values() for s in side.samples)
        if errors:
            report.notes.append(f"{label}: {errors} failed requests")


def run(rounds: int = 4, seconds: float = 5.0) -> Report:
    report = Report("serving floor")
    with tempfile.TemporaryDirectory() as tmp:
        add_rows(report, measure(Path(tmp), rounds, seconds, warmup_s=1.0))
    report.notes.append(f"HAProxy ingress, {REPLICAS} replicas per app, default ServingConfig; {rounds} rounds of "
                        f"{seconds:g} s per app and cell, alternating, the order turned each round; CPU per request: "
                        "each process's user + system time over the measured rounds over the requests answered in them")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    main()


__all__ = ["FLOOR", "FloorRanker", "floor_app", "floor_score", "measure", "run"]
