"""``moestream bench learner``: sustained throughput of the whole trainer beside the bare model's ceiling.

Pipeline rows: a backlog of simulator events in a real Kafka topic is read by 1 or 2 trainer actors
under Ray (``infra.pipeline.start_trainers``): consume, parse, join, Feast online lookup and push,
forward, backward (and, with 2 workers, the gradient all-reduce), Adam, checkpoints. Events/s is
Kafka messages (impressions and feedback) consumed per second while training keeps up, measured
between the first trained step and the last message consumed; examples/s is joined impressions
trained per second over the same span.

Two traffics, the same simulator and seed, the same number of requests:

- **today's**: the simulator's default populations (5,000 users, Zipf-like; 20,000 items, half live at the
  start), so a run sees a few thousand users and ten thousand items over and over;
- **10^7 users and items** (``LARGE``): populations of 10^7 each, drawn as the simulator draws them, so nearly
  every impression brings a user or an item the run has not seen before: every step inserts ID-map entries,
  resets embedding rows and writes new entities to the online store. Goal: >= 20,000 events/s with one
  worker; today's figure is its anchor. A run's distinct IDs and worker 0's ID tables (live IDs, evictions
  once a field passes ``learner.tables``' capacity) are in the notes.

The online store is SQLite (the default) in every row with a goal. One more row per family runs one worker at
10^7 on a Redis server the benchmark starts (Debian's ``redis-server``), anchored on the same run on SQLite:
whether the production store changes the figure (``--no-redis`` leaves it out).

Anchor (the ceiling): the same model, batch, loss and optimizer stepping on tensors built beforehand, in this
process, with the trainer's torch threads: no Kafka, no Feast, no joiner. The pipeline's examples/s over it is
the fraction of the ceiling the plumbing leaves, reported without a goal: the goal is events/s. Without
``KAFKA_BOOTSTRAP_SERVERS`` a local broker is started for the run and stopped after it.

``python -m benchmarks.learner --family MMoE-8 --traffic 10^7 --workers 1`` runs a subset.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from rich.progress import Progress

from benchmarks.harness import Report, Row
from benchmarks.serving import free_port
from benchmarks.stream import broker
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.models import loss_terms
from learner.allocator import retain_freed_memory
from learner.config import LearnerConfig
from learner.step import build_model, build_optimizer
from stream.events import TASKS, encode
from stream.kafka_io import EventSink, ensure_topics
from stream.simulator import Simulator, SimulatorConfig

BATCH = 1024
TRAINER_THREADS = max(1, len(os.sched_getaffinity(0)) - 1)
"""Torch threads of a trainer by default (``learner.worker``: every core but one), and so of the ceiling: with
every core on a machine that other work shares, torch's threads wait on each other (the MMoE-8 step ran 5-7k
examples/s with 2 threads beside other work on the 2-core machine, 57-65k with 1)."""
GOAL_EVENTS_PER_S = 20_000
BARE_ROWS = 100_000
"""Live rows per field of the ceiling's per-field tables (its batches draw among them)."""
FAMILIES = {
    "MMoE-8": ("mmoe", {"n_experts": 8}),
    "HoME": ("home", {}),
}
TODAY = SimulatorConfig(seed=3)
LARGE = replace(TODAY, n_users=10**7, n_items=10**7)
TRAFFIC = {"today": TODAY, "10^7": LARGE}
"""Traffic name -> simulator; rows of today's traffic keep their old names, the others say which they ran."""
ROW_SUFFIX = {"today": "", "10^7": ", 10^7 users and items"}


def traffic_events(simulator: SimulatorConfig, n_requests: int) -> tuple[list[bytes], dict[str, int]]:
    """The simulator's events for ``n_requests``, encoded, ending a second ago (the consumer refuses event times
    beyond its clock-skew allowance, and a run's simulated span, minutes, would otherwise reach into the
    future); and what the traffic holds: events, impressions, distinct users and items."""
    events = list(Simulator(simulator).events(0, n_requests))  # the simulator (1.3 GB at 10^7) is freed on return
    shift = int(time.time() * 1000) - 1000 - max(e["ts_ms"] for e in events)
    for event in events:
        event["ts_ms"] += shift
    shown = [e for e in events if e["type"] == "impression"]
    figures = {"events": len(events), "impressions": len(shown), "users": len({e["user_id"] for e in shown}),
               "items": len({e["item_id"] for e in shown})}
    return [encode(e) for e in events], figures


def bare_examples_per_s(family: str, hparams: dict, steps: int) -> float:
    """The ceiling: forward + loss + backward + Adam and the row-wise table update on pre-built tensors of the
    trainer's shape, with the trainer's torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAINER_THREADS)
    try:
        return _bare_examples_per_s(family, hparams, steps)
    finally:
        torch.set_num_threads(before)


def _bare_examples_per_s(family: str, hparams: dict, steps: int) -> float:
    config = LearnerConfig(family=family, hparams=hparams)
    model = build_model(config, config.embedded_fields(), len(FEATURE_COLUMNS))  # the trainer's: tables, wide part
    optimizer = build_optimizer(model.parameters(), config.lr)  # the trainer's own
    gen = torch.Generator().manual_seed(0)
    ids = {f: torch.randint(0, 10**6, (BATCH,), generator=gen) for f in ID_FIELDS}
    rows = None  # per-field tables read the rows the ID maps hand out; BARE_ROWS live rows per field
    if config.tables:
        rows = {f: torch.randint(1, BARE_ROWS + 1, (BATCH,), generator=gen) for f in config.tables}
        for f in config.tables:
            for table in model.field_tables(f):
                table.ensure_rows(BARE_ROWS)
    dense = torch.rand(BATCH, len(FEATURE_COLUMNS), generator=gen) * 10
    labels = {t: (torch.rand(BATCH, generator=gen) < 0.2).float() for t in TASKS}

    def step() -> None:
        total, _ = loss_terms(model(ids, dense, rows), labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()  # Adam: the dense network
        for table in model.row_tables().values():
            table.apply_gradients()  # row-wise Adagrad: the batch's rows, the embeddings' and the wide part's

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def pipeline_rates(bootstrap: str, family: str, hparams: dict, workers: int, events: list[bytes],
                   root: Path, timeout_s: float = 600, redis: str | None = None, consumer: str = "process") -> dict:
    """Events/s and examples/s of ``workers`` trainer actors draining ``events`` from a fresh topic, and worker
    0's final ID tables; the online store is SQLite, or the Redis server at ``redis`` (``host:port``); the
    consumer in a process of its own or on a thread of the trainer (``kafka.consumer``)."""
    import ray

    from features.store import OnlineFeatures
    from infra.pipeline import RunLayout, start_trainers, worker_config

    topic = f"bench.learner.{uuid.uuid4().hex[:8]}"
    config = worker_config(RunLayout(root / topic), bootstrap=bootstrap, topic=topic, family=family,
                           window_ms=2_000, snapshot_every_steps=10**6, batch_size=BATCH, wandb_mode="disabled")
    cadence = replace(config.learner.cadence, checkpoint_every_steps=50)
    config = replace(config, learner=replace(config.learner, hparams=hparams, cadence=cadence),
                     kafka=replace(config.kafka, max_batch=4096, consumer=consumer))
    if redis is not None:
        config = replace(config, features=replace(config.features, online_store="redis", redis_connection=redis,
                                                  project=f"bench{uuid.uuid4().hex[:8]}"))
    ensure_topics(config.kafka)
    OnlineFeatures(config.features).apply()
    sink = EventSink(config.kafka)
    for value in events:
        sink.send_raw(value, key=None)
    sink.flush()
    sink.close()
    group = start_trainers(config, workers, max_restarts=0)
    n, t0, consumed0, trained0 = len(events), None, 0, 0
    deadline = time.monotonic() + timeout_s
    while True:
        stats = group.stats()
        now = time.perf_counter()
        consumed, trained = sum(s["consumed"] for s in stats), sum(s["examples_trained"] for s in stats)
        if t0 is None and trained > 0:
            t0, consumed0, trained0 = now, consumed, trained
        if consumed >= n:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{workers} worker(s) consumed {consumed} of {n} in {timeout_s}s")
        time.sleep(0.25)  # a benchmark's sampling period, not a wait for a condition
    elapsed = now - (t0 or now)
    finals = group.stop()
    for actor in group.actors:
        ray.kill(actor)
    return {
        "events_per_s": (consumed - consumed0) / elapsed if elapsed > 0 else float("nan"),
        "examples_per_s": (trained - trained0) / elapsed if elapsed > 0 else float("nan"),
        "id_tables": finals[0]["id_tables"],
    }


def id_tables_note(tables: dict[str, dict[str, int]]) -> str:
    """Worker 0's ID tables in a few words: per field, live IDs of the capacity, admitted, evicted, overflow."""
    return "; ".join(f"{field} {t['live']:,} live of {t['capacity']:,}, {t['admitted']:,} admitted, "
                     f"{t['evicted']:,} evicted, {t['overflow']:,} overflow" for field, t in tables.items())


def run(quick: bool = False, *, families: tuple[str, ...] | None = None, traffic: tuple[str, ...] | None = None,
        worker_counts: tuple[int, ...] | None = None, redis: bool = True) -> Report:
    """Every family, traffic and worker count on the SQLite online store (the default; the goal's rows), then one
    worker at 10^7 on Redis, anchored on the same run on SQLite, without a goal (quick: MMoE-8 and 1 worker, a
    tenth of the events); ``families``, ``traffic`` and ``worker_counts`` choose a subset, ``redis=False``
    leaves the Redis rows out."""
    from infra.redis_server import RedisServerConfig, running
    from infra.runtime import init_ray

    for names, known in ((families or (), FAMILIES), (traffic or (), TRAFFIC)):
        if unknown := [n for n in names if n not in known]:
            raise KeyError(f"unknown {unknown[0]!r}; choose from {list(known)}")
    report = Report("learner")
    retain_freed_memory()  # as the trainer process does (learner.worker): the ceiling is measured alike
    n_requests = 6_000 if quick else 60_000  # about 8 events per request; a full run trains for about 25 s per row
    families = families or (("MMoE-8",) if quick else tuple(FAMILIES))
    traffic = tuple(n for n in TRAFFIC if n in traffic) if traffic else tuple(TRAFFIC)  # today's first: the anchor
    worker_counts = worker_counts or ((1,) if quick else (1, 2))
    streams = {}
    for name in traffic:
        streams[name], seen = traffic_events(TRAFFIC[name], n_requests)
        report.notes.append(f"traffic {name} ({TRAFFIC[name].n_users:,} users, {TRAFFIC[name].n_items:,} items): "
                            f"{seen['events']:,} events, {seen['impressions']:,} impressions of {seen['users']:,} "
                            f"distinct users and {seen['items']:,} distinct items")
    on_redis = redis and "10^7" in traffic and 1 in worker_counts
    with broker() as bootstrap, TemporaryDirectory() as tmp, Progress(transient=True) as progress, \
            (running(RedisServerConfig(port=free_port(), data_dir=Path(tmp) / "redis")) if on_redis
             else nullcontext()) as redis_server:
        runs = len(traffic) * len(worker_counts) + on_redis + (not quick and "10^7" in traffic and 1 in worker_counts)
        task = progress.add_task("learner benchmark", total=len(families) * (1 + runs))
        init_ray(quiet=True)
        for label in families:
            family, hparams = FAMILIES[label]
            ceiling = bare_examples_per_s(family, hparams, steps=10 if quick else 40)
            progress.advance(task)
            report.add(Row(f"{label}: bare model training (ceiling)", ceiling, "examples/s",
                           anchor="bare model", anchor_value=ceiling))
            today: dict[int, float] = {}  # events/s of today's traffic, per worker count: the others' anchor
            on_sqlite = None  # one worker at 10^7 on SQLite: the Redis row's anchor
            for name in traffic:
                for workers in worker_counts:
                    where = f"{label}, {workers} worker(s){ROW_SUFFIX[name]}"
                    try:
                        rates = pipeline_rates(bootstrap, family, hparams, workers, streams[name], Path(tmp))
                    except Exception as exc:  # a failed configuration is reported, the others still run
                        report.notes.append(f"{where}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                        progress.advance(task)
                        continue
                    progress.advance(task)
                    events_per_s, one = rates["events_per_s"], workers == 1
                    if name == "today":
                        today[workers] = events_per_s
                    anchor = today.get(workers) if name != "today" else None
                    report.add(Row(f"{where}: Kafka + Feast + trainer", events_per_s, "events/s",
                                   anchor="today's traffic" if anchor else None, anchor_value=anchor,
                                   goal=f">= {GOAL_EVENTS_PER_S:,} events/s" if one else None,
                                   met=events_per_s >= GOAL_EVENTS_PER_S if one else None))
                    report.add(Row(f"{where}: examples trained", rates["examples_per_s"], "examples/s",
                                   anchor="bare model", anchor_value=ceiling))
                    report.notes.append(f"{where}: worker 0's ID tables at the end: "
                                        f"{id_tables_note(rates['id_tables'])}")
                    if name == "10^7" and one:
                        on_sqlite = events_per_s
                        if not quick:
                            _thread_consumer_row(report, bootstrap, label, streams[name], Path(tmp), events_per_s)
                            progress.advance(task)
            if on_redis:
                where = f"{label}, 1 worker(s){ROW_SUFFIX['10^7']}, Redis online store"
                try:
                    rates = pipeline_rates(bootstrap, family, hparams, 1, streams["10^7"], Path(tmp),
                                           redis=redis_server.connection_string)
                except Exception as exc:
                    report.notes.append(f"{where}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                else:
                    events_per_s = rates["events_per_s"]
                    report.add(Row(f"{where}: Kafka + Feast + trainer", events_per_s, "events/s",
                                   anchor="the same on SQLite", anchor_value=on_sqlite))
                    report.add(Row(f"{where}: examples trained", rates["examples_per_s"], "examples/s",
                                   anchor="bare model", anchor_value=ceiling))
                progress.advance(task)
    report.notes.append(f"{n_requests:,} simulator requests per traffic and run, batch {BATCH}, 4 partitions; events/s "
                        f"counts impressions and feedback, examples/s joined impressions")
    return report


def _thread_consumer_row(report: Report, bootstrap: str, label: str, events: list[bytes], root: Path,
                         in_process: float) -> None:
    """The same run with the consumer on a thread of the trainer's process (as before ``stream.consumer_process``),
    anchored on the consumer in a process of its own."""
    family, hparams = FAMILIES[label]
    where = f"{label}, 1 worker(s){ROW_SUFFIX['10^7']}, consumer on the trainer's thread"
    try:
        rates = pipeline_rates(bootstrap, family, hparams, 1, events, root, consumer="thread")
    except Exception as exc:  # reported, the others still run
        report.notes.append(f"{where}: failed: {type(exc).__name__}: {str(exc)[:200]}")
        return
    report.add(Row(f"{where}: Kafka + Feast + trainer", rates["events_per_s"], "events/s",
                   anchor="the consumer in its own process", anchor_value=in_process))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learner", description=run.__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="repeatable; default: all")
    parser.add_argument("--traffic", action="append", choices=list(TRAFFIC), help="repeatable; default: all")
    parser.add_argument("--workers", action="append", type=int, help="repeatable; default: 1 and 2")
    parser.add_argument("--no-redis", action="store_true", help="leave out the Redis online store's rows")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args.quick, families=tuple(args.family or ()), traffic=tuple(args.traffic or ()),
                 worker_counts=tuple(args.workers or ()), redis=not args.no_redis)
    report.print()
    if args.json:
        report.write_json(args.json)


if __name__ == "__main__":
    main()


__all__ = ["LARGE", "TODAY", "TRAFFIC", "bare_examples_per_s", "id_tables_note", "pipeline_rates", "run",
           "traffic_events"]
