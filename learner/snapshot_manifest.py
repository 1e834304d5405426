"""A snapshot version's manifest: what the version is, and how it links to the chain it belongs to.

A manifest is the JSON beside each payload. The store writes the chain fields (``kind``, ``parent``,
``parent_sha256``, ``base``, ``depth``, ``bytes``, ``chain_bytes``) with the version, the payload's sha256 and
the time; everything else is the publisher's (model config, step, offsets, metrics, ...) and comes back as
``data``. A manifest that cannot be a base or a delta (a delta without a parent, a parent not older than the
version, ...) is refused when built or read, so a chain walk always ends at a base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

FILE_NAME = re.compile(r"^v(\d{6,})\.(json|safetensors|delta\.safetensors)$")
"""A version's files: its manifest, a base's payload, a delta's payload."""
CHAIN_FIELDS = ("kind", "parent", "parent_sha256", "base", "depth", "bytes", "chain_bytes")


@dataclass(frozen=True)
class Manifest:
    """What a version is and how it links to its chain. Manifests written before chains existed read as bases
    (``bytes`` None: their size was not recorded)."""

    version: int
    sha256: str
    created_at: float
    data: dict
    """Everything else the publisher recorded: model config, step, offsets, metrics, ..."""
    kind: str = "base"
    """``base`` (the whole state) or ``delta`` (the change from ``parent``)."""
    parent: int | None = None
    parent_sha256: str | None = None
    """The sha256 of the parent's payload this delta was made from: a parent replaced or re-pointed is caught."""
    base: int | None = None
    """The version the chain starts from (a base's own version)."""
    depth: int = 0
    """Deltas from the chain's base up to this version (0 for a base)."""
    bytes: int | None = None
    """Bytes of this version's payload."""
    chain_bytes: int = 0
    """Bytes of the chain's deltas up to this version (0 for a base)."""

    def __post_init__(self) -> None:
        if self.base is None and self.kind == "base":
            object.__setattr__(self, "base", self.version)
        if reserved := sorted({"version", "sha256", "created_at", *CHAIN_FIELDS} & set(self.data)):
            raise ValueError(f"manifest data may not set {reserved}: the store writes them")
        if self.kind == "base":
            ok = self.parent is None and self.parent_sha256 is None and self.base == self.version and self.depth == 0
        elif self.kind == "delta":
            ok = (isinstance(self.parent, int) and isinstance(self.base, int) and self.base <= self.parent < self.version
                  and isinstance(self.parent_sha256, str) and self.depth >= 1)
        else:
            ok = False
        if not ok:
            raise ValueError(f"v{self.version}: kind {self.kind!r}, parent {self.parent}, base {self.base} and "
                             f"depth {self.depth} do not make a base or a delta")

    def to_json(self) -> bytes:
        fields = {"version": self.version, "sha256": self.sha256, "created_at": self.created_at,
                  **{name: getattr(self, name) for name in CHAIN_FIELDS}}
        return orjson.dumps({**fields, **self.data}, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        obj = orjson.loads(raw)
        version, sha, created = obj.pop("version"), obj.pop("sha256"), obj.pop("created_at")
        chain = {name: obj.pop(name) for name in CHAIN_FIELDS if name in obj}
        return cls(version=version, sha256=sha, created_at=created, data=obj, **chain)


def payload_name(version: int, kind: str) -> str:
    return f"v{version:06d}.delta.safetensors" if kind == "delta" else f"v{version:06d}.safetensors"


def manifest_name(version: int) -> str:
    return f"v{version:06d}.json"


def broken_link(child: Manifest, parent: Manifest) -> str | None:
    """Why ``parent`` is not the version the delta ``child`` was made from; None when it is."""
    if parent.sha256 != child.parent_sha256:
        return (f"it was made from another v{parent.version} (whose sha256 was {child.parent_sha256[:12]}, "
                f"not {parent.sha256[:12]})")
    if parent.base != child.base or parent.depth + 1 != child.depth:
        return (f"it (chain of v{child.base}, depth {child.depth}) does not follow its parent v{parent.version} "
                f"(chain of v{parent.base}, depth {parent.depth})")
    return None


__all__ = ["CHAIN_FIELDS", "FILE_NAME", "Manifest", "broken_link", "manifest_name", "payload_name"]
