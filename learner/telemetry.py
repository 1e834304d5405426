"""Training telemetry to Weights & Biases: offline files under the data directory unless configured online.

The whole run config goes to ``wandb.init(config=...)`` so a run can be reproduced from its log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


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

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
