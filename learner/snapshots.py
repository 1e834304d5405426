"""Versioned weight snapshots: safetensors + a JSON manifest carrying the file's sha256.

Layout of a snapshot directory (the long-lived weight store serving follows)::

    v000003.safetensors   weights (no pickle anywhere: safetensors only holds tensors)
    v000003.json          manifest: version, sha256 of the weights file, model config, step, offsets, ...
    LATEST                the newest published version, written last

Every file is written to a temporary name, fsynced and renamed, so a reader sees a whole snapshot or none.
A snapshot whose weights are not all finite is refused at publish time; a reader verifies the sha256
before it trusts the bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

_NAME = re.compile(r"^v(\d{6,})\.json$")


class SnapshotError(RuntimeError):
    """A snapshot that must not be published or loaded (non-finite, corrupt, missing)."""


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


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class SnapshotStore:
    def __init__(self, directory: Path, keep: int = 10) -> None:
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

    def publish(self, state_dict: dict[str, torch.Tensor], data: dict) -> Manifest:
        """Write a new version; refuse non-finite weights. Returns its manifest."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise SnapshotError(f"refusing to publish non-finite weights: {bad[:5]}")
        payload = save_safetensors(tensors)
        version = max([*self.versions(), self.latest_version() or 0], default=0) + 1
        manifest = Manifest(version, hashlib.sha256(payload).hexdigest(), time.time(), data)
        _write_atomic(self._weights(version), payload)
        _write_atomic(self._manifest(version), manifest.to_json())
        _write_atomic(self.directory / "LATEST", str(version).encode())
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
        tensors = load_safetensors(payload)
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors.values()):
            raise SnapshotError(f"v{version} holds non-finite weights")
        return manifest, tensors

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep]:
            self._weights(version).unlink(missing_ok=True)
            self._manifest(version).unlink(missing_ok=True)
