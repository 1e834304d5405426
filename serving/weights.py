"""Follows the snapshot directory and swaps verified models in, off the request path.

A background thread polls ``LATEST``; a newer version is loaded (sha256 and finiteness verified by
``SnapshotStore.load``), rebuilt from its manifest's model config, put in eval mode, and installed with one
reference assignment. Readers take ``current`` once per batch, so a batch is scored by one model, whole,
and the version it reports is the one that scored it. Versions only move forward. A snapshot that fails
verification is refused and remembered, and the previous model keeps serving (a replica that has none yet, or
missed a good version published just before the bad one, takes the newest kept version that verifies); one
that was superseded while being read (the publisher prunes old versions) is skipped without being held
against it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from learner.models import MultiTaskRanker
from learner.snapshots import Manifest, SnapshotError, SnapshotStore

log = logging.getLogger(__name__)
_SUPERSEDED = object()


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
        """Install the newest version above the one serving that verifies.

        That is ``LATEST`` unless it is refused; then the versions between the one serving and ``LATEST`` are
        tried, newest first. So a replica that starts while ``LATEST`` is corrupt serves the newest good
        snapshot rather than nothing, and one that missed a good version published just before a corrupt one
        still gets it."""
        latest = self.store.latest_version()
        serving = self.current.version if self.current is not None else 0
        if latest is None or latest <= serving:
            return
        for version in self._candidates(latest, serving):
            loaded = self._load(version, latest)
            if loaded is _SUPERSEDED:
                return  # the next poll takes the newer one
            if loaded is not None:
                self.current = loaded  # the atomic swap: one reference assignment
                self.swaps += 1
                if self.on_swap is not None:
                    self.on_swap(loaded)
                return

    def _candidates(self, latest: int, serving: int) -> Iterator[int]:
        """``LATEST``, then, once it is refused, the kept versions between it and the one serving, newest first."""
        if latest not in self.rejected:
            yield latest
        if latest in self.rejected:  # refused just now or on an earlier poll
            yield from (v for v in sorted(self.store.versions(), reverse=True)
                        if serving < v < latest and v not in self.rejected)

    def _load(self, version: int, latest: int) -> LoadedModel | None | object:
        """The verified model of ``version``; None if refused (and remembered); ``_SUPERSEDED`` if a newer
        publish replaced ``LATEST`` or pruned the version while it was read, which says nothing against it."""
        try:
            manifest, tensors = self.store.load(version)
            model = MultiTaskRanker.from_config(manifest.data["model_config"])
            model.load_state_dict(tensors)
            model.eval()
        except (SnapshotError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            if self.store.latest_version() != latest or version not in self.store.versions():
                return _SUPERSEDED
            self.rejected[version] = str(exc)
            log.warning("refusing snapshot v%s: %s", version, exc)
            return None
        return LoadedModel(manifest, model)

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
