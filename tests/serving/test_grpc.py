"""``moestream.v1.Ranking`` through Ray Serve's real gRPC proxy, beside the same app's HTTP API: the same
rankings, the same refusals with the same messages (as gRPC status codes), statuses before the first model and
without a token, hot swaps under gRPC load, and Hypothesis-generated fields and bytes."""

from __future__ import annotations

import math
import threading
from collections import Counter
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from infra.pipeline import wait_for
from learner.snapshots import SnapshotStore
from serving.app import build_app
from serving.config import DEFAULT_TASK_WEIGHTS, ServingConfig
from serving.grpc_service import SERVICER_FUNCTION
from serving.proto import ranking_pb2 as pb
from serving.proto.ranking_pb2_grpc import RankingStub
from stream.events import TASKS
from tests.conftest import free_ports
from tests.serving.conftest import (Publisher, assert_no_replica_went_back, chain_store, deploy_locked, feature_store,
                                    publish, publish_paced)

pytestmark = pytest.mark.integration

APP = "ranking-grpc"
MAX_CANDIDATES = 1000
"""The default cap: hot swaps are exercised at full-size requests."""
MAX_ID = 2**53 - 1
MAX_DELTAS = 5
"""The delta hot swap's chains: a base is due after this many deltas."""
CODE = grpc.StatusCode
ROUTE = (("application", APP),)
"""Serve's gRPC proxy picks the application by this metadata when it serves several."""


class Served:
    def __init__(self, http: str, channel: grpc.Channel, store: SnapshotStore) -> None:
        self.http, self.channel, self.store = http, channel, store
        self.stub = RankingStub(channel)
        self.raw = channel.unary_unary("/moestream.v1.Ranking/Rank")  # bytes in, bytes out

    def rank(self, request: pb.RankRequest, app: str = APP, **kwargs) -> pb.RankResponse:
        return self.stub.Rank(request, metadata=(("application", app), *kwargs.pop("metadata", ())), timeout=30,
                              **kwargs)

    def refusal(self, request: pb.RankRequest | bytes, app: str = APP, metadata=()) -> grpc.RpcError:
        call = self.raw if isinstance(request, bytes) else self.stub.Rank
        with pytest.raises(grpc.RpcError) as error:
            call(request, metadata=(("application", app), *metadata), timeout=30)
        return error.value


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory: pytest.TempPathFactory):
    """One app with v1 behind both proxies. Serve binds its ports once per instance, so it is shut down before
    (a test before may have left one without gRPC) and after."""
    from ray import serve

    root = tmp_path_factory.mktemp("grpc")
    store = SnapshotStore(root / "snapshots")
    publish(store, seed=1)
    http_port, grpc_port = free_ports(2)
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
                logging_config={"log_level": "WARNING"})
    config = ServingConfig(num_replicas=2, num_cpus=0.5, poll_s=0.05, max_candidates=MAX_CANDIDATES)
    serve.run(build_app(store.directory, feature_store(root / "features"), config), name=APP, route_prefix="/")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = RankingStub(channel)

    def healthy() -> bool:
        try:
            return stub.Health(pb.HealthRequest(), metadata=ROUTE, timeout=10).ok
        except grpc.RpcError:
            return False

    wait_for(healthy, 60, "the gRPC proxy to answer Health")
    yield Served(f"http://127.0.0.1:{http_port}", channel, store)
    channel.close()
    serve.shutdown()


def test_rank_over_grpc_is_rank_over_http(served: Served) -> None:
    candidates = [10, 11, 12, 13, 99, 10**12, 0, MAX_ID]
    ranked = served.rank(pb.RankRequest(user_id=2, candidates=candidates))
    http = httpx.post(f"{served.http}/v1/rank", json={"user_id": 2, "candidates": candidates}, timeout=30).json()
    assert ranked.model_version == http["model_version"] == 1 and ranked.family == http["family"] == "mmoe"
    assert [i.item_id for i in ranked.items] == [i["item_id"] for i in http["items"]]
    assert sorted(i.item_id for i in ranked.items) == sorted(candidates)
    assert list(ranked.tasks) == list(http["items"][0]["probabilities"]) == list(TASKS)
    for ours, theirs in zip(ranked.items, http["items"]):
        assert ours.score == np.float32(theirs["score"])  # both the same float32, JSON prints it wider
        assert list(ours.probabilities) == [np.float32(p) for p in theirs["probabilities"].values()]
    scores = [i.score for i in ranked.items]
    assert scores == sorted(scores, reverse=True)
    assert ranked.replica and ranked.batch >= 1


def test_compact_items_carry_ids_and_scores_only(served: Served) -> None:
    full = served.rank(pb.RankRequest(user_id=3, candidates=[10, 11, 12]))
    compact = served.rank(pb.RankRequest(user_id=3, candidates=[10, 11, 12], compact=True))
    assert [(i.item_id, i.score) for i in compact.items] == [(i.item_id, i.score) for i in full.items]
    assert all(not i.probabilities for i in compact.items) and all(len(i.probabilities) == 6 for i in full.items)


def test_task_weights_replace_the_configured_ones_they_name(served: Served) -> None:
    candidates = list(range(20, 60))
    only_click = {t: 0.0 for t in TASKS} | {"click": 1.0}
    ranked = served.rank(pb.RankRequest(user_id=1, candidates=candidates, task_weights=only_click))
    click = [i.probabilities[list(ranked.tasks).index("click")] for i in ranked.items]
    assert [i.score for i in ranked.items] == click and click == sorted(click, reverse=True)
    # One task named: the others keep their configured weights.
    boosted = served.rank(pb.RankRequest(user_id=1, candidates=candidates, task_weights={"follow": 40.0}))
    weights = DEFAULT_TASK_WEIGHTS | {"follow": 40.0}
    for item in boosted.items:
        expected = sum(weights[t] * p for t, p in zip(boosted.tasks, item.probabilities))
        assert item.score == pytest.approx(expected, rel=1e-5)


# (request, status code, the text the details must hold, the same request as JSON for HTTP or None)
REFUSED = [
    (pb.RankRequest(user_id=1), CODE.INVALID_ARGUMENT, "candidates: List should have at least 1 item",
     {"user_id": 1, "candidates": []}),
    (pb.RankRequest(user_id=1, candidates=range(MAX_CANDIDATES + 1)), CODE.INVALID_ARGUMENT,
     f"candidates: List should have at most {MAX_CANDIDATES} items", {"user_id": 1, "candidates": list(range(MAX_CANDIDATES + 1))}),
    (pb.RankRequest(user_id=1, candidates=[5, 7, 5, 7, 9]), CODE.INVALID_ARGUMENT,
     "candidates: Value error, must be distinct; repeated: [5, 7]", {"user_id": 1, "candidates": [5, 7, 5, 7, 9]}),
    (pb.RankRequest(user_id=-1, candidates=[1]), CODE.INVALID_ARGUMENT, "user_id: Input should be greater than or "
     "equal to 0", {"user_id": -1, "candidates": [1]}),
    (pb.RankRequest(user_id=MAX_ID + 1, candidates=[1]), CODE.INVALID_ARGUMENT, "user_id: Input should be less than "
     "or equal to 9007199254740991", {"user_id": MAX_ID + 1, "candidates": [1]}),
    (pb.RankRequest(user_id=1, candidates=[3, -4]), CODE.INVALID_ARGUMENT, "candidates.1: Input should be greater "
     "than or equal to 0", {"user_id": 1, "candidates": [3, -4]}),
    (pb.RankRequest(user_id=1, candidates=[2**62]), CODE.INVALID_ARGUMENT, "candidates.0: Input should be less than "
     "or equal to 9007199254740991", {"user_id": 1, "candidates": [2**62]}),
    (pb.RankRequest(user_id=1, candidates=[1], task_weights={"clicks": 1.0}), CODE.INVALID_ARGUMENT,
     "task_weights.clicks.[key]: Input should be 'click', 'long_view',", None),
    (pb.RankRequest(user_id=1, candidates=[1], task_weights={"click": math.nan}), CODE.INVALID_ARGUMENT,
     "task_weights.click: Input should be a finite number", None),
    (pb.RankRequest(user_id=1, candidates=[1], task_weights={"like": 1e39}), CODE.INVALID_ARGUMENT,
     "task_weights.like: Input should be less than or equal to 1000000", None),  # float32 scores would be inf
    (pb.RankRequest(user_id=1, candidates=[1], task_weights={t: 0.0 for t in TASKS}), CODE.INVALID_ARGUMENT,
     "task_weights: Value error, would leave every task a weight of 0", None),
    (pb.RankRequest(user_id=1, candidates=range(10**15, 10**15 + 9000)), CODE.RESOURCE_EXHAUSTED,
     "bytes exceeds the limit of 65536", None),
]


@pytest.mark.parametrize(("request_", "code", "needle", "as_json"), REFUSED,
                         ids=[needle.split(":")[0][:30] for _, _, needle, _ in REFUSED])
def test_bad_requests_are_refused_with_http_s_message(served: Served, request_, code, needle, as_json) -> None:
    error = served.refusal(request_)
    assert error.code() == code and needle in error.details(), (error.code(), error.details())
    if as_json is not None:
        http = httpx.post(f"{served.http}/v1/rank", json=as_json, timeout=30)
        assert http.status_code == 422 and http.json()["message"] == error.details()


WIRE = {
    "a tag with no end": (b"\xff\xff\xff", "not a valid moestream.v1.RankRequest message"),
    "candidates cut short": (b"\x12\x05\x01\x02", "not a valid moestream.v1.RankRequest message"),
    "a task name not UTF-8": (b"\x1a\x05\n\x03\xff\xfe\xfd", "not a valid moestream.v1.RankRequest message"),
    "user_id sent as a string": (b"\x0a\x03abc\x12\x01\x01", "field(s) [1] of the request"),
    "a field the service does not know": (b"\x08\x01\x12\x01\x01\x78\x01", "field(s) [15] of the request"),
}


@pytest.mark.parametrize(("raw", "needle"), WIRE.values(), ids=WIRE)
def test_bytes_that_are_not_a_rank_request_are_invalid_argument(served: Served, raw: bytes, needle: str) -> None:
    error = served.refusal(raw)
    assert error.code() == CODE.INVALID_ARGUMENT and needle in error.details(), (error.code(), error.details())


def test_the_wire_cases_are_what_they_say() -> None:
    """Each ``WIRE`` case really is the fault it is named for, and the valid parts around it parse."""
    from google.protobuf.message import DecodeError
    from google.protobuf.unknown_fields import UnknownFieldSet

    for raw, needle in WIRE.values():
        if "not a valid" in needle:
            with pytest.raises(DecodeError):
                pb.RankRequest.FromString(raw)
        else:
            message = pb.RankRequest.FromString(raw)
            assert [f.field_number for f in UnknownFieldSet(message)] == [int(needle.split("[")[1].split("]")[0])]
            assert list(message.candidates) == [1]


def test_before_the_first_model_and_without_a_token(served: Served, tmp_path: Path) -> None:
    """A locked app with no snapshot yet: Health is UNAVAILABLE with the reason (open, as ``/healthz``), Rank is
    UNAUTHENTICATED without the token and UNAVAILABLE with it, naming no server path; then both answer."""
    from ray import serve

    store, token = deploy_locked(tmp_path, "grpc-locked", "/locked")
    try:
        route, request = (("application", "grpc-locked"),), pb.RankRequest(user_id=1, candidates=[10, 11])
        with pytest.raises(grpc.RpcError) as health:
            served.stub.Health(pb.HealthRequest(), metadata=route, timeout=30)
        assert health.value.code() == CODE.UNAVAILABLE and "no model published yet" in health.value.details()
        refused = served.refusal(request, app="grpc-locked")
        assert refused.code() == CODE.UNAUTHENTICATED and "bearer token" in refused.details()
        wrong = served.refusal(request, app="grpc-locked", metadata=(("authorization", "Bearer " + "f" * 64),))
        assert wrong.code() == CODE.UNAUTHENTICATED and "f" * 64 not in wrong.details()
        authorized = (("authorization", f"Bearer {token}"),)
        early = served.refusal(request, app="grpc-locked", metadata=authorized)
        assert early.code() == CODE.UNAVAILABLE and "no model published yet" in early.details()
        assert str(tmp_path) not in early.details() + health.value.details()

        publish(store, seed=1)

        def ready() -> bool:
            try:
                return served.stub.Health(pb.HealthRequest(), metadata=route, timeout=30).model_version == 1
            except grpc.RpcError:
                return False

        wait_for(ready, 60, "the locked replica to serve v1")
        ranked = served.rank(request, app="grpc-locked", metadata=authorized)
        assert ranked.model_version == 1 and len(ranked.items) == 2
        assert served.refusal(request, app="grpc-locked").code() == CODE.UNAUTHENTICATED
    finally:
        serve.delete("grpc-locked")


class GrpcLoad:
    """Three gRPC clients, each ranking ``MAX_CANDIDATES`` of 5000 ids for a random user, one request after the
    other, until stopped. ``rows``: per client, in send order, ``(code, replica, version, batch, items)``."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.rows: list[list[tuple]] = [[] for _ in range(3)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(len(self.rows))]

    def _client(self, k: int) -> None:
        rng = np.random.default_rng(k)
        while not self._stop.is_set():
            request = pb.RankRequest(user_id=int(rng.integers(0, 50)),
                                     candidates=rng.choice(5000, MAX_CANDIDATES, replace=False).tolist())
            try:
                r = self.served.rank(request)
                self.rows[k].append(("OK", r.replica, r.model_version, r.batch, len(r.items)))
            except grpc.RpcError as exc:
                self.rows[k].append((exc.code(), exc.details(), None, None, 0))

    def __enter__(self) -> GrpcLoad:
        for t in self._threads:
            t.start()
        try:
            wait_for(lambda: self.answered() >= 10, 60, "the clients' first responses")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def answered(self) -> int:
        return sum(map(len, self.rows))

    def publish_paced(self, publish, n: int) -> list[int]:
        return publish_paced(self.rows, publish, n)

    def assert_nothing_dropped(self, published: set[int]) -> list[tuple]:
        """Every request answered in full by a published version, and no replica went back a version."""
        answered = [r for per in self.rows for r in per]
        failed = [r for r in answered if r[0] != "OK"]
        assert not failed, f"{len(failed)} of {len(answered)} gRPC requests failed, e.g. {failed[:3]}"
        assert all(r[4] == MAX_CANDIDATES for r in answered) and {r[2] for r in answered} <= published
        assert_no_replica_went_back(self.rows)
        return answered


def test_snapshots_swap_in_under_grpc_load_with_nothing_dropped(served: Served) -> None:
    """gRPC requests share the replicas' hot swaps: every one (of 1000 candidates) is answered while new versions
    are published."""
    seeds = iter(range(200, 210))
    with GrpcLoad(served) as load:
        published = {1, *load.publish_paced(lambda: publish(served.store, seed=next(seeds)).version, 10)}
    answered = load.assert_nothing_dropped(published)
    assert {r[2] for r in answered} == published, "every version answered: swapped in under load"


def test_deltas_swap_in_under_grpc_load_with_nothing_dropped(served: Served) -> None:
    """Versions as the trainer publishes them since issue 22 (a base, deltas applied in place, a new base every
    ``MAX_DELTAS``), from a learning publisher, under gRPC load of 1000 candidates per request: nothing fails, no
    replica goes back a version, every replica applied deltas in place (``/healthz`` ``weights``), and answers
    came from deltas."""
    store = chain_store(served.store.directory, MAX_DELTAS)  # the app's store, compacted by count
    publisher = Publisher(store)
    health: dict[str, dict] = {}

    def every_replica_applied_deltas_up_to(version: int) -> bool:
        for _ in range(4):
            answer = httpx.get(f"{served.http}/healthz", timeout=10).json()
            health[answer["replica"]] = answer
        return len(health) == 2 and all(h["model_version"] == version and h["weights"]["deltas_applied"] > 0
                                        for h in health.values())

    before = store.latest_version()
    with GrpcLoad(served) as load:
        chain = load.publish_paced(publisher.next, 12)  # base, 5 deltas, base, 5 deltas
        final = chain[-1]
        assert store.manifest(final).kind == "delta"
        wait_for(lambda: every_replica_applied_deltas_up_to(final), 60,
                 f"both replicas to serve v{final}, having applied deltas")
    answered = load.assert_nothing_dropped({before, *chain})
    kinds = Counter(store.manifest(v).kind for v in {r[2] for r in answered} & set(chain))
    print(f"\ndeltas under gRPC load: {len(answered)} requests of {MAX_CANDIDATES} candidates, versions answered by "
          f"kind {dict(kinds)}; replicas' weights {[h['weights'] for h in health.values()]}")
    assert kinds == {"base": 2, "delta": 10}, f"answers came from {dict(kinds)}"


def _acceptable(request: pb.RankRequest) -> bool:
    """What the HTTP API's rules accept, written out plainly: the oracle of the property tests."""
    weights = dict(request.task_weights)
    merged = {**DEFAULT_TASK_WEIGHTS, **weights}
    return (0 <= request.user_id <= MAX_ID and 1 <= len(request.candidates) <= MAX_CANDIDATES
            and len(set(request.candidates)) == len(request.candidates)
            and all(0 <= c <= MAX_ID for c in request.candidates)
            and set(weights) <= set(TASKS) and all(abs(w) <= 1e6 for w in weights.values())
            and (not weights or any(merged.values())))


INT64 = st.integers(-(2**63), 2**63 - 1)
IDS = st.one_of(st.integers(0, 300), st.integers(MAX_ID - 2, MAX_ID + 2), INT64)
VALID = st.builds(  # requests the rules accept: without them the mix below may draw none in 60 examples
    pb.RankRequest,
    user_id=st.integers(0, 300),
    candidates=st.lists(st.integers(0, 10_000), min_size=1, max_size=8, unique=True),
    task_weights=st.dictionaries(st.sampled_from(TASKS), st.floats(0.1, 10), max_size=3),
    compact=st.booleans(),
)
REQUESTS = st.one_of(VALID, st.builds(
    pb.RankRequest,
    user_id=IDS,
    candidates=st.one_of(st.lists(st.integers(0, 10_000), max_size=8), st.lists(IDS, max_size=12),
                         st.lists(st.integers(0, 10**6), min_size=MAX_CANDIDATES - 1, max_size=MAX_CANDIDATES + 1,
                                  unique=True)),
    task_weights=st.dictionaries(st.one_of(st.sampled_from(TASKS), st.text(st.characters(exclude_categories=("Cs",)),
                                                                            max_size=12)),
                                 st.one_of(st.floats(-10, 10), st.floats(allow_nan=True), st.sampled_from([1e6, -1e6])),
                                 max_size=4),
    compact=st.booleans(),
))


def test_any_rank_request_is_ranked_or_refused_as_http_would(served: Served) -> None:
    outcomes = set()

    @given(request=REQUESTS)
    @example(request=pb.RankRequest(user_id=1, candidates=[10, 11]))  # both outcomes in every run, whatever is drawn
    @example(request=pb.RankRequest(user_id=-1, candidates=[10, 11]))
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(request: pb.RankRequest) -> None:
        try:
            ranked = served.rank(request)
        except grpc.RpcError as exc:
            assert exc.code() == CODE.INVALID_ARGUMENT and exc.details(), (exc.code(), exc.details())
            assert not _acceptable(request), exc.details()
            outcomes.add("refused")
            return
        assert _acceptable(request)
        outcomes.add("ranked")
        assert sorted(i.item_id for i in ranked.items) == sorted(request.candidates)
        scores = [i.score for i in ranked.items]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
        assert all(len(i.probabilities) == (0 if request.compact else len(TASKS)) for i in ranked.items)

    check()
    assert outcomes == {"ranked", "refused"}, f"the strategy only produced requests that were {outcomes}"


def test_any_bytes_are_ranked_or_refused_never_a_server_error(served: Served) -> None:
    valid = pb.RankRequest(user_id=1, candidates=[10, 11]).SerializeToString()

    outcomes = set()

    @given(raw=st.one_of(st.binary(max_size=64), st.binary(max_size=8).map(lambda b: valid + b),
                         st.integers(0, len(valid)).map(lambda n: valid[:n])))
    @example(raw=valid)  # both outcomes in every run, whatever is drawn
    @example(raw=b"\xff")
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(raw: bytes) -> None:
        try:
            pb.RankResponse.FromString(served.raw(raw, metadata=ROUTE, timeout=30))
            outcomes.add("ranked")
        except grpc.RpcError as exc:
            assert exc.code() == CODE.INVALID_ARGUMENT and exc.details(), (exc.code(), exc.details())
            outcomes.add("refused")

    check()
    assert outcomes == {"ranked", "refused"}, f"the bytes were only ever {outcomes}"
