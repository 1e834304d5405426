"""What the serving stack costs without the model: the ranker beside a zero-cost scorer (``python -m
benchmarks.serving_floor``).

Issue #24 asks for 1000 candidates at concurrency 8 with p99 <= 30 ms and >= 400k candidates/s on the 2-core
machine, through the same proxy. This measures the floor under that goal: the same app (``serving.app``, default
``ServingConfig``: FastAPI, the body's parsing and validation, ``@serve.batch``, the batch split into rankings, the
response encoded, Serve's replica plumbing, HAProxy, the client) deployed beside the ranker in one Ray instance, its
scoring replaced by fixed probabilities: no feature lookup, no forward pass (``FloorDeployment``), at the batches
its own speed makes. Whatever the floor
cannot reach, no model and no lookup can.

Both are sent the same request bodies in alternating rounds, the order turned every round, so that a busy neighbour
hits both alike. Each round also takes the CPU time of this process and of every process it started (``psutil``; the
Ray instance, its replicas and HAProxy), so the rows split one request's CPU over the client, HAProxy, each app's
replicas and Ray's other processes. A process that exits during a round takes its CPU of that round with it (none
does in a run: the replicas, HAProxy and Ray's processes live as long as the instance). docs/serving.md has the figures.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from ray.serve import Application

from benchmarks.harness import Report, Row
from benchmarks.http_load import Sample, closed_loop
from benchmarks.serving import (GOAL_1000_AT, GOAL_1000_CANDIDATES_S, GOAL_1000_P99_MS, GOAL_AT, GOAL_P99_MS, MODES,
                                REPLICAS, TRAFFIC, _pct, bodies, prepare, rounds_main, serve_on_free_port)
from features.store import FeatureStoreConfig
from serving.app import RankerDeployment
from serving.config import ServingConfig
from serving.ranker import NoModelYet, Ranking, RankingService, RankQuery, batch_of

CELLS = ((1000, 8, False), (1000, 8, True), (100, 8, False))
"""(candidates, concurrency, compact): issue #24's cell with full and compact responses, and the 100-candidate goal."""
FLOOR = "zero-cost scorer (no lookup, no model)"
APPS = ("ranker", "floor")
PROBABILITIES = np.random.default_rng(0).random((4096, 16), dtype=np.float32)
"""What the floor answers: fixed probabilities, sliced (and tiled past 4096 candidates) per batch."""


def floor_score(service: RankingService, queries: Sequence[RankQuery]) -> list[Ranking]:
    """:meth:`RankingService.score` less the feature lookup and the forward pass (and the weights' lock they are run
    under): the batch numbered, fixed probabilities fused with the task weights, then the service's own
    :meth:`RankingService.rankings` (metrics, the split into one ranking per request)."""
    current = service.weights.current
    if current is None:
        raise NoModelYet(service.not_ready())
    batch = service.next_batch()
    lengths, items = batch_of(queries)
    tasks = current.model.tasks
    probs = np.resize(PROBABILITIES[:, : len(tasks)], (len(items), len(tasks)))  # (N, T) float32
    scores = probs @ service.task_weights(tasks).numpy()  # (N,) float32, as the ranker's
    return service.rankings(current, batch, tasks, lengths, items, scores, probs)


class FloorDeployment(RankerDeployment.func_or_class):  # the ranker's class: its app, batching, gRPC and health
    """The ranking deployment with :func:`floor_score` in place of the lookup and the model."""

    async def __init__(self, *args, **kwargs) -> None:  # the ingress class's __init__ is a coroutine (Serve's rule)
        await super().__init__(*args, **kwargs)
        service = self.service
        service.score = lambda queries: floor_score(service, queries)


def floor_app(snapshots: Path, features: FeatureStoreConfig, config: ServingConfig) -> Application:
    """The floor as a Serve application, deployed as ``serving.app.build_app`` deploys the ranker."""
    from ray import serve

    return serve.deployment(FloorDeployment).options(**config.deployment_options()).bind(
        str(Path(snapshots).absolute()), features, config)


@dataclass
class Side:
    samples: list[Sample] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process group over this side's rounds (see :func:`_group`)."""
    requests: int = 0


def _group(process: psutil.Process, me: int) -> str:
    if process.pid == me:
        return "client (this process)"
    name, cmdline = process.name(), " ".join(process.cmdline())
    for app in APPS:
        if f"ServeReplica:{app}:" in name or f"ServeReplica:{app}:" in cmdline:
            return f"replicas: {app}"
    return "HAProxy" if name == "haproxy" else "Ray's other processes"


def cpu_times() -> dict[tuple[int, float], tuple[str, float]]:
    """This process and every process it started (the Ray instance it started, with its replicas and HAProxy: not
    another Ray instance on the machine), keyed by pid and start time: group and CPU seconds (user + system)."""
    me = psutil.Process()
    out = {}
    for process in (me, *me.children(recursive=True)):
        try:
            with process.oneshot():
                t = process.cpu_times()
                out[(process.pid, process.create_time())] = (_group(process, me.pid), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def measure(root: Path, rounds: int, seconds: float, warmup_s: float, n_events: int = TRAFFIC,
            cells: tuple[tuple[int, int, bool], ...] = CELLS) -> dict[tuple[int, int, bool], dict[str, Side]]:
    """Each cell's side per app (``ranker``, ``floor``), ``rounds`` rounds each. Ray is started (with HAProxy) unless
    an instance is running already, which is then used as it is and left running."""
    from ray import serve

    from serving.app import build_app

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
                    for key, (group, cpu) in cpu_times().items():  # one started in the round: all its CPU
                        side.cpu_s[group] = side.cpu_s.get(group, 0.0) + cpu - before.get(key, (group, 0.0))[1]
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
    rounds_main(__doc__.split("\n\n")[0], run, argv)


if __name__ == "__main__":
    main()


__all__ = ["FLOOR", "FloorDeployment", "floor_app", "floor_score", "measure", "run"]
