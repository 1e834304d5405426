"""Running moestream on a Ray cluster from its configuration: the Serve config, the ranking app, the trainers.

The ranking service is deployed from a Serve config file (``ServeDeploySchema``) that :func:`serve_config`
generates from :class:`infra.config.MoestreamConfig`: ``moestream serve-config`` prints it for KubeRay's
``serveConfigV2``, ``serve deploy`` or ``serve run``, and ``moestream serve`` deploys the very same document.
Its application is built by :func:`ranking_app` from the config sections carried in its ``args``; the
replicas' own environment can still override them (``MOESTREAM_FEATURES__REDIS_CONNECTION`` from a secret,
say). Placement on the cluster comes from ``ray.ranker_resources`` and ``ray.trainer_resources``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.schema import ServeDeploySchema

from features.redact import redact_connection
from infra.config import ConfigError, MoestreamConfig, load_config
from infra.pipeline import TrainerGroup, start_trainers
from serving.app import RankerDeployment, build_app
from serving.grpc_service import SERVICER_FUNCTION

APP_NAME = "moestream"
IMPORT_PATH = "infra.deploy:ranking_app"
REPLICA_SECTIONS = ("paths", "features", "serving")
"""What a ranking replica reads of the configuration: where the run is, the feature store, the service."""
DEPLOY_TIMEOUT_S = 300.0


def serve_config(config: MoestreamConfig) -> dict[str, Any]:
    """The Serve config (``ServeDeploySchema``) of the ranking app: the HTTP and gRPC proxies and the application.

    The application's ``args`` carry the keys of the replica's sections that differ from their defaults (the
    defaults are the image's own), and ``paths.data_root`` always, absolute, resolved here: replicas do not
    share this process's working directory.
    """
    replica = config.to_data(REPLICA_SECTIONS, changed_only=True)
    if redact_connection(config.features.redis_connection) != config.features.redis_connection:
        raise ConfigError("features.redis_connection carries a password, and a Serve config is no place for "
                          "credentials: give the replicas MOESTREAM_FEATURES__REDIS_CONNECTION in their environment "
                          "(a Kubernetes secret) and generate the Serve config without it")
    replica["paths"]["data_root"] = str(Path(config.paths.data_root).absolute())
    replica = {section: values for section, values in replica.items() if values}
    application: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": {"config": replica},
    }
    if config.ray.ranker_resources:
        # Replicas, autoscaling and limits come from ``serving`` through the builder; placement is the one
        # option it cannot know. A config's ray_actor_options replace the code's whole, so CPUs go along.
        actor = dict(config.serving.deployment_options().get("ray_actor_options", {}))
        actor["resources"] = dict(config.ray.ranker_resources)
        application["deployments"] = [{"name": RankerDeployment.name, "ray_actor_options": actor}]
    document: dict[str, Any] = {
        "proxy_location": config.http.proxy_location,
        "http_options": {"host": config.http.host, "port": config.http.port},
    }
    if config.grpc.port is not None:
        document["grpc_options"] = {"port": config.grpc.port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    document["applications"] = [application]
    return document


def ranking_app(args: dict[str, Any]):
    """Serve application builder named by :data:`IMPORT_PATH`: ``args["config"]`` holds the config sections a
    replica needs, over which the environment of the process building the app applies."""
    config = load_config(data=args.get("config") or {})
    worker = config.worker_config()
    return build_app(worker.snapshot_store, config.features, config.serving, weight_store=worker.weight_store)


def deploy_ranking(config: MoestreamConfig, timeout_s: float = DEPLOY_TIMEOUT_S) -> str:
    """Deploy the ranking app from :func:`serve_config` on the connected cluster; wait until it runs and
    return its URL (:func:`grpc_address` is its gRPC address). The same path as ``serve run <config file>``;
    Ray has no public call that deploys a Serve config document from Python, so this uses the one its CLI uses."""
    from ray.serve._private import api as serve_api

    schema = ServeDeploySchema.model_validate(serve_config(config))
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), grpc_options=schema.grpc_options.model_dump(),
        proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        status = str(app.status) if app else "NOT_STARTED"
        if status.endswith("RUNNING"):
            break
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            raise RuntimeError(f"the ranking app failed to deploy ({status}): {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ranking app was not running after {timeout_s:.0f}s ({status}): "
                               f"{app.message if app else ''}")
        time.sleep(0.5)  # poll interval of the app status, not a guess at how long deploying takes
    return f"http://{_local(config.http.host)}:{config.http.port}"


def grpc_address(config: MoestreamConfig) -> str | None:
    """Where ``moestream.v1.Ranking`` answers (``host:port``), or None without a gRPC proxy. Serve binds it on
    every interface; the address named is ``http.host``'s, where the HTTP proxy answers too."""
    return None if config.grpc.port is None else f"{_local(config.http.host)}:{config.grpc.port}"


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def undeploy_ranking() -> None:
    serve.delete(APP_NAME)


def start_training(config: MoestreamConfig) -> TrainerGroup:
    """``trainer.workers`` trainer actors on the nodes that offer ``ray.trainer_resources``."""
    return start_trainers(config.worker_config(), config.trainer.workers, config.trainer.max_restarts,
                          resources=config.ray.trainer_resources)


def connect(config: MoestreamConfig, quiet: bool = False) -> None:
    """Join ``ray.address`` (or ``RAY_ADDRESS``), or start a local instance, with token auth handled."""
    from infra.runtime import init_ray

    init_ray(address=config.ray.address, num_cpus=config.ray.num_cpus, namespace=config.ray.namespace, quiet=quiet,
             metrics_export_port=config.ray.metrics_export_port)


def metrics_endpoints(config: MoestreamConfig) -> list[str]:
    """The connected cluster's Prometheus endpoints (``http://host:port/metrics``, one per node). A local
    instance runs no dashboard to list them for Prometheus, so they are written to Ray's service-discovery
    file here, where ``infra/prometheus/prometheus.yml`` looks (docs/telemetry.md)."""
    from infra.runtime import metrics_targets, write_service_discovery

    if not (config.ray.address or os.environ.get("RAY_ADDRESS")):
        try:
            write_service_discovery()
        except OSError as exc:
            print(f"moestream: cannot write Ray's service-discovery file for Prometheus: {exc}", flush=True)
    return [f"http://{target}/metrics" for target in metrics_targets()]


__all__ = ["APP_NAME", "IMPORT_PATH", "connect", "deploy_ranking", "grpc_address", "metrics_endpoints", "ranking_app",
           "serve_config", "start_training", "undeploy_ranking"]
