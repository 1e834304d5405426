"""``bench quality``'s checkpoints: a full run takes hours, so each finished seed (and the floor's tuning) is
kept on disk and a later run with the same inputs picks it up instead of computing it again.

A checkpoint is valid for one **key**: the sha256 of everything its figures depend on, namely the plan (all
but its list of seeds), the configuration file's bytes, the ``MOESTREAM_*`` environment, the versions of torch
and numpy, whether a GPU is there (``trainer.device: auto`` trains on it, in bf16), and the source of ``stream/``,
``features/``, ``learner/``, ``infra/config.py`` and the benchmark's measuring modules (:data:`BENCHMARK_SOURCES`).
A change to any of them (a learner default, a model's code, the simulator) makes the older checkpoints stale:
they are ignored and overwritten, never mixed with new figures. Changes elsewhere (docs, serving, the report's
wording and plots) keep them. A seed is also kept only beside the floor's tuning it was scored with.

Files are JSON written whole and then renamed (a run killed mid-write leaves the previous file or none), with
NaN kept as NaN (a learning-curve window without both classes). Each records the commit it was computed on
(``+modified`` when tracked files differed from it), the machine and when, which the report names. To compute
everything again: ``moestream bench quality --fresh``, or delete the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import machine, source
from benchmarks.quality_floor import FloorConfig, Tuning

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("stream", "features", "learner")
"""Packages whose code the figures depend on."""
BENCHMARK_SOURCES = ("infra/config.py", "benchmarks/quality.py", "benchmarks/quality_stream.py",
                     "benchmarks/quality_train.py", "benchmarks/quality_floor.py")
"""The other files they depend on: the configuration's loader, and the modules that simulate, train and score
(not the report's rows, notes and plots, which are computed again from the figures on every run)."""
FORMAT = 1


def source_files(root: Path = ROOT) -> list[Path]:
    files = [p for package in SOURCES for p in (root / package).rglob("*.py")]
    files += [root / name for name in BENCHMARK_SOURCES if (root / name).is_file()]
    return sorted(files)


def run_key(plan: dict, config_file: Path, root: Path = ROOT) -> str:
    """The sha256 of what a seed's figures depend on (``plan``: the plan as a dict; its seeds are left out)."""
    h = hashlib.sha256()
    inputs = {"format": FORMAT, "plan": {k: v for k, v in plan.items() if k != "seeds"},
              "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOESTREAM_")},
              "versions": [torch.__version__, np.__version__], "gpu": torch.cuda.is_available()}
    h.update(json.dumps(inputs, sort_keys=True, default=str).encode())
    h.update(b"\0config\0" + Path(config_file).read_bytes())
    for path in source_files(root):
        h.update(b"\0" + str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def commit() -> str | None:
    """The checked-out commit (``benchmarks.harness.source``), with ``+modified`` when tracked files differ from
    it; None outside git."""
    got = source()
    return got["commit"] + ("+modified" if got["modified"] else "") if got else None


def tuning_digest(tuning: Tuning) -> str:
    """What identifies a tuning: the points it chose and every point's AUC."""
    body = {"chosen": [asdict(c) for c in tuning.chosen], "auc": sorted([list(p), v] for p, v in tuning.auc.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Provenance:
    commit: str | None
    written_at: str
    machine: str = ""


@dataclass(frozen=True)
class Checkpoints:
    """Seeds and the floor's tuning of runs with one key, under ``directory``. ``commit``: what the run measures,
    read when it starts (a checkout during a run would otherwise be recorded)."""

    directory: Path
    key: str
    commit: str | None = None
    host: dict = field(default_factory=machine)

    def _read(self, name: str) -> dict | None:
        path = self.directory / name
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # none yet, or unreadable: computed again and overwritten
        return body if isinstance(body, dict) and body.get("key") == self.key else None

    def _write(self, name: str, payload: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        body = {"key": self.key, "commit": self.commit, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": f"{self.host['hostname']}, {self.host['cpus']} CPUs", **payload}
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.directory / name)

    def seed(self, seed: int, tuning: Tuning) -> tuple[dict, Provenance] | None:
        """A finished seed's figures (``SeedFigures`` fields) and where they come from, if this key has them
        scored beside ``tuning``'s floor."""
        body = self._read(f"seed-{seed}.json")
        if body is None or body.get("tuning") != tuning_digest(tuning):
            return None
        try:
            figures = body["figures"]
            figures["staleness"] = {int(lag): v for lag, v in figures["staleness"].items()}  # JSON keys are strings
            return figures, Provenance(body["commit"], body["written_at"], body.get("machine", ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None  # edited or truncated by hand: computed again and overwritten

    def save_seed(self, seed: int, figures: dict, tuning: Tuning) -> None:
        self._write(f"seed-{seed}.json", {"tuning": tuning_digest(tuning), "figures": figures})

    def tuning(self) -> tuple[Tuning, dict[str, float]] | None:
        """The floor's tuning and the seconds it took by section (its stream's simulation, the grid), if this key
        has it."""
        body = self._read("tuning.json")
        if body is None:
            return None
        try:
            chosen = [FloorConfig(**c) for c in body["chosen"]]
            auc = {(float(lr), int(dim), float(acc)): v for (lr, dim, acc), v in body["auc"]}
            return Tuning(chosen, auc), dict(body["sections"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return None  # edited or truncated by hand: computed again and overwritten

    def save_tuning(self, tuning: Tuning, sections: dict[str, float]) -> None:
        self._write("tuning.json", {"chosen": [asdict(c) for c in tuning.chosen],
                                    "auc": [[list(point), v] for point, v in tuning.auc.items()],
                                    "sections": sections})


__all__ = ["BENCHMARK_SOURCES", "Checkpoints", "Provenance", "commit", "run_key", "source_files", "tuning_digest"]
