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

One child draws every heatmap of a run (:class:`Plotter`, ``python -m learner.plot_process --serve``: a request per
line on its stdin, ``ok`` or the error on its stdout), so the interpreter, numpy and matplotlib are loaded once, not
once a heatmap. A child that dies or does not answer within :data:`TIMEOUT_S` is killed and the next drawing starts
another.
"""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TIMEOUT_S = 120


class Plotter:
    """The heatmap's child process, started at the first drawing and kept for the next (see the module docstring).
    One drawing at a time (a lock), from any thread."""

    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.started = 0
        """Children started so far (one, unless one died or hung)."""

    def draw(self, steps: Sequence[int], shares: np.ndarray, tasks: Sequence[str], experts: Sequence[str],
             path: Path) -> Path:
        """:func:`learner.telemetry.plot_utilisation` in the child (the caller's thread waits for it without the
        interpreter's lock); raises ``RuntimeError`` with the child's error when it fails."""
        path.parent.mkdir(parents=True, exist_ok=True)
        inputs = path.with_name(f".{path.name}.inputs.npz")
        np.savez(inputs, steps=np.asarray(steps, dtype=np.int64), shares=np.asarray(shares, dtype=np.float64),
                 tasks=np.asarray(tasks, dtype=str), experts=np.asarray(experts, dtype=str))
        try:
            with self._lock:
                answer = self._ask(f"{inputs}\t{path}\n")
        finally:
            inputs.unlink(missing_ok=True)
        if answer != "ok":
            raise RuntimeError(f"the heatmap's process failed: {answer}")
        return path

    def _ask(self, request: str) -> str:
        child = self._child
        if child is None or child.poll() is not None:
            child = self._child = subprocess.Popen([sys.executable, "-m", "learner.plot_process", "--serve"],
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True, bufsize=1)
            self.started += 1
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(request)
            child.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._lost(child, "it exited before the request")
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._lost(child, f"no answer within {self.timeout_s:g} s")
            ready, _, _ = select.select([child.stdout], [], [], left)
            if ready:
                line = child.stdout.readline()
                return line.strip() if line else self._lost(child, "it exited")

    def _lost(self, child: subprocess.Popen, why: str) -> str:
        """The child is gone or hung: killed, with what it said on stderr; the next drawing starts another."""
        child.kill()
        _, err = child.communicate()
        self._child = None
        return f"{why} (exit {child.returncode}): {(err or '').strip()[-800:]}"

    def close(self) -> None:
        """End the child (it exits when its stdin closes) and wait for it."""
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.communicate(timeout=30)  # closes stdin: the child's loop ends
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()


def draw_apart(steps: Sequence[int], shares: np.ndarray, tasks: Sequence[str], experts: Sequence[str], path: Path) -> Path:
    """One drawing in a child of its own, ended after it (:class:`Plotter` keeps one for many)."""
    plotter = Plotter()
    try:
        return plotter.draw(steps, shares, tasks, experts, path)
    finally:
        plotter.close()


def _draw(inputs: str, path: str) -> None:
    from learner.telemetry import plot_utilisation

    with np.load(inputs) as data:
        plot_utilisation([int(s) for s in data["steps"]], data["shares"], [str(t) for t in data["tasks"]],
                         [str(e) for e in data["experts"]], Path(path))


def serve() -> int:
    """The child's loop: ``INPUTS<TAB>PNG`` per line on stdin, ``ok`` or ``TypeName: message`` per line on stdout;
    returns when stdin closes."""
    import learner.telemetry  # noqa: F401 - loaded before the first request, not during it

    for line in sys.stdin:
        try:
            inputs, path = line.rstrip("\n").split("\t")
            _draw(inputs, path)
            answer = "ok"
        except Exception as exc:  # noqa: BLE001 - the parent reports it in a line, as it reported a thread's error
            answer = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve())


__all__ = ["Plotter", "draw_apart"]
