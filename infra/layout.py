"""Where one run keeps its state, apart from the code that starts the run (no Ray here: the configuration
derives these paths, and loading it must stay fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Where one run keeps its state: Feast stores, snapshots, checkpoints, W&B files, the run history."""

    root: Path

    @classmethod
    def of(cls, data_root: Path | str, run: str) -> RunLayout:
        """The one rule for where a run lives: ``<data_root>/runs/<run>``."""
        return cls(runs_dir(data_root) / run)

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

    @property
    def telemetry(self) -> Path:
        return self.root / "telemetry"

    @property
    def history(self) -> Path:
        """Every telemetry record of the run (``learner.history``), what ``moestream report`` draws."""
        return self.telemetry / "history.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.html"


def runs_dir(data_root: Path | str) -> Path:
    return Path(data_root).absolute() / "runs"


def latest_run(data_root: Path | str) -> str | None:
    """The run under ``data_root`` whose files changed last (a run's snapshots, checkpoints and health
    reports are rewritten while it trains), or None where there is no run."""
    runs = [d for d in runs_dir(data_root).glob("*") if d.is_dir()]
    if not runs:
        return None
    return max(runs, key=_last_change).name


def _last_change(run: Path) -> float:
    watched = [run, *(run / name for name in ("snapshots", "checkpoints", "health", "telemetry"))]
    return max(p.stat().st_mtime for p in watched if p.exists())


__all__ = ["RunLayout", "latest_run", "runs_dir"]
