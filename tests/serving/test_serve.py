"""The ranking deployment on a real local Ray Serve, over real HTTP: hot swap under load (whole versions, and
chains of a base and deltas), hardening, metrics."""

from __future__ import annotations

import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from infra.pipeline import wait_for
from learner.snapshots import SnapshotStore
from serving.app import build_app
from serving.config import ServingConfig
from tests.conftest import free_port
from tests.serving.conftest import (Publisher, assert_no_replica_went_back, chain_store, deploy_locked, feature_store,
                                    publish, publish_paced)

pytestmark = pytest.mark.integration

REPLICAS = 2
SWITCH_INTERVAL_MS = 0.7
"""The fixture's ``serving.switch_interval_ms``: neither Python's 5 ms nor ServingConfig's default."""
SNAPSHOTS = 50
CLIENTS = 4
DELTA_VERSIONS = 22
MAX_DELTAS = 5
CANDIDATES = 1000
"""Issue 24's request size: the delta hot swap is exercised at it."""


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory: pytest.TempPathFactory):
    """Two replicas following a snapshot directory that holds v1. Serve binds its HTTP port once per
    instance, so it is shut down before (a test before may have left one) and after."""
    from ray import serve

    root = tmp_path_factory.mktemp("serving")
    features = feature_store(root / "features")
    store = SnapshotStore(root / "snapshots")
    publish(store, seed=1)
    port = free_port()
    serve.shutdown()  # an instance an earlier test left running would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    config = ServingConfig(num_replicas=REPLICAS, num_cpus=0.5, poll_s=0.05, max_candidates=200,
                           switch_interval_ms=SWITCH_INTERVAL_MS)
    serve.run(build_app(store.directory, features, config), name="ranking-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}", store
    serve.shutdown()


class Load:
    """``CLIENTS`` threads, each ranking ``candidates`` of ``items`` ids for a random user, one request after the
    other, until stopped. ``rows``: per client, in send order, ``(status, replica, version, batch, pid, items)``."""

    def __init__(self, url: str, candidates: int = 20, items: int = 500) -> None:
        self.url, self.candidates, self.items = url, candidates, items
        self.rows: list[list[tuple]] = [[] for _ in range(CLIENTS)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(CLIENTS)]

    def _client(self, k: int) -> None:
        rng = np.random.default_rng(k)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                body = {"user_id": int(rng.integers(0, 50)),
                        "candidates": rng.choice(self.items, self.candidates, replace=False).tolist()}
                try:
                    r = http.post("/v1/rank", json=body)
                    result = r.json() if r.status_code == 200 else {}
                    self.rows[k].append((r.status_code, result.get("replica"), result.get("model_version"),
                                         result.get("batch"), result.get("pid"), len(result.get("items", []))))
                except httpx.HTTPError as exc:
                    self.rows[k].append((repr(exc), None, None, None, None, 0))

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def answered(self) -> int:
        return sum(map(len, self.rows))

    def all_answer_with(self, version: int) -> bool:
        """Whether every replica's newest answer so far came from ``version``."""
        last: dict[str, int] = {}
        for rows in self.rows:
            for status, replica, answered, *_ in list(rows):
                if status == 200:
                    last[replica] = max(last.get(replica, 0), answered)
        return len(last) == REPLICAS and set(last.values()) == {version}

    def publish_paced(self, publish: Callable[[], int], n: int) -> list[int]:
        return publish_paced(self.rows, publish, n)

    def assert_nothing_dropped(self, published: set[int]) -> list[tuple]:
        """Every request answered in full by a published version; no replica restarted or went back a version.
        Returns every row."""
        rows = [row for per_client in self.rows for row in per_client]
        failed = [row for row in rows if row[0] != 200]
        assert not failed, f"{len(failed)} of {len(rows)} requests failed, e.g. {failed[:3]}"
        assert all(n == self.candidates for *_, n in rows)
        versions = {row[2] for row in rows}
        assert versions <= published, f"versions never published: {sorted(versions - published)}"
        pids = defaultdict(set)
        for _, replica, _, _, pid, _ in rows:
            pids[replica].add(pid)
        assert len(pids) == REPLICAS and all(len(p) == 1 for p in pids.values()), f"replicas restarted: {dict(pids)}"
        assert_no_replica_went_back(self.rows)
        return rows


def test_fifty_snapshots_swap_in_under_load_with_nothing_dropped(served) -> None:
    url, store = served
    load = Load(url).start()
    try:
        wait_for(lambda: load.answered() >= 20, 60, "the clients' first responses")
        seeds = iter(range(100, 100 + SNAPSHOTS))
        published = {1, *load.publish_paced(lambda: publish(store, seed=next(seeds)).version, SNAPSHOTS)}
        final = max(published)
        wait_for(lambda: load.all_answer_with(final), 60, f"both replicas to serve v{final}")
    finally:
        load.stop()
    rows = load.assert_nothing_dropped(published)
    assert {row[2] for row in rows} == published, "every version answered: swapped in under load"


def test_a_chain_of_deltas_swaps_in_under_load_with_nothing_dropped(served, tmp_path: Path) -> None:
    """Versions as the trainer publishes them since issue 22: a base, then deltas applied in place to the live
    model under the ranker's lock, a new base every ``MAX_DELTAS`` (compaction). An app of its own (1000
    candidates per request, issue 24's size) follows a chain from a learning publisher: no request fails, no
    replica goes back a version, every replica applied deltas (``/healthz`` ``weights.deltas_applied``) and the
    answers came from deltas and from bases."""
    from ray import serve

    url, _ = served
    store = chain_store(tmp_path / "snapshots", MAX_DELTAS)
    publisher = Publisher(store)
    published = {publisher.base()}
    config = ServingConfig(num_replicas=REPLICAS, num_cpus=0.5, poll_s=0.05, max_candidates=CANDIDATES)
    serve.run(build_app(store.directory, feature_store(tmp_path / "features"), config), name="ranking-deltas",
              route_prefix="/deltas")
    load = Load(f"{url}/deltas", candidates=CANDIDATES, items=5000).start()
    health: dict[str, dict] = {}

    def every_replica_applied_deltas_up_to(version: int) -> bool:
        for _ in range(4):
            answer = httpx.get(f"{url}/deltas/healthz", timeout=10).json()
            health[answer["replica"]] = answer
        return len(health) == REPLICAS and all(h["model_version"] == version and h["weights"]["deltas_applied"] > 0
                                               for h in health.values())

    try:
        wait_for(lambda: load.answered() >= 8, 60, "the clients' first responses")
        published.update(load.publish_paced(publisher.next, DELTA_VERSIONS))
        final = max(published)
        assert store.manifest(final).kind == "delta"
        wait_for(lambda: every_replica_applied_deltas_up_to(final), 60,
                 f"both replicas to serve v{final}, having applied deltas")
        wait_for(lambda: load.all_answer_with(final), 60, f"both replicas to answer with v{final}")
    finally:
        load.stop()
        serve.delete("ranking-deltas")
    rows = load.assert_nothing_dropped(published)
    kinds = Counter(store.manifest(v).kind for v in {row[2] for row in rows})
    print(f"\ndeltas under load: {len(rows)} requests of {CANDIDATES} candidates, versions answered by kind "
          f"{dict(kinds)}; replicas' weights {[h['weights'] for h in health.values()]}")
    assert kinds == {"base": 4, "delta": DELTA_VERSIONS - 3}, f"answers came from {dict(kinds)}"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b'{"user_id": 1, "candidates": [1, 2', 422, "not valid JSON"),
        (b'{"user_id": "1", "candidates": [1]}', 422, "user_id"),
        (b'{"candidates": [1]}', 422, "user_id: Field required"),
        (b'{"user_id": 1, "candidates": [' + b"1," * 200 + b'1]}', 422, "at most 200 items"),
        (b'{"user_id": 1, "candidates": [' + b"12345678," * 10_000 + b'1]}', 413, "exceeds the limit"),
        (b'{"user_id": 1e400, "candidates": [1]}', 422, "user_id: Value error, must be a finite number, got 1e400 (overflows)"),
        (b'{"user_id": NaN, "candidates": [1]}', 422, "user_id: Value error, must be a finite number, got NaN"),
        (b'{"user_id": 1, "candidates": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 422, "body nests deeper than 1024 levels"),
    ],
)
def test_bad_requests_over_http_are_4xx(served, body: bytes, status: int, needle: str) -> None:
    url, _ = served
    r = httpx.post(f"{url}/v1/rank", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_a_body_that_is_not_json_over_http_is_a_415(served) -> None:
    url, _ = served
    r = httpx.post(f"{url}/v1/rank", content=b'{"user_id": 1, "candidates": [1]}', headers={"content-type": "text/plain"},
                   timeout=30)
    assert r.status_code == 415 and r.json()["detail"] == "Content-Type must be application/json, got text/plain"


def test_a_locked_replica_before_and_after_its_first_snapshot(served, tmp_path: Path) -> None:
    """A replica with API tokens and no snapshot yet: not ready on ``/healthz`` (open to all), 401 without the
    token, 503 that names no server path with it; then ready and ranking once a snapshot is published."""
    from ray import serve

    url, _ = served
    store, token = deploy_locked(tmp_path, "ranking-locked", "/locked")
    try:
        base, body = f"{url}/locked", {"user_id": 1, "candidates": [10, 11]}
        with httpx.Client(base_url=base, timeout=30) as http:
            health = http.get("/healthz")
            assert health.status_code == 503 and health.json()["ok"] is False, health.text
            assert "no model published yet" in health.json()["reason"]
            refused = http.post("/v1/rank", json=body)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
            wrong = http.post("/v1/rank", json=body, headers={"authorization": "Bearer " + "f" * 64})
            assert wrong.status_code == 401 and "f" * 64 not in wrong.text
            authorized = {"authorization": f"Bearer {token}"}
            early = http.post("/v1/rank", json=body, headers=authorized)
            assert early.status_code == 503 and "no model published yet" in early.json()["detail"]
            assert str(tmp_path) not in early.text + health.text

            publish(store, seed=1)
            wait_for(lambda: http.get("/healthz").status_code == 200, 60, "the locked replica to serve v1")
            ranked = http.post("/v1/rank", json=body, headers=authorized)
            assert ranked.status_code == 200 and ranked.json()["model_version"] == 1, ranked.text
            assert http.post("/v1/rank", json=body).status_code == 401
    finally:
        serve.delete("ranking-locked")


def test_a_streamed_body_over_the_limit_is_refused(served) -> None:
    """No Content-Length (chunked transfer through the proxy): the limit holds on the bytes that arrive."""
    url, _ = served

    def chunks():
        yield b'{"user_id": 1, "candidates": ['
        for _ in range(100):
            yield b"1234567," * 1000
        yield b"1]}"

    r = httpx.post(f"{url}/v1/rank", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text


def test_predict_model_docs_and_unknown_ids_over_http(served) -> None:
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as http:
        predicted = http.post("/predict", json={"user_id": 10**12, "item_ids": [3, 10**12, 1]})
        assert predicted.status_code == 200, predicted.text
        assert [i["item_id"] for i in predicted.json()["items"]] == [3, 10**12, 1]
        model = http.get("/v1/model").json()
        assert model["family"] == "mmoe" and model["version"] >= 1 and model["snapshot_age_s"] >= 0
        docs = http.get("/docs")
        assert docs.status_code == 200 and not re.findall(r"(?:https?:)?//[\w.-]+", docs.text), "docs need the internet"
        for asset in re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", docs.text):
            assert http.get(asset).status_code == 200, asset
        assert "/v1/rank" in http.get("/openapi.json").json()["paths"]


def test_compact_rankings_and_the_item_cache_over_http(served) -> None:
    url, _ = served
    candidates = list(range(1, 150))
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(4):
            compact = http.post("/v1/rank", json={"user_id": 1, "candidates": candidates, "compact": True})
            assert compact.status_code == 200, compact.text
            body = compact.json()
            assert sorted(body["item_ids"]) == candidates and body["scores"] == sorted(body["scores"], reverse=True)
            assert "items" not in body
        caches = [http.get("/healthz").json()["item_cache"] for _ in range(6)]
    assert all(c["ttl_ms"] == ServingConfig().item_cache_ttl_ms and c["entries"] <= c["capacity"] for c in caches)
    assert any(c["misses"] > 0 for c in caches)


def test_replicas_run_user_code_on_their_main_loop(served) -> None:
    """``ServingConfig.user_code_thread`` is off by default: Serve's switch reaches every replica's process."""
    url, _ = served
    pids: set[int] = set()

    def both_seen() -> bool:
        pids.update(httpx.get(f"{url}/healthz").json()["pid"] for _ in range(4))
        return len(pids) >= REPLICAS

    wait_for(both_seen, 30, "both replicas answering /healthz")
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0" in environ, pid


def test_replicas_hand_the_interpreter_lock_over_at_the_configured_interval(served) -> None:
    """``serving.switch_interval_ms`` reaches every replica's interpreter (neither Python's 5 ms nor our default)."""
    url, _ = served
    seen: dict[int, float] = {}

    def both_seen() -> bool:
        seen.update((a["pid"], a["switch_interval_ms"]) for a in (httpx.get(f"{url}/healthz").json() for _ in range(4)))
        return len(seen) >= REPLICAS

    wait_for(both_seen, 30, "both replicas answering /healthz")
    assert seen == pytest.approx(dict.fromkeys(seen, SWITCH_INTERVAL_MS))


def test_ray_metrics_report_version_and_swaps(served) -> None:
    """Ray's metrics agent exports the replicas' metrics in Prometheus format (it flushes every few seconds)."""
    import ray

    url, store = served
    latest = publish(store, seed=999).version  # every replica swaps at least once more, whatever ran before
    ours: set[str] = set()  # this app's replicas, as they name themselves

    def all_at_latest() -> bool:
        answers = [httpx.get(f"{url}/healthz").json() for _ in range(6)]
        ours.update(a["replica"] for a in answers)
        return all(a["model_version"] == latest for a in answers) and len(ours) >= REPLICAS

    wait_for(all_at_latest, 60, f"both replicas answering at v{latest}")
    for _ in range(8):  # requests of its own: the test does not rely on those of the tests before it
        assert httpx.post(f"{url}/v1/rank", json={"user_id": 1, "candidates": [1, 2, 3]}, timeout=30).status_code == 200
    port = ray._private.worker.global_worker.node.metrics_export_port

    def sample(name: str) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {}
        for line in text.splitlines():
            replica = re.search(r'replica="([^"]+)"', line)
            # Only this app's replicas: other Serve apps of the same Ray session (the reliability scenarios) and
            # services built in this test process (tests/serving/test_api.py) export the same metric names.
            if line.startswith(name + "{") and replica and replica.group(1) in ours:
                found[replica.group(1)] = float(line.rsplit(" ", 1)[1])
        return found

    wait_for(lambda: len(sample("ray_moestream_model_version")) == REPLICAS
             and set(sample("ray_moestream_model_version").values()) == {float(latest)}, 60, "exported versions")
    swaps = sample("ray_moestream_model_swaps_total")
    assert len(swaps) == REPLICAS and all(v >= 2 for v in swaps.values()), swaps
    wait_for(lambda: sample("ray_moestream_rank_latency_ms_count") and sample("ray_moestream_rank_batch_candidates_count"),
             60, "the requests' metrics exported")
    wait_for(lambda: sample("ray_moestream_item_cache_misses_total"), 60, "the item cache's counters exported")
