"""``moestream doctor``: what this machine has of what moestream needs, and the command that fixes what is missing.

Each check is a function of the effective configuration that returns a :class:`Check`: a name, whether it passed
(None: not needed with this configuration), what was found, and, when it failed, the one command (or setting) that
fixes it. Checks look and never change anything: no broker is started, nothing is downloaded, no run is created.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from infra.config import WANDB_KEY_ENV, MoestreamConfig

JAVA_MAJOR = 17
"""Kafka 4.x brokers need Java 17 or newer."""
MIN_FREE_BYTES = 2 * 1024**3
"""Below this much free space under ``paths.data_root`` a run soon stops publishing (snapshots, checkpoints,
the feature store's files); the run's own estimate (``infra.disk``) is checked beside it."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None
    """None: not needed with this configuration."""
    found: str
    fix: str | None = None


def version() -> str:
    """moestream's installed version (the package metadata that ``pyproject.toml`` sets)."""
    try:
        return metadata.version("moestream")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: run `make install`)"


def checks(config: MoestreamConfig) -> list[Check]:
    found = []
    for check in CHECKS:
        try:
            found.append(check(config))
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a finding, not a crash of the doctor
            found.append(Check(check.__name__.strip("_"), False, f"the check failed: {type(exc).__name__}: {exc}"))
    return found


def _java(config: MoestreamConfig) -> Check:
    java = shutil.which("java")
    fix = f"apt-get install openjdk-{JAVA_MAJOR}-jre-headless (or put Java {JAVA_MAJOR}+ on PATH)"
    if java is None:
        return Check("java", False, "`java` is not on PATH (the local Kafka broker needs it)", fix)
    shown = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    text = (shown.stderr or shown.stdout).strip()
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    major = int(match.group(1)) if match else 0
    major = int(match.group(2)) if match and major == 1 and match.group(2) else major  # "1.8" is Java 8
    first = text.splitlines()[0] if text else "no version printed"
    if major < JAVA_MAJOR:
        return Check("java", False, f"{java}: {first}", fix)
    return Check("java", True, f"{java}: {first}")


def _kafka_jars(config: MoestreamConfig) -> Check:
    from infra.kafka import broker

    cfg = broker.BrokerConfig()
    if broker.provisioned(cfg):
        return Check("Kafka jars", True, f"Kafka {cfg.version} in {broker.kafka_home() / cfg.version}")
    return Check("Kafka jars", False, f"Kafka {cfg.version} is not in {broker.kafka_home()}",
                 "moestream kafka up (downloads the jars once from Maven Central, then starts a broker)")


def _kafka_broker(config: MoestreamConfig) -> Check:
    from infra.kafka import broker
    from stream.kafka_io import listens

    address = config.kafka.bootstrap_servers
    if any(listens(server, min(config.kafka.connect_timeout_s, 3.0)) for server in address.split(",")):
        return Check("Kafka broker", True, f"answers at {address}")
    local = address == broker.BrokerConfig().bootstrap
    fix = "moestream kafka up" if local else f"start the broker at {address}, or set kafka.bootstrap_servers"
    return Check("Kafka broker", False, f"nothing accepts connections at {address} (kafka.bootstrap_servers)", fix)


def _ray(config: MoestreamConfig) -> Check:
    try:
        installed = metadata.version("ray")
    except metadata.PackageNotFoundError:
        return Check("Ray", False, "ray is not installed", "make install")
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    where = f"connects to {address} (ray.address)" if address else "starts a local Ray instance (ray.address: null)"
    return Check("Ray", True, f"ray {installed}; moestream {where}")


def _redis(config: MoestreamConfig) -> Check:
    if config.features.online_store != "redis":
        return Check("Redis", None, f"not used (features.online_store: {config.features.online_store})")
    import redis

    host, _, port = config.features.redis_connection.partition(",")[0].rpartition(":")
    try:
        redis.Redis(host=host or "127.0.0.1", port=int(port or 6379), socket_connect_timeout=3, socket_timeout=3).ping()
    except (redis.RedisError, ValueError) as exc:
        fix = ("redis-server --port " + (port or "6379") if host in ("127.0.0.1", "localhost", "")
               else "start Redis there, or set features.redis_connection")
        if shutil.which("redis-server") is None:
            fix = "apt-get install redis-server, then " + fix
        return Check("Redis", False, f"{config.features.redis_connection} (features.redis_connection): {exc}", fix)
    return Check("Redis", True, f"answers at {config.features.redis_connection}")


def _wandb(config: MoestreamConfig) -> Check:
    mode = config.telemetry.mode
    if mode == "online" and not os.environ.get(WANDB_KEY_ENV):
        return Check("W&B", False, "telemetry.mode is online but WANDB_API_KEY is not set",
                     "export WANDB_API_KEY=..., or set telemetry.mode: offline")
    return Check("W&B", True, f"telemetry.mode: {mode}" + (" (files only, no account needed)" if mode == "offline" else ""))


def _disk(config: MoestreamConfig) -> Check:
    from infra.disk import free_space_warnings

    root = Path(config.paths.data_root).expanduser().absolute()
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    warnings = free_space_warnings(config)
    found = f"{free / 1024**3:.1f} GiB free under {root} (paths.data_root)"
    if warnings or free < MIN_FREE_BYTES:
        why = warnings[0] if warnings else f"less than {MIN_FREE_BYTES / 1024**3:.0f} GiB"
        return Check("disk", False, f"{found}; {why}",
                     "free space there (old runs: rm -r <data_root>/runs/<id>), or set paths.data_root elsewhere")
    return Check("disk", True, found)


CHECKS: tuple[Callable[[MoestreamConfig], Check], ...] = (_java, _kafka_jars, _kafka_broker, _ray, _redis, _wandb,
                                                          _disk)

__all__ = ["CHECKS", "Check", "checks", "version"]
