"""Scenario f of issue 9: corrupted snapshots land in the weight store that live Serve replicas follow.

Over Ray Serve's real HTTP path, under load: good v1 serves; then each kind of corruption in
``tests.serving.conftest.CORRUPTIONS`` is published as a newer version (a flipped byte, a copy cut short,
half a file under a matching sha256, NaN weights). Every ranking request still succeeds with v1, every replica
refuses each bad version (``/healthz`` lists it, the replica logs why, ``moestream_snapshots_rejected`` counts
it), a replica that starts while the newest version is corrupt serves v1 too, and the next good version is
picked up by all of them. Then the same for a corrupt delta in a chain (issue 22): refused, the version before
it serving until the next base, through the store and through Ray's weight-store actor.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import httpx
import pytest

from infra.pipeline import wait_for
from learner.snapshots import SnapshotStore
from serving.app import build_app
from serving.config import ServingConfig
from tests.conftest import free_port
from tests.reliability.ranking_load import RankingLoad, tally
from tests.serving.conftest import CORRUPTIONS, Publisher, chain_store, feature_store, publish, publish_corrupt

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
REPLICAS = 2
APP = "corrupt-snapshots"


class Replicas:
    """What each replica of a route last said on ``/healthz`` (requests land on a replica of the proxy's choosing,
    so it is asked until every one has answered)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.health: dict[str, dict] = {}

    def poll(self) -> dict[str, dict]:
        for _ in range(4):
            r = httpx.get(f"{self.url}/healthz", timeout=10)
            if r.status_code == 200:
                self.health[r.json()["replica"]] = r.json()
        return self.health

    def all_refused(self, version: int, replicas: int) -> bool:
        health = self.poll()
        return len(health) == replicas and all(version in h["rejected_versions"] for h in health.values())

    def all_serve(self, version: int, replicas: int) -> bool:
        health = self.poll()
        return len(health) == replicas and all(h["model_version"] == version for h in health.values())


def _rejected_gauge(app: str) -> dict[str, float]:
    """``moestream_snapshots_rejected`` of each replica of ``app``, as Ray's metrics agent exports it."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        replica = re.search(r'replica="([^"]+)"', line)
        if line.startswith("ray_moestream_snapshots_rejected{") and replica and f'application="{app}"' in line:
            found[replica.group(1)] = float(line.rsplit(" ", 1)[1])
    return found


def test_corrupt_snapshots_are_refused_and_v1_keeps_serving(ray_session, tmp_path) -> None:
    from ray import serve

    features = feature_store(tmp_path / "features")
    store = SnapshotStore(tmp_path / "snapshots")
    first = publish(store, seed=1).version
    port = free_port()
    serve.shutdown()  # an instance an earlier test left running would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    config = ServingConfig(num_replicas=REPLICAS, num_cpus=0.5, poll_s=0.05, max_candidates=200)
    serve.run(build_app(store.directory, features, config), name=APP, route_prefix="/")
    load = RankingLoad(url, clients=3).start()
    replicas, refused_after = Replicas(url), {}
    try:
        wait_for(lambda: len(load.outcomes) >= 50, 60, "the clients' first responses")
        bad, corrupt_from = [], time.monotonic()
        for i, kind in enumerate(CORRUPTIONS):
            bad.append(publish_corrupt(store, kind, seed=10 + i))
            published_at = time.monotonic()
            wait_for(lambda: replicas.all_refused(bad[-1], REPLICAS), 60, f"both replicas to refuse v{bad[-1]} ({kind})")
            refused_after[bad[-1]] = time.monotonic() - published_at

        # A replica that starts now finds a corrupt LATEST and no previous model of its own.
        serve.run(build_app(store.directory, features, ServingConfig(num_cpus=0.5, poll_s=0.05, max_candidates=200)),
                  name=f"{APP}-late", route_prefix="/late")
        late = [httpx.post(f"{url}/late/v1/rank", json={"user_id": 1, "candidates": [10, 11]}, timeout=30)
                for _ in range(5)]
        late_health = httpx.get(f"{url}/late/healthz", timeout=10).json()

        good = publish(store, seed=99).version
        published_at = good_at = time.monotonic()
        wait_for(lambda: replicas.all_serve(good, REPLICAS), 60, f"both replicas to serve v{good}")
        picked_up_s = time.monotonic() - published_at
        wait_for(lambda: sum(a.version == good for a in load.outcomes) >= 20, 60, f"responses of v{good}")
        late_good = Replicas(f"{url}/late")
        wait_for(lambda: late_good.all_serve(good, 1), 60, f"the late replica to serve v{good}")
        wait_for(lambda: list(_rejected_gauge(APP).values()) == [len(bad)] * REPLICAS, 60,
                 "the replicas' exported count of refused snapshots")
    finally:
        load.stop()
        serve.delete(f"{APP}-late")
        serve.delete(APP)

    outcomes = load.outcomes
    versions = Counter(a.version for a in outcomes if a.ok)
    while_corrupt = [a for a in outcomes if corrupt_from <= a.sent_at < good_at]
    print(f"\ncorrupt snapshots: {len(outcomes)} ranking requests over HTTP to {REPLICAS} replicas, "
          f"{sum(not a.ok for a in outcomes)} failed ({tally(outcomes)}); versions answered "
          f"{dict(sorted(versions.items()))}; {len(while_corrupt)} sent while a corrupt version was LATEST, "
          f"{sum(a.ok and a.version == first for a in while_corrupt)} of them answered 200 by v{first}; refused by both replicas (kind: seconds after publishing): "
          + ", ".join(f"v{v} {kind}: {refused_after[v]:.2f} s" for v, kind in zip(bad, CORRUPTIONS))
          + f"; replicas' /healthz rejected_versions {sorted({v for h in replicas.health.values() for v in h['rejected_versions']})}"
          f"; a replica started while v{bad[-1]} was LATEST answered {[r.status_code for r in late]} with "
          f"v{late_health['model_version']} (refused {late_health['rejected_versions']}); good v{good} served by "
          f"both replicas {picked_up_s:.2f} s after publishing")
    assert all(a.ok for a in outcomes), tally(outcomes)
    assert set(versions) == {first, good} and not set(versions) & set(bad)
    assert all(r.status_code == 200 and r.json()["model_version"] == first for r in late)
    assert late_health["rejected_versions"] == bad


MAX_DELTAS = 6
"""The delta scenario's chains: a base is due after this many deltas (``learner.publish.max_deltas``)."""


def test_a_corrupt_delta_is_refused_and_the_version_before_serves_until_the_next_base(ray_session, tmp_path) -> None:
    """A chain (base, then deltas from a learning :class:`Publisher`) under load over HTTP; one delta's payload has
    a byte flipped, its manifest's sha256 that of the true bytes; the deltas after it are its children. Every
    replica refuses it and keeps serving the delta before it (0 failed requests, no answer from the corrupt
    delta or its children); the next base (compaction after ``MAX_DELTAS``) and a delta on it are served.

    Where the corruption happens, and why: the delta is published by hand with the byte flipped *before* its
    files reach the store (payload, manifest, ``LATEST`` last, as the store writes). Flipping a byte of a file the
    store already published would race the replicas' 50 ms poll (one could apply the intact bytes first), and
    would miss any replica reading through Ray, which gets the bytes that were offered, not the file. Two apps
    follow the store: one reads it alone (``weight_store`` None: the replica reads exactly the corrupted file),
    the other follows the run's weight-store actor first and the store second, as replicas do with
    ``learner.publish.via_ray``. Each version is offered as ``learner.reporter`` offers it, read back verified
    from the store, so the corrupt delta never reaches Ray: that replica meets it through its store fallback,
    and its children through Ray with a parent it does not serve.
    """
    import ray
    from ray import serve

    from learner.weight_store import weight_store

    features = feature_store(tmp_path / "features")
    store = chain_store(tmp_path / "snapshots", MAX_DELTAS)
    actor_name = f"test-corrupt-delta-{tmp_path.name}"
    actor = weight_store(actor_name)
    publisher = Publisher(store, actor)
    first = publisher.base()
    port = free_port()
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    config = ServingConfig(num_replicas=REPLICAS, num_cpus=0.5, poll_s=0.05, max_candidates=200)
    apps = {f"{APP}-delta": ("/", None), f"{APP}-delta-ray": ("/ray", actor_name)}
    for name, (prefix, through) in apps.items():
        serve.run(build_app(store.directory, features, config, weight_store=through), name=name, route_prefix=prefix)
    urls = {"store": url, "ray": f"{url}/ray"}
    loads = {k: RankingLoad(u, clients=2).start() for k, u in urls.items()}
    replicas = {k: Replicas(u) for k, u in urls.items()}

    def everywhere(check) -> bool:
        return all(check(r) for r in replicas.values())

    try:
        wait_for(lambda: all(len(load.outcomes) >= 20 for load in loads.values()), 60, "the clients' first responses")
        goods = [publisher.next() for _ in range(2)]
        assert [store.manifest(v).kind for v in goods] == ["delta", "delta"]
        wait_for(lambda: everywhere(lambda r: r.all_serve(goods[-1], REPLICAS)), 60,
                 f"every replica to serve v{goods[-1]}")

        corrupt_at = time.monotonic()
        bad = publisher.corrupt_delta()
        wait_for(lambda: everywhere(lambda r: r.all_refused(bad, REPLICAS)), 60, f"every replica to refuse v{bad}")
        children = []
        while not store.base_due():
            children.append(publisher.next())
        children_at = time.monotonic()
        assert children and all(store.manifest(v).kind == "delta" for v in children)
        wait_for(lambda: all(sum(a.sent_at >= children_at and a.version == goods[-1] for a in load.outcomes) >= 20
                             for load in loads.values()), 60, f"answers of v{goods[-1]} with v{children[-1]} LATEST")
        held = ray.get(actor.held.remote())

        base_at = time.monotonic()
        newest = publisher.next()
        assert store.manifest(newest).kind == "base"
        wait_for(lambda: everywhere(lambda r: r.all_serve(newest, REPLICAS)), 60, f"every replica to serve v{newest}")
        final = publisher.next()
        assert store.manifest(final).kind == "delta"
        wait_for(lambda: everywhere(lambda r: r.all_serve(final, REPLICAS)), 60, f"every replica to serve v{final}")
        wait_for(lambda: all(sum(a.version == final for a in load.outcomes) >= 10 for load in loads.values()), 60,
                 f"responses of v{final}")
        applied = len(goods) + 1  # the good deltas of each chain: into the live model, none loaded whole
        wait_for(lambda: everywhere(lambda r: all(h["weights"]["deltas_applied"] >= applied
                                                  for h in r.poll().values())),
                 60, "the replicas to count the deltas they applied")
        health = {k: dict(r.health) for k, r in replicas.items()}
    finally:
        for load in loads.values():
            load.stop()
        for name in apps:
            serve.delete(name)
        ray.kill(actor, no_restart=True)

    for k, load in loads.items():
        outcomes = load.outcomes
        versions = Counter(a.version for a in outcomes if a.ok)
        while_corrupt = [a for a in outcomes if corrupt_at <= a.sent_at and a.received_at is not None
                         and a.received_at < base_at]
        print(f"\ncorrupt delta, replicas following {k}: {len(outcomes)} ranking requests, "
              f"{sum(not a.ok for a in outcomes)} failed ({tally(outcomes)}); versions answered "
              f"{dict(sorted(versions.items()))}; v{bad} corrupt, its children {children}; {len(while_corrupt)} "
              f"answered while they were LATEST, by {dict(Counter(a.version for a in while_corrupt))}; replicas' "
              f"weights {[h['weights'] for h in health[k].values()]}, rejected "
              f"{[h['rejected_versions'] for h in health[k].values()]}")
        assert all(a.ok for a in outcomes), tally(outcomes)
        assert set(versions) <= {first, *goods, newest, final} and final in versions
        assert while_corrupt and all(a.version == goods[-1] for a in while_corrupt)
        assert len(health[k]) == REPLICAS
        for h in health[k].values():
            assert h["model_version"] == final and bad in h["rejected_versions"]
            assert h["weights"]["deltas_applied"] == applied, "each good delta went into the live model once"
    assert bad not in held and children[-1] in held, "the corrupt delta never reached Ray; its children did"
