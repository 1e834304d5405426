"""A real ``redis-server`` on loopback for tests and benchmarks: the production online store, run locally.

``ensure_installed`` installs Debian's ``redis-server`` package with ``apt-get`` when the binary is missing
(``infra.packages``; root, as in our CI and dev containers). :func:`running` starts a private, non-persistent server
on the given port in the foreground of a child process, waits until it answers ``PING`` (a condition with a
deadline, not a sleep), and stops it on exit: ``SHUTDOWN NOSAVE``, then terminate, then kill.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from infra import packages

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class RedisServerError(RuntimeError):
    """redis-server could not be installed, started or stopped."""


@dataclass(frozen=True)
class RedisServerConfig:
    port: int
    data_dir: Path
    """Working directory of the server (its log goes here); nothing is persisted."""
    host: str = HOST
    binary: str = "redis-server"

    @property
    def connection_string(self) -> str:
        """In Feast's ``host:port`` form (``FeatureStoreConfig.redis_connection``)."""
        return f"{self.host}:{self.port}"


def ensure_installed(binary: str = "redis-server") -> str:
    """Path of ``redis-server``, installing Debian's package first if it is missing."""
    try:
        return packages.ensure_installed(binary, "redis-server")
    except packages.PackageError as exc:
        raise RedisServerError(str(exc)) from exc


def _ping(config: RedisServerConfig) -> None:
    client = redis.Redis(host=config.host, port=config.port, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    finally:
        client.close()


@contextmanager
def running(config: RedisServerConfig) -> Iterator[RedisServerConfig]:
    """A redis-server for the duration of the block; stopped (and waited for) when it ends."""
    binary = ensure_installed(config.binary)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    log = config.data_dir / "redis.log"
    args = [
        binary, "--port", str(config.port), "--bind", config.host, "--protected-mode", "yes",
        "--save", "", "--appendonly", "no", "--dir", str(config.data_dir), "--daemonize", "no",
        "--logfile", str(log),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        try:
            for attempt in Retrying(
                stop=stop_after_delay(READY_TIMEOUT_S),
                wait=wait_exponential(multiplier=0.02, max=0.5),
                retry=retry_if_exception_type(redis.ConnectionError),
                reraise=True,
            ):
                with attempt:
                    if process.poll() is not None:
                        raise RedisServerError(_died(process, log))
                    _ping(config)
        except redis.ConnectionError as error:
            raise RedisServerError(f"redis-server on {config.connection_string} did not answer in "
                                   f"{READY_TIMEOUT_S}s: {error}") from error
        yield config
    finally:
        _stop(process, config)


def _died(process: subprocess.Popen, log: Path) -> str:
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    return f"redis-server exited with {process.returncode}: {stderr[-1000:]}{tail}"


def _stop(process: subprocess.Popen, config: RedisServerConfig) -> None:
    if process.poll() is None:
        with suppress(redis.RedisError):
            client = redis.Redis(host=config.host, port=config.port, socket_timeout=2)
            with suppress(redis.ConnectionError):  # the server closes the connection as it shuts down
                client.shutdown(nosave=True)
            client.close()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr:
        process.stderr.close()
