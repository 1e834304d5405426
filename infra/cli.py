"""The ``moestream`` command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from infra.kafka.cli import app as kafka_app

app = typer.Typer(help="Streaming online learning of multi-task MoE rankers.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
snapshots_app = typer.Typer(help="Published weight snapshots.", no_args_is_help=True)
app.add_typer(snapshots_app, name="snapshots")
console = Console()

DataRoot = Annotated[Path, typer.Option(help="Where runs keep Feast stores, snapshots and W&B files.")]
Topic = Annotated[str, typer.Option(help="Kafka topic of the event stream.")]


@app.command()
def simulate(
    rate: Annotated[float, typer.Option(help="Requests per second (each shows several items).")] = 100.0,
    seconds: Annotated[float, typer.Option(help="How long to produce.")] = 10.0,
    topic: Topic = "moestream.events",
    seed: int = 0,
    out: Annotated[Optional[Path], typer.Option(help="Write a log file (.parquet or .csv) instead of producing.")] = None,
) -> None:
    """Produce simulated impressions and feedback to Kafka (or write them to a log file)."""
    from infra.kafka.broker import bootstrap_servers
    from infra.pipeline import produce
    from stream.kafka_io import EventSink, KafkaConfig, ensure_topics
    from stream.simulator import Simulator, SimulatorConfig

    if out is not None:
        from stream.logfile import write_log

        sim = Simulator(SimulatorConfig(seed=seed))
        n = write_log(sim.events(int(time.time() * 1000), int(seconds * rate)), out)
        console.print(f"wrote {n} events to {out}")
        return
    config = KafkaConfig(bootstrap_servers=bootstrap_servers(), topic=topic)
    ensure_topics(config)
    sink = EventSink(config)
    n = produce(sink, Simulator(SimulatorConfig(seed=seed)), seconds, rate)
    sink.close()
    console.print(f"produced {n} events to {topic} at {config.bootstrap_servers}")


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="A Parquet or CSV log: KuaiRand-1K's schema or moestream's own.")],
    direct: Annotated[bool, typer.Option("--direct", help="Train in this process instead of producing to Kafka.")] = False,
    speed: Annotated[float, typer.Option(help="0: as fast as possible; 60: sixty times real time.")] = 0.0,
    start: Annotated[int, typer.Option(help="Skip this many events of the sorted sequence (resume).")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Stop after this many events.")] = None,
    restamp: Annotated[bool, typer.Option("--restamp", help="Shift timestamps so the first event is now.")] = False,
    topic: Topic = "moestream.events",
    model: Annotated[str, typer.Option(help="Model family for --direct.")] = "mmoe",
    data_root: DataRoot = Path(".moestream"),
) -> None:
    """Replay a historical log in event-time order to Kafka, or straight into the trainer with --direct."""
    from stream.replay import ReplayConfig
    from stream.replay import replay as run_replay

    config = ReplayConfig(path=path, speed=speed, start=start, limit=limit, restamp=restamp)
    if direct:
        from infra.pipeline import RunLayout, worker_config
        from learner.worker import DirectTrainer

        layout = RunLayout(data_root.absolute() / "runs" / f"replay-{time.strftime('%Y%m%d-%H%M%S')}")
        trainer = DirectTrainer(worker_config(layout, bootstrap="unused", topic="replay", family=model))
        result = run_replay(config, trainer.learn_events)
        stats = trainer.finish()
        console.print(f"replayed {result.emitted} events ({result.schema}) in {result.seconds:.1f}s; "
                      f"trained {stats['examples_trained']} examples in {stats['steps']} steps; "
                      f"snapshots {stats['snapshots']} under {layout.snapshots}")
        for task, m in stats["metrics"].items():
            console.print(f"  {task:10s} progressive AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}")
    else:
        from infra.kafka.broker import bootstrap_servers
        from stream.kafka_io import EventSink, KafkaConfig, ensure_topics

        kafka = KafkaConfig(bootstrap_servers=bootstrap_servers(), topic=topic)
        ensure_topics(kafka)
        sink = EventSink(kafka)
        result = run_replay(config, sink.send_all)
        sink.close()
        console.print(f"replayed {result.emitted} events ({result.schema}) to {topic} in {result.seconds:.1f}s")
    console.print(f"resume with --start {result.position.emitted}")


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Model family (learner.models.FAMILIES).")] = "mmoe",
    seconds: Annotated[Optional[float], typer.Option(help="Stop after this long (default: run until Ctrl-C).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Data-parallel trainer actors in one consumer group.")] = 1,
    topic: Topic = "moestream.events",
    data_root: DataRoot = Path(".moestream"),
) -> None:
    """Train continuously from the event topic in Ray actors (one GPU each when the cluster has GPUs),
    averaging gradients across them every step, publishing snapshots."""
    import ray

    from infra.kafka.broker import bootstrap_servers
    from infra.pipeline import RunLayout, start_trainers, worker_config
    from infra.runtime import init_ray

    config = worker_config(RunLayout(data_root.absolute() / "live"), bootstrap=bootstrap_servers(), topic=topic, family=model)
    if workers > config.kafka.partitions:
        console.print(f"[red]--workers {workers} exceeds the topic's {config.kafka.partitions} partitions "
                      "(kafka.partitions): each worker reads its own share of them[/]")
        raise typer.Exit(2)
    init_ray()
    group = start_trainers(config, workers)
    deadline = time.monotonic() + seconds if seconds else None
    try:
        while deadline is None or time.monotonic() < deadline:
            ready, _ = ray.wait(group.runs, num_returns=len(group.runs), timeout=5)
            if len(ready) == len(group.runs):
                break
            for s in group.stats():
                console.print(f"worker {s['rank']}: consumed {s['consumed']}  steps {s['steps']}  "
                              f"snapshots {s['snapshots'][-1:]}  id collisions {s['id_collision_rate']:.2%} "
                              f"of {s['id_keys']:,} ids in {s['id_buckets']:,} buckets")
    except KeyboardInterrupt:
        pass
    for stats in group.stop():
        console.print(f"worker {stats['rank']}: trained {stats['examples_trained']} examples in {stats['steps']} steps; "
                      f"snapshots {stats['snapshots']}")


@app.command()
def serve(
    port: int = 8000,
    data_root: DataRoot = Path(".moestream"),
) -> None:
    """Serve the latest snapshots of the live run over HTTP until Ctrl-C."""
    from infra.kafka.broker import bootstrap_servers
    from infra.pipeline import RunLayout, start_serving, worker_config
    from infra.runtime import init_ray

    config = worker_config(RunLayout(data_root.absolute() / "live"), bootstrap=bootstrap_servers(), topic="unused")
    init_ray()
    url = start_serving(config, port)
    console.print(f"serving at {url}/predict (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(help="How long the simulator produces.")] = 40.0,
    rate: Annotated[float, typer.Option(help="Simulated requests per second (4 impressions each).")] = 300.0,
    model: str = "mmoe",
    port: int = 18000,
    data_root: DataRoot = Path(".moestream"),
) -> None:
    """Run the whole pipeline on embedded defaults for a bounded time and print a summary.

    Without ``KAFKA_BOOTSTRAP_SERVERS`` a local broker is started for the demo and stopped after it (one
    that was already running is left running).
    """
    import os

    from infra.kafka import broker
    from infra.pipeline import run_demo, shutdown

    started_broker = not os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and not broker.status().running
    if started_broker:
        console.print("[dim]starting a local Kafka broker (first run downloads its jars from Maven Central) ...[/]")
        broker.up()
    try:
        summary = run_demo(seconds, rate, model, port, data_root, log=lambda m: console.print(f"[dim]{m}[/]"))
    finally:
        shutdown()
        if started_broker:
            broker.down()
    _print_summary(summary)


def _print_summary(s) -> None:
    table = Table(title="moestream demo", show_header=False)
    table.add_row("events produced / consumed", f"{s.produced} / {s.consumed}")
    table.add_row("dead-lettered", ", ".join(f"{k}: {v}" for k, v in s.dead_lettered.items()) or "0")
    table.add_row("examples trained / steps", f"{s.examples_trained} / {s.steps}")
    table.add_row("snapshot versions", f"{len(s.snapshots)} (v{s.snapshots[0]} .. v{s.snapshots[-1]})")
    table.add_row("W&B (offline) run", str(s.wandb_dir))
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
    console.print(f"POST /predict {s.prediction['request']} ->")
    console.print_json(data=s.prediction["response"])


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="Which benchmark (models, ...).")],
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes and fewer repeats.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
) -> None:
    """Run a benchmark: a table on the terminal and, with --json, the figures as JSON."""
    import benchmarks

    try:
        report = benchmarks.run(name, quick=quick)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/]")
        raise typer.Exit(2) from None
    report.print(console)
    if json_path:
        report.write_json(json_path)
        console.print(f"wrote {json_path}")


SnapshotDir = Annotated[Path, typer.Argument(help="A snapshot directory (default: the live run's).")]
LIVE_SNAPSHOTS = Path(".moestream/live/snapshots")


@snapshots_app.command("list")
def snapshots_list(directory: SnapshotDir = LIVE_SNAPSHOTS) -> None:
    """List the snapshots in a directory (* marks the one LATEST names)."""
    from learner.snapshots import SnapshotStore

    if not directory.is_dir():
        console.print(f"[red]no snapshot directory at {directory}[/]")
        raise typer.Exit(1)
    store = SnapshotStore(directory)
    table = Table()
    for col in ("version", "family", "step", "examples", "sha256", "created", "note"):
        table.add_column(col)
    latest = store.latest_version()
    for m in store.list():
        mark = " *" if m.version == latest else ""
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at))
        note = f"rollback of v{m.data['rollback_of']}" if "rollback_of" in m.data else ""
        table.add_row(f"v{m.version}{mark}", m.data.get("family", "?"), str(m.data.get("step")),
                      str(m.data.get("examples")), m.sha256[:12], created, note)
    console.print(table)


@snapshots_app.command("rollback")
def snapshots_rollback(
    version: Annotated[str, typer.Argument(help="A kept version to serve again (3 or v3).")],
    directory: SnapshotDir = LIVE_SNAPSHOTS,
) -> None:
    """Serve a kept version again: verified, then republished as the newest version (followers pick it up)."""
    from learner.snapshots import SnapshotError, SnapshotStore

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
def experts(
    run: Annotated[Path, typer.Argument(help="A run directory (or its health/experts.json).")] = Path(".moestream/live"),
) -> None:
    """Latest expert utilisation per task, drift and anomalies, as the trainer last wrote them."""
    import orjson

    path = run if run.suffix == ".json" else run / "experts.json" if run.name == "health" else run / "health" / "experts.json"
    try:
        report = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        console.print(f"[red]no expert-health report at {path} (the trainer writes one every health.every_steps steps)[/]")
        raise typer.Exit(1) from None
    except orjson.JSONDecodeError as exc:
        console.print(f"[red]{path} is not valid JSON: {exc}[/]")
        raise typer.Exit(1) from None
    try:
        _print_experts(report)
    except (KeyError, TypeError, AttributeError) as exc:
        console.print(f"[red]{path} is not an expert-health report (missing or malformed {exc})[/]")
        raise typer.Exit(1) from None


def _print_experts(r: dict) -> None:
    snap = r.get("snapshot") or {}
    staleness = snap.get("staleness_s")
    console.print(
        f"[bold]{r.get('family', '?')}[/] step {r['step']}  "
        f"snapshot v{snap.get('version')} ({'-' if staleness is None else f'{staleness:.0f} s'} old)  "
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
