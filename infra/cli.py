"""The ``moestream`` command line.

Every command that runs part of the pipeline reads the configuration (``--config FILE``, else
``$MOESTREAM_CONFIG``, else ``./moestream.yaml`` where there is one; then ``MOESTREAM_<SECTION>__<KEY>``
variables, see ``infra.config``) and says which file that was; its flags override single keys of it for one
run. A run lives in ``<data_root>/runs/<run>`` (``--run`` picks one, ``latest`` the newest).
"""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from infra.console import CommandConsole
from infra.features_cli import app as features_app
from infra.kafka.cli import app as kafka_app

if TYPE_CHECKING:
    from infra.config import MoestreamConfig

app = typer.Typer(help="Streaming online learning of multi-task MoE rankers.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
snapshots_app = typer.Typer(help="Published weight snapshots.", no_args_is_help=True)
app.add_typer(snapshots_app, name="snapshots")
config_app = typer.Typer(help="The effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(features_app, name="features")
console = CommandConsole()
notes = CommandConsole(stderr=True)
"""Deprecations and other notes beside a command's output (stderr: ``config show | ...`` stays YAML)."""

ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", "-c", dir_okay=False,
    help="The configuration file (default: $MOESTREAM_CONFIG, else ./moestream.yaml if present, else built-in "
         "defaults); MOESTREAM_* variables apply on top.",
)]
RunName = Annotated[Optional[str], typer.Option(
    "--run", help="The run, kept in <data_root>/runs/<run> (paths.run, default live); latest: the newest run.")]
DataRoot = Annotated[Optional[Path], typer.Option(help="Where runs keep Feast stores, snapshots and W&B files "
                                                       "(paths.data_root).")]
Topic = Annotated[Optional[str], typer.Option(help="Kafka topic of the event stream (kafka.topic).")]
Model = Annotated[Optional[str], typer.Option(help="Model family, one of learner.models.FAMILIES (learner.family).")]
TRAIN_POLL_S = 0.5
"""How often `train` looks at its workers: a bounded run stops, and a dead worker is reported, this soon after."""
STATUS_EVERY_S = 5.0
"""`train` prints a worker's status line at most this often (and only when something moved)."""


def _print_version(value: bool) -> None:
    if value:
        from infra.doctor import version

        typer.echo(f"moestream {version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print moestream's version and exit.")] = False,
) -> None:
    """Streaming online learning of multi-task MoE rankers."""


def load(path: Path | None, *, uses_run: bool = False, **overrides: Any) -> MoestreamConfig:
    """The effective configuration, with the flags given (dotted key -> value; None: not given) on top;
    an invalid one ends the command with its message and exit status 2. A key set under its old name is
    noted once on stderr with the new name. Which file was read goes to stderr, and, for a command that
    ``uses_run``, which run is meant (``--run latest`` resolved to the newest run's name)."""
    from infra.config import ConfigDeprecationWarning, ConfigError, config_path, load_config

    file = config_path(path)
    flags = {k.replace("__", "."): v for k, v in overrides.items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConfigDeprecationWarning)
            config = load_config(file, overrides=flags)
            if uses_run and config.paths.run == "latest":
                config = load_config(file, overrides={**flags, "paths.run": _latest_run(config)})
    except ConfigError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    finally:
        for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, ConfigDeprecationWarning)):
            notes.print(f"moestream: {message}", style="yellow", markup=False, highlight=False)
    source = str(file.absolute()) if file is not None else "built-in defaults (no ./moestream.yaml)"
    run = f"; run {config.paths.run} in {config.layout().root}" if uses_run else ""
    notes.print(f"config: {source}{run}", style="dim", markup=False, highlight=False)
    return config


def _latest_run(config: MoestreamConfig) -> str:
    from infra.layout import latest_run, runs_dir

    name = latest_run(config.paths.data_root)
    if name is None:
        console.print(f"[red]--run latest: no run in {runs_dir(config.paths.data_root)}[/]")
        raise typer.Exit(1)
    return name


def _stop_on_sigterm() -> None:
    """``docker stop``, ``kubectl delete`` and ``ray job stop`` send SIGTERM: end as Ctrl-C does, cleanly.

    Installed after joining Ray, whose core installs a handler that dumps a stack and aborts on SIGTERM."""
    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


@app.command()
def simulate(
    rate: Annotated[float, typer.Option(help="Requests per second (each shows several items).",
                                        callback=_positive)] = 100.0,
    seconds: Annotated[float, typer.Option(help="How long to produce.", callback=_positive)] = 10.0,
    topic: Topic = None,
    seed: Annotated[Optional[int], typer.Option(help="Simulator seed (simulator.seed).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write a log file (.parquet or .csv) instead of producing.")] = None,
    config: ConfigFile = None,
) -> None:
    """Produce simulated impressions and feedback to Kafka (or write them to a log file)."""
    cfg = load(config, kafka__topic=topic, simulator__seed=seed)
    from stream.simulator import Simulator

    if out is not None:
        from stream.logfile import write_log

        sim = Simulator(cfg.simulator)
        n = write_log(sim.events(int(time.time() * 1000), int(seconds * rate)), out)
        console.print(f"wrote {n} events to {out}")
        return
    _require_topics(cfg.kafka)
    from infra.pipeline import produce  # after the broker check: importing the pipeline takes seconds
    from stream.kafka_io import EventSink

    sink = EventSink(cfg.kafka)
    n = produce(sink, Simulator(cfg.simulator), seconds, rate)
    sink.close()
    console.print(f"produced {n} events to {cfg.kafka.topic} at {cfg.kafka.bootstrap_servers}")


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="A Parquet or CSV log: KuaiRand-1K's schema or moestream's own.")],
    direct: Annotated[bool, typer.Option("--direct", help="Train in this process instead of producing to Kafka.")] = False,
    speed: Annotated[float, typer.Option(help="0: as fast as possible; 60: sixty times real time.")] = 0.0,
    start: Annotated[int, typer.Option(help="Skip this many events of the sorted sequence (resume).")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Stop after this many events.")] = None,
    restamp: Annotated[bool, typer.Option("--restamp", help="Shift timestamps so the first event is now.")] = False,
    topic: Topic = None,
    model: Model = None,
    data_root: DataRoot = None,
    config: ConfigFile = None,
) -> None:
    """Replay a historical log in event-time order to Kafka, or straight into the trainer with --direct.

    The run gets a directory of its own, <data_root>/runs/replay-<time>; rows of the log that cannot be
    replayed are skipped and listed there in rejects.jsonl (docs/replay.md). A file that cannot be read at
    all ends the command with one line saying why, and exit status 1; so does --start past the end of the log.
    To Kafka, every batch is acknowledged by the broker before the next is read, and a run that fails part-way
    (a lost broker) prints the position to resume from and exits non-zero.
    """
    from stream.replay import LogError, detect_schema

    try:
        detect_schema(path)  # before anything starts: a missing or unreadable file is one line, not a trainer
    except LogError as exc:
        _say(str(exc), style="red")
        raise typer.Exit(1) from None
    run = f"replay-{time.strftime('%Y%m%d-%H%M%S')}"
    if direct:
        from learner.replay_source import train_replay

        cfg = load(config, uses_run=True, learner__family=model, paths__data_root=data_root, paths__run=run)
        layout = cfg.layout()
        replay_config = _replay_config(path, speed, start, limit, restamp, layout.root)
        result, stats = _replayed(train_replay, cfg.worker_config(), replay_config)
        _say(f"replayed {result.emitted} events ({result.schema}) in {result.seconds:.1f}s; "
             f"trained {stats['examples_trained']} examples in {stats['steps']} steps; "
             f"snapshots {stats['snapshots']} under {layout.snapshots}")
        for task, m in stats["metrics"].items():
            console.print(f"  {task:10s} progressive AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}")
    else:
        cfg = load(config, kafka__topic=topic, paths__data_root=data_root)
        from infra.layout import RunLayout

        replay_config = _replay_config(path, speed, start, limit, restamp, RunLayout.of(cfg.paths.data_root, run).root)
        _require_topics(cfg.kafka)
        result = _replayed_to_kafka(cfg.kafka, replay_config)
        console.print(f"replayed {result.emitted} events ({result.schema}) to {cfg.kafka.topic} in {result.seconds:.1f}s")
    if result.unknown_columns:
        _say(f"ignored columns no log schema knows: {', '.join(result.unknown_columns)}")
    if result.emitted == 0 and not result.rejected and start == 0:
        _say(f"{path}: no events (the file has a header and no rows)")
    if result.rejected:
        by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(result.rejected.items()))
        _say(f"rejected {sum(result.rejected.values())} rows ({by_reason}); listed in {result.rejects_path}")
    console.print(f"resume with --start {result.position.emitted}")


def _require_topics(kafka) -> None:
    """A broker that answers within kafka.connect_timeout_s and the topics on it; else one line, exit 1."""
    from stream.kafka_io import BrokerUnavailable, ensure_topics, require_broker

    try:
        require_broker(kafka)
        ensure_topics(kafka)
    except BrokerUnavailable as exc:
        _say(str(exc), style="red")
        raise typer.Exit(1) from None


def _say(message: str, style: str | None = None) -> None:
    """One line, never wrapped (it may hold a path), with no markup read into it."""
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def _replay_config(path: Path, speed: float, start: int, limit: int | None, restamp: bool, run_dir: Path):
    from stream.replay import ReplayConfig

    run_dir.mkdir(parents=True, exist_ok=True)
    return ReplayConfig(path=path, speed=speed, start=start, limit=limit, restamp=restamp,
                        rejects_path=run_dir / "rejects.jsonl")


def _replayed(run, *args):
    """``run(*args)``; a log that turns out unreadable while it is read ends the command in one line."""
    from stream.replay import LogError, PastTheEnd

    try:
        return run(*args)
    except PastTheEnd as exc:
        _say(f"--start {exc.start} is past the end of {exc.path} ({exc.events} events)", style="red")
        raise typer.Exit(1) from None
    except LogError as exc:
        _say(str(exc), style="red")
        raise typer.Exit(1) from None


def _replayed_to_kafka(kafka, replay_config):
    """Replay to the event topic, each batch acknowledged by the broker before the next is read. A failure
    part-way (a lost broker, a log unreadable further on, Ctrl-C) ends the command with the position to resume
    from, which counts acknowledged events only: a resumed run may repeat a batch in flight, never skip one."""
    from kafka.errors import KafkaError

    from stream.kafka_io import EventSink
    from stream.replay import replay as run_replay

    acknowledged = replay_config.resume_from.emitted

    def delivered(position) -> None:
        nonlocal acknowledged
        acknowledged = position.emitted

    sink = EventSink(kafka)
    try:
        return _replayed(run_replay, replay_config, sink.deliver, delivered)
    except typer.Exit as stop:  # the log turned out unreadable (said in one line)
        if acknowledged == replay_config.resume_from.emitted:
            raise  # before anything was produced: nothing to resume
        code = stop.exit_code
    except (KafkaError, OSError) as exc:
        said = str(exc)  # kafka-python's errors start with their class name, others do not
        _say(f"replay stopped: {said if said.startswith(type(exc).__name__) else f'{type(exc).__name__}: {said}'}",
             style="red")
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        sink.close()
    console.print(f"resume with --start {acknowledged}")
    raise typer.Exit(code)


@app.command()
def train(
    model: Model = None,
    seconds: Annotated[Optional[float], typer.Option(help="Stop after this long (default: run until Ctrl-C).")] = None,
    max_events: Annotated[Optional[int], typer.Option(
        min=1, help="Stop once the workers consumed this many events in all (a bounded run).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Data-parallel trainer actors in one consumer group (trainer.workers).")] = None,
    topic: Topic = None,
    data_root: DataRoot = None,
    run: RunName = None,
    config: ConfigFile = None,
) -> None:
    """Train continuously from the event topic in Ray actors, publishing snapshots, until Ctrl-C or SIGTERM
    (or --seconds / --max-events).

    One GPU per actor when the cluster has GPUs; with several workers, gradients are averaged every step. On
    a cluster the actors go to the nodes that offer ray.trainer_resources; submit the command as a Ray job:
    `ray job submit -- moestream train --config moestream.yaml`.
    """
    cfg = load(config, uses_run=True, learner__family=model, trainer__workers=workers, kafka__topic=topic,
               paths__data_root=data_root, paths__run=run)
    from stream.kafka_io import BrokerUnavailable, require_broker

    try:
        require_broker(cfg.kafka)  # before Ray starts: no broker is one line, not a traceback a minute later
    except BrokerUnavailable as exc:
        _say(str(exc), style="red")
        raise typer.Exit(1) from None
    import ray

    from infra.deploy import connect, metrics_endpoints, start_training  # after the broker check: it takes seconds
    from infra.disk import free_space_warnings

    for warning in free_space_warnings(cfg):
        _say(f"moestream: {warning}", style="yellow")
    connect(cfg)
    _stop_on_sigterm()
    group = start_training(cfg)
    console.print(f"training {cfg.learner.family} from {cfg.kafka.topic} at {cfg.kafka.bootstrap_servers} with "
                  f"{cfg.trainer.workers} worker(s); snapshots in {cfg.layout().snapshots}")
    _say(f"Prometheus metrics at {' '.join(metrics_endpoints(cfg))} (docs/telemetry.md)")
    deadline = time.monotonic() + seconds if seconds else None
    shown: dict[int, tuple] = {}
    next_status = time.monotonic() + STATUS_EVERY_S
    try:
        while True:
            ready, _ = ray.wait(group.runs, num_returns=len(group.runs), timeout=TRAIN_POLL_S)
            if len(ready) == len(group.runs):
                break
            try:
                stats = group.stats()
            except ray.exceptions.RayError:  # a worker died for good: stop() below says which and why
                break
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_EVERY_S
                for s in stats:
                    progress = (s["consumed"], s["steps"], s["snapshots"][-1:], _outages(s))
                    if shown.get(s["rank"]) != progress:  # a line when something moved, not every few seconds
                        shown[s["rank"]] = progress
                        _say(_status(s))
            if max_events is not None and sum(s["consumed"] for s in stats) >= max_events:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:
        pass
    try:
        _finish_training(group, bounded=seconds is not None or max_events is not None)
    finally:
        _report_after_run(cfg.layout().root)


def _status(s: dict) -> str:
    snapshot = f"v{s['snapshots'][-1]}" if s["snapshots"] else "none yet"
    line = f"worker {s['rank']}: consumed {s['consumed']:,}  steps {s['steps']:,}  snapshot {snapshot}"
    ids = _ids(s)
    return line + (f"  {ids}" if ids else "") + _outages(s)


def _ids(s: dict) -> str:
    """The embedding tables' figures for a status line: per field, live ids, and what the map did to others."""
    tables = s.get("id_tables") or {}
    if not tables:  # the shared hashed table
        if not s.get("id_keys"):
            return ""
        return f"id collisions {s['id_collision_rate']:.2%} of {s['id_keys']:,} ids in {s['id_buckets']:,} buckets"
    parts = []
    for name, t in tables.items():
        events = ", ".join(f"{kind} {t[kind]:,}" for kind in ("expired", "evicted", "collisions") if t.get(kind))
        parts.append(f"{name} {t['live']:,} live" + (f" ({events})" if events else ""))
    return "ids: " + ", ".join(parts)


def _outages(s: dict) -> str:
    """What a worker waited out or recovered from, for its status line (nothing when all is well)."""
    parts = [f"{s[key]} {what}" for key, what in (("broker_retries", "fetch(es) retried while the broker was away"),
                                                  ("intake_stalls", "intake stall(s)"),
                                                  ("publish_failures", "failed publish(es)"),
                                                  ("feature_store_outages", "feature store outage(s)"))
             if s.get(key)]
    return "  " + ", ".join(parts) if parts else ""


def _finish_training(group, bounded: bool) -> None:
    """Stop the workers and report; a run that did not do its job exits 1: a worker died for good, or a bounded
    run trained nothing although events were there."""
    from infra.pipeline import WorkersFailed

    try:
        results, failures = group.stop(), []
    except WorkersFailed as exc:
        results, failures = exc.results, exc.failures
    for stats in results:
        published = stats["snapshots"]
        versions = f"v{published[0]} .. v{published[-1]}" if published else "none"
        _say(f"worker {stats['rank']}: trained {stats['examples_trained']:,} examples in {stats['steps']:,} steps; "
             f"snapshots {versions}" + _outages(stats))
    for failure in failures:
        _say(f"{failure} (died after its restarts, trainer.max_restarts)", style="red")
    if failures:
        raise typer.Exit(1)
    consumed = sum(s["consumed"] for s in results)
    waiting = sum(sum(s.get("lag", {}).values()) for s in results)
    if bounded and not sum(s["examples_trained"] for s in results) and (consumed or waiting):
        dead = sum(sum(s.get("dead_lettered", {}).values()) for s in results)
        _say(f"trained no example although the workers consumed {consumed} events ({dead} dead-lettered) and "
             f"{waiting} more wait in the topic", style="red")
        raise typer.Exit(1)


@app.command()
def serve(
    port: Annotated[Optional[int], typer.Option(help="HTTP port of Serve's proxy (http.port).")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(help="gRPC port of Serve's proxy (grpc.port).")] = None,
    data_root: DataRoot = None,
    run: RunName = None,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Deploy on the cluster (ray.address or RAY_ADDRESS) and return, leaving the app running "
                         "(default: serve until Ctrl-C, then remove it).",
    )] = False,
    config: ConfigFile = None,
) -> None:
    """Serve the latest snapshots of the run over HTTP and gRPC.

    Deploys the Serve config that `moestream serve-config` prints, on the cluster at ray.address (or
    RAY_ADDRESS), else on a local Ray instance.
    """
    cfg = load(config, uses_run=True, http__port=port, grpc__port=grpc_port, paths__data_root=data_root,
               paths__run=run)
    import os

    if detach and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        _say("--detach needs a Ray cluster (ray.address or RAY_ADDRESS): a local Ray instance ends with this command, "
             "and the app with it", style="red")
        raise typer.Exit(2)
    from infra.deploy import connect, deploy_ranking, grpc_address, undeploy_ranking

    connect(cfg)
    _stop_on_sigterm()
    url, grpc_at = deploy_ranking(cfg), grpc_address(cfg)
    console.print(f"serving run {cfg.paths.run} ({cfg.layout().snapshots}): POST {url}/v1/rank, API docs at {url}/docs"
                  + (f", gRPC moestream.v1.Ranking/Rank at {grpc_at}" if grpc_at else "")
                  + ("" if detach else " (Ctrl-C stops)"))
    if detach:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        undeploy_ranking()


@app.command("serve-config")
def serve_config_command(
    out: Annotated[Optional[Path], typer.Option(help="Write it here instead of printing it.")] = None,
    config: ConfigFile = None,
) -> None:
    """Print the Ray Serve config of the ranking app, generated from the configuration.

    A ServeDeploySchema document: KubeRay's serveConfigV2, or the file for `serve deploy` / `serve run`.
    """
    cfg = load(config)
    import yaml

    from infra.config import ConfigError
    from infra.deploy import serve_config

    try:
        text = yaml.safe_dump(serve_config(cfg), sort_keys=False, default_flow_style=False)
    except ConfigError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")


@config_app.command("show")
def config_show(config: ConfigFile = None) -> None:
    """Print the effective configuration (file, then MOESTREAM_* variables) as YAML.

    Credentials are never printed, only whether the environment provides them.
    """
    cfg = load(config)
    from infra.config import render

    typer.echo(render(cfg), nl=False)


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(help="How long the simulator produces.")] = 40.0,
    rate: Annotated[float, typer.Option(help="Simulated requests per second (4 impressions each).")] = 300.0,
    model: Annotated[str, typer.Option(help="Model family, one of learner.models.FAMILIES.")] = "home",
    port: int = 18000,
    data_root: DataRoot = None,
    config: ConfigFile = None,
) -> None:
    """Run the whole pipeline on embedded defaults for a bounded time and print a summary.

    The demo trains HoME, the project's headline family (``--model`` picks another). Of the configuration it
    takes kafka.bootstrap_servers and paths.data_root; the rest are its own small settings. With the local broker's address a local broker is started for the demo and
    stopped after it (one that was already running is left running).
    """
    cfg = load(config, learner__family=model, paths__data_root=data_root)
    import os

    from infra.kafka import broker
    from infra.pipeline import run_demo, shutdown

    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = cfg.kafka.bootstrap_servers  # what run_demo connects to
    local = cfg.kafka.bootstrap_servers == broker.BrokerConfig().bootstrap
    started_broker = local and not broker.status().running
    if started_broker:
        console.print("[dim]starting a local Kafka broker (first run downloads its jars from Maven Central) ...[/]")
        broker.up()
    try:
        summary = run_demo(seconds, rate, cfg.learner.family, port, cfg.paths.data_root,
                           log=lambda m: console.print(f"[dim]{m}[/]"))
    finally:
        shutdown()
        if started_broker:
            broker.down()
    _print_summary(summary)


def _print_summary(s) -> None:
    table = Table(title="moestream demo", show_header=False)
    table.add_row("run (serve it again: moestream serve --run NAME)", s.run)
    table.add_row("events produced / consumed", f"{s.produced} / {s.consumed}")
    table.add_row("dead-lettered", ", ".join(f"{k}: {v}" for k, v in s.dead_lettered.items()) or "0")
    table.add_row("examples trained / steps", f"{s.examples_trained} / {s.steps}")
    table.add_row("snapshot versions", f"{len(s.snapshots)} (v{s.snapshots[0]} .. v{s.snapshots[-1]})")
    table.add_row("W&B (offline) run", str(s.wandb_dir))
    table.add_row("report (opens offline)", str(s.report) if s.report else "none")
    table.add_row("wall time", f"{s.wall_s:.1f} s")
    console.print(table)
    metrics = Table(title="progressive validation (scored before learning)")
    for col in ("task", "AUC", "AUC, last 20k", "logloss", "calibration", "positive rate", "examples"):
        metrics.add_column(col)
    for task, m in s.metrics.items():
        metrics.add_row(
            task, f"{m['auc']:.4f}", f"{m.get('window_auc', float('nan')):.4f}", f"{m['logloss']:.4f}",
            f"{m['calibration']:.3f}",
            f"{m['positive_rate']:.2%}", f"{m['n']:.0f}",
        )
    console.print(metrics)
    if s.health:
        _print_health(s.health)
    console.print(f"POST /v1/rank {s.prediction['request']} ->")
    console.print_json(data=s.prediction["response"])


def _print_health(r: dict) -> None:
    """Per task: the experts it routes most to, its drift, its anomalies; then every anomaly by kind."""
    table = Table(title=f"expert health at step {r['step']} ({r.get('family', '?')}; load balance "
                        f"{r['load_balance']:.2f}, 1 = even)")
    for col in ("task", "top experts (routing share)", "drift vs published", "drift vs reference", "anomalies"):
        table.add_column(col)
    by_task: dict[str, list[str]] = {}
    for a in r["anomalies"]:
        by_task.setdefault(a["subject"].removeprefix("task "), []).append(a["kind"])
    for t, task in enumerate(r["tasks"]):
        share = r["routing_share"][t]
        top = sorted(range(len(share)), key=lambda e: -share[e])[:3]
        drift = [(r.get(f"drift_vs_{kind}") or {}).get(task) for kind in ("published", "reference")]
        table.add_row(task, ", ".join(f"{r['experts'][e]} {share[e]:.0%}" for e in top),
                      *("-" if d is None else f"{d:.4f}" for d in drift), ", ".join(by_task.get(task, [])) or "-")
    console.print(table)
    kinds: dict[str, list[str]] = {}
    for a in r["anomalies"]:
        kinds.setdefault(a["kind"], []).append(a["subject"])
    if kinds:
        _say("anomalies: " + "; ".join(f"{kind} {len(subjects)} ({', '.join(subjects)})"
                                        for kind, subjects in sorted(kinds.items())), style="yellow")
    else:
        _say("anomalies: none", style="green")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(
        help="Which benchmark: models, synthetic, stream, features, learner, replay, embeddings, serving, freshness, "
             "quality; or all.")],
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes and fewer repeats.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="quality: compute every seed again instead of resuming the ones a run with the same plan, "
                        "configuration and code finished before.")] = False,
) -> None:
    """Run a benchmark: a table on the terminal and, with --json, the figures as JSON.

    `bench all` runs models, stream, features, learner, replay, embeddings, serving and freshness in turn (and, in
    full mode, quality last: hours) and writes benchmarks/results/<date>-<machine>.json and .md; it exits 1 if any
    of them failed.
    """
    import benchmarks

    if name == "all":
        if fresh:
            console.print("[red]--fresh applies to bench quality only[/]")
            raise typer.Exit(2)
        _bench_all(quick, json_path)
        return
    try:
        report = benchmarks.run(name, quick=quick, fresh=fresh)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/]")
        raise typer.Exit(2) from None
    report.print(console)
    if json_path:
        report.write_json(json_path)
        console.print(f"wrote {json_path}")


def _bench_all(quick: bool, json_path: Path | None) -> None:
    from benchmarks.suite import run_all

    result = run_all(quick=quick)
    console.print(result.table())
    for outcome in result.outcomes:
        for note in outcome.report.notes if outcome.report else ():
            console.print(f"[dim]- {outcome.name}: {note}[/]", highlight=False)
    written = result.write()
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(result.to_json())
        written += (json_path,)
    console.print(f"{len(result.outcomes) - len(result.failed)} of {len(result.outcomes)} benchmarks ran in "
                  f"{result.seconds:.0f} s; wrote {', '.join(map(str, written))}")
    if result.failed:
        console.print(f"[red]failed: {', '.join(o.name for o in result.failed)}[/]")
        raise typer.Exit(1)


SnapshotDir = Annotated[Optional[Path], typer.Argument(
    help="A snapshot directory (default: the run's, <data_root>/runs/<run>/snapshots).")]


@snapshots_app.command("list")
def snapshots_list(directory: SnapshotDir = None, run: RunName = None, data_root: DataRoot = None,
                   config: ConfigFile = None) -> None:
    """List the snapshots in a directory (* marks the one LATEST names; a delta names its parent)."""
    from learner.snapshots import SnapshotStore

    directory = directory or load(config, uses_run=True, paths__run=run, paths__data_root=data_root).layout().snapshots

    if not directory.is_dir():
        console.print(f"[red]no snapshot directory at {directory}[/]")
        raise typer.Exit(1)
    store = SnapshotStore(directory)
    table = Table()
    for col in ("version", "kind", "parent", "family", "step", "examples", "sha256", "created", "note"):
        table.add_column(col)
    latest = store.latest_version()
    for m in store.list():
        mark = " *" if m.version == latest else ""
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at))
        note = f"rollback of v{m.data['rollback_of']}" if "rollback_of" in m.data else ""
        parent = f"v{m.parent}" if m.parent is not None else ""
        table.add_row(f"v{m.version}{mark}", m.kind, parent, m.data.get("family", "?"), str(m.data.get("step")),
                      str(m.data.get("examples")), m.sha256[:12], created, note)
    console.print(table)


@snapshots_app.command("rollback")
def snapshots_rollback(
    version: Annotated[str, typer.Argument(help="A kept version to serve again (3 or v3).")],
    directory: SnapshotDir = None,
    run: RunName = None,
    data_root: DataRoot = None,
    config: ConfigFile = None,
) -> None:
    """Serve a kept version again: verified, then republished as the newest version (followers pick it up)."""
    from learner.snapshots import SnapshotError, SnapshotStore

    directory = directory or load(config, uses_run=True, paths__run=run, paths__data_root=data_root).layout().snapshots

    raw = version.lower().removeprefix("v")
    if not (raw.isascii() and raw.isdecimal()):
        console.print(f"[red]VERSION must be a number like 3 or v3, got {version!r}[/]")
        raise typer.Exit(2)
    if not directory.is_dir():
        console.print(f"[red]no snapshot directory at {directory}[/]")
        raise typer.Exit(1)
    try:
        manifest = SnapshotStore(directory).rollback(int(raw))
    except SnapshotError as exc:
        console.print(f"[red]rollback refused: {exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"v{int(raw)} is live again as v{manifest.version} (LATEST -> v{manifest.version}, sha256 {manifest.sha256[:12]})")


@app.command()
def doctor(config: ConfigFile = None) -> None:
    """Check what moestream needs on this machine (Java, the Kafka jars and broker, Ray, Redis if configured, the
    W&B mode, free space under the data root) and print the command that fixes what is missing. Exits 1 if
    anything needed is missing."""
    cfg = load(config)
    from infra.doctor import checks, version

    table = Table(title=f"moestream {version()}: doctor")
    for col in ("check", "status", "found", "fix"):
        table.add_column(col, overflow="fold")
    found = checks(cfg)
    for c in found:
        status = {True: "[green]ok[/]", False: "[red]missing[/]", None: "[dim]not needed[/]"}[c.ok]
        table.add_row(c.name, status, c.found, c.fix or "")
    console.print(table)
    if any(c.ok is False for c in found):
        raise typer.Exit(1)


@app.command()
def experts(
    run: Annotated[Optional[Path], typer.Argument(
        help="A run directory or its health/experts.json (default: --run's).")] = None,
    run_name: RunName = None,
    data_root: DataRoot = None,
    config: ConfigFile = None,
) -> None:
    """Latest expert utilisation per task, drift and anomalies, as the trainer last wrote them."""
    import orjson

    run = run or load(config, uses_run=True, paths__run=run_name, paths__data_root=data_root).layout().root

    path = run if run.suffix == ".json" else run / "experts.json" if run.name == "health" else run / "health" / "experts.json"
    try:
        report = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        console.print(f"[red]no expert-health report at {path} (the trainer writes one every learner.cadence.health_every_steps steps)[/]")
        raise typer.Exit(1) from None
    except orjson.JSONDecodeError as exc:
        console.print(f"[red]{path} is not valid JSON: {exc}[/]")
        raise typer.Exit(1) from None
    try:
        _print_experts(report, _latest_manifest(path.parent.parent / "snapshots"))
    except (KeyError, TypeError, AttributeError) as exc:
        console.print(f"[red]{path} is not an expert-health report (missing or malformed {exc})[/]")
        raise typer.Exit(1) from None


@app.command()
def report(
    run: Annotated[Optional[str], typer.Argument(
        help="A run directory, or a run's name (<data_root>/runs/<name>; latest: the newest). Default: --run's, "
             "else paths.run.")] = None,
    run_name: RunName = None,
    data_root: DataRoot = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", dir_okay=False, help="Where to write the page (default: <run>/report.html).")] = None,
    config: ConfigFile = None,
) -> None:
    """Write one self-contained HTML page about a run and print its path: progressive AUC and losses, expert
    utilisation over time, drift, anomalies, snapshot versions and freshness. It opens offline (no server, no
    network): the local way to look at a run whose W&B files are offline."""
    from infra.report import ReportError, write_report

    if run is not None and (Path(run).is_dir() or Path(run).is_absolute() or "/" in run):  # a path, not a name
        root = Path(run)
    else:
        root = load(config, uses_run=True, paths__run=run or run_name, paths__data_root=data_root).layout().root
    try:
        path = write_report(root, output)
    except ReportError as exc:
        _say(str(exc), style="red")
        raise typer.Exit(1) from None
    _say(f"wrote {path}")


def _report_after_run(run: Path) -> None:
    """Render the run's report at the end of a run and say where it is (or why there is none)."""
    from infra.report import ReportError, write_report

    try:
        _say(f"report: {write_report(run)}")
    except ReportError as exc:
        _say(f"no report: {exc}", style="yellow")


def _latest_manifest(directory: Path):
    """The manifest the run's ``LATEST`` names, or None (no snapshot yet, or no snapshot directory)."""
    from learner.snapshots import SnapshotError, SnapshotStore

    try:
        return SnapshotStore(directory).latest_manifest() if directory.is_dir() else None
    except (SnapshotError, OSError):
        return None


def _print_experts(r: dict, latest=None) -> None:
    """The report ``r``; ``latest``, the run's newest snapshot manifest, may be newer than the report (a
    report is written every health_every_steps steps, a snapshot every snapshot_every_steps)."""
    reported = r.get("snapshot") or {}
    if latest is not None:
        snapshot = f"snapshot v{latest.version} ({time.time() - latest.created_at:.0f} s old, step {latest.data.get('step')})"
    elif reported.get("version") is not None:
        snapshot = f"snapshot v{reported['version']} (as of the report)"
    else:
        snapshot = "no snapshot published yet"
    console.print(
        f"[bold]{r.get('family', '?')}[/] report of step {r['step']}  {snapshot}  "
        f"load balance {r['load_balance']:.3f} (1 = even)"
    )
    table = Table(title="routing share per task (% of the task's gate mass or routing choices)")
    table.add_column("expert", no_wrap=True)
    for task in r["tasks"]:
        table.add_column(task, justify="right")
    table.add_column("zero act.", justify="right")
    table.add_column("out scale", justify="right")
    scale = r.get("output_scale")
    for e, name in enumerate(r["experts"]):
        cells = [f"{100 * r['routing_share'][t][e]:.1f}" if r["mean_gate"][t][e] > 0 else "·" for t in range(len(r["tasks"]))]
        table.add_row(name, *cells, f"{100 * r['zero_frac'][e]:.0f}%", "-" if scale is None else f"{scale[e]:.3g}")
    console.print(table)
    for kind in ("published", "reference"):
        drift = r.get(f"drift_vs_{kind}") or {}
        if drift:
            figures = "  ".join(f"{t} {v:.3f}" for t, v in drift.items())
            console.print(f"Jensen-Shannon drift vs the {kind} {'snapshot' if kind == 'published' else 'window'}: {figures}")
    for a in r["anomalies"]:
        console.print(f"[yellow]{a['kind']}[/]: {a['subject']}: {a['detail']}")
    if not r["anomalies"]:
        console.print("[green]no anomalies[/]")
    for check, why in (r.get("skipped") or {}).items():
        console.print(f"[dim]{check} check skipped: {why}[/]")


if __name__ == "__main__":
    app()
