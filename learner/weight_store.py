"""Live model versions through Ray: replicas on any node follow the trainer without a shared filesystem.

The trainer writes every version durably to the snapshot store first (``learner.snapshots``: what a restarted
trainer or a cold replica without Ray reads), then offers it here. :class:`WeightStore` is a detached Ray actor
(one per run and store, named :func:`actor_name`) holding the newest chains: for each version its manifest (JSON bytes)
and a reference to its payload bytes (the same safetensors file the store holds, verified against the
manifest's sha256 by whoever reads it). The payload reaches the actor as a uint8 array (read from Ray's object
store without a copy) and the actor puts it in the object store itself, so the reference it hands out is its
own: it outlives a trainer that crashes or restarts, and each replica's node fetches it from wherever it lies.

A version larger than ``learner.publish.ray_max_bytes`` (the base of a large model) is offered as its manifest
only: replicas read its payload from the durable store, so the object store holds live deltas and small bases
rather than gigabytes per base and copy.

A base written beside training (``learner.loop``) is offered just before the delta that brings it up to date
(``learner.snapshots.SnapshotStore.publish_beside``); :meth:`WeightStore.latest` never names it on its own.

A replica asks :meth:`WeightStore.chain_to` for the newest version's chain (its base and every delta up to
it) and applies what comes after the version it serves (``serving.weights``). The actor keeps the newest ``keep_bases`` chains (a replica one compaction behind still finds its deltas);
versions are accepted only in increasing order, but for a base numbered at or below the newest held that was
created after it: the run's store started over (emptied by hand, or another store under the same run name),
and the actor holds the new lineage from then on (replicas follow it: ``serving.weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTOR_PREFIX = "moestream-weights-"
NAMESPACE = "moestream"


def actor_name(run: str) -> str:
    """The weight store of run ``run`` on a cluster: the trainer and every replica configured with that run name
    share it, whatever data directory each node has."""
    return f"{ACTOR_PREFIX}{run}"


@dataclass(frozen=True)
class Offered:
    version: int
    base: int
    manifest: bytes
    payload: list  # [ObjectRef]: a list, so that Ray hands the reference over rather than the bytes
    target: bool = True
    """False for a base written beside training (its manifest's ``same_as``): offered just before the delta that
    brings it up to date, it is never the newest version a replica should move to on its own."""


class WeightStore:
    """The actor's class (wrapped by :func:`weight_store`); every method is cheap: it holds references only."""

    def __init__(self, keep_bases: int = 2) -> None:
        if keep_bases < 1:
            raise ValueError(f"keep_bases must be >= 1, got {keep_bases}")
        self.keep_bases = keep_bases
        self._versions: dict[int, Offered] = {}

    def offer(self, version: int, base: int, manifest: bytes, payload) -> bool:
        """Hold ``version`` (a base when ``base == version``; ``payload`` its bytes as a uint8 array, or None for
        a version whose payload is read from the durable store: ``learner.publish.ray_max_bytes``). False, and
        nothing held, for a version not newer than the newest held, or a delta whose base is not held (a replica
        could not reach it)."""
        import ray

        newest = max(self._versions, default=0)
        if base == version and version <= newest and self._restarted(manifest):
            self._versions.clear()  # the run's store started over (emptied, or a new store): a new lineage
            newest = 0
        if version <= newest or (base != version and base not in self._versions):
            return False
        import orjson

        target = "same_as" not in orjson.loads(manifest)
        self._versions[version] = Offered(version, base, manifest, [] if payload is None else [ray.put(payload)],
                                          target)
        bases = sorted(v for v, o in self._versions.items() if o.base == v)
        for dropped in bases[: -self.keep_bases]:
            self._versions = {v: o for v, o in self._versions.items() if o.base != dropped}
        return True

    def _restarted(self, manifest: bytes) -> bool:
        """Whether a base numbered at or below what is held comes from a store that started over: it was
        created after the newest version held."""
        import orjson

        newest = self._versions[max(self._versions)]
        return orjson.loads(manifest)["created_at"] > orjson.loads(newest.manifest)["created_at"]

    def latest(self) -> int | None:
        return max((v for v, o in self._versions.items() if o.target), default=None)

    def chain_to(self, target: int, since: int | None = None) -> list[tuple[int, bytes, list]]:
        """``target``'s chain, base first, as ``(version, manifest, [payload ref])`` (``[]`` for a payload in the
        durable store only); from ``since`` on when ``since`` is on it (what a replica serving ``since`` lacks);
        empty when it is not held."""
        held = self._versions.get(target)
        if held is None:
            return []
        on_chain = since is not None and since in self._versions and self._versions[since].base == held.base
        first = since if on_chain else -1
        return [(v, o.manifest, o.payload) for v, o in sorted(self._versions.items())
                if o.base == held.base and first <= v <= target]

    def held(self) -> list[int]:
        return sorted(self._versions)


def weight_store(name: str, keep_bases: int = 2):
    """The weight store actor called ``name`` (:func:`actor_name`), started detached if it is not running yet:
    the trainer and the replicas each call this, whichever starts first."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=-1)(WeightStore)
    return actor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(keep_bases)


def weight_store_if_ray(name: str, keep_bases: int = 2):
    """:func:`weight_store` in a process connected to Ray; None outside Ray (direct replay, a notebook)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return weight_store(name, keep_bases)


def offer(actor, version: int, base: int, manifest: bytes, payload: bytes | None) -> bool:
    """Offer a version to the weight-store ``actor`` (``payload`` None: its manifest only, the payload being read
    from the durable store): True once it holds it."""
    import numpy as np
    import ray

    array = None if payload is None else np.frombuffer(payload, dtype=np.uint8)
    return bool(ray.get(actor.offer.remote(version, base, manifest, array)))


__all__ = ["ACTOR_PREFIX", "NAMESPACE", "WeightStore", "actor_name", "offer", "weight_store", "weight_store_if_ray"]
