"""``moestream bench freshness``: from an event's production to the first ranking response of a model trained on it.

The whole pipeline runs (``infra.pipeline``): simulator traffic paced in wall-clock time goes to a real
Kafka topic; one trainer actor consumes, joins, trains and publishes a snapshot every step; one Serve
replica follows the snapshot directory; a client ranks candidates over HTTP, one request after the other,
and notes the model version of every response. Each produced event's partition and offset come back from
the broker; each snapshot's manifest says, per partition, the offset below which its weights cover every
event (``offsets``, read as the manifests appear). An event's freshness is the time from just before it was
sent to the first response whose version covers its offset. Events the run never saw covered count as
infinitely stale in the percentiles.

What bounds freshness by construction: an impression is trained only once its attribution window has closed
(the joiner's ``window_ms``, set here to 1 s with feedback delays under 0.8 s), and offsets are covered in
order, so every event waits at least the window. The row "after the window" subtracts it.

Anchors are literature figures, not measured here: Ekko (Sima et al., OSDI 2022) reports 2.4 s model-update
latency for its geo-distributed parameter dissemination; Monolith (Liu et al., 2022) syncs sparse parameters
from training to serving at minute intervals (60 s taken as its figure). Neither includes a label join.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import orjson

from benchmarks.harness import Report, Row
from benchmarks.serving import free_port
from benchmarks.stream import broker
from benchmarks.timing import load_average

WINDOW_MS = 1_000
MAX_DELAY_S = 0.8
BATCH = 128
PUBLISH_EVERY_S = 0.2
"""A snapshot after the first step that ends this long after the previous one: publishing (16 MB of weights,
sha256, fsync) every step would cost the trainer more than it can spare at this rate."""
RATE = 50.0
"""Simulated requests per second (4 impressions each, plus their feedback): about 400 events/s."""
GOAL_P50_S, GOAL_P99_S = 2.0, 5.0
READY_LAG = 400
"""Consumer lag (messages) under which the trainer counts as keeping up: about one second of traffic."""
READY_VERSIONS = 5
"""Versions behind the newest under which the replica counts as keeping up (about a second at ``PUBLISH_EVERY_S``)."""
WARMUP_LIMIT_S = 240
EKKO_S, MONOLITH_S = 2.4, 60.0


@dataclass
class Produced:
    """Partition, offset and send time of every measured event (filled by the producer's callbacks)."""

    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, sent_at: float):
        def record(metadata) -> None:
            with self.lock:
                self.partitions.append(metadata.partition)
                self.offsets.append(metadata.offset)
                self.sent_at.append(sent_at)

        return record

    def errback(self, _exc) -> None:
        with self.lock:
            self.failed += 1


class ManifestWatcher(threading.Thread):
    """Reads each snapshot's manifest as it appears (the publisher keeps only the newest ten)."""

    def __init__(self, directory: Path, every_s: float = 0.02) -> None:
        super().__init__(name="manifest-watcher", daemon=True)
        from learner.snapshots import SnapshotError, SnapshotStore

        self.store, self.error = SnapshotStore(directory), SnapshotError
        self.every_s = every_s
        self.offsets: dict[int, dict[int, int]] = {}
        self.kinds: dict[int, tuple[str, int | None]] = {}
        """Each version's kind (base or delta) and payload bytes."""
        self.times: dict[int, tuple[float, float]] = {}
        """Each version's manifest time (the trainer's clock as it began writing the version) and when this watcher
        first read it (written and listed in the store)."""
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            for version in self.store.versions():
                if version not in self.offsets:
                    try:
                        manifest = self.store.manifest(version)
                    except self.error:  # pruned between the listing and the read
                        continue
                    self.offsets[version] = {int(p): int(o) for p, o in manifest.data.get("offsets", {}).items()}
                    self.kinds[version] = (manifest.kind, manifest.bytes)
                    self.times[version] = (manifest.created_at, time.time())

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class RankingClient(threading.Thread):
    """One request after the other; notes when each response arrived and which version produced it."""

    def __init__(self, url: str) -> None:
        super().__init__(name="ranking-client", daemon=True)
        self.url = url
        self.seen: list[tuple[float, int]] = []
        self.failed = 0
        self.not_ready = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        body = {"user_id": 42, "candidates": list(range(1, 21))}
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._halt.is_set():
                try:
                    response = http.post("/v1/rank", json=body)
                except httpx.HTTPError:
                    self.failed += 1
                    continue
                if response.status_code == 503:  # nothing published yet
                    self.not_ready += 1
                    time.sleep(0.05)
                elif response.status_code == 200:
                    self.seen.append((time.time(), response.json()["model_version"]))
                else:
                    self.failed += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


class LagSampler(threading.Thread):
    """The trainer's consumer lag (messages behind, all partitions) once a second: a trainer that falls
    behind the traffic makes freshness grow without bound, whatever the rest of the pipeline does. Each sample
    also notes whether a checkpoint was being written beside training (:attr:`samples`, for the timeline)."""

    def __init__(self, trainer) -> None:
        super().__init__(name="lag-sampler", daemon=True)
        self.trainer = trainer
        self.lags: list[int] = []
        self.samples: list[tuple[float, int, bool]] = []
        """(wall time, lag, a checkpoint being written)"""
        self._halt = threading.Event()

    def run(self) -> None:
        import ray

        while not self._halt.wait(1.0):
            stats = ray.get(self.trainer.stats.remote())
            self.lags.append(sum(stats["lag"].values()))
            self.samples.append((time.time(), self.lags[-1], bool(stats.get("checkpoint_writing"))))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def process_label(name: str, cmdline: list[str]) -> str:
    """What a process is, for :class:`CpuSampler`: a Ray worker by its title (``ray::TrainerActor``, without the
    method it runs), a kernel thread by its kind (``kworker/u4:2`` -> ``kernel: kworker``), anything else by name."""
    title = cmdline[0] if cmdline else ""
    if title.startswith("ray::"):
        return title.split(".")[0].split(" ")[0]
    if not cmdline:  # kernel threads have no command line
        return "kernel: " + name.split("/")[0].rstrip("0123456789:-.")
    if name.startswith("python"):  # which program: a module run with -m, else the script
        args = cmdline[1:]
        program = args[args.index("-m") + 1] if "-m" in args[:-1] else next(
            (Path(a).name for a in args if not a.startswith("-")), "")
        return f"python {program}".strip()
    return name


class CpuSampler(threading.Thread):
    """Every process's CPU on the machine once a second (``psutil``, user + system), grouped by
    :func:`process_label`: what else ran when freshness rose (:attr:`samples`, for the timeline and the notes)."""

    def __init__(self, every_s: float = 1.0) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.every_s = every_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        """(wall time, CPU seconds per label since the sample before)"""
        self._halt = threading.Event()

    @staticmethod
    def _read() -> dict[tuple[int, float], tuple[str, float]]:
        import psutil

        out = {}
        for process in psutil.process_iter(["name", "cmdline", "cpu_times", "create_time"]):
            info = process.info
            if info["cpu_times"] is None:  # gone, or not ours to read
                continue
            out[(process.pid, info["create_time"])] = (process_label(info["name"] or "?", info["cmdline"] or []),
                                                       info["cpu_times"].user + info["cpu_times"].system)
        return out

    def run(self) -> None:
        before = self._read()
        while not self._halt.wait(self.every_s):
            now = self._read()
            spent: dict[str, float] = {}
            for key, (label, cpu) in now.items():  # a process that started meanwhile counts from 0
                used = cpu - before[key][1] if key in before else cpu
                if used > 0:
                    spent[label] = spent.get(label, 0.0) + used
            self.samples.append((time.time(), spent))
            before = now

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def busiest(samples: list[tuple[float, dict[str, float]]], start: float, end: float, n: int = 6) -> str:
    """The ``n`` labels with the most CPU between wall times ``start`` and ``end``, in cores, beside their average over
    every sample: ``ray::TrainerActor 0.95 (0.71)``."""
    def cores(chosen: list[dict[str, float]]) -> dict[str, float]:
        total: dict[str, float] = {}
        for spent in chosen:
            for label, used in spent.items():
                total[label] = total.get(label, 0.0) + used / len(chosen)
        return total
    inside = cores([spent for t, spent in samples if start <= t <= end] or [{}])
    overall = cores([spent for _, spent in samples] or [{}])
    top = sorted(inside.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{label} {used:.2f} ({overall.get(label, 0.0):.2f})" for label, used in top)


def replica_caught_up(client: RankingClient, watcher: ManifestWatcher) -> bool:
    """The replica serves a version at most ``READY_VERSIONS`` behind the newest the trainer published: at start it
    loads the base, then works through the deltas published meanwhile, and measuring before it is through would time
    that backlog, not the pipeline."""
    newest = max(watcher.kinds, default=None)
    return bool(client.seen) and newest is not None and client.seen[-1][1] >= newest - READY_VERSIONS


def covered_at(produced: Produced, moments: list[tuple[float, dict[int, int]]]) -> np.ndarray:
    """Seconds from send to the first of ``moments`` (time, a manifest's offsets; in time order) that covers each
    event (inf: none does)."""
    partitions, offs, sent = (np.asarray(a) for a in (produced.partitions, produced.offsets, produced.sent_at))
    result = np.full(len(offs), np.inf)
    by_partition = {}
    for p in np.unique(partitions):
        index = np.flatnonzero(partitions == p)
        index = index[np.argsort(offs[index])]
        by_partition[int(p)] = (index, offs[index])
    covered = dict.fromkeys(by_partition, 0)
    for t, manifest in moments:
        for p, (index, sorted_offsets) in by_partition.items():
            upto = int(np.searchsorted(sorted_offsets, manifest.get(p, 0)))  # offsets below the manifest's
            if upto > covered[p]:
                newly = index[covered[p]:upto]
                result[newly] = t - sent[newly]
                covered[p] = upto
    return result


def freshness(produced: Produced, responses: list[tuple[float, int]], offsets: dict[int, dict[int, int]]) -> tuple[np.ndarray, int]:
    """Seconds from send to the first response covering each event (inf: never covered), and how many
    responses named a version whose manifest was never read."""
    moments = [(t, offsets[version]) for t, version in sorted(responses) if version in offsets]
    return covered_at(produced, moments), sum(version not in offsets for _, version in responses)


def stages(produced: Produced, offsets: dict[int, dict[int, int]],
           times: dict[int, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Where each event's freshness went: seconds from send to the manifest time of the first version covering it
    (joined, trained, the version built: the trainer's part) and to that version being read from the store
    (written: the store's part); the rest, to the first response, is delivery, the replica's apply and the client's
    next request."""
    ordered = sorted(v for v in offsets if v in times)
    return {"trained": covered_at(produced, [(times[v][0], offsets[v]) for v in ordered]),
            "written": covered_at(produced, [(times[v][1], offsets[v]) for v in ordered])}


def produce(producer, topic: str, events, until: float, produced: Produced | None) -> int:
    """Send paced simulator events until the wall clock passes ``until``; with ``produced``, record them."""
    from stream.events import encode

    n = 0
    for event in events:
        sent_at = time.time()
        future = producer.send(topic, value=encode(event), key=str(event["user_id"]).encode())
        if produced is not None:
            future.add_callback(produced.callback(sent_at))
            future.add_errback(produced.errback)
        n += 1
        if sent_at >= until:
            break
    return n


@dataclass
class Measured:
    """One pipeline run: each measured event's freshness, and what the trainer, replica and store said."""

    ages: np.ndarray
    sent: np.ndarray
    """Each measured event's send time (wall clock), in the order of ``ages``."""
    samples: list[tuple[float, int, bool]]
    """The trainer once a second while measuring: (wall time, consumer lag, a checkpoint being written)."""
    unknown: int
    stats: dict
    health: dict
    kinds: dict[int, tuple[str, int | None]]
    offsets: dict[int, dict[int, int]]
    lags: list[int]
    responses: int
    versions_seen: int
    failed: int
    produce_failed: int
    notes: list[str] = field(default_factory=list)
    stages: dict[str, np.ndarray] = field(default_factory=dict)
    """Per event, in the order of ``ages``: seconds from send to its version's manifest time and to its version read
    from the store (:func:`stages`)."""
    steps: dict[str, list[float]] = field(default_factory=dict)
    """The trainer's steps from the measured window's start on, phase by phase (``learner.step_log``)."""
    cpu: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    """Every process's CPU once a second while measuring (:class:`CpuSampler`)."""


def measure(config, layout, bootstrap: str, simulator, measure_s: float, tail_s: float,
            warmup_limit_s: float = WARMUP_LIMIT_S) -> Measured:
    """Start a trainer actor and a Serve replica on ``config``, produce paced traffic until the trainer keeps
    up and a model is served, then measure ``measure_s`` seconds of events (module docstring)."""
    import httpx
    import ray
    from kafka import KafkaProducer
    from ray import serve

    from features.store import OnlineFeatures
    from infra.pipeline import start_serving, start_trainer, wait_for
    from learner.weight_store import NAMESPACE
    from serving.config import ServingConfig
    from stream.kafka_io import ensure_topics
    from stream.simulator import Simulator

    ensure_topics(config.kafka)
    OnlineFeatures(config.features).apply()
    trainer, run_ref = start_trainer(config, max_restarts=0)  # starts while the replica below does
    url = start_serving(config, free_port(), ServingConfig(poll_s=0.05))
    watcher, client = ManifestWatcher(layout.snapshots), RankingClient(url)
    watcher.start()
    client.start()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=10)
    events = Simulator(simulator).events(int(time.time() * 1000), 10**9, rate=RATE)
    produced, notes, health = Produced(), [], {}
    lags, cpu = LagSampler(trainer), CpuSampler()
    start: float | None = None
    try:
        # Warm-up traffic until a model is served, the trainer has worked off the backlog that built up while its
        # actor started and the replica the versions published while it loaded the base: measuring before that
        # would time the backlogs, not the pipeline.
        warm_until, caught_up = time.time() + warmup_limit_s, 0
        while caught_up < 3 and time.time() < warm_until:
            produce(producer, config.kafka.topic, events, time.time() + 1.0, None)
            lag = sum(ray.get(trainer.stats.remote())["lag"].values())
            caught_up = caught_up + 1 if lag <= READY_LAG and replica_caught_up(client, watcher) else 0
        if caught_up < 3:
            notes.append(f"warm-up: the trainer had not caught up with the traffic (lag <= {READY_LAG} messages) or "
                         f"the replica with the trainer (within {READY_VERSIONS} versions) for 3 s after "
                         f"{warmup_limit_s:g} s; measured anyway")
        start = time.time()
        lags.start()
        cpu.start()
        n_measured = produce(producer, config.kafka.topic, events, start + measure_s, produced)
        producer.flush()
        produce(producer, config.kafka.topic, events, time.time() + tail_s, None)  # the last windows close
        producer.flush()
        lags.stop()
        cpu.stop()
        wait_for(lambda: len(produced.offsets) + produced.failed >= n_measured, 30, "the broker's acknowledgements")
        try:
            health = httpx.get(f"{url}/healthz", timeout=30).json()
        except httpx.HTTPError as exc:  # a replica that cannot answer is a figure of the run, not its end
            notes.append(f"the replica's /healthz did not answer at the end ({type(exc).__name__}: {exc})")
    finally:
        client.stop()
        watcher.stop()
        producer.close()
        trainer.stop.remote()
        stats = ray.get(run_ref)
        steps = ray.get(trainer.steps.remote(start)) if start is not None else {}
        ray.get(trainer.close.remote())
        ray.kill(trainer)
        serve.shutdown()  # the next run starts its own app, on its own port
        if config.weight_store is not None:  # detached: it would hold this run's versions for the session
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(config.weight_store, namespace=NAMESPACE))
    ages, unknown = freshness(produced, client.seen, watcher.offsets)
    covered = np.isfinite(ages)
    uncovered = sorted({int(p) for p, ok in zip(produced.partitions, covered) if not ok})
    if uncovered:
        last = watcher.offsets[max(watcher.offsets)] if watcher.offsets else {}
        notes.append(f"events never covered are in partitions {uncovered}; the last manifest's offsets: {last}; "
                     f"the trainer's lag at the end: {stats.get('lag')}")
    return Measured(ages, np.asarray(produced.sent_at), list(lags.samples), unknown, stats, health, dict(watcher.kinds),
                    dict(watcher.offsets), list(lags.lags),
                    len(client.seen), len({v for _, v in client.seen}), client.failed, produced.failed, notes,
                    stages(produced, watcher.offsets, watcher.times), steps, list(cpu.samples))


def seed_population(config, live_ids: int) -> None:
    """A checkpoint of an untrained learner whose ID maps hold ``live_ids`` ids (half users, half items, ids from 0),
    which the trainer actor resumes from: the tables a feed with that many live ids would have, without the hours
    of traffic that would admit them (``Learner.admit``)."""
    import gc

    from learner.worker import TrainerWorker

    worker = TrainerWorker(config)
    try:
        half = live_ids // 2
        for start in range(0, half, 1_000_000):
            ids = np.arange(start, min(half, start + 1_000_000), dtype=np.int64)
            worker.loop.learner.admit({"user_id": ids, "item_id": ids}, now_ms=int(time.time() * 1000))
        if not worker.loop.checkpoint():
            raise RuntimeError(f"the seeded checkpoint was not written: {worker.loop.last_checkpoint_error}")
    finally:
        worker.close()
    del worker
    gc.collect()


SIZES = (10**5, 10**6, 10**7)
"""Live ids of the sized runs (``--quick``: the first)."""
EMB_DIM = 32
GOAL_DELTA_SHARE = 0.05
GOAL_APPLY_P99_MS = 50.0
GOAL_SIZED_P50_S, GOAL_SIZED_P99_S = 2.0, 3.0
MODES = ("full", "deltas", "compaction")
"""Publishing in the sized runs: every version whole; the shipped chains; the shipped chains with a base due
every ``COMPACTION_DELTAS`` deltas, so that bases are written (beside training) inside the measured window."""
COMPACTION_DELTAS = 30
"""At a version every ``PUBLISH_EVERY_S`` or so, a base every few seconds to about twenty: two or more in 40 s,
where the shipped 1000 deltas (or half a base's bytes) put one every several minutes."""


def sized_config(layout, bootstrap: str, topic: str, live_ids: int, mode: str):
    """The pipeline's configuration for a run at ``live_ids``: per-field tables of ``EMB_DIM`` with room for them,
    a version at most every ``PUBLISH_EVERY_S``, and checkpoints at the shipped cadence, written beside training
    (``learner.cadence.checkpoint_beside``: at 10^7 ids one takes seconds to write, and ``checkpoint_max_share``
    spaces them out to about one a minute, longer than the measured window).
    ``mode`` "deltas": the shipped ``learner.publish`` (a base, then deltas through the weight-store actor until the
    chain's deltas weigh half the base; a base over ``ray_max_bytes`` read from the store); "compaction": the same
    with a base due after ``COMPACTION_DELTAS`` deltas, each written beside training; "full": every version is a
    base (``learner.publish.max_deltas: 0``) that replicas read from the snapshot directory, as before chains."""
    from infra.pipeline import worker_config
    from learner.config import PublishConfig

    config = worker_config(layout, bootstrap=bootstrap, topic=topic, window_ms=WINDOW_MS, snapshot_every_steps=10**9,
                           batch_size=BATCH, wandb_mode="disabled")
    capacity = max(1 << 16, int(live_ids // 2 * 1.25))
    tables = {field: {"capacity": capacity, "dim": EMB_DIM} for field in ("user_id", "item_id")}
    cadence = replace(config.learner.cadence, snapshot_every_s=PUBLISH_EVERY_S)
    publish = {"full": PublishConfig(max_deltas=0, via_ray=False), "deltas": PublishConfig(),
               "compaction": PublishConfig(max_deltas=COMPACTION_DELTAS)}[mode]
    return replace(config, learner=replace(config.learner, cadence=cadence, tables=tables, publish=publish),
                   weight_store=config.weight_store if publish.via_ray else None)


def sized_simulator(live_ids: int):
    """Traffic over the seeded population (its ids are live), at most 10^6 users and items of it: the simulator
    keeps vectors per user and item, and a few thousand ids a second touch a small share of any of them."""
    from stream.simulator import SimulatorConfig

    population = max(1_000, min(live_ids // 2, 1_000_000))
    return SimulatorConfig(seed=5, n_users=population, n_items=population, max_delay_s=MAX_DELAY_S)


def age_at(ages: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of ``ages``, inf where it falls among events never seen covered (interpolating
    between a finite age and inf would give nan)."""
    return float(np.percentile(ages, q, method="higher"))


def sized_rows(report: Report, live_ids: int, mode: str, m: Measured, full: Measured | None) -> None:
    """Rows of one sized run; ``full``: the same size with full-snapshot publishing, measured in this run."""
    label = f"{live_ids:.0e} live ids, {mode}".replace("e+0", "e")
    p50, p99 = (age_at(m.ages, q) for q in (50, 99))
    published = m.stats.get("published_versions", {})
    at_goal = live_ids == SIZES[-1] and mode in ("deltas", "compaction")
    anchor = full is not None
    full_p50 = age_at(full.ages, 50) if anchor else None
    full_p99 = age_at(full.ages, 99) if anchor else None
    report.add(Row(f"freshness p50 ({label})", p50, "s", anchor="full-snapshot publishing, same size, this run"
                   if anchor else None, anchor_value=full_p50,
                   goal=f"<= {GOAL_SIZED_P50_S:g} s" if at_goal else None, met=p50 <= GOAL_SIZED_P50_S if at_goal else None))
    report.add(Row(f"freshness p99 ({label})", p99, "s", anchor="full-snapshot publishing, same size, this run"
                   if anchor else None, anchor_value=full_p99,
                   goal=f"<= {GOAL_SIZED_P99_S:g} s" if at_goal else None, met=p99 <= GOAL_SIZED_P99_S if at_goal else None))
    for stage, until in (("trained", "its version's manifest time"), ("written", "its version read from the store")):
        if (ages := m.stages.get(stage)) is not None and len(ages):
            for q in (50, 99):
                report.add(Row(f"freshness p{q} until {until} ({label})", age_at(ages, q), "s",
                               anchor="the whole freshness", anchor_value=age_at(m.ages, q)))
    for kind in ("base", "delta"):
        figures = published.get(kind)
        if not figures:
            continue
        report.add(Row(f"{kind} bytes p50 ({label})", figures["bytes_p50"], "B"))
        report.add(Row(f"{kind} publish time p50 ({label})", figures["seconds_p50"] * 1000, "ms"))
        report.add(Row(f"{kind} publish time p99 ({label})", figures["seconds_p99"] * 1000, "ms"))
    if capture := published.get("capture"):  # what a base written beside training took of the training thread
        report.add(Row(f"base copies on the training thread, max ({label})", capture["seconds_max"] * 1000, "ms",
                       anchor="the base's whole write, p50", anchor_value=published["base"]["seconds_p50"] * 1000
                       if published.get("base") else None))
    held = m.stats.get("checkpoint_seconds", {})
    if capture := held.get("capture"):  # what each checkpoint took of the training thread
        written = held.get("write")
        report.add(Row(f"checkpoint on the training thread, max ({label})", capture["max"] * 1000, "ms",
                       anchor="the checkpoint's write beside training, p50" if written else None,
                       anchor_value=written["p50"] * 1000 if written else None))
    base, delta = published.get("base"), published.get("delta")
    if base and delta:
        share = delta["bytes_p50"] / base["bytes_p50"]
        report.add(Row(f"delta bytes / base bytes ({label})", share * 100, "%", anchor="a base (the whole model)",
                       anchor_value=100.0, goal=f"<= {GOAL_DELTA_SHARE:.0%}" if at_goal else None,
                       met=share <= GOAL_DELTA_SHARE if at_goal else None))
    weights = m.health.get("weights") or {}
    for q in ("p50", "p99"):
        prepare, value = weights.get(f"prepare_ms_{q}"), weights.get(f"apply_ms_{q}")
        if value is not None:
            # the whole apply once the delta is read: its checks and map merges beside the requests, then the
            # writes under the lock a batch is scored under (the percentiles of each, added: an upper bound)
            whole = value + (prepare or 0.0)
            goal = q == "p99" and at_goal
            report.add(Row(f"replica delta apply {q}, prepare + install ({label})", whole, "ms",
                           goal=f"<= {GOAL_APPLY_P99_MS:g} ms" if goal else None,
                           met=whole <= GOAL_APPLY_P99_MS if goal else None))
            report.add(Row(f"replica delta install {q}, lock held ({label})", value, "ms"))
    if m.steps.get("total"):
        report.add(Row(f"longest training step ({label})", max(m.steps["total"]), "s",
                       anchor="the median step", anchor_value=float(np.median(m.steps["total"]))))
        report.notes.append(f"{label}: the longest steps: {longest_steps(m)}")
    if m.cpu and len(m.sent):
        worst = worst_window(m)
        report.notes.append(f"{label}: the busiest processes in cores while the events sent at {worst[0] - m.sent.min():.0f}-"
                            f"{worst[1] - m.sent.min():.0f} s were the stalest (their average over the run): "
                            f"{busiest(m.cpu, *worst)}")
    kinds = [k for k, _ in m.kinds.values()]
    report.notes.append(
        f"{label}: {m.stats['steps']} steps, {len(m.stats['snapshots'])} versions published ({kinds.count('base')} "
        f"bases, {kinds.count('delta')} deltas seen by the watcher; {published.get('capture', {}).get('n', 0)} bases "
        f"written beside training), replica: {weights.get('deltas_applied', 0)} deltas applied, "
        f"{weights.get('bases_adopted', 0)} bases taken through their delta alone, {weights.get('rebuilds', 0)} rebuilds, {weights.get('folds', 0)} map folds, {m.health.get('swaps')} "
        f"swaps, rejected {m.health.get('rejected_versions')}; client: {m.responses:,} responses, {m.versions_seen} "
        f"versions seen, {m.failed} failed; consumer lag while measuring max {max(m.lags, default=0):,} messages; "
        f"{int(np.isinf(m.ages).sum())} of {len(m.ages)} events never seen covered; checkpoints: "
        f"{held.get('capture', {}).get('n', 0)} taken, {held.get('write', {}).get('n', 0)} written beside training, "
        f"{m.stats.get('checkpoint_failures', 0)} failed" + "".join(f"; {n}" for n in m.notes))


def worst_window(m: Measured, width_s: float = 30.0) -> tuple[float, float]:
    """The ``width_s`` seconds (wall time) whose events had the highest p99 freshness."""
    seconds = np.floor(m.sent).astype(np.int64)
    firsts = np.unique(seconds)
    p99 = [age_at(m.ages[(seconds >= t) & (seconds < t + width_s)], 99) for t in firsts]
    at = float(firsts[int(np.argmax(p99))])
    return at, at + width_s


def longest_steps(m: Measured, n: int = 5) -> str:
    """The ``n`` longest steps of the measured window: when each began (seconds after the first measured event was
    sent), its wall time, and its phases over a tenth of it, largest first; then the longest wait for a batch."""
    from learner.step_log import PHASES

    steps, start = m.steps, float(m.sent.min()) if len(m.sent) else 0.0
    total = np.asarray(steps["total"])
    described = []
    for i in np.argsort(-total)[:n]:
        phases = sorted(((steps[p][i], p) for p in PHASES if steps[p][i] >= total[i] / 10), reverse=True)
        described.append(f"at {steps['at'][i] - start:.1f} s, {total[i]:.2f} s ("
                         + ", ".join(f"{p} {t:.2f} s" for t, p in phases) + ")")
    waited = np.asarray(steps["waited"])
    at = int(np.argmax(waited))
    return "; ".join(described) + f"; the longest wait for a batch {waited[at]:.2f} s, before the step at " \
        f"{steps['at'][at] - start:.1f} s"


def timeline(path: Path, m: Measured, title: str, goal_s: float | None = None) -> Path:
    """Each measured event's freshness against when it was sent, with each second's p99, the spans where a
    checkpoint was being written beside training, the trainer's consumer lag and its steps' wall times below
    (PNG)."""
    from benchmarks.quality_plots import pyplot

    plt = pyplot()
    start = float(m.sent.min()) if len(m.sent) else 0.0
    sent, ages = m.sent - start, m.ages
    fig, (top, bottom, steps, cpu) = plt.subplots(4, 1, figsize=(9, 8.5), sharex=True, height_ratios=(3, 1, 1, 1.3))
    covered = np.isfinite(m.ages)
    top.scatter(sent[covered], ages[covered], s=2, alpha=0.25, color="tab:blue", label="an event")
    seconds = np.floor(sent).astype(int)
    per_second = [(t, min(age_at(m.ages[seconds == t], 99), 60.0)) for t in np.unique(seconds)]  # inf: off the top
    if per_second:
        top.plot(*zip(*per_second), color="black", linewidth=1.2, label="p99 of the events sent in each second")
    if (trained := m.stages.get("trained")) is not None and len(trained) == len(ages):
        until = [(t, min(age_at(trained[seconds == t], 99), 60.0)) for t in np.unique(seconds)]
        top.plot(*zip(*until), color="tab:purple", linewidth=0.8,
                 label="p99 until its version's manifest time (the trainer's part)")
    if goal_s is not None:
        top.axhline(goal_s, color="red", linestyle="--", linewidth=1, label=f"goal p99 {goal_s:g} s")
    at = [t - start for t, _, _ in m.samples]
    spans = [(began - start, ended - start) for began, ended in m.stats.get("checkpoint_spans", [])]
    if not spans:  # a trainer that does not report its writes' times: the seconds the lag sampler saw one
        spans = [(t - 0.5, t + 0.5) for t, (_, _, writing) in zip(at, m.samples) if writing]
    for axis in (top, bottom, steps, cpu):
        for began, ended in spans:
            axis.axvspan(began, ended, color="orange", alpha=0.15, linewidth=0)
    bottom.plot(at, [lag for _, lag, _ in m.samples], color="tab:green")
    top.set_ylabel("freshness (s)")
    top.set_ylim(0, max([4.0, *(1.1 * p for _, p in per_second if p < 60.0)]))
    top.set_title(title + " (orange: a checkpoint being written beside training)", fontsize=10)
    top.legend(fontsize=8, loc="upper right")
    top.grid(alpha=0.3)
    bottom.set_ylabel("consumer lag\n(messages)")
    bottom.grid(alpha=0.3)
    if m.steps.get("total"):
        began = np.asarray(m.steps["at"]) - start
        steps.vlines(began, 0, m.steps["total"], color="tab:gray", linewidth=0.6, label="a step's wall time")
        steps.vlines(began, 0, m.steps["publish"], color="tab:purple", linewidth=0.6, label="its publish")
        steps.legend(fontsize=7, loc="upper right")
    steps.set_ylabel("training step\n(s)")
    steps.grid(alpha=0.3)
    if m.cpu:
        totals: dict[str, float] = {}
        for _, spent in m.cpu:
            for name, used in spent.items():
                totals[name] = totals.get(name, 0.0) + used
        top_labels = sorted(totals, key=lambda k: -totals[k])[:5]
        when = [t - start for t, _ in m.cpu]
        layers = [[spent.get(name, 0.0) for _, spent in m.cpu] for name in top_labels]
        layers.append([sum(spent.values()) - sum(spent.get(name, 0.0) for name in top_labels) for _, spent in m.cpu])
        cpu.stackplot(when, layers, labels=[*top_labels, "the rest"], linewidth=0)
        cpu.legend(fontsize=6, loc="upper left", ncol=3)
    cpu.set_ylabel("CPU by process\n(cores)")
    cpu.set_xlabel("seconds since the first measured event was sent")
    cpu.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


RESULTS = Path(__file__).parent / "results"


def run(quick: bool = False, sizes: tuple[int, ...] | None = None, modes: tuple[str, ...] = MODES,
        sized_measure_s: float | None = None, out_dir: Path | None = None) -> Report:
    """``sizes`` and ``modes``: the sized runs (default: ``SIZES``, or its first with ``quick``; every mode).
    ``sized_measure_s``: their measured window (default: the default run's, 40 s; at 10^7 ids a checkpoint comes
    every few minutes, so a window of several minutes holds one in its steady share). Each sized run's timeline
    (:func:`timeline`) goes to ``out_dir`` (default ``benchmarks/results/freshness``, ``freshness-quick``)."""
    from infra.pipeline import RunLayout, shutdown, worker_config
    from infra.runtime import init_ray
    from stream.simulator import SimulatorConfig

    # The tail outlasts the attribution window (1 s) plus the longest feedback delay, so the last measured
    # impressions are joined and trained.
    measure_s, tail_s = (6.0, 3.0) if quick else (40.0, 8.0)
    sizes = sizes if sizes is not None else SIZES[:1] if quick else SIZES
    report = Report("freshness")
    with broker() as bootstrap, TemporaryDirectory() as tmp:
        init_ray(quiet=True)
        layout = RunLayout(Path(tmp) / "default")
        config = worker_config(layout, bootstrap=bootstrap, topic=f"bench.freshness.{uuid.uuid4().hex[:8]}",
                               window_ms=WINDOW_MS, snapshot_every_steps=10**9, batch_size=BATCH, wandb_mode="disabled")
        cadence = replace(config.learner.cadence, snapshot_every_s=PUBLISH_EVERY_S)
        config = replace(config, learner=replace(config.learner, cadence=cadence))
        default = measure(config, layout, bootstrap,
                          SimulatorConfig(seed=5, n_users=2_000, n_items=5_000, max_delay_s=MAX_DELAY_S),
                          measure_s, tail_s)
        sized: dict[tuple[int, str], Measured] = {}
        for live_ids in sizes:
            for mode in modes:
                run_layout = RunLayout(Path(tmp) / f"{live_ids}-{mode}")
                topic = f"bench.freshness.{live_ids}.{mode}.{uuid.uuid4().hex[:6]}"
                sized_cfg = sized_config(run_layout, bootstrap, topic, live_ids, mode)
                from stream.kafka_io import ensure_topics

                ensure_topics(sized_cfg.kafka)
                seed_population(sized_cfg, live_ids)
                sized[(live_ids, mode)] = measure(sized_cfg, run_layout, bootstrap, sized_simulator(live_ids),
                                                  sized_measure_s or measure_s, tail_s)
                shutil.rmtree(run_layout.root, ignore_errors=True)  # gigabytes at 10^7
        shutdown()

    m = default
    p50, p99 = (age_at(m.ages, q) for q in (50, 99))
    window_s = WINDOW_MS / 1000
    literature = "(literature, not measured here)"
    report.add(Row("freshness p50", p50, "s", anchor=f"Ekko model-update latency {literature}", anchor_value=EKKO_S,
                   goal=f"<= {GOAL_P50_S:g} s", met=p50 <= GOAL_P50_S))
    report.add(Row("freshness p99", p99, "s", anchor=f"Ekko model-update latency {literature}", anchor_value=EKKO_S,
                   goal=f"<= {GOAL_P99_S:g} s", met=p99 <= GOAL_P99_S))
    report.add(Row("freshness p50", p50, "s", anchor=f"Monolith minute-level parameter sync {literature}",
                   anchor_value=MONOLITH_S))
    report.add(Row(f"after the {window_s:g} s attribution window closes: p50", p50 - window_s, "s"))
    report.add(Row(f"after the {window_s:g} s attribution window closes: p99", p99 - window_s, "s"))
    report.add(Row("events measured", float(len(m.ages)), "events"))
    report.add(Row("events never seen covered in the run", float(np.isinf(m.ages).sum()), "events"))
    report.notes += [
        f"{measure_s:g} s of simulator traffic at {RATE:g} requests/s measured (after warm-up traffic until a model "
        f"was served, the trainer's lag stayed under {READY_LAG} messages and the replica within {READY_VERSIONS} "
        f"versions of the trainer's newest for 3 s), {tail_s:g} s of traffic after "
        f"it; joiner window {WINDOW_MS} ms, feedback delays up to {MAX_DELAY_S} s; batch {BATCH}; a version at most "
        f"every {PUBLISH_EVERY_S:g} s; 1 trainer, 1 Serve replica polling every 50 ms; the first rows: the default "
        "model and pipeline (MMoE, per-field tables of 16, a base then deltas, delivered through the run's "
        "weight-store actor) on 2,000 users and 5,000 items",
        f"default run: trainer consumer lag while measuring max {max(m.lags, default=0):,}, last "
        f"{m.lags[-1] if m.lags else 0:,} messages; {m.stats['steps']} steps, {m.stats['examples_trained']:,} examples, "
        f"{len(m.stats['snapshots'])} versions published; client: {m.responses:,} ranking responses, {m.versions_seen} "
        f"versions seen, {m.failed} failed requests, {m.unknown} responses of a version whose manifest was not read; "
        f"{m.produce_failed} produce failures" + "".join(f"; {n}" for n in m.notes),
        "an event counts as trained on when the manifest's offsets pass it: the trainer publishes, per partition, "
        "the offset below which every example was stepped on (learner.intake.Intake.trained_offsets: examples "
        "still in its read-ahead buffer hold it back)",
        "anchors are figures reported in papers, for other systems and hardware: context, not a same-run comparison",
    ]
    if sizes:
        report.notes.append(
            f"sized runs: per-field tables of {EMB_DIM} (user_id, item_id) seeded with the live ids (half each) by a "
            "checkpoint the trainer resumes from (benchmarks.freshness.seed_population), traffic from a simulator over "
            "at most 10^6 users and items of that population; 'full' publishes every version whole "
            "(learner.publish.max_deltas 0) that replicas read from the snapshot directory, as before chains; 'deltas' "
            "the shipped learner.publish: a base then deltas until they weigh half of it, delivered through the run's "
            "weight-store actor (a base over ray_max_bytes, 256 MiB, read from the durable store); 'compaction' the same "
            f"with a base due every {COMPACTION_DELTAS} deltas, so that bases written beside training fall inside the "
            "measured window; "
            "checkpoints at the shipped cadence (every 10 steps), written beside training "
            "(learner.cadence.checkpoint_beside), at most learner.cadence.checkpoint_max_share of the time: at 10^7 "
            "ids about one a minute, so a 40 s window may hold none; "
            f"measured window {sized_measure_s or measure_s:g} s")
    out_dir = out_dir or RESULTS / ("freshness-quick" if quick else "freshness")
    for live_ids in sizes:
        for mode in modes:
            sized_rows(report, live_ids, mode, sized[(live_ids, mode)],
                       sized.get((live_ids, "full")) if mode != "full" else None)
            label = f"{live_ids:.0e}-{mode}".replace("e+0", "e")
            at_goal = live_ids == SIZES[-1] and mode != "full"
            path = timeline(out_dir / f"timeline-{label}.png", sized[(live_ids, mode)],
                            f"freshness, {live_ids:.0e} live ids, {mode}".replace("e+0", "e"),
                            GOAL_SIZED_P99_S if at_goal else None)
            report.notes.append(f"timeline of {label}: {path}")
            if steps := sized[(live_ids, mode)].steps:  # every step of the window, phase by phase, for a closer look
                np.savez_compressed(out_dir / f"steps-{label}.npz", **{k: np.asarray(v) for k, v in steps.items()})
            if cpu := sized[(live_ids, mode)].cpu:
                (out_dir / f"cpu-{label}.json").write_bytes(orjson.dumps(cpu))
    report.notes.append(f"load average at the end {load_average()}")
    return report


if __name__ == "__main__":
    run(quick=True).print()


__all__ = ["ManifestWatcher", "Measured", "RankingClient", "freshness", "measure", "run", "seed_population"]
