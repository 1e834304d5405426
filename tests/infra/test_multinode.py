"""Multi-node for real: a two-node Ray cluster on this machine with token authentication, the trainer submitted
as a Ray job (`ray job submit -- moestream train`), the ranking app deployed by `moestream serve` from the Serve
config; the trainer and the replica placed on different nodes by their custom resources, as Ray's state API
reports it. The replica's node has a data directory of its own, with no snapshot in it: every version reaches
the replica through Ray (the run's weight-store actor), none through a shared filesystem; the online features
are in Redis, which both nodes reach."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from infra.config import load_config
from infra.pipeline import wait_for
from learner.snapshots import SnapshotStore
from stream.kafka_io import EventSink, ensure_topics
from stream.simulator import Simulator, SimulatorConfig
from tests.conftest import free_port
from tests.infra.ray_cluster import LocalCluster

pytestmark = pytest.mark.integration

TRAINER_NODE = {"trainer_node": 1}
RANKER_NODE = {"ranker_node": 1}
REQUESTS = 500
"""Simulated requests (four impressions and their feedback each): a few seconds of traffic."""
REPORT = os.environ.get("MOESTREAM_PLACEMENT_REPORT")
"""Write what Ray reported about placement here as JSON (for the record of a run)."""


def _config_file(tmp_path: Path, bootstrap: str, topic: str, port: int, redis: str, data_root: str = "data",
                 name: str = "moestream.yaml") -> Path:
    data = {
        "paths": {"data_root": str(tmp_path / data_root)},
        "features": {"online_store": "redis", "redis_connection": redis},
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "group_id": f"{topic}.trainer", "partitions": 2},
        "joiner": {"window_ms": 2_000},
        "learner": {"cadence": {"snapshot_every_steps": 2}},
        "telemetry": {"enabled": False},
        "trainer": {"batch_size": 128},
        "serving": {"num_cpus": 0.5},
        "http": {"host": "127.0.0.1", "port": port, "proxy_location": "HeadOnly"},
        "ray": {"trainer_resources": TRAINER_NODE, "ranker_resources": RANKER_NODE},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _produce(config) -> int:
    ensure_topics(config.kafka)
    sink = EventSink(config.kafka)
    sink.send_all(Simulator(SimulatorConfig(seed=5, n_users=300, n_items=500, max_delay_s=1.0))
                  .events(int(time.time() * 1000), REQUESTS))
    sink.close()
    return sink.sent


def _moestream(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "moestream"), *args]


def _serve(cluster: LocalCluster, path: Path, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(_moestream("serve", "--config", str(path)), stdout=out, stderr=subprocess.STDOUT,
                                env=cluster.env(RAY_ADDRESS=cluster.address), start_new_session=True)


def _join_without_token(cluster: LocalCluster, tmp_path: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Try joining without a token, and with a wrong one (each in a fresh process: Ray caches tokens); what each
    says comes out of its stdout. The one with a wrong token retries for about 20 s before giving up, so both run
    while the test goes on."""
    probe = "from infra.runtime import init_ray\ntry:\n    init_ray(address=%r)\nexcept RuntimeError as e:\n    print(e)\n"
    home = tmp_path / "home"
    home.mkdir()
    missing = cluster.env(HOME=str(home), RAY_AUTH_TOKEN_PATH=str(home / "no-token"))
    wrong_token = home / "wrong-token"
    wrong_token.write_text("0" * 64)
    wrong = cluster.env(HOME=str(home), RAY_AUTH_TOKEN_PATH=str(wrong_token))
    return tuple(subprocess.Popen([sys.executable, "-c", probe % cluster.address], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for env in (missing, wrong))


def _said(probe: subprocess.Popen) -> str:
    try:
        return probe.communicate(timeout=180)[0]
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()


@pytest.mark.timeout(1500)
def test_trainer_job_and_serve_replica_run_on_different_nodes(kafka_bootstrap, unique_topic, redis_server,
                                                             tmp_path: Path) -> None:
    port = free_port()
    path = _config_file(tmp_path, kafka_bootstrap, unique_topic, port, redis_server)
    replica_path = _config_file(tmp_path, kafka_bootstrap, unique_topic, port, redis_server, "replica-data",
                                "replica.yaml")  # shares Kafka and Redis with the trainer's node, not a filesystem
    config = load_config(path, environ={})
    replica_snapshots = load_config(replica_path, environ={}).layout().snapshots
    assert replica_snapshots != config.layout().snapshots
    produced = _produce(config)
    serve_log = tmp_path / "serve.log"

    with LocalCluster(head_resources=RANKER_NODE, worker_resources=TRAINER_NODE) as cluster:
        nodes = {n["node_id"]: n for n in cluster.state("nodes")}
        head_id = next(i for i, n in nodes.items() if n["is_head_node"])
        worker_id = next(i for i, n in nodes.items() if not n["is_head_node"])

        probes = _join_without_token(cluster, tmp_path)
        server = _serve(cluster, replica_path, serve_log)
        try:
            no_token, wrong_token = map(_said, probes)
            assert "uses token authentication and no token was found" in no_token
            assert "refused our token" in wrong_token

            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: server.poll() is not None or "/v1/rank, API docs at" in serve_log.read_text(), 300,
                     "`moestream serve` to deploy the ranking app")
            assert server.poll() is None, serve_log.read_text()

            submission = f"moestream-train-{uuid.uuid4().hex[:8]}"
            job = subprocess.run(
                ["ray", "job", "submit", "--address", cluster.dashboard, "--submission-id", submission, "--",
                 *_moestream("train", "--config", str(path), "--max-events", str(produced), "--seconds", "300")],
                env=cluster.env(), capture_output=True, text=True, timeout=600,
            )
            assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
            assert "trained" in job.stdout and f"Job '{submission}' succeeded" in job.stdout + job.stderr

            store = SnapshotStore(config.layout().snapshots)
            latest = store.latest_version()
            assert latest is not None
            wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).json().get("model_version") == latest, 120,
                     f"the replica to serve v{latest}")
            assert SnapshotStore(replica_snapshots).latest_version() is None, "the replica's own store stays empty"
            health = httpx.get(f"{url}/healthz", timeout=5).json()
            kinds = [m.kind for m in store.chain(latest)]
            assert kinds[0] == "base" and health["rejected_versions"] == []
            if len(kinds) > 1:  # the trainer published deltas after its base: the replica applied them
                assert health["weights"]["deltas_applied"] >= 1
            response = httpx.post(f"{url}/predict", json={"user_id": 7, "item_ids": [1, 2, 3]}, timeout=30)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == latest and len(response.json()["items"]) == 3

            actors = cluster.state("actors")
            trainers = [a for a in actors if a["class_name"] == "TrainerActor"]
            replicas = [a for a in actors if a["class_name"].startswith("ServeReplica:moestream:")]
            jobs = [j for j in cluster.state("jobs") if j.get("submission_id") == submission]
            assert len(trainers) == 1 and len(replicas) == 1, (trainers, replicas)
            trainer_node, replica_node = trainers[0]["node_id"], replicas[0]["node_id"]
            placement = {
                "nodes": {i: {"head": n["is_head_node"], "resources": n["resources_total"]} for i, n in nodes.items()},
                "trainer": {"node_id": trainer_node, "state": trainers[0]["state"], "pid": trainers[0].get("pid")},
                "replica": {"node_id": replica_node, "state": replicas[0]["state"], "pid": replicas[0].get("pid"),
                            "class_name": replicas[0]["class_name"]},
                "job": {"submission_id": submission, "status": jobs[0]["status"] if jobs else None,
                        "driver_node_id": (jobs[0].get("driver_node_id") if jobs else None)},
                "served_version": latest, "events": produced,
            }
            print("placement as Ray reported it:", json.dumps(placement, indent=2))
            if REPORT:
                Path(REPORT).write_text(json.dumps(placement, indent=2))
            assert trainer_node == worker_id and "trainer_node" in nodes[trainer_node]["resources_total"]
            assert replica_node == head_id and "ranker_node" in nodes[replica_node]["resources_total"]
            assert trainer_node != replica_node
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)  # `moestream serve` removes its app and exits
                try:
                    server.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        assert server.returncode == 0, serve_log.read_text()[-4000:]
