"""`moestream kafka up|down|status`: the local broker from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from infra.console import CommandConsole
from infra.kafka import broker
from infra.kafka.broker import BrokerConfig, BrokerError

app = typer.Typer(
    help="A local Apache Kafka broker (KRaft, 127.0.0.1) provisioned from Maven Central, no Docker needed.",
    no_args_is_help=True,
)
console = CommandConsole()
errors = CommandConsole(stderr=True)

DataDir = Annotated[
    Optional[Path],
    typer.Option(
        help="Broker state: topic data, logs, pid file. "
        "Default: $MOESTREAM_KAFKA_DATA or ~/.local/share/moestream/kafka."
    ),
]
Port = Annotated[int, typer.Option(help="Client (PLAINTEXT) port on 127.0.0.1.")]
ControllerPort = Annotated[int, typer.Option(help="KRaft controller port on 127.0.0.1.")]
Heap = Annotated[str, typer.Option(help="Maximum JVM heap, as for -Xmx.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for a clean shutdown before SIGKILL.")]


def _config(
    data_dir: Path | None, port: int, controller_port: int, heap: str = BrokerConfig.heap
) -> BrokerConfig:
    if data_dir is None:  # the config's own default, which reads $MOESTREAM_KAFKA_DATA
        return BrokerConfig(port=port, controller_port=controller_port, heap=heap)
    return BrokerConfig(data_dir=data_dir, port=port, controller_port=controller_port, heap=heap)


def _fail(err: BrokerError) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {escape(str(err))}")
    return typer.Exit(code=1)


@app.command()
def up(
    data_dir: DataDir = None,
    port: Port = BrokerConfig.port,
    controller_port: ControllerPort = BrokerConfig.controller_port,
    heap: Heap = BrokerConfig.heap,
) -> None:
    """Start the broker (fetching its jars the first time) and wait until it answers."""
    cfg = _config(data_dir, port, controller_port, heap)
    try:
        if not broker.provisioned(cfg):
            with console.status(f"Fetching Kafka {cfg.version} jars from Maven Central (once)"):
                broker.provision(cfg)
        with console.status(f"Starting Kafka {cfg.version} on {cfg.bootstrap}"):
            address = broker.up(cfg)
    except BrokerError as err:
        raise _fail(err) from err
    pid = broker.status(cfg).pid
    data = escape(str(cfg.data_dir))
    console.print(f"[green]Kafka {cfg.version} is up[/] at [bold]{address}[/]  pid {pid}  data {data}")


@app.command()
def down(data_dir: DataDir = None, timeout: Timeout = 30.0) -> None:
    """Stop the broker of this data dir; harmless when it is not running."""
    cfg = _config(data_dir, BrokerConfig.port, BrokerConfig.controller_port)
    try:
        broker.down(cfg, timeout=timeout)
    except BrokerError as err:
        raise _fail(err) from err
    console.print(f"Kafka of {escape(str(cfg.data_dir))} is [bold]down[/]")


@app.command()
def status(
    data_dir: DataDir = None,
    port: Port = BrokerConfig.port,
    controller_port: ControllerPort = BrokerConfig.controller_port,
) -> None:
    """Show whether the broker runs; exit code 0 when it does, 1 when it does not."""
    cfg = _config(data_dir, port, controller_port)
    state = broker.status(cfg)
    if state.running:
        console.print(
            f"[green]running[/]  Kafka {state.version} at [bold]{state.bootstrap}[/]  "
            f"pid {state.pid}  data {escape(str(cfg.data_dir))}"
        )
    else:
        console.print(f"[yellow]not running[/]  Kafka {state.version}  data {escape(str(cfg.data_dir))}")
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()
