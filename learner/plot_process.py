"""The expert-utilisation heatmap, drawn in a process of its own (``python -m learner.plot_process INPUTS PNG``).

matplotlib is Python that holds the interpreter's lock for most of a drawing (0.7 s of CPU for the heatmap of
six tasks). Drawn on a thread of the trainer, it made the training thread wait for the lock after each of the
hundreds of torch calls of a step that let it go: a step of 300 small torch calls took 0.90-0.93 s at the median
instead of 0.16-0.21 s while heatmaps were drawn on a thread beside it (0.50 s at a switch interval of 0.5 ms), and
0.17 s with them drawn apart; at 10^7 live ids every heatmap (every 100 steps, about a minute) showed in
`bench freshness` as a spike of 1 to 1.5 s (docs/learner.md). A child interpreter shares no lock with training; it
takes its inputs from a ``.npz`` file (no pickle) and writes the PNG as :func:`learner.telemetry.plot_utilisation`
does. It runs at the trainer's priority, not below: the run's end waits for its last heatmap, and made 10 steps
nicer (niceness 19 in a Ray worker) its 1.5 s of CPU (an interpreter, numpy, matplotlib, the drawing) gets little of
a busy node (a CI run with it niced read 156 s for the end-to-end test, which ends such a run; 30 s alone since).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TIMEOUT_S = 120


def draw_apart(steps: Sequence[int], shares: np.ndarray, tasks: Sequence[str], experts: Sequence[str], path: Path) -> Path:
    """:func:`learner.telemetry.plot_utilisation` in a child interpreter (the caller's thread waits for it without
    the interpreter's lock); raises ``RuntimeError`` with the child's error when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = path.with_name(f".{path.name}.inputs.npz")
    np.savez(inputs, steps=np.asarray(steps, dtype=np.int64), shares=np.asarray(shares, dtype=np.float64),
             tasks=np.asarray(tasks, dtype=str), experts=np.asarray(experts, dtype=str))
    try:
        done = subprocess.run([sys.executable, "-m", "learner.plot_process", str(inputs), str(path)],
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        inputs.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"the heatmap's process exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return path


def main(argv: Sequence[str]) -> int:
    from learner.telemetry import plot_utilisation

    inputs, path = argv
    with np.load(inputs) as data:
        plot_utilisation([int(s) for s in data["steps"]], data["shares"], [str(t) for t in data["tasks"]],
                         [str(e) for e in data["experts"]], Path(path))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:  # noqa: BLE001 - the parent reports it in a line, as it reported a thread's error
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


__all__ = ["draw_apart"]
