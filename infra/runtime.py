"""Starting or joining Ray, with its token authentication handled.

Ray >= 2.59 turns token authentication on by default for a local cluster: ``ray.init()`` generates a token
into ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN_PATH``) and every process of the cluster, the dashboard and
``ray job submit`` need it. Joining an existing cluster needs the same token, from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or the default file. We leave Ray's secure default on, make sure a token is there
before joining, and turn Ray's cryptic failure into a message that says what to set.

Ray is imported where it is used: the configuration imports :class:`RayConfig`, and ``moestream config show``
must not pay for Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SMALL_MACHINE_SERVE_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}
"""Serve's proxy must answer its readiness check within 5 s by default; on a loaded 2-core machine starting
a trainer beside it, it sometimes cannot, and the controller kills it. Local instances get more slack."""

SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"
"""The name of the file a Ray head lists its nodes' metrics endpoints in, in Ray's temp dir."""


@dataclass(frozen=True)
class RayConfig:
    """Which Ray to run on, and where on it the trainers and the ranking replicas go."""

    address: str | None = None
    """A running cluster's GCS address (``host:6379``); None: ``RAY_ADDRESS``, else a local instance."""
    namespace: str = "moestream"
    num_cpus: int | None = None
    """CPUs of a local instance (None: at least 4, so the trainer and Serve fit on a small machine)."""
    trainer_resources: Mapping[str, float] = field(default_factory=dict)
    """Custom resources each trainer actor requires, e.g. ``{"trainer_node": 1}``: trainers run only on the
    nodes started with them (``ray start --resources``)."""
    ranker_resources: Mapping[str, float] = field(default_factory=dict)
    """The same for each ranking replica (written into the Serve config's ``ray_actor_options``)."""
    metrics_export_port: int | None = None
    """Where a local instance serves Prometheus metrics (``http://<node>:<port>/metrics``); None: a free port Ray
    picks, which ``moestream train`` prints and writes into the service-discovery file. A cluster's nodes take
    theirs from ``ray start --metrics-export-port``."""

    def __post_init__(self) -> None:
        port = self.metrics_export_port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ValueError(f"ray.metrics_export_port must be a port number or null, got {port!r}")
        if self.num_cpus is not None and (isinstance(self.num_cpus, bool) or not isinstance(self.num_cpus, int)
                                          or self.num_cpus < 1):
            raise ValueError(f"ray.num_cpus must be an integer >= 1 or null, got {self.num_cpus!r}")
        for name in ("trainer_resources", "ranker_resources"):
            for key, amount in getattr(self, name).items():
                if key in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ValueError(f"ray.{name}.{key}: name only custom resources here; CPUs and GPUs are "
                                     "set by trainer.device and serving.num_cpus")
                if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
                    raise ValueError(f"ray.{name}.{key} must be a number > 0, got {amount!r}")


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def auth_enabled() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "token").lower() != "disabled"


def has_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or token_path().is_file()


def write_private_token() -> None:
    """Make the token of a local instance readable by its owner only (mode 600).

    Ray writes a missing ``~/.ray/auth_token`` with the umask's mode, world-readable (644) by default; we write
    it first, with the same 256 random bits, created 600 so no other user can ever read it. A token file
    that others can read (one Ray wrote on an earlier run) is made 600."""
    if not auth_enabled() or os.environ.get("RAY_AUTH_TOKEN"):
        return
    import secrets

    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))


def init_ray(
    address: str | None = None, num_cpus: int | None = None, namespace: str = "moestream", quiet: bool = False,
    metrics_export_port: int | None = None,
) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local instance (serving Prometheus
    metrics on ``metrics_export_port``; None: a free port)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and auth_enabled() and not has_token():
        raise RuntimeError(
            f"Ray cluster {address} uses token authentication and no token was found: set RAY_AUTH_TOKEN, "
            f"or RAY_AUTH_TOKEN_PATH, or copy the head node's {token_path()} (`ray get-auth-token` prints it). "
            "Set RAY_AUTH_MODE=disabled only for clusters started with authentication off."
        )
    kwargs: dict = {"namespace": namespace, "logging_level": "WARNING", "log_to_driver": not quiet}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
        if metrics_export_port is not None:
            kwargs["_metrics_export_port"] = metrics_export_port
        write_private_token()
        # Ray's notice that it turned tokens on by default is what this module sees to: not a warning for users.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        for name, value in SMALL_MACHINE_SERVE_ENV.items():
            os.environ.setdefault(name, value)  # inherited by the Serve controller and proxy
    try:
        ray.init(**kwargs)
    except ray.exceptions.AuthenticationError as exc:
        raise RuntimeError(f"Ray refused our token for {address}: {exc}") from exc
    except ConnectionError as exc:
        if not (address and auth_enabled()):
            raise
        # A GCS that rejects the token only logs "InvalidAuthToken" and the driver gives up as unreachable.
        raise RuntimeError(
            f"could not join the Ray cluster at {address}: {exc}. It is either unreachable or it refused our "
            f"token (from {'RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else token_path()}); "
            "`ray get-auth-token` on the head node prints the one it expects."
        ) from exc


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def metrics_targets() -> list[str]:
    """``host:port`` of every live node's Prometheus endpoint (Ray's metrics agent) in the connected cluster."""
    import ray

    return [f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" for node in ray.nodes()
            if node["alive"] and node.get("MetricsExportPort")]


def service_discovery_file() -> Path:
    """Where a Ray head writes the nodes' metrics endpoints for Prometheus (``file_sd_configs``), and where
    ``infra/prometheus/prometheus.yml`` reads them: ``<Ray's temp dir>/prom_metrics_service_discovery.json``."""
    import ray

    return Path(ray.get_runtime_context().get_temp_dir()) / SERVICE_DISCOVERY_FILE


def write_service_discovery(path: Path | None = None) -> Path:
    """Write the connected cluster's metrics endpoints in the format of Ray's service-discovery file to
    ``path`` (default :func:`service_discovery_file`), atomically. A head with its dashboard writes that file
    itself and keeps it current; a local instance started without the dashboard (:func:`init_ray`) does not,
    so ``moestream train`` writes it once (a local instance has one node, whose port does not change)."""
    import json

    path = path or service_discovery_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": metrics_targets()}]))
    tmp.replace(path)
    return path
