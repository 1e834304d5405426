"""Wiring of the whole pipeline: simulator -> Kafka -> trainer actor (joiner, Feast, model) -> snapshots -> Serve.

This is the composition root: the only place that knows every stage and starts processes.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path

import httpx
import orjson
import ray
from ray import serve

from features.config import FeatureStoreConfig
from features.store import OnlineFeatures
from infra.kafka.broker import bootstrap_servers
from infra.layout import RunLayout
from infra.report import write_report
from infra.runtime import cluster_has_gpus, init_ray
from learner.config import CadenceConfig, LearnerConfig, WorkerConfig
from learner.distributed import GroupConfig, PeerLost, host_store
from learner.telemetry import TelemetryConfig
from learner.worker import TrainerWorker
from learner.weight_store import actor_name
from serving.app import build_app
from serving.config import ServingConfig
from stream.joiner import JoinerConfig
from stream.kafka_io import EventSink, KafkaConfig, ensure_topics
from stream.simulator import Simulator, SimulatorConfig


def worker_config(
    layout: RunLayout,
    *,
    bootstrap: str,
    topic: str,
    family: str = "mmoe",
    window_ms: int = 10_000,
    snapshot_every_steps: int = 10,
    checkpoint_every_steps: int = CadenceConfig.checkpoint_every_steps,
    batch_size: int = 512,
    wandb_mode: str = "offline",
) -> WorkerConfig:
    """A worker's configuration for tests, benchmarks and the demo: defaults but for what they vary."""
    cadence = CadenceConfig(snapshot_every_steps=snapshot_every_steps, checkpoint_every_steps=checkpoint_every_steps)
    return WorkerConfig(
        kafka=KafkaConfig(bootstrap_servers=bootstrap, topic=topic, group_id=f"{topic}.trainer"),
        joiner=JoinerConfig(window_ms=window_ms),
        features=FeatureStoreConfig(data_dir=layout.features),
        learner=LearnerConfig(family=family, cadence=cadence),
        telemetry=TelemetryConfig(mode=wandb_mode, directory=layout.wandb,  # type: ignore[arg-type]
                                  history=layout.history),
        snapshot_dir=layout.snapshots,
        checkpoint_dir=layout.checkpoints,
        batch_size=batch_size,
        weight_store=actor_name(f"{layout.root.name}-{sha256(str(layout.root.absolute()).encode()).hexdigest()[:10]}"),
    )


class TrainerActor(TrainerWorker):
    """The trainer worker as run by Ray. If a peer of its data-parallel group dies, its collectives fail;
    it then exits its process so that Ray restarts it too and the whole group re-forms from its
    checkpoints (``learner.distributed``), instead of hanging or training alone."""

    def run(self, max_seconds: float | None = None) -> dict:
        try:
            return super().run(max_seconds)
        except PeerLost as exc:
            print(f"moestream: {exc}; exiting so that Ray restarts this worker", flush=True)
        except Exception:  # noqa: BLE001 - any failure: restart from the checkpoint rather than stay up idle
            # An actor whose run raised would stay alive doing nothing, and in a group its peers would
            # wait on it until their collectives time out; a restart resumes every worker from the last
            # group checkpoint instead (bounded by max_restarts).
            print(f"moestream: worker failed; exiting so that Ray restarts it:\n{traceback.format_exc()}", flush=True)
        os._exit(75)

    def pid(self) -> int:
        return os.getpid()


def _actor_options(max_restarts: int, resources: Mapping[str, float] | None = None) -> dict:
    """Threaded (``stats``/``stop`` answer while ``run`` loops); restarted by Ray after a crash, its ``run``
    retried on the new process, which resumes from the last checkpoint and the committed offsets.
    ``resources``: custom Ray resources the actor requires, which places it on the nodes that offer them."""
    options: dict = {"max_concurrency": 4, "num_cpus": 1, "max_restarts": max_restarts,
                     "max_task_retries": max_restarts}
    if resources:
        options["resources"] = dict(resources)
    if cluster_has_gpus():
        options["num_gpus"] = 1
    return options


def start_trainer(config: WorkerConfig, max_restarts: int = 3, resources: Mapping[str, float] | None = None):
    """One trainer actor and the reference of its ``run``."""
    actor = ray.remote(TrainerActor).options(**_actor_options(max_restarts, resources)).remote(config)
    return actor, actor.run.remote()


@dataclass
class TrainerGroup:
    """N trainer actors of one consumer group training one model data-parallel."""

    actors: list
    runs: list
    store: object | None = None
    """The rendezvous store (hosted here, in the driver; it must outlive worker restarts)."""

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def stop(self) -> list[dict]:
        """Stop every worker; each one's final figures. A worker that died for good (its restarts spent) raises
        :class:`WorkersFailed`, naming each dead worker and its cause, once the others have stopped."""
        for actor in self.actors:
            actor.stop.remote()
        results, failures = [], []
        for rank, run in enumerate(self.runs):
            try:
                results.append(ray.get(run))
            except ray.exceptions.RayError as exc:
                failures.append(f"worker {rank}: {_cause(exc)}")
        for actor in self.actors:
            try:
                ray.get(actor.close.remote())
            except ray.exceptions.RayError:
                pass  # a dead worker has nothing left to close
        if failures:
            raise WorkersFailed(failures, results)
        return results


class WorkersFailed(RuntimeError):
    """Trainer workers died for good (Ray's restarts spent); ``results``: the figures of those that did not."""

    def __init__(self, failures: list[str], results: list[dict]) -> None:
        super().__init__("; ".join(failures))
        self.failures, self.results = failures, results


def _cause(exc: BaseException) -> str:
    """The last line of a Ray error's cause: what the worker died of, without Ray's wrapping."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def start_trainers(
    config: WorkerConfig, workers: int = 1, max_restarts: int = 3, resources: Mapping[str, float] | None = None
) -> TrainerGroup:
    """``workers`` trainer actors sharing one consumer group id (each reads a static share of the partitions,
    see ``learner.worker``), each on a GPU when the cluster has one; with more than one, gradients are
    averaged every step (``learner.distributed``)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > config.kafka.partitions:
        raise ValueError(f"workers ({workers}) must not exceed the topic's partitions (kafka.partitions = "
                         f"{config.kafka.partitions}): each worker reads its own share of them")
    if workers == 1:
        actor, run = start_trainer(config, max_restarts, resources)
        return TrainerGroup([actor], [run])
    host = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    store = host_store(host, port, workers)
    options = _actor_options(max_restarts, resources)
    actors = [
        ray.remote(TrainerActor).options(**options).remote(replace(config, group=GroupConfig(host, port, workers, rank)))
        for rank in range(workers)
    ]
    return TrainerGroup(actors, [a.run.remote() for a in actors], store)


def start_serving(config: WorkerConfig, port: int, serving: ServingConfig | None = None) -> str:
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(build_app(config.snapshot_store, config.features, serving or ServingConfig(), config.weight_store),
              name="moestream", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.25) -> None:
    """Poll a condition until it holds or the deadline passes (then raise, naming what was awaited)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def produce(sink: EventSink, sim: Simulator, seconds: float, rate: float, malformed_every: int = 0) -> int:
    """Paced simulator traffic for ``seconds``; every ``malformed_every``-th message is deliberately broken."""
    n = 0
    for event in sim.events(int(time.time() * 1000), int(seconds * rate), rate=rate):
        sink.send(event)
        n += 1
        if malformed_every and n % malformed_every == 0:
            sink.send_raw(b'{"type": "impression", "user_id": "not-a-number"', key=b"bad")
            n += 1
    sink.flush()
    return n


@dataclass
class DemoSummary:
    produced: int
    consumed: int
    dead_lettered: dict[str, int]
    steps: int
    examples_trained: int
    snapshots: list[int]
    metrics: dict[str, dict[str, float]]
    prediction: dict
    served_version: int
    wandb_dir: str | None
    wall_s: float
    joiner: dict = field(default_factory=dict)
    run: str = ""
    """The run's name: ``moestream serve --run NAME`` serves its model again."""
    run_dir: str = ""
    health: dict | None = None
    """The last expert-health report (``health/experts.json``), if the trainer wrote one."""
    report: str | None = None
    """The run's HTML report (``moestream report``)."""


DEMO_SIMULATOR = SimulatorConfig(seed=7, n_users=2_000, n_items=5_000)
"""A catalog small enough that ~1 minute of traffic shows users and items often enough to learn from."""


def run_demo(
    seconds: float = 40.0,
    rate: float = 300.0,
    family: str = "home",
    port: int = 18000,
    data_root: Path = Path(".moestream"),
    log: Callable[[str], None] = print,
) -> DemoSummary:
    """The main job end to end on embedded defaults, bounded in time."""
    t0 = time.monotonic()
    run_id = time.strftime("demo-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    layout = RunLayout.of(data_root, run_id)
    bootstrap = bootstrap_servers()
    config = worker_config(layout, bootstrap=bootstrap, topic=f"moestream.demo.{run_id}", family=family)
    log(f"run {run_id}: Kafka at {bootstrap}, state under {layout.root}")
    ensure_topics(config.kafka)
    OnlineFeatures(config.features).apply()
    log("starting Ray, the trainer actor and the Serve app ...")
    init_ray(quiet=True)
    url = start_serving(config, port)
    trainer, run_ref = start_trainer(config)

    log(f"producing simulator traffic for {seconds:.0f}s at {rate:.0f} requests/s ...")
    sink = EventSink(config.kafka)
    produced = produce(sink, Simulator(DEMO_SIMULATOR), seconds, rate, malformed_every=2000)
    sink.close()

    wait_for(lambda: ray.get(trainer.stats.remote())["consumed"] >= produced, 120, "the trainer to consume all")
    trainer.stop.remote()
    stats = ray.get(run_ref)
    last = stats["snapshots"][-1]
    wait_for(lambda: httpx.get(f"{url}/healthz").json().get("model_version") == last, 60, f"serving v{last}")
    request = {"user_id": 42, "candidates": [1, 2, 3]}
    response = httpx.post(f"{url}/v1/rank", json=request, timeout=10)
    response.raise_for_status()
    ray.get(trainer.close.remote())  # the run history is complete once the trainer closed its telemetry
    health = _read_json(layout.root / "health" / "experts.json")
    log("writing the run report ...")
    report = write_report(layout.root)
    return DemoSummary(
        produced=produced,
        consumed=stats["consumed"],
        dead_lettered=stats["dead_lettered"],
        steps=stats["steps"],
        examples_trained=stats["examples_trained"],
        snapshots=stats["snapshots"],
        metrics=stats["metrics"],
        prediction={"request": request, "response": response.json()},
        served_version=response.json()["model_version"],
        wandb_dir=stats["wandb_dir"],
        wall_s=time.monotonic() - t0,
        joiner=stats["joiner"],
        run=run_id,
        run_dir=str(layout.root),
        health=health,
        report=str(report),
    )


def _read_json(path: Path) -> dict | None:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def shutdown() -> None:
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


__all__ = ["DemoSummary", "RunLayout", "TrainerGroup", "run_demo", "start_serving", "start_trainer", "start_trainers",
           "worker_config"]
