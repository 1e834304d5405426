"""Where one run keeps its state, apart from the code that starts the run (no Ray here: the configuration
derives these paths, and loading it must stay fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Where one run keeps its state: Feast stores, snapshots, checkpoints, W&B files."""

    root: Path

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


__all__ = ["RunLayout"]
