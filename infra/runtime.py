"""Starting or joining Ray, with its token authentication handled.

Ray >= 2.59 turns token authentication on by default for a local cluster: ``ray.init()`` generates a token
into ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN_PATH``) and every process of the cluster, the dashboard and
``ray job submit`` need it. Joining an existing cluster needs the same token, from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or the default file. We leave Ray's secure default on, make sure a token is there
before joining, and turn Ray's cryptic failure into a message that says what to set.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

SMALL_MACHINE_SERVE_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}
"""Serve's proxy must answer its readiness check within 5 s by default; on a loaded 2-core machine starting
a trainer beside it, it sometimes cannot, and the controller kills it. Local instances get more slack."""


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def auth_enabled() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "token").lower() != "disabled"


def has_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or token_path().is_file()


def init_ray(
    address: str | None = None, num_cpus: int | None = None, namespace: str = "moestream", quiet: bool = False
) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local instance."""
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
        for name, value in SMALL_MACHINE_SERVE_ENV.items():
            os.environ.setdefault(name, value)  # inherited by the Serve controller and proxy
    try:
        ray.init(**kwargs)
    except ray.exceptions.AuthenticationError as exc:
        raise RuntimeError(f"Ray refused our token for {address}: {exc}") from exc


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
