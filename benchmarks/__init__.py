"""Benchmarks: ``moestream bench NAME [--quick] [--json PATH]``.

Each benchmark module exposes ``run(quick: bool) -> Report``; ``BENCHMARKS`` maps a name to its module.
Every figure is measured beside the anchor it is compared with, in the same process and run.
"""

from __future__ import annotations

import importlib

BENCHMARKS: dict[str, str] = {
    "models": "benchmarks.models",
    "synthetic": "benchmarks.synthetic",
    "stream": "benchmarks.stream",
    "learner": "benchmarks.learner",
    "features": "benchmarks.features",
    "serving": "benchmarks.serving",
    "freshness": "benchmarks.freshness",
    "replay": "benchmarks.replay",
    "embeddings": "benchmarks.embeddings",
    "quality": "benchmarks.quality",
}


RESUMABLE = ("quality",)
"""Benchmarks that keep finished parts of a run and resume from them unless asked for a fresh run."""


def run(name: str, quick: bool = False, fresh: bool = False):
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    if fresh and name not in RESUMABLE:
        raise KeyError(f"--fresh applies to {', '.join(RESUMABLE)} only: {name!r} keeps nothing between runs")
    module = importlib.import_module(BENCHMARKS[name])
    return module.run(quick=quick, resume=not fresh) if name in RESUMABLE else module.run(quick=quick)
