"""Versioned weight snapshots as chains: a base (the whole model), then deltas (each the change from the
version before it), each one a safetensors payload beside a JSON manifest that carries the payload's sha256.

A store is a local directory or a folder of any ``pyarrow.fs`` filesystem (``learner.snapshot_files``)::

    v000003.safetensors         a base: the whole state dict (no pickle anywhere: safetensors only holds tensors)
    v000004.delta.safetensors   a delta: ``learner.delta.to_tensors`` (dense entries, changed rows, map changes)
    v000004.json                manifest: version, kind, parent (+ its sha256), base, depth, bytes, sha256, ...
    LATEST                      the newest published version, written last

**Chains.** A delta's parent is the version ``LATEST`` named when it was published; ``base`` is the base its
chain starts from. Loading a version reads its chain base first and applies the deltas one after another onto
one state (linear in the chain's length). Every file's sha256 is checked before its bytes are trusted, and every
link: the parent exists, belongs to the same chain, and is the very bytes the delta was made from (the child's
manifest records the parent's sha256), so a gap, a re-pointed parent or a flipped byte is a
:class:`SnapshotError` naming the version, never a silently wrong model.

**Compaction.** A delta is small to publish, but a reader starting cold reads the whole chain, and a bad link
takes every later version of its chain with it. So the publisher asks :meth:`SnapshotStore.base_due` before
each publish: a base is due after ``max_deltas`` deltas (default 20) or once the chain's delta bytes reach
``max_delta_bytes`` (default half of the base's bytes: a cold reader then reads about 1.5 models at most, and
a chain takes about 1.5 models of space). ``chain_status`` gives the figures (deltas and their bytes since the
base) for telemetry.

**Bases beside training.** A base of a large model takes seconds to serialise and write (about 9 s at 10^7 ids).
The trainer writes one beside training (``learner.beside``): :meth:`SnapshotStore.write_pending` puts the state of a
published version under a temporary name, with no lock and nothing published, while deltas go on along the old
chain; :meth:`SnapshotStore.publish_beside` then numbers it past those deltas, with the delta that brings it up to
date (their composition) as its child, and points ``LATEST`` at that child. The base's manifest names the version
whose state it holds (``same_as``), so a replica that went through that version takes the child alone.

**Crash safety.** A publish writes the payload, then its manifest, then ``LATEST``, each whole (a local file
goes to a temporary name, is fsynced and renamed; an object store shows an object only once it is whole).
Readers start from ``LATEST`` and follow manifests, so a publish killed at any point leaves ``LATEST`` on the
last whole version. What it left (a temporary file, a payload without its manifest, a manifest ``LATEST``
never named) is removed by the next publish, which numbers its version past every file it finds, so no number
a reader could have seen is used twice. A publish that cannot write (a
full disk, a read-only directory) raises :class:`SnapshotUnwritable` and leaves nothing of itself behind.
Local writers take turns through an ``flock``; an object store has no lock: one publisher per store.

**Pruning** keeps the newest ``keep`` bases and every delta of their chains: a chain goes whole or not at all.

Publishing is guarded: a snapshot (base or delta) is refused (:class:`SnapshotRefused`, with the reason) when
any value is not finite, or, given a :class:`PublishGuard`, when a task's recent progressive AUC fell more than
``max_auc_drop`` below the one recorded in the manifest ``LATEST`` points at. Versions only grow: a
:meth:`SnapshotStore.rollback` republishes a kept version's verified state as a new base (its manifest says
``rollback_of``), so every follower of ``LATEST`` picks it up like any other new version.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from learner.config import PublishGuard  # the guard's settings are configuration: checked without torch
from learner.snapshot_files import ArrowFiles, LocalFiles, is_leftover_tmp, open_files, write_atomic
from learner.snapshot_manifest import FILE_NAME, Manifest, broken_link, manifest_name, payload_name

if TYPE_CHECKING:  # torch is imported where weights are written or read: listing versions needs only manifests
    import pyarrow.fs
    import torch

    from learner.delta import Delta

SNAPSHOTS_KEPT = 10
"""Chains (bases, each with its deltas) a store keeps by default; older ones are pruned after each publish."""
MAX_DELTAS = 20
"""Deltas after which a base is due: bounds the files a cold reader opens and the deltas it applies."""
DELTA_BYTES_FRACTION = 0.5
"""Without ``max_delta_bytes``, a base is due once the chain's deltas hold this fraction of the base's bytes."""


class SnapshotError(RuntimeError):
    """A snapshot that must not be published or loaded (non-finite, corrupt, missing, not linked to its chain)."""


class SnapshotUnwritable(SnapshotError):
    """The store refused the write (``errno`` 28: full, 30: read-only, ...); nothing of it was left."""

    def __init__(self, directory: Path | str, error: OSError) -> None:
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
class PendingBase:
    """A base written beside training (:meth:`SnapshotStore.write_pending`) that is no version yet: its payload
    under a temporary name, and the version whose state it holds."""

    name: str
    sha256: str
    bytes: int
    same_as: Manifest
    """The published version whose state the payload holds, entry for entry."""


@dataclass(frozen=True)
class ChainStatus:
    """Where the chain ``LATEST`` ends in stands: what :meth:`SnapshotStore.base_due` decides on, for telemetry."""

    version: int
    """The version ``LATEST`` names."""
    base: int
    chain_length: int
    """Deltas since the base."""
    delta_bytes: int
    """Their payloads' bytes."""
    base_bytes: int


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point entries holding a NaN or an infinity. A finite sum proves a tensor finite (a NaN or an
    infinity makes every sum it enters non-finite) at a thirtieth of ``isfinite``'s cost; a sum that is not
    finite (one of those, or an overflow) is checked element by element."""
    import torch

    return [k for k, v in tensors.items()
            if v.is_floating_point() and not torch.isfinite(v.sum()) and not torch.isfinite(v).all()]


class SnapshotStore:
    """A chain of versions at ``location``: a local path, a ``file://``/``s3://``/``gs://``/... URI, or a path
    inside ``filesystem`` (any ``pyarrow.fs.FileSystem``). ``directory`` is the local directory (None for a
    store elsewhere), ``uri`` the store's address."""

    def __init__(self, location: str | os.PathLike, keep: int = SNAPSHOTS_KEPT, *, max_deltas: int = MAX_DELTAS,
                 max_delta_bytes: int | None = None, delta_fraction: float = DELTA_BYTES_FRACTION,
                 filesystem: pyarrow.fs.FileSystem | None = None) -> None:
        if keep < 1 or max_deltas < 0 or (max_delta_bytes is not None and max_delta_bytes < 0):
            raise ValueError(f"keep must be >= 1 and max_deltas, max_delta_bytes >= 0, got {keep}, {max_deltas}, "
                             f"{max_delta_bytes}")
        self.files: LocalFiles | ArrowFiles = open_files(location, filesystem)
        self.directory: Path | None = self.files.directory if isinstance(self.files, LocalFiles) else None
        self.uri = self.files.uri
        self.keep, self.max_deltas, self.max_delta_bytes = keep, max_deltas, max_delta_bytes
        self.delta_fraction = delta_fraction
        """Without ``max_delta_bytes``, a chain's deltas may weigh this fraction of its base."""
        self._pending: set[str] = set()
        """Temporary names of bases this store is writing beside training: not leftovers."""

    # -- reading manifests ------------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        return sorted(int(m.group(1)) for name in self.files.names()
                      if (m := FILE_NAME.match(name)) and m.group(2) == "json")

    def latest_version(self) -> int | None:
        try:
            return int(self.files.read("LATEST").decode().strip())
        except (FileNotFoundError, ValueError):
            return None

    def manifest(self, version: int) -> Manifest:
        try:
            return Manifest.from_json(self.files.read(manifest_name(version)))
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot v{version} in {self.files.location}") from None
        except (ValueError, KeyError, TypeError) as exc:  # orjson's JSONDecodeError is a ValueError
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

    def chain(self, version: int, since: int | None = None) -> list[Manifest]:
        """The manifests ``version`` is made of, base first, each link checked (not the payloads: :meth:`load`).
        With ``since`` (a version the caller holds) on that chain, the walk stops there: the list starts at
        ``since``, and what it reads follows the versions after ``since``, not the chain's depth."""
        chain = [self.manifest(version)]
        while (child := chain[-1]).kind == "delta" and child.version != since:
            try:
                parent = self.manifest(child.parent)
            except SnapshotError as exc:
                why = f"a gap: its parent v{child.parent} is missing or unreadable ({exc})"
            else:
                why = broken_link(child, parent)
            if why:
                raise SnapshotError(f"v{version}'s chain breaks at v{child.version}: {why}")
            chain.append(parent)
        return chain[::-1]

    # -- compaction -------------------------------------------------------------------------------------------

    def chain_status(self) -> ChainStatus | None:
        """The chain ``LATEST`` ends in; None when nothing usable is published (then a base is due)."""
        try:
            head = self._head()
            base = head if head.kind == "base" else self.manifest(head.base)
        except SnapshotError:
            return None
        base_bytes = base.bytes if base.bytes is not None else self.files.size(payload_name(base.version, "base"))
        return ChainStatus(head.version, base.version, head.depth, head.chain_bytes, base_bytes or 0)

    def delta_budget(self, base_bytes: int) -> int:
        """Delta bytes a chain on a base of ``base_bytes`` may hold before a base is due."""
        return self.max_delta_bytes if self.max_delta_bytes is not None else int(base_bytes * self.delta_fraction)

    def base_due(self) -> bool:
        """Whether the next version should be a base: nothing usable is published, the chain holds ``max_deltas``
        deltas, or their bytes reached the budget (:meth:`delta_budget`)."""
        status = self.chain_status()
        return (status is None or status.chain_length >= self.max_deltas
                or status.delta_bytes >= self.delta_budget(status.base_bytes))

    # -- publishing -------------------------------------------------------------------------------------------

    def publish(self, state_dict: dict[str, torch.Tensor], data: dict, guard: PublishGuard | None = None) -> Manifest:
        """Write a new base version (the whole state) and point ``LATEST`` at it. Returns its manifest.

        Raises :class:`SnapshotRefused` (nothing written) for non-finite weights, or, with a ``guard``,
        when ``data["metrics"]`` fails :meth:`PublishGuard.check` against the latest manifest's metrics;
        :class:`SnapshotUnwritable` (nothing left behind) when the store refuses the write.
        """
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if bad := _non_finite(tensors):
            raise SnapshotRefused("non-finite", f"refusing to publish non-finite weights: {bad[:5]}")
        payload = safetensors_parts(tensors)  # no copy of the whole model into one buffer
        with self._exclusive():  # the guard reads the latest manifest: no other writer may slip in between
            self._guard(data, guard)
            return self._write(payload, data, parent=None)

    def publish_delta(self, delta: Delta, data: dict, guard: PublishGuard | None = None,
                      parent: int | None = None) -> Manifest:
        """Write a delta version on top of the one ``LATEST`` names, and point ``LATEST`` at it.

        Refused like :meth:`publish` (non-finite values, the guard); a :class:`SnapshotError` when there is no
        parent to apply it to (nothing published, or ``LATEST``'s manifest or payload is gone), and
        ``SnapshotRefused("parent-moved")`` when ``parent`` is given and ``LATEST`` names another version (a
        rollback, or another publisher, came in between: the delta is the change from ``parent``, not from
        what ``LATEST`` is now; publish a base). That the delta fits its parent is the publisher's promise,
        checked by every reader. :meth:`base_due` is advice: a delta published past it is written all the same.
        """
        payload = _delta_payload(delta)
        with self._on_head(data, guard, parent) as head:
            return self._write(payload, data, parent=head)

    def write_pending(self, state_dict: dict[str, torch.Tensor], same_as: Manifest) -> PendingBase:
        """Write a base beside training: the whole state of published version ``same_as``, under a temporary name,
        with no lock held and nothing published (:meth:`publish_beside` makes it a version). Refused like
        :meth:`publish` for non-finite weights; :class:`SnapshotUnwritable` when the store refuses the write."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        if bad := _non_finite(tensors):
            raise SnapshotRefused("non-finite", f"refusing to publish non-finite weights: {bad[:5]}")
        parts = safetensors_parts(tensors)  # streamed, so that the writing thread leaves the GIL to training
        sha256, size = _digest(parts)
        name = f".base.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        self._pending.add(name)
        try:
            self.files.write(name, parts)
        except OSError as exc:
            self.discard_pending(name)
            raise SnapshotUnwritable(self.files.location, exc) from exc
        return PendingBase(name, sha256, size, same_as)

    def discard_pending(self, pending: PendingBase | str) -> None:
        """Give up a base written beside training: its file goes."""
        name = pending if isinstance(pending, str) else pending.name
        self._pending.discard(name)
        with contextlib.suppress(OSError):
            self.files.remove(name)

    def publish_beside(self, pending: PendingBase, delta: Delta, data: dict, guard: PublishGuard | None = None,
                       parent: int | None = None) -> tuple[Manifest, Manifest]:
        """Make a base written beside training a version, with the delta that brings it up to now: the base
        (the state of ``pending.same_as``, its manifest saying so in ``data["same_as"]``) and on it ``delta``,
        the change since that version (``learner.delta.compose`` of every delta published after it and the
        change since the last), then ``LATEST`` straight to the delta: the base alone is never ``LATEST``.

        Both are numbered past the deltas published while the base was written, so the old chain ends where
        the new one starts and every number only grows. A publish killed anywhere before ``LATEST`` leaves two
        versions newer than ``LATEST``, which the next publish removes. Refused like :meth:`publish_delta`
        (``parent-moved`` when ``LATEST`` is not ``parent``); a :class:`SnapshotError` when the pending payload
        is gone (another writer took it for a leftover): write another."""
        payload = _delta_payload(delta)
        with self._on_head(data, guard, parent):
            if self.files.size(pending.name) != pending.bytes:
                raise SnapshotError(f"the base written beside training ({pending.name}) is gone or cut")
            return self._write_beside(pending, payload, data)

    def rollback(self, version: int) -> Manifest:
        """Serve a kept version again: verify it (its whole chain), then republish it as a new base.

        A base's bytes are republished as they are; a delta's materialised state is written whole. The new
        manifest carries the old one's data plus ``rollback_of``; ``LATEST`` names the new version, so
        followers that only move forward pick it up.
        """
        with self._exclusive():  # a publish racing this one could prune the version or take its number
            kept = self.versions()
            if version not in kept:
                have = ", ".join(f"v{v}" for v in kept) or "none"
                raise SnapshotError(f"no snapshot v{version} in {self.files.location} (kept: {have})")
            chain = self.chain(version)
            manifest = chain[-1]
            if manifest.kind == "base":
                payload = self._payload(manifest)
                self._tensors(manifest, payload)  # readable and finite
            else:
                payload = _safetensors({k: v.contiguous() for k, v in self._materialise(version, chain).items()})
            return self._write(payload, {**manifest.data, "rollback_of": version}, parent=None)

    def _head(self) -> Manifest:
        """The manifest ``LATEST`` names, if its payload is there whole; else why not (:class:`SnapshotError`)."""
        version = self.latest_version()
        if version is None:
            raise SnapshotError(f"no snapshot published in {self.files.location}")
        head = self.manifest(version)
        size = self.files.size(payload_name(version, head.kind))
        if size is None or (head.bytes is not None and size != head.bytes):
            raise SnapshotError(f"v{version}, which LATEST names, has {'no' if size is None else 'a cut'} payload")
        return head

    @contextlib.contextmanager
    def _on_head(self, data: dict, guard: PublishGuard | None, parent: int | None) -> Iterator[Manifest]:
        """The writers' lock held and the manifest ``LATEST`` names, once it is ``parent`` (when given: else
        ``SnapshotRefused("parent-moved")``) and ``data`` passes the guard: where a delta is written on top."""
        with self._exclusive():
            head = self._head()
            if parent is not None and head.version != parent:
                raise SnapshotRefused("parent-moved", f"LATEST names v{head.version}, not v{parent} this delta is "
                                                      "the change from (a rollback?): a base is due")
            self._guard(data, guard)
            yield head

    def _guard(self, data: dict, guard: PublishGuard | None) -> None:
        if guard is not None and (latest := self.latest_manifest()) is not None:
            why = guard.check(data.get("metrics", {}), latest.data.get("metrics", {}))
            if why:
                raise SnapshotRefused("auc-drop", f"progressive AUC fell below v{latest.version}'s: {why}")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Writers of a local store (the trainer publishing, ``moestream snapshots rollback``) take turns: each
        numbers its version from what is there, so two at once could pick the same number. Readers (serving)
        need no lock: every file is replaced whole. A directory where even the lock file cannot be opened
        (read-only, full) is :class:`SnapshotUnwritable`. An object store has no lock: one writer per store."""
        try:
            held = self.files.lock()
        except OSError as exc:
            raise SnapshotUnwritable(self.files.location, exc) from exc
        with held:
            yield

    def _write(self, payload: bytes | list[memoryview], data: dict, parent: Manifest | None) -> Manifest:
        """Number, write (payload, manifest, then ``LATEST``), prune. Call with the writers' lock held."""
        try:
            names = self.files.names()
            latest = self.latest_version()
            version = max([*(int(m.group(1)) for n in names if (m := FILE_NAME.match(n))), latest or 0]) + 1
            self._remove_leftovers(names, latest)
        except OSError as exc:
            raise SnapshotUnwritable(self.files.location, exc) from exc
        sha256, size = _digest(payload)
        if parent is None:
            manifest = Manifest(version, sha256, time.time(), data, bytes=size)
        else:
            manifest = Manifest(version, sha256, time.time(), data, kind="delta",
                                parent=parent.version, parent_sha256=parent.sha256, base=parent.base,
                                depth=parent.depth + 1, bytes=size, chain_bytes=parent.chain_bytes + size)
        try:
            self.files.write(payload_name(version, manifest.kind), payload)
            self.files.write(manifest_name(version), manifest.to_json())
            self.files.write("LATEST", str(version).encode())
        except OSError as exc:
            with contextlib.suppress(OSError):
                if self.latest_version() != version:  # not published: its files alone would only take space
                    self._remove_version(version)
            raise SnapshotUnwritable(self.files.location, exc) from exc
        self._prune()
        return manifest

    def _write_beside(self, pending: PendingBase, payload: bytes, data: dict) -> tuple[Manifest, Manifest]:
        """Number both (base, then delta), move the base's payload into place, write the delta, the manifests,
        then ``LATEST``; prune. Call with the writers' lock held."""
        try:
            names = self.files.names()
            latest = self.latest_version()
            version = max([*(int(m.group(1)) for n in names if (m := FILE_NAME.match(n))), latest or 0]) + 1
            self._remove_leftovers(names, latest)
        except OSError as exc:
            raise SnapshotUnwritable(self.files.location, exc) from exc
        same = pending.same_as
        now = time.time()
        base = Manifest(version, pending.sha256, now, {**same.data, "same_as": {"version": same.version,
                                                                               "sha256": same.sha256}},
                        bytes=pending.bytes)
        delta = Manifest(version + 1, hashlib.sha256(payload).hexdigest(), now, data, kind="delta", parent=version,
                         parent_sha256=base.sha256, base=version, depth=1, bytes=len(payload),
                         chain_bytes=len(payload))
        try:
            self.files.move(pending.name, payload_name(version, "base"))
            self._pending.discard(pending.name)
            self.files.write(payload_name(delta.version, "delta"), payload)
            self.files.write(manifest_name(version), base.to_json())
            self.files.write(manifest_name(delta.version), delta.to_json())
            self.files.write("LATEST", str(delta.version).encode())
        except OSError as exc:
            with contextlib.suppress(OSError):
                if self.latest_version() != delta.version:
                    self._remove_version(delta.version)
                    self._remove_version(version)
            self.discard_pending(pending)
            raise SnapshotUnwritable(self.files.location, exc) from exc
        self._prune()
        return base, delta

    def _remove_leftovers(self, names: list[str], latest: int | None) -> None:
        """What killed publishes left: temporary files, payloads without a manifest, and manifests newer than
        ``LATEST`` (written, never published). Only with the writers' lock held, when no publish is under way."""
        manifests = {int(m.group(1)) for n in names if (m := FILE_NAME.match(n)) and m.group(2) == "json"}
        for name in names:
            m = FILE_NAME.match(name)
            orphan = m is not None and m.group(2) != "json" and int(m.group(1)) not in manifests
            if (is_leftover_tmp(name) and not self._writing(name)) or orphan:
                with contextlib.suppress(OSError):
                    self.files.remove(name)
        if latest is not None:  # without LATEST nothing says which versions were published: keep them all
            for version in sorted(v for v in manifests if v > latest):
                with contextlib.suppress(OSError):
                    self._remove_version(version)

    def _writing(self, name: str) -> bool:
        """Whether ``name`` is a base being written beside training, or the temporary file its write goes through."""
        return any(name == pending or name.startswith(f".{pending}.tmp-") for pending in self._pending)

    def _remove_version(self, version: int) -> None:
        """The manifest first: a removal cut short leaves a payload without a manifest, which nothing reads."""
        self.files.remove(manifest_name(version))
        for kind in ("base", "delta"):
            self.files.remove(payload_name(version, kind))

    def _prune(self) -> None:
        """Keep the newest ``keep`` bases and every version after the oldest of them (their chains' deltas);
        remove the older ones, oldest first (what cannot be removed now goes next time). A chain's versions
        are never older than its base, so no kept chain loses a link."""
        names = set(self.files.names())
        versions = self.versions()
        bases = [v for v in versions if payload_name(v, "base") in names]
        if len(bases) <= self.keep:
            return
        oldest_kept = bases[-self.keep]
        if (latest := self.latest_manifest()) is not None:  # LATEST's chain whatever else happened
            oldest_kept = min(oldest_kept, latest.base)
        for version in versions:
            if version < oldest_kept:
                with contextlib.suppress(OSError):
                    self._remove_version(version)

    # -- reading versions -------------------------------------------------------------------------------------

    def load(self, version: int | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Read, verify and materialise a version (default: the latest): its base and every delta up to it."""
        version = version if version is not None else self.latest_version()
        if version is None:
            raise SnapshotError(f"no snapshot published in {self.files.location}")
        chain = self.chain(version)
        return chain[-1], self._materialise(version, chain)

    def read_delta(self, version: int) -> tuple[Manifest, Delta]:
        """A delta version's manifest and change, verified (sha256, finite values, a delta's entries), for a
        follower that applies versions one by one onto the state it serves (``learner.delta.materialise``): only
        onto version ``manifest.parent`` whose payload's sha256 is ``manifest.parent_sha256``."""
        manifest = self.manifest(version)
        if manifest.kind != "delta":
            raise SnapshotError(f"v{version} is a base, not a delta: load it whole")
        return manifest, self._delta(manifest)

    def _materialise(self, version: int, chain: list[Manifest]) -> dict[str, torch.Tensor]:
        """The chain's base with its deltas applied one after another: each copies only the tables it touches."""
        from learner.delta import DeltaError, materialise

        current = chain[0]
        try:
            state = self._tensors(current, self._payload(current))
            for current in chain[1:]:
                try:
                    state = materialise(state, self._delta(current))
                except DeltaError as exc:
                    raise SnapshotError(f"v{current.version} does not fit its parent v{current.parent}: {exc}") from None
        except SnapshotError as exc:
            if current.version == version:
                raise
            raise SnapshotError(f"v{version} cannot be loaded, its chain breaks at v{current.version}: {exc}") from None
        return state

    def payload(self, version: int) -> tuple[Manifest, bytes]:
        """A version's manifest and payload bytes, verified against its sha256: what the publisher offers to the
        run's weight-store actor (``learner.weight_store``) and a follower there decodes with :func:`decode`."""
        manifest = self.manifest(version)
        return manifest, self._payload(manifest)

    def _payload(self, manifest: Manifest) -> bytes:
        """The payload's bytes, once their sha256 matches the manifest's."""
        name = payload_name(manifest.version, manifest.kind)
        try:
            payload = self.files.read(name)
        except FileNotFoundError:
            raise SnapshotError(f"weights of v{manifest.version} are missing ({name})") from None
        except OSError as exc:
            raise SnapshotError(f"weights of v{manifest.version} are unreadable ({name}): {exc}") from None
        _verify(manifest, payload)
        return payload

    def _tensors(self, manifest: Manifest, payload: bytes) -> dict[str, torch.Tensor]:
        return _tensors(manifest, payload)

    def _delta(self, manifest: Manifest) -> Delta:
        return _as_delta(manifest, _tensors(manifest, self._payload(manifest)))


def _verify(manifest: Manifest, payload: bytes) -> None:
    digest = hashlib.sha256(payload).hexdigest()
    if digest != manifest.sha256:
        raise SnapshotError(f"v{manifest.version}: sha256 {digest[:12]} does not match manifest {manifest.sha256[:12]}")


def _tensors(manifest: Manifest, payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(payload)
    except SafetensorError as exc:  # bytes that match their sha256 but are no safetensors file (a bad writer)
        raise SnapshotError(f"v{manifest.version} is not a readable safetensors file: {exc}") from None
    if _non_finite(tensors):
        raise SnapshotError(f"v{manifest.version} holds non-finite weights")
    return tensors


def _as_delta(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Delta:
    from learner.delta import DeltaError, from_tensors

    try:
        return from_tensors(tensors)
    except DeltaError as exc:
        raise SnapshotError(f"v{manifest.version} is no delta: {exc}") from None


def decode(manifest: Manifest, payload: bytes) -> dict[str, torch.Tensor] | Delta:
    """A version's payload, verified as a file of the store is (sha256, safetensors, finite values): a base's
    whole state, or a delta. For payloads that did not come from the store's files (the weight-store actor)."""
    return parse(manifest, verified(manifest, payload))


def verified(manifest: Manifest, payload: bytes) -> bytes:
    """``payload``, once its sha256 matches the manifest's (:class:`SnapshotError` otherwise): the part of
    :func:`decode` that holds no interpreter lock (hashlib lets it go), which a replica runs apart (``serving.weights``)."""
    _verify(manifest, payload)
    return payload


def parse(manifest: Manifest, payload: bytes) -> dict[str, torch.Tensor] | Delta:
    """The contents of a payload :func:`verified` against ``manifest``: a base's whole state, or a delta, checked as
    :func:`decode` checks them (safetensors, finite values, a delta's entries)."""
    tensors = _tensors(manifest, payload)
    return tensors if manifest.kind == "base" else _as_delta(manifest, tensors)


_DTYPES = {"int64": "I64", "float64": "F64", "float32": "F32", "int32": "I32", "bfloat16": "BF16", "float16": "F16",
           "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
"""safetensors' names of torch's dtypes, in the order its writer lays tensors out (then by name)."""


@dataclass(frozen=True)
class Streamed:
    """A tensor written to a file chunk by chunk as it is read, never whole in memory (a table's rows streamed from a
    snapshot into a checkpoint: ``RowSnapshot.stream``): its dtype and shape, and its chunks, tensors of consecutive
    rows in order (on any device) that hold ``shape[0]`` rows together. The chunks can be read once."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Iterable[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def whole(self) -> torch.Tensor:
        import torch

        return torch.cat([chunk.cpu() for chunk in self.chunks]).reshape(self.shape)


def safetensors_parts(tensors: dict[str, torch.Tensor | Streamed]) -> list[memoryview] | Iterator[memoryview]:
    """The file ``safetensors.torch.save(tensors)`` makes, byte for byte, as its header and a view of each tensor's
    memory (contiguous CPU tensors; no copy). The library builds the file in one buffer while holding the GIL,
    about 2 s for a base of 10^7 ids, which a writer beside training would take from the training thread;
    hashing and writing these views let the GIL go. A :class:`Streamed` tensor's chunks are read as the parts are
    (the parts are then an iterator, to be read once). A dtype outside ``_DTYPES``: the library's bytes, whole."""
    import torch

    order = list(_DTYPES.values())
    kinds = {k: _DTYPES.get(str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
    if None in kinds.values():
        whole = {k: t.whole() if isinstance(t, Streamed) else t for k, t in tensors.items()}
        return [memoryview(_safetensors(whole))]
    header, sources, offset = {}, [], 0
    for name in sorted(tensors, key=lambda k: (order.index(kinds[k]), k)):
        tensor = tensors[name]
        size = tensor.nbytes if isinstance(tensor, Streamed) else tensor.numel() * tensor.element_size()
        header[name] = {"dtype": kinds[name], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        sources.append(tensor if isinstance(tensor, Streamed) else _bytes_of(tensor))
        offset += size
    raw = orjson.dumps(header)
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned, as the library pads it
    head = memoryview(struct.pack("<Q", len(raw)) + raw)
    if not any(isinstance(source, Streamed) for source in sources):
        return [head, *sources]
    return _streamed_parts(head, sources)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes (no copy)."""
    import torch

    flat = tensor.reshape(-1)
    if flat.numel() < 2:  # a scalar or a single element may carry a stride of 0: a fresh one has 1
        flat = flat.new_empty(flat.shape).copy_(flat)
    return memoryview(flat.view(torch.uint8).numpy())


def _streamed_parts(head: memoryview, sources: list[memoryview | Streamed]) -> Iterator[memoryview]:
    yield head
    for source in sources:
        if not isinstance(source, Streamed):
            yield source
            continue
        written = 0
        for chunk in source.chunks:
            view = _bytes_of(chunk.detach().cpu().contiguous())
            written += view.nbytes
            yield view
        if written != source.nbytes:  # the header promised what the file would then not hold
            raise ValueError(f"a streamed tensor of shape {list(source.shape)} gave {written} bytes, not {source.nbytes}")


def _delta_payload(delta: Delta) -> bytes:
    """A delta's safetensors bytes, refused (nothing written) when a value is not finite."""
    from learner.delta import to_tensors

    tensors = to_tensors(delta)
    if bad := _non_finite(tensors):
        raise SnapshotRefused("non-finite", f"refusing to publish a delta with non-finite values: {bad[:5]}")
    return _safetensors(tensors)


def _digest(payload: bytes | list[memoryview]) -> tuple[str, int]:
    """sha256 (hex) and size of a payload, whole or in parts."""
    digest = hashlib.sha256()
    for part in [payload] if isinstance(payload, bytes) else payload:
        digest.update(part)
    return digest.hexdigest(), (len(payload) if isinstance(payload, bytes) else sum(p.nbytes for p in payload))


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save as save_safetensors

    return save_safetensors(tensors)


__all__ = ["DELTA_BYTES_FRACTION", "MAX_DELTAS", "SNAPSHOTS_KEPT", "ChainStatus", "Manifest", "PendingBase", "PublishGuard",
           "SnapshotError", "SnapshotRefused", "SnapshotStore", "SnapshotUnwritable", "Streamed", "decode", "parse", "verified",
           "write_atomic"]
