"""Versioned weight snapshots: safetensors + a JSON manifest carrying the file's sha256.

Layout of a snapshot directory (the long-lived weight store serving follows)::

    v000003.safetensors   weights (no pickle anywhere: safetensors only holds tensors)
    v000003.json          manifest: version, sha256 of the weights file, model config, step, offsets, ...
    LATEST                the newest published version, written last

Every file is written to a temporary name, fsynced and renamed, so a reader sees a whole snapshot or none.
A reader verifies the sha256 before it trusts the bytes. A publish that cannot write (a full disk, a
read-only directory) raises :class:`SnapshotUnwritable` and leaves nothing of itself behind: no temporary
file, no weights without their manifest; ``LATEST`` still names the last whole version.

Publishing is guarded: a snapshot is refused (:class:`SnapshotRefused`, with the reason) when any weight is
not finite, or, given a :class:`PublishGuard`, when a task's recent progressive AUC fell more than
``max_auc_drop`` below the one recorded in the manifest ``LATEST`` points at. Versions only grow: a
:meth:`SnapshotStore.rollback` republishes a kept version's verified bytes under a new number (its manifest
says ``rollback_of``), so every follower of ``LATEST`` picks it up like any other new version.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from learner.config import PublishGuard  # the guard's settings are configuration: checked without torch

if TYPE_CHECKING:  # torch is imported where weights are written or read: listing versions needs only manifests
    import torch

_NAME = re.compile(r"^v(\d{6,})\.json$")
SNAPSHOTS_KEPT = 10
"""Versions a store keeps by default (older ones are pruned after each publish)."""


class SnapshotError(RuntimeError):
    """A snapshot that must not be published or loaded (non-finite, corrupt, missing)."""


class SnapshotUnwritable(SnapshotError):
    """The directory refused the write (``errno`` 28: full, 30: read-only, ...); nothing of it was left."""

    def __init__(self, directory: Path, error: OSError) -> None:
        name = errno.errorcode.get(error.errno, "?") if error.errno is not None else "?"
        super().__init__(f"cannot write a snapshot to {directory}: [Errno {error.errno}] {name}: {error.strerror or error}")
        self.directory = directory
        self.errno = error.errno


class SnapshotRefused(SnapshotError):
    """The publish guard said no; ``reason`` says why (``non-finite`` or ``auc-drop``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    version: int
    sha256: str
    created_at: float
    data: dict
    """Everything else the publisher recorded: model config, step, offsets, metrics, ..."""

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"version": self.version, "sha256": self.sha256, "created_at": self.created_at, **self.data},
            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        obj = orjson.loads(raw)
        version, sha, created = obj.pop("version"), obj.pop("sha256"), obj.pop("created_at")
        return cls(version=version, sha256=sha, created_at=created, data=obj)


def write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the directory: readers see all of it or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk still lets a file be removed; a read-only one made none
            tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class SnapshotStore:
    def __init__(self, directory: Path, keep: int = SNAPSHOTS_KEPT) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def _weights(self, version: int) -> Path:
        return self.directory / f"v{version:06d}.safetensors"

    def _manifest(self, version: int) -> Path:
        return self.directory / f"v{version:06d}.json"

    def versions(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))

    def latest_version(self) -> int | None:
        try:
            return int((self.directory / "LATEST").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def manifest(self, version: int) -> Manifest:
        try:
            return Manifest.from_json(self._manifest(version).read_bytes())
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot v{version} in {self.directory}") from None
        except (orjson.JSONDecodeError, KeyError) as exc:
            raise SnapshotError(f"manifest of v{version} is unreadable: {exc}") from None

    def list(self) -> list[Manifest]:
        return [self.manifest(v) for v in self.versions()]

    def latest_manifest(self) -> Manifest | None:
        """The manifest ``LATEST`` names, or None when nothing is published (or it was pruned by hand)."""
        version = self.latest_version()
        if version is None:
            return None
        try:
            return self.manifest(version)
        except SnapshotError:
            return None

    def publish(self, state_dict: dict[str, torch.Tensor], data: dict, guard: PublishGuard | None = None) -> Manifest:
        """Write a new version and point ``LATEST`` at it. Returns its manifest.

        Raises :class:`SnapshotRefused` (nothing written) for non-finite weights, or, with a ``guard``,
        when ``data["metrics"]`` fails :meth:`PublishGuard.check` against the latest manifest's metrics;
        :class:`SnapshotUnwritable` (nothing left behind) when the directory refuses the write.
        """
        import torch
        from safetensors.torch import save as save_safetensors

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise SnapshotRefused("non-finite", f"refusing to publish non-finite weights: {bad[:5]}")
        payload = save_safetensors(tensors)
        with self._exclusive():  # the guard reads the latest manifest: no other writer may slip in between
            if guard is not None and (latest := self.latest_manifest()) is not None:
                why = guard.check(data.get("metrics", {}), latest.data.get("metrics", {}))
                if why:
                    raise SnapshotRefused("auc-drop", f"progressive AUC fell below v{latest.version}'s: {why}")
            return self._write(payload, data)

    def rollback(self, version: int) -> Manifest:
        """Serve a kept version again: verify it, then republish its bytes as a new version.

        The new manifest carries the old one's data plus ``rollback_of``; ``LATEST`` names the new
        version, so followers that only move forward pick it up.
        """
        with self._exclusive():  # a publish racing this one could prune the version or take its number
            kept = self.versions()
            if version not in kept:
                have = ", ".join(f"v{v}" for v in kept) or "none"
                raise SnapshotError(f"no snapshot v{version} in {self.directory} (kept: {have})")
            manifest, _ = self.load(version)  # sha256 and finiteness checked
            payload = self._weights(version).read_bytes()
            if hashlib.sha256(payload).hexdigest() != manifest.sha256:
                raise SnapshotError(f"v{version} changed on disk while rolling back")
            return self._write(payload, {**manifest.data, "rollback_of": version})

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Writers of this directory (the trainer publishing, ``moestream snapshots rollback``) take turns:
        each numbers its version from what is on disk, so two at once could pick the same number.
        Readers (serving) need no lock: every file is replaced atomically. A directory where even the lock
        file cannot be opened (read-only, full) is :class:`SnapshotUnwritable`."""
        try:
            handle = open(self.directory / ".lock", "a+b")
        except OSError as exc:
            raise SnapshotUnwritable(self.directory, exc) from exc
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _write(self, payload: bytes, data: dict) -> Manifest:
        version = max([*self.versions(), self.latest_version() or 0], default=0) + 1
        manifest = Manifest(version, hashlib.sha256(payload).hexdigest(), time.time(), data)
        try:
            write_atomic(self._weights(version), payload)
            write_atomic(self._manifest(version), manifest.to_json())
            write_atomic(self.directory / "LATEST", str(version).encode())
        except OSError as exc:
            if self.latest_version() != version:  # not published: its weights alone would only take space
                for path in (self._manifest(version), self._weights(version)):
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
            raise SnapshotUnwritable(self.directory, exc) from exc
        self._prune()
        return manifest

    def load(self, version: int | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Read and verify a version (default: the latest)."""
        version = version if version is not None else self.latest_version()
        if version is None:
            raise SnapshotError(f"no snapshot published in {self.directory}")
        manifest = self.manifest(version)
        try:
            payload = self._weights(version).read_bytes()
        except FileNotFoundError:
            raise SnapshotError(f"weights of v{version} are missing") from None
        digest = hashlib.sha256(payload).hexdigest()
        if digest != manifest.sha256:
            raise SnapshotError(f"v{version}: sha256 {digest[:12]} does not match manifest {manifest.sha256[:12]}")
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(payload)
        except SafetensorError as exc:  # bytes that match their sha256 but are no safetensors file (a bad writer)
            raise SnapshotError(f"v{version} is not a readable safetensors file: {exc}") from None
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors.values()):
            raise SnapshotError(f"v{version} holds non-finite weights")
        return manifest, tensors

    def _prune(self) -> None:
        """Remove all but the newest ``keep`` versions (a version that cannot be removed now goes next time)."""
        for version in self.versions()[: -self.keep]:
            with contextlib.suppress(OSError):
                self._weights(version).unlink(missing_ok=True)
                self._manifest(version).unlink(missing_ok=True)
