"""Follows the trainer's published versions and brings each into the replica's model, off the request path.

Versions form chains (``learner.snapshots``): a base holds the whole model, each delta after it the change from
its parent (``learner.delta``). A background thread polls the source for a version newer than the one serving:

- **the next deltas** of the chain the replica serves are verified (sha256, finiteness, parent, shapes) and
  applied to the live model in place: checked and their map changes merged beside the requests
  (``learner.delta.prepare_delta``), then installed under :attr:`WeightFollower.lock`, which the ranker holds
  while it scores a batch (``install_delta``: the dense part copied, the changed rows staged, the merged overlays
  put in place, at a cost that does not grow with the rows), then the rows written into the tables beside the
  requests, which read them from the delta meanwhile (``settle_delta``): no batch ever sees a half-applied
  version, and a batch waits for the dense part at most. In a replica the follower hands the prepared delta to
  the scoring thread, which installs it before its next batch (:meth:`WeightFollower.install_handed`), so the
  requests never wait for the follower's thread to be scheduled;
- **a base written beside training** (compaction: its manifest's ``same_as`` names the version whose state it
  holds) is not read at all by a replica whose model went through that version: the delta published with it
  brings any later version of the old chain up to date (``learner.delta.compose``), so it is applied in place
  like any other and the replica follows the new chain without loading a whole model;
- **a new base** otherwise (a rollback, a trainer restart, a replica that starts late or lost its place) is
  loaded with its chain into a new model while the old one keeps serving, then installed with one reference
  assignment.

The follower's bulk work, which lets the interpreter's lock go while it runs (a version's bytes read and hashed, a
delta's rows written, a fold's plan, a new base's load), runs on a worker thread made ``serving.follower_nice`` steps
nicer than the replica (``learner.priority``), so that on a saturated node it takes the CPU the requests leave rather
than theirs. A delta's decoding, checks and map merges, Python that holds the interpreter's lock, run at the
requests' priority (``serving.follower_nice_scope`` "bulk", the default; "all" runs them on the worker too): a thread
the OS keeps off the CPU while it holds the interpreter's lock stalls the scoring thread, whatever its own
priority, until the OS runs it again. What holds the lock a batch is scored under stays at the requests' priority
for the same reason.

Versions only move forward. A version that fails verification is refused and remembered. A delta that cannot
be applied (a gap, a wrong parent, a bad checksum) makes the replica rebuild from the newest base and its chain
as far as it verifies, still serving what it has meanwhile; a replica whose newest version is refused serves
the newest kept version below it that verifies (so one that starts while ``LATEST`` is corrupt serves
something). A version superseded while being read (the publisher pruned it) is skipped, not held against it.

Sources: :class:`StoreSource` reads the durable snapshot store (a directory or any ``pyarrow.fs`` URI);
:class:`RaySource` reads the run's weight-store actor (``learner.weight_store``), so that a replica on a node
without the trainer's filesystem follows every version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from learner.delta import (
    Delta, DeltaError, PreparedDelta, fold_due, install_delta, install_fold, materialise, plan_fold, prepare_delta,
    settle_delta, without_held,
)
from learner.models import MultiTaskRanker
from learner.priority import lower_thread_priority
from learner.snapshots import Manifest, SnapshotError, SnapshotStore, manifest_name, parse, verified
from serving.config import FOLLOWER_NICE_SCOPES

log = logging.getLogger(__name__)
APPLY_TIMES_KEPT = 1000
HANDOFF_S = 0.05
"""How long a delta handed to the scorer waits for a batch before the follower installs it itself (an idle
replica)."""
FOLD_PAUSE_S = 0.002
"""The follower's pause between two chunks of a map fold (``learner.delta.plan_fold``): at 10^7 ids a fold is
about 180 ms of CPU, which on a busy replica would take a core from the requests in one burst; in chunks of about
a millisecond, each followed by this pause, it does not."""


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


@dataclass(frozen=True)
class Entry:
    """One version a source offers: its manifest, and how to fetch its payload, verified against the manifest's
    sha256; :meth:`parse` makes the contents of those bytes (a base's whole state, or a delta)."""

    manifest: Manifest
    fetch: Callable[[], bytes]

    @property
    def version(self) -> int:
        return self.manifest.version

    def parse(self, payload: bytes) -> dict | Delta:
        """The contents of the payload :attr:`fetch` returned, checked (``learner.snapshots.parse``)."""
        return parse(self.manifest, payload)

    def read(self) -> dict | Delta:
        """The version's verified contents: fetched, then parsed."""
        return self.parse(self.fetch())

    @property
    def is_base(self) -> bool:
        return self.manifest.kind == "base"


class Superseded(Exception):
    """The version was pruned or replaced while it was read: nothing against it, the next poll goes on."""


class VersionSource(Protocol):
    def latest(self) -> int | None:
        """The newest version published (None: nothing yet)."""

    def chain(self, target: int, since: int | None = None) -> list[Entry]:
        """``target``'s chain, base first: every version from its base to ``target``; or, when ``since`` is on it,
        from ``since`` to ``target`` (a replica reads what follows the version it serves, not the whole chain).
        Raises :class:`SnapshotError` when a link is missing, :class:`Superseded` when ``target`` is gone."""

    def below(self, version: int) -> int | None:
        """The newest version held below ``version`` (None: none)."""


class StoreSource:
    """Versions from the durable snapshot store."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store

    def latest(self) -> int | None:
        return self.store.latest_version()

    def chain(self, target: int, since: int | None = None) -> list[Entry]:
        listed_at = self.store.latest_version()
        if self.store.files.size(manifest_name(target)) is None:
            raise Superseded
        return [Entry(m, self._reader(m, listed_at)) for m in self.store.chain(target, since)]

    def reader(self, manifest: Manifest) -> Callable[[], bytes]:
        """Fetches ``manifest``'s payload from the store (verified) when called."""
        return self._reader(manifest, self.store.latest_version())

    def _reader(self, manifest: Manifest, listed_at: int | None) -> Callable[[], bytes]:
        def fetch() -> bytes:
            try:
                stored, payload = self.store.payload(manifest.version)
                if stored.sha256 != manifest.sha256:  # republished under its number since it was listed
                    raise Superseded
                return payload
            except SnapshotError:  # pruned or replaced by a newer publish while read: nothing against it
                if self.store.latest_version() != listed_at or manifest.version not in self.store.versions():
                    raise Superseded from None
                raise
        return fetch

    def below(self, version: int) -> int | None:
        return max((v for v in self.store.versions() if v < version), default=None)


class RaySource:
    """Versions from the run's weight-store actor: each payload fetched from Ray's object store and verified
    against its manifest like a file of the store. A version the actor holds as its manifest only (larger than
    ``learner.publish.ray_max_bytes``) is read from ``store``, the durable store."""

    def __init__(self, actor, store: StoreSource | None = None) -> None:
        self.actor, self.store = actor, store

    def latest(self) -> int | None:
        import ray

        return ray.get(self.actor.latest.remote())

    def chain(self, target: int, since: int | None = None) -> list[Entry]:
        import ray

        entries = []
        for version, raw, payload in ray.get(self.actor.chain_to.remote(target, since)):
            manifest = Manifest.from_json(raw)
            if not payload:
                entries.append(Entry(manifest, self._from_store(manifest)))
                continue

            def fetch(manifest=manifest, ref=payload[0]) -> bytes:
                return verified(manifest, ray.get(ref).tobytes())  # a uint8 array in the object store
            entries.append(Entry(manifest, fetch))
        if not entries or entries[-1].version != target:
            raise Superseded
        return entries

    def _from_store(self, manifest: Manifest) -> Callable[[], bytes]:
        """A reader of a version whose payload is in the durable store only; its error says so."""
        why = (f"v{manifest.version} ({manifest.bytes or 0:,} bytes, over learner.publish.ray_max_bytes) is in the "
               "durable store only")
        if self.store is None:
            def unreachable() -> bytes:
                raise SnapshotError(f"{why}, and this replica has none")
            return unreachable
        fetch, where = self.store.reader(manifest), self.store.store.uri

        def from_store() -> bytes:
            try:
                return fetch()
            except SnapshotError as exc:
                raise SnapshotError(f"{why}, which this replica cannot read at {where} (a store every node "
                                    f"reaches, e.g. s3://, is needed): {exc}") from exc
        return from_store

    def below(self, version: int) -> int | None:
        import ray

        return max((v for v in ray.get(self.actor.held.remote()) if v < version), default=None)


class Sources:
    """Several sources as one: the newest version any of them holds, each version's chain from the first that
    has it. A replica follows the weight-store actor and falls back to the durable store for what the actor no
    longer (or does not yet) hold: a restarted actor, a run whose trainer is not running."""

    def __init__(self, *sources: VersionSource) -> None:
        self.sources = sources

    def latest(self) -> int | None:
        return max((v for s in self.sources if (v := s.latest()) is not None), default=None)

    def chain(self, target: int, since: int | None = None) -> list[Entry]:
        for source in self.sources:
            latest = source.latest()
            if latest is None or latest < target:
                continue
            try:
                return source.chain(target, since)
            except Superseded:
                continue
        raise Superseded

    def below(self, version: int) -> int | None:
        return max((v for s in self.sources if (v := s.below(version)) is not None), default=None)


class WeightFollower:
    """``current`` is the newest verified version (None before the first); ``on_swap`` is called, on the follower
    thread, with each version installed (a new base or an applied delta)."""

    def __init__(self, source: VersionSource | Path | str, poll_s: float = 0.25,
                 on_swap: Callable[[LoadedModel], None] | None = None, handoff: bool = False, nice: int = 0,
                 nice_scope: str = "bulk") -> None:
        if nice_scope not in FOLLOWER_NICE_SCOPES:
            raise ValueError(f"nice_scope must be one of {list(FOLLOWER_NICE_SCOPES)}, got {nice_scope!r}")
        self.source = source if hasattr(source, "chain") else StoreSource(SnapshotStore(source))
        self.nice: int | None = None
        """The niceness the follower's bulk work runs at (``serving.follower_nice``); None: the replica's own."""
        self.nice_scope = nice_scope
        """What runs at :attr:`nice` (``serving.follower_nice_scope``): the bulk work only, or all the follower's."""
        self._worker_cpu = 0.0
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="weight-follower-work", initializer=self._lower,
                                           initargs=(nice,)) if nice > 0 else None)
        if self._worker is not None:
            self._worker.submit(lambda: None).result()  # the thread starts, and is made nicer, now: /healthz says so
        """Where the follower's bulk work runs, at a lower priority than the requests. Nothing that holds
        :attr:`lock` runs there: a thread made nicer cannot be made less nice again, and a batch waiting for a lock
        held by a thread the OS keeps off the CPU would wait for the follower's priority, not its own."""
        self.handoff = handoff
        """Whether a scorer installs the deltas this follower prepares (:meth:`install_handed`)."""
        self._handed: tuple[Entry, PreparedDelta] | None = None
        self._handed_error: Exception | None = None
        self._taken = threading.Event()
        self.installed_by_scorer = 0
        self.poll_s = poll_s
        self.on_swap = on_swap
        self.current: LoadedModel | None = None
        self.lock = threading.Lock()
        """Held by the ranker while a batch is scored and by the follower while it applies a delta."""
        self.swaps = 0
        self.deltas_applied = 0
        self.rebuilds = 0
        self.adopted = 0
        """Bases written beside training taken through their delta alone, without loading them."""
        self.folds = 0
        self._lineage: dict[int, str] = {}
        """The versions the served model went through since it was last loaded whole, with their sha256."""
        self.apply_s: deque[float] = deque(maxlen=APPLY_TIMES_KEPT)
        """Wall time of the latest delta applies, lock held (what a batch may wait)."""
        self.apply_cpu_s: deque[float] = deque(maxlen=APPLY_TIMES_KEPT)
        """The installing thread's CPU time in each of them (the scorer's or the follower's): below the wall time
        when that thread was preempted while it held the lock."""
        self.prepare_s: deque[float] = deque(maxlen=APPLY_TIMES_KEPT)
        """Wall time of the latest deltas' checks and map merges, beside the requests (after the read)."""
        self.settle_s: deque[float] = deque(maxlen=APPLY_TIMES_KEPT)
        """Wall time of the latest deltas' rows written into the tables after the install, beside the requests."""
        self.follow_cpu_s: deque[float] = deque(maxlen=APPLY_TIMES_KEPT)
        """The follower thread's CPU time for each of the latest deltas: its read, preparation and settling."""
        self.rejected: dict[int, str] = {}
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._follow, name="weight-follower", daemon=True)
        self._thread.start()

    def _lower(self, steps: int) -> None:
        self.nice = lower_thread_priority(steps)

    def _bulk(self, fn: Callable, *args, **kwargs):
        """Bulk work, which lets the interpreter's lock go while it runs: ``fn(*args, **kwargs)`` on the low-priority
        worker when there is one (it raises what ``fn`` raised)."""
        if self._worker is None:
            return fn(*args, **kwargs)
        return self._worker.submit(self._timed, fn, args, kwargs).result()

    def _python(self, fn: Callable, *args, **kwargs):
        """Work that holds the interpreter's lock: on this thread, at the requests' priority, unless the scope of
        ``serving.follower_nice`` is all the follower's work."""
        return self._bulk(fn, *args, **kwargs) if self.nice_scope == "all" else fn(*args, **kwargs)

    def _timed(self, fn: Callable, args: tuple, kwargs: dict):
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            self._worker_cpu += time.thread_time() - started

    def _cpu(self) -> float:
        """The CPU time of the calling thread and of the worker's work so far: read on the follower's thread, which
        waits for each piece of work it hands over, the difference of two readings is what happened in between."""
        return time.thread_time() + self._worker_cpu

    @property
    def store(self) -> SnapshotStore | None:
        return self.source.store if isinstance(self.source, StoreSource) else None

    def refresh(self) -> None:
        """Bring the newest version in: its deltas when it continues the chain served, else its chain
        rebuilt; on a refusal, the newest version below it that verifies."""
        target = self.source.latest()
        serving = self.current.version if self.current is not None else 0
        if target is not None and target < serving:  # versions never go back: the run's store started over
            log.warning("the newest version published, v%s, is older than v%s served: the store started over; "
                        "following its new versions", target, serving)
            serving, self.rejected = 0, {}
        while target is not None and target > serving:
            if target in self.rejected:
                target = self.source.below(target)
                continue
            try:
                chain = self._chain(target)
                if self._advance(chain, serving):
                    return
            except Superseded:
                return  # the next poll takes the newer one
            except SnapshotError as exc:  # a link of its chain is missing
                self._refuse(target, str(exc))
                target = self.source.below(target)
                continue
            target = self.source.below(chain[0].version)  # nothing of this chain beyond serving verifies

    def _chain(self, target: int) -> list[Entry]:
        """``target``'s chain from the version served when it is on it, else from its base. A replica reads the
        manifests of the versions it lacks, not the whole chain (up to ``learner.publish.max_deltas`` long)."""
        return self.source.chain(target, since=self.current.version if self.current is not None else None)

    def _advance(self, chain: list[Entry], serving: int) -> bool:
        """Serve ``chain``'s last version (or the furthest of it that verifies, when newer than ``serving``).
        False when nothing newer could be installed."""
        versions = [e.version for e in chain]
        at = versions.index(serving) if self.current is not None and serving in versions else None
        # the version served itself, not another of its number (a store that started over), and a delta after it
        incremental = (at is not None and chain[at].manifest.sha256 == self.current.manifest.sha256
                       and not chain[at + 1].is_base)
        if incremental and self._apply(chain[at + 1:]) is None:
            return True  # every delta in; else rebuild from the base, as far as it verifies
        if not chain[0].is_base:  # the chain from the version served: a rebuild reads it from its base
            chain = self.source.chain(chain[-1].version)
            versions = [e.version for e in chain]
        if not incremental and self._adoptable(chain) and self._apply(chain[1:], adopting=chain[0]) is None:
            self.adopted += 1
            return True
        installed = self._rebuild(chain, serving)
        self.rebuilds += installed and incremental
        refused = next((v for v in versions if v in self.rejected), None)
        if not installed and refused is not None and refused != chain[-1].version:
            # unreachable until a new base: remembered, so later polls do not walk this chain again
            self._refuse(chain[-1].version, f"its chain holds v{refused}, which was refused")
        return installed

    def _adoptable(self, chain: list[Entry]) -> bool:
        """Whether ``chain`` starts with a base written beside training whose state is that of a version the served
        model went through (its manifest's ``same_as``, sha256 included), followed by a delta: that delta then
        brings the served model up to date without the base being read."""
        same = chain[0].manifest.data.get("same_as")
        return (self.current is not None and len(chain) > 1 and chain[0].is_base and not chain[1].is_base
                and isinstance(same, dict) and self.current.version < chain[0].version
                and self._lineage.get(same.get("version")) == same.get("sha256"))

    def _apply(self, deltas: list[Entry], adopting: Entry | None = None) -> int | None:
        """Apply ``deltas`` in order to the live model (the first on ``adopting``, a base written beside training,
        in place of the version served: :meth:`_adoptable`); the version that failed, or None."""
        expected = adopting.version if adopting is not None else self.current.version
        for entry in deltas:
            if entry.version in self.rejected:
                return entry.version
            cpu = self._cpu()
            try:
                delta = self._python(entry.parse, self._bulk(entry.fetch))
                if entry.manifest.parent != expected:
                    raise SnapshotError(f"v{entry.version}'s parent is v{entry.manifest.parent}, "
                                        f"the replica serves v{self.current.version}")
                started = time.perf_counter()
                if adopting is not None:  # a catch-up delta: most of its rows are the versions applied already
                    delta = self._bulk(without_held, self.current.model, delta)
                prepared = self._python(prepare_delta, self.current.model, delta)  # checks, map merges; no lock
                self.prepare_s.append(time.perf_counter() - started)
                self._install(entry, prepared)
                started = time.perf_counter()
                # the rows written beside the requests, which read them staged meanwhile
                self._bulk(settle_delta, prepared)
                self.settle_s.append(time.perf_counter() - started)
                self.follow_cpu_s.append(self._cpu() - cpu)
            except Superseded:
                return entry.version
            except (SnapshotError, DeltaError, KeyError, RuntimeError, ValueError, TypeError) as exc:
                self._refuse(entry.version, str(exc))
                return entry.version
            if adopting is not None:  # the model is on the new chain now: its lineage starts at the adopted base
                self._lineage, adopting = {adopting.version: adopting.manifest.sha256}, None
            self._lineage[entry.version] = entry.manifest.sha256
            expected = entry.version
            self.deltas_applied += 1
            self._swapped()
        self._fold()
        return None

    def _install(self, entry: Entry, prepared: PreparedDelta) -> None:
        """Install a prepared delta under the lock: handed to the scoring thread when there is one
        (:meth:`install_handed`), else, or when no batch takes it within :data:`HANDOFF_S`, on this thread. Raises
        what the install raised."""
        if self.handoff:
            with self.lock:
                self._handed, self._handed_error = (entry, prepared), None
                self._taken.clear()
            self._taken.wait(HANDOFF_S)
            with self.lock:
                if self._handed is not None:  # no batch came: installed here
                    self._handed = None
                    self._install_now(entry, prepared)
                elif self._handed_error is not None:
                    raise self._handed_error
            return
        with self.lock:
            self._install_now(entry, prepared)

    def _pause(self) -> None:
        """Let the requests have the core between two chunks of a fold (:data:`FOLD_PAUSE_S`)."""
        self._stop.wait(FOLD_PAUSE_S)

    def install_handed(self) -> None:
        """Install the delta the follower handed over, if any. The scorer calls this with the lock held before it
        scores a batch: the install then runs on the thread that is about to score anyway, between two batches,
        rather than on the follower's thread, which the requests would wait for until the OS schedules it (on a
        busy machine the lock was held about twice the install's CPU time). Never raises: an install that
        fails, changing nothing, is the follower's to report."""
        handed, self._handed = self._handed, None
        if handed is None:
            return
        try:
            self._install_now(*handed)
            self.installed_by_scorer += 1
        except Exception as exc:  # noqa: BLE001 - the batch is scored by the version served; the follower reports it
            self._handed_error = exc
        finally:
            self._taken.set()

    def _install_now(self, entry: Entry, prepared: PreparedDelta) -> None:
        """With the lock held: write ``prepared`` into the live model and serve ``entry``'s version."""
        started, cpu = time.perf_counter(), time.thread_time()
        install_delta(self.current.model, prepared)
        self.current = LoadedModel(entry.manifest, self.current.model)
        self.apply_s.append(time.perf_counter() - started)
        self.apply_cpu_s.append(time.thread_time() - cpu)

    def _fold(self) -> None:
        """Fold the maps' overlays of applied deltas into the maps once they have grown: planned beside the
        requests (O(map)), installed under the lock (O(overlay))."""
        model = self.current.model
        if fold_due(model):
            planned = self._bulk(plan_fold, model, pause=self._pause)
            with self.lock:
                install_fold(model, planned)
            self.folds += 1

    def _rebuild(self, chain: list[Entry], serving: int) -> bool:
        """A new model from ``chain``'s base and its deltas, as far as they verify; installed if newer."""
        usable = chain[: next((i for i, e in enumerate(chain) if e.version in self.rejected), len(chain))]
        if not usable or usable[-1].version <= serving:
            return False  # already served, or refused: read nothing
        built = self._bulk(self._build, usable, serving)
        if isinstance(built, bool):
            return built
        self.current, self._lineage = built  # the atomic swap: one reference assignment
        self._swapped()
        return True

    def _build(self, usable: list[Entry], serving: int) -> tuple[LoadedModel, dict[int, str]] | bool:
        """The model of ``usable``'s last version that verifies, read from its base, with its lineage; True when a
        version was superseded while read (the next poll starts over from the newer one), False when nothing newer
        than ``serving`` verifies."""
        state, last, lineage = None, None, {}
        for entry in usable:
            try:
                content = entry.read()
                if entry.is_base:
                    state = content
                else:
                    if last is None or entry.manifest.parent != last.version:
                        raise SnapshotError(f"v{entry.version}'s parent v{entry.manifest.parent} is not "
                                            f"v{last.version if last else None}")
                    state = materialise(state, content)
                last = entry.manifest
                lineage[last.version] = last.sha256
            except Superseded:
                return True
            except (SnapshotError, DeltaError, KeyError, RuntimeError, ValueError, TypeError) as exc:
                self._refuse(entry.version, str(exc))
                break
        if last is None or last.version <= serving:
            return False
        try:
            model = MultiTaskRanker.from_config(last.data["model_config"])
            model.load_state_dict(state)
            model.eval()
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            self._refuse(last.version, str(exc))
            return False
        return LoadedModel(last, model), lineage

    def _refuse(self, version: int, why: str) -> None:
        if version not in self.rejected:
            self.rejected[version] = why
            log.warning("refusing snapshot v%s: %s", version, why)

    def _swapped(self) -> None:
        self.swaps += 1
        if self.on_swap is not None:
            self.on_swap(self.current)

    def figures(self) -> dict:
        """What ``/healthz`` reports of the follower: swaps, deltas applied, rebuilds, folds, apply times (the lock
        held: what a batch may wait), prepare times (checks and map merges) and settle times (the rows written),
        both beside the requests."""
        def at(seconds: deque[float], q: float) -> float | None:
            times = sorted(seconds)
            return round(times[min(len(times) - 1, int(q * len(times)))] * 1000, 3) if times else None
        return {"swaps": self.swaps, "deltas_applied": self.deltas_applied, "rebuilds": self.rebuilds,
                "bases_adopted": self.adopted, "installed_by_scorer": self.installed_by_scorer,
                "folds": self.folds, "apply_ms_p50": at(self.apply_s, 0.5), "apply_ms_p99": at(self.apply_s, 0.99),
                "apply_ms_max": at(self.apply_s, 1.0), "prepare_ms_p50": at(self.prepare_s, 0.5),
                "prepare_ms_p99": at(self.prepare_s, 0.99), "settle_ms_p50": at(self.settle_s, 0.5),
                "settle_ms_p99": at(self.settle_s, 0.99), "follow_cpu_ms_p50": at(self.follow_cpu_s, 0.5),
                "follow_cpu_ms_p99": at(self.follow_cpu_s, 0.99), "apply_cpu_ms_p50": at(self.apply_cpu_s, 0.5),
                "apply_cpu_ms_p99": at(self.apply_cpu_s, 0.99), "nice": self.nice, "nice_scope": self.nice_scope}

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # the follower must outlive any one bad snapshot
                log.exception("weight follower iteration failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)


__all__ = ["Entry", "LoadedModel", "RaySource", "Sources", "StoreSource", "Superseded", "VersionSource", "WeightFollower"]
