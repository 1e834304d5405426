"""``bench quality``'s figures: learning curves per task, continuous vs frozen, AUC against staleness (PNG, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stream.events import TASKS

Curves = Mapping[str, Mapping[str, Sequence[float]]]
"""Scorer -> task -> window AUC per window (mean over seeds)."""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def learning_curves(path: Path, task: str, ends: Sequence[int], curves: Curves, reference: Sequence[str],
                    title: str) -> Path:
    """Window AUC against examples trained for every scorer, the ``reference`` ones (oracle, floor) as
    dashed lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.asarray(ends)
    for name, per_task in curves.items():
        style = {"linewidth": 1.2}
        if name in reference:  # the first black, the next grey
            style = {"linestyle": "--", "linewidth": 1.5, "color": ("black", "grey")[list(reference).index(name) % 2]}
        ax.plot(x, per_task[task], label=name, **style)
    ax.set_xlabel("examples trained (window end)")
    ax.set_ylabel(f"{task}: window AUC")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    return _save(fig, path)


def frozen_curves(path: Path, ends: Sequence[int], continuous: Mapping[str, Sequence[float]],
                  frozen: Mapping[str, Sequence[float]], freeze_at: int, title: str) -> Path:
    """Per task, window AUC of the continuously trained model and of its copy frozen at ``freeze_at``."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    x = np.asarray(ends)
    for ax, task in zip(axes.flat, TASKS):
        ax.plot(x, continuous[task], label="continuous")
        ax.plot(x, frozen[task], label="frozen")
        ax.axvline(freeze_at, color="grey", linestyle=":", linewidth=1)
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("examples trained (window end)", fontsize=9)
    fig.supylabel("window AUC", fontsize=9)
    return _save(fig, path)


def staleness(path: Path, lags_s: Sequence[float], lost: Mapping[str, Sequence[float]], title: str) -> Path:
    """Per task, AUC of the version ``lag`` old minus the live model's on the same events, against the lag."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task, values in lost.items():
        ax.plot(lags_s, values, marker="o", label=task)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("serving staleness, event time (s)")
    ax.set_ylabel("AUC(version that old) - AUC(live model)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


__all__ = ["frozen_curves", "learning_curves", "staleness"]
