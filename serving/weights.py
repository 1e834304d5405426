"""Follows the snapshot directory and swaps verified models in, off the request path.

A background thread polls ``LATEST``; a newer version is loaded (sha256 and finiteness verified by
``SnapshotStore.load``), rebuilt from its manifest's model config, put in eval mode, and installed with one
reference assignment. Readers take ``current`` once per batch, so a batch is scored by one model, whole,
and the version it reports is the one that scored it. Versions only move forward. A snapshot that fails
verification is refused and remembered, and the previous model keeps serving; one that was superseded while
being read (the publisher prunes old versions) is skipped without being held against it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from learner.models import MultiTaskRanker
from learner.snapshots import Manifest, SnapshotError, SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    model: MultiTaskRanker

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def family(self) -> str:
        return str(self.manifest.data.get("family", "unknown"))


class WeightFollower:
    """``current`` is the newest verified model (None before the first snapshot); ``on_swap`` is called,
    on the follower thread, with each model just installed."""

    def __init__(self, snapshot_dir: Path, poll_s: float = 0.25,
                 on_swap: Callable[[LoadedModel], None] | None = None) -> None:
        self.store = SnapshotStore(snapshot_dir)
        self.poll_s = poll_s
        self.on_swap = on_swap
        self.current: LoadedModel | None = None
        self.swaps = 0
        self.rejected: dict[int, str] = {}
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._follow, name="weight-follower", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        """Load the latest version if it is newer than the one serving."""
        latest = self.store.latest_version()
        if latest is None or latest in self.rejected:
            return
        if self.current is not None and latest <= self.current.version:
            return
        try:
            manifest, tensors = self.store.load(latest)
            model = MultiTaskRanker.from_config(manifest.data["model_config"])
            model.load_state_dict(tensors)
            model.eval()
        except (SnapshotError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            if self.store.latest_version() != latest:
                return  # superseded (and perhaps pruned) while we read it: the next poll takes the newer one
            self.rejected[latest] = str(exc)
            log.warning("refusing snapshot v%s: %s", latest, exc)
            return
        loaded = LoadedModel(manifest, model)
        self.current = loaded  # the atomic swap: one reference assignment
        self.swaps += 1
        if self.on_swap is not None:
            self.on_swap(loaded)

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # the follower must outlive any one bad snapshot
                log.exception("weight follower iteration failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


__all__ = ["LoadedModel", "WeightFollower"]
