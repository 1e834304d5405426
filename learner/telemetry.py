"""Training telemetry to Weights & Biases: offline files under the data directory unless configured online.

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
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "moestream"
    directory: Path = Path(".moestream/wandb")
    run_name: str | None = None


class Telemetry:
    def __init__(self, config: TelemetryConfig, run_config: dict) -> None:
        self.config = config
        self.run = None
        if not config.enabled or config.mode == "disabled":
            return
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

    @property
    def run_dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        """A W&B alert (rate-limit before calling: W&B only holds back repeats of one title for 1 minute)."""
        if self.run is None:
            return
        self.run.alert(title=title[:63], text=text, level=level)
        self.run.summary["alerts/count"] = int(self.run.summary.get("alerts/count", 0)) + 1
        self.run.summary["alerts/last"] = f"{title}: {text}"

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def summarise(self, values: dict) -> None:
        """Set run-summary values (the figures a run page shows without a chart)."""
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


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
