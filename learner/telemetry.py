"""Training telemetry: every record goes to each sink; W&B (offline files under the data directory unless
configured online) is one, Prometheus metrics through Ray (``learner.prometheus``, in a Ray process) another,
the run history that ``moestream report`` draws (``learner.history``) a third.

The whole run config goes to ``wandb.init(config=...)`` so a run can be reproduced from its log. Offline
(the default) needs no account; ``mode="online"`` with ``WANDB_API_KEY`` set streams to the W&B server.
Alerts (``wandb.alert``) are sent to W&B in every mode (offline runs keep them in the run file until
``wandb sync``) and are also counted in the run summary (``alerts/count``, ``alerts/last``), so an offline
run shows them without a server. See docs/telemetry.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from learner.history import HistorySink


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "moestream"
    directory: Path = Path(".moestream/wandb")
    run_name: str | None = None
    prometheus: bool = True
    """Also export the figures as Prometheus metrics through Ray's metrics API when the trainer runs in Ray
    (``learner.prometheus``)."""
    history: Path | None = None
    """The run history (JSON lines, ``learner.history``) that ``moestream report`` reads, written whatever W&B's
    mode; None: none. Derived from ``paths`` by the root config."""


class Sink(Protocol):
    """One place telemetry goes (W&B, ...). :class:`Telemetry` hands every record to each of its sinks."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def alert(self, title: str, text: str, level: str) -> None: ...

    def summarise(self, values: dict) -> None: ...

    def finish(self) -> None: ...


class WandbSink:
    """A W&B run: offline files under ``config.directory`` unless configured online."""

    def __init__(self, config: TelemetryConfig, run_config: dict) -> None:
        import wandb

        directory = Path(config.directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=config.project,
            dir=str(directory),
            mode=config.mode,
            name=config.run_name,
            config=run_config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def alert(self, title: str, text: str, level: str) -> None:
        self.run.alert(title=title[:63], text=text, level=level)
        self.run.summary["alerts/count"] = int(self.run.summary.get("alerts/count", 0)) + 1
        self.run.summary["alerts/last"] = f"{title}: {text}"

    def log_image(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def summarise(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        import wandb

        self.run.finish()
        # Now, not in wandb's atexit hook: a Ray actor's process is torn down before that hook reaches W&B's
        # service, which printed a ConnectionResetError traceback at the end of every run.
        wandb.teardown()


class Telemetry:
    """Every record a trainer emits, handed to each configured sink."""

    def __init__(self, config: TelemetryConfig, run_config: dict) -> None:
        self.config = config
        self.wandb: WandbSink | None = None
        self.sinks: list[Sink] = []
        if config.enabled and config.mode != "disabled":
            self.wandb = WandbSink(config, run_config)
            self.sinks.append(self.wandb)
        if config.enabled and config.prometheus:
            from learner.prometheus import PrometheusSink, ray_running

            if ray_running():
                self.sinks.append(PrometheusSink())
        if config.enabled and config.history is not None:
            self.sinks.append(HistorySink(config.history, run_config))

    @property
    def run(self):
        """The W&B run, if W&B is on."""
        return self.wandb.run if self.wandb is not None else None

    @property
    def run_dir(self) -> str | None:
        return self.wandb.run.dir if self.wandb is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        """An alert (rate-limit before calling: W&B only holds back repeats of one title for 1 minute)."""
        for sink in self.sinks:
            sink.alert(title, text, level)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.wandb is not None:
            self.wandb.log_image(key, path, step)

    def summarise(self, values: dict) -> None:
        """Set run-summary values (the figures a run page shows without a chart)."""
        for sink in self.sinks:
            sink.summarise(values)

    def finish(self) -> None:
        sinks, self.sinks, self.wandb = self.sinks, [], None
        for sink in sinks:
            sink.finish()


def load_plotting() -> None:
    """Import matplotlib (Agg backend, files only) now: the import takes 0.3 s of CPU from compiled bytecode
    (over a second where it compiles the sources), which a trainer spends at start-up rather than on its plot
    thread while the first steps train."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def plot_utilisation(
    steps: Sequence[int], shares: np.ndarray, tasks: Sequence[str], experts: Sequence[str], path: Path
) -> Path:
    """Task x expert utilisation over time as a PNG: one heatmap per task, experts down, steps across.

    ``shares`` is ``(R, T, E)``: the routing share of each report ``R``.
    """
    load_plotting()
    import matplotlib.pyplot as plt

    n_tasks = len(tasks)
    cols = min(3, n_tasks)
    rows = -(-n_tasks // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.25 * len(experts) * rows + 1.6 * rows),
                             squeeze=False, sharey=True)
    vmax = max(float(shares.max()), 1e-9)
    for t, task in enumerate(tasks):
        ax = axes[t // cols][t % cols]
        image = ax.imshow(shares[:, t, :].T, aspect="auto", interpolation="nearest", cmap="viridis",
                          vmin=0.0, vmax=vmax, extent=(-0.5, len(steps) - 0.5, len(experts) - 0.5, -0.5))
        ax.set_title(task)
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("step")
        ax.set_yticks(range(len(experts)), experts, fontsize=7)
    for t in range(n_tasks, rows * cols):
        axes[t // cols][t % cols].axis("off")
    fig.colorbar(image, ax=axes, label="routing share", shrink=0.8)
    fig.suptitle("expert utilisation per task over time")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
