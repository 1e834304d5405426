"""How much disk a training run needs, estimated from its configuration, and a warning before it runs short.

A run writes weight snapshots (``learner.snapshots``: the model's state, kept ``SNAPSHOTS_KEPT`` deep) and
checkpoints (``learner.checkpoint``: the model, Adam's two moments of every parameter, the metrics' and the
aggregates' arrays, kept ``keep`` deep per worker, plus one pinned by a group). Each store also holds the
one being written beside those it keeps. The model's size comes from building it on PyTorch's ``meta``
device: the real shapes, no memory. Measured figures at the default settings are in ``docs/operations.md``.

A store that runs out of space does not stop training (snapshot and checkpoint failures are waited out
and retried), but nothing new is published or made durable meanwhile: hence the warning at start.
"""

from __future__ import annotations

import inspect
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from features.definitions import FEATURE_COLUMNS
from infra.config import MoestreamConfig
from learner.checkpoint import CheckpointStore
from learner.snapshots import SNAPSHOTS_KEPT
from learner.step import build_model

MANIFEST_BYTES = 16 * 1024
"""A snapshot's JSON manifest and safetensors header (2 KiB measured, with room for long metric lists)."""
CHECKPOINT_ARRAYS_BYTES = 512 * 1024
"""A checkpoint's fixed arrays: the progressive metrics' histograms (199 KB measured) and its small files.
The aggregates add 280 bytes per user and per item seen, which a start-up check cannot know."""
CHECKPOINTS_KEPT: int = inspect.signature(CheckpointStore).parameters["keep"].default


@dataclass(frozen=True)
class DiskNeed:
    path: Path
    bytes: int
    what: str


def model_bytes(config: MoestreamConfig) -> tuple[int, int]:
    """Bytes of the model's state (parameters and buffers: the embedding tables and the wide part's rows with their
    row-wise optimizer state), as a snapshot stores them, and of its dense parameters alone (what Adam keeps two
    moments of). The model is :func:`learner.step.build_model`'s, the one the trainer trains."""
    learner = config.learner
    with torch.device("meta"):
        model = build_model(learner, learner.embedded_fields(), len(FEATURE_COLUMNS))
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # Per-field tables grow with the live ids: at most every row of each table indexed by the field's rows (its
    # embedding and its wide rows, each with its row-wise state), and the id map that serving reads (an id and a
    # row, 8 bytes each, per live id).
    for field, table in (learner.tables or {}).items():
        for rows in model.field_tables(field):
            state += (rows.n_rows - rows.allocated) * rows.row_bytes
        state += 16 * table["capacity"]
    return state, sum(p.numel() * p.element_size() for p in model.parameters())


def disk_needs(config: MoestreamConfig) -> list[DiskNeed]:
    """What the snapshot and checkpoint stores of a run hold at most, each with the one being written."""
    weights, dense = model_bytes(config)
    snapshot = weights + MANIFEST_BYTES
    checkpoint = weights + 2 * dense + CHECKPOINT_ARRAYS_BYTES  # the state, then Adam's exp_avg and exp_avg_sq
    layout, workers = config.layout(), config.trainer.workers
    pinned = 1 if workers > 1 else 0  # a group's last agreed step, kept beside the newest ones
    publish = config.learner.publish
    # Each kept chain: its base and deltas up to max_delta_fraction of it (every version whole with max_deltas 0).
    chain = snapshot * (1 + (publish.max_delta_fraction if publish.max_deltas else 0))
    chains = publish.keep_bases if publish.max_deltas else SNAPSHOTS_KEPT
    remote = publish.store is not None and "://" in publish.store and not publish.store.startswith("file://")
    where = Path(publish.store.removeprefix("file://")) if publish.store and not remote else layout.snapshots
    needs = [] if remote else [  # an object store's space is not this machine's
        DiskNeed(where, int((chains + 1) * chain),
                 f"{chains} + 1 chains of a {_size(snapshot)} base and its deltas" if publish.max_deltas
                 else f"{chains} + 1 snapshots of {_size(snapshot)}")]
    return [
        *needs,
        DiskNeed(layout.checkpoints, workers * (CHECKPOINTS_KEPT + pinned + 1) * checkpoint,
                 f"{CHECKPOINTS_KEPT + pinned} + 1 checkpoints of {_size(checkpoint)} x {workers} worker(s)"),
    ]


def free_space_warnings(config: MoestreamConfig) -> list[str]:
    """One warning per file system that has less space free than the run's stores on it still need (what
    they hold already is reused as old versions are pruned); an empty list when all fit."""
    by_device: dict[int, tuple[Path, int, list[DiskNeed]]] = {}
    for need in disk_needs(config):
        existing = _existing(need.path)
        device = os.stat(existing).st_dev
        _, held, needs = by_device.get(device, (existing, 0, []))
        by_device[device] = (existing, held + _held(need.path), [*needs, need])
    warnings = []
    for existing, held, needs in by_device.values():
        needed = max(0, sum(n.bytes for n in needs) - held)
        free = shutil.disk_usage(existing).free
        if free < needed:
            paths = " and ".join(str(n.path) for n in needs)
            detail = "; ".join(n.what for n in needs)
            warnings.append(f"{paths}: {free:,} bytes ({_size(free)}) free, the run needs about {needed:,} bytes "
                            f"({_size(needed)}: {detail}); snapshots and checkpoints will fail once it is full")
    return warnings


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the stores create their directories when they write)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _held(path: Path) -> int:
    """Bytes of the files under ``path`` now (0 if it does not exist yet)."""
    if not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


__all__ = ["DiskNeed", "disk_needs", "free_space_warnings", "model_bytes"]
