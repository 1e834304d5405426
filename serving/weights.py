"""Follows the snapshot directory and swaps verified models in, off the request path.

A background thread polls ``LATEST``; a newer version is loaded (sha256 and finiteness verified by
``SnapshotStore.load``), rebuilt from its manifest's model config, and installed with one reference
assignment, so a request sees either the old model or the new one, never a mix. A snapshot that fails
verification is skipped and remembered; the previous model keeps serving.
"""

from __future__ import annotations

import logging
import threading
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


class WeightFollower:
    def __init__(self, snapshot_dir: Path, poll_s: float = 0.25) -> None:
        self.store = SnapshotStore(snapshot_dir)
        self.poll_s = poll_s
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
        except (SnapshotError, KeyError, RuntimeError, ValueError) as exc:
            self.rejected[latest] = str(exc)
            log.warning("refusing snapshot v%s: %s", latest, exc)
            return
        self.current = LoadedModel(manifest, model)  # the atomic swap
        self.swaps += 1

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # the follower must outlive any one bad snapshot
                log.exception("weight follower iteration failed")

    def close(self) -> None:
        self._stop.set()


__all__ = ["LoadedModel", "WeightFollower"]
