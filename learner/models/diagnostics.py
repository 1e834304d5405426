"""A switch for the diagnostics only telemetry reads: scoring turns them off.

A forward pass reports, beside the logits, how many of each expert's activations are (near) zero over the batch
(``ModelOutput.expert_zero_frac``; HoME's ``meta_expert_zero_frac``): the trainer's expert-health telemetry reads
them, and counting them is one more pass over every expert's output. Scoring reads the logits alone, so
``MultiTaskRanker.predict_proba`` runs the model inside :func:`without_diagnostics`, where those counts come back NaN,
"not computed" (2-4% of the served MMoE's forward pass; docs/serving.md).

The switch is a context variable: per thread and per asyncio task, so a trainer's forward pass on another thread of
the same process keeps its diagnostics while a scorer runs without.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_DIAGNOSTICS: ContextVar[bool] = ContextVar("moestream_model_diagnostics", default=True)


@contextmanager
def without_diagnostics() -> Iterator[None]:
    """Forward passes run inside skip the telemetry's diagnostics (they come back NaN)."""
    token = _DIAGNOSTICS.set(False)
    try:
        yield
    finally:
        _DIAGNOSTICS.reset(token)


def diagnostics_on() -> bool:
    """False inside :func:`without_diagnostics`."""
    return _DIAGNOSTICS.get()


__all__ = ["diagnostics_on", "without_diagnostics"]
