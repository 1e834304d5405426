"""Scenario c of issue 9: a ranking replica's process is SIGKILLed under load. At least 99% of requests still
succeed, and Serve brings the deployment back to two healthy replicas.

Two replicas serve over Ray Serve's real HTTP proxy while closed-loop clients keep requests in flight. Each
response names the process that answered (``pid``); one of the two is killed with SIGKILL, as the kernel's OOM
killer or a crash would end it. The clients keep going until Serve reports the deployment healthy with two
running replicas and the new one has answered, then for as many requests again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from infra.pipeline import wait_for
from learner.snapshots import SnapshotStore
from serving.app import build_app
from serving.config import ServingConfig
from tests.conftest import free_port
from tests.reliability.ranking_load import RankingLoad, tally
from tests.serving.conftest import feature_store, publish

pytestmark = [pytest.mark.integration, pytest.mark.reliability]
REPLICAS = 2
CLIENTS = 4
BEFORE = 300
"""Requests answered before the kill."""
AFTER = 300
"""Requests answered after the deployment is whole again."""
GOAL = 0.99


def _deployment(app: str):
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return next(iter(deployments.values()))


def _states(deployment) -> dict[str, int]:
    return {getattr(state, "value", state): n for state, n in deployment.replica_states.items()}


def _whole(app: str) -> bool:
    d = _deployment(app)
    return d.status == "HEALTHY" and _states(d) == {"RUNNING": REPLICAS}


def test_a_killed_replica_costs_under_one_percent_of_requests_and_comes_back(ray_session, tmp_path: Path) -> None:
    from ray import serve

    features = feature_store(tmp_path / "features")
    store = SnapshotStore(tmp_path / "snapshots")
    publish(store, seed=1)
    port, app = free_port(), "replica-kill"
    serve.shutdown()  # an instance an earlier test left running would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    config = ServingConfig(num_replicas=REPLICAS, num_cpus=0.5, poll_s=0.05, max_candidates=200)
    serve.run(build_app(store.directory, features, config), name=app, route_prefix="/")
    load = RankingLoad(f"http://127.0.0.1:{port}", clients=CLIENTS).start()
    try:
        wait_for(lambda: len(load.outcomes) >= BEFORE and len(load.latest_by_pid()) == REPLICAS, 120,
                 f"{BEFORE} answers from both replicas")
        before = set(load.latest_by_pid())
        victim = min(before)
        assert b"ray" in Path(f"/proc/{victim}/cmdline").read_bytes(), "the answering pid is not a Ray worker"
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def recovered() -> bool:
            return _whole(app) and bool(set(load.latest_by_pid()) - before)

        wait_for(recovered, 180, "Serve to report two running replicas again and the new one to answer")
        recovery_s = time.monotonic() - killed_at
        n_recovered = len(load.requests)
        wait_for(lambda: len(load.requests) >= n_recovered + AFTER, 120, f"{AFTER} more answers")
        status = _deployment(app)
    finally:
        load.stop()
        serve.delete(app)

    outcomes = load.outcomes
    failed = [a for a in outcomes if not a.ok]
    rate = 1 - len(failed) / len(outcomes)
    after_kill = [a for a in outcomes if a.sent_at >= killed_at]
    pids = load.latest_by_pid()
    recovering = [a for a in after_kill if a.sent_at < killed_at + recovery_s]
    print(f"\nreplica kill: {len(outcomes)} ranking requests from {CLIENTS} clients to {REPLICAS} replicas "
          f"({len(outcomes) - len(after_kill)} before the SIGKILL of pid {victim}, {len(after_kill)} after); "
          f"succeeded {len(outcomes) - len(failed)} ({rate:.2%}), failed {len(failed)} ({tally(failed) or 'none'}) "
          + (f"(sent {min(a.sent_at for a in failed) - killed_at:+.2f} s to {max(a.sent_at for a in failed) - killed_at:+.2f} s "
             "from the kill) " if failed else "")
          + f"with no client retries; deployment {getattr(status.status, 'value', status.status)} with {_states(status)} "
          f"{recovery_s:.1f} s after the kill (new replica pid {sorted(set(pids) - before)}); replicas answering "
          f"at the end {sorted(p for p, a in pids.items() if a.sent_at > killed_at + recovery_s)}; sent between the "
          f"kill and the recovery: {len(recovering)}, of which failed {sum(not a.ok for a in recovering)}")
    for a in failed[:10]:
        print(f"  failed: sent {a.sent_at - killed_at:+.2f} s from the kill: {a.status}")
    assert rate >= GOAL, f"{len(failed)} of {len(outcomes)} requests failed: {tally(failed)}"
    assert len(set(pids) - before) == 1, f"replica processes before {sorted(before)}, after {sorted(pids)}"
