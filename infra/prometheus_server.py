"""A real ``prometheus`` on loopback with the shipped scrape configuration: the tests' Prometheus, and a way to
look at a local run's metrics from Python without the compose stack.

``infra/prometheus/prometheus.yml`` finds Ray's nodes through the service-discovery file in Ray's temp dir
(:data:`RAY_SERVICE_DISCOVERY`). :func:`scrape_config` returns the same configuration reading another file,
for a run whose Ray is not the one ``/tmp/ray`` describes (a test's, or one of several on a machine).
:func:`running` installs Debian's ``prometheus`` when missing (``infra.packages``), starts it in the foreground
of a child process, waits until ``/-/ready`` answers (a condition with a deadline, not a sleep) and stops it
on exit: terminate, then kill.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from infra import packages
from infra.runtime import SERVICE_DISCOVERY_FILE

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SCRAPE_CONFIG = Path(__file__).resolve().parent / "prometheus" / "prometheus.yml"
RAY_SERVICE_DISCOVERY = f"/tmp/ray/{SERVICE_DISCOVERY_FILE}"
"""The file the shipped configuration reads the nodes from: where a Ray head writes it by default."""


class PrometheusServerError(RuntimeError):
    """prometheus could not be installed or started."""


class _NotReady(Exception):
    pass


@dataclass(frozen=True)
class PrometheusServerConfig:
    port: int
    data_dir: Path
    """Its time-series database and log."""
    config_file: Path = SCRAPE_CONFIG
    host: str = HOST
    binary: str = "prometheus"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def scrape_config(service_discovery: Path, source: Path = SCRAPE_CONFIG) -> str:
    """The shipped scrape configuration, reading the nodes from ``service_discovery`` instead of Ray's default."""
    text = source.read_text()
    if RAY_SERVICE_DISCOVERY not in text:
        raise PrometheusServerError(f"{source} does not read {RAY_SERVICE_DISCOVERY}")
    return text.replace(RAY_SERVICE_DISCOVERY, str(service_discovery))


@contextmanager
def running(config: PrometheusServerConfig) -> Iterator[str]:
    """A prometheus for the duration of the block; its URL. Stopped (and waited for) when the block ends."""
    try:
        binary = packages.ensure_installed(config.binary, "prometheus")
    except packages.PackageError as exc:
        raise PrometheusServerError(str(exc)) from exc
    config.data_dir.mkdir(parents=True, exist_ok=True)
    log = config.data_dir / "prometheus.log"
    args = [binary, f"--config.file={config.config_file}", f"--storage.tsdb.path={config.data_dir / 'tsdb'}",
            f"--web.listen-address={config.host}:{config.port}"]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            for attempt in Retrying(stop=stop_after_delay(READY_TIMEOUT_S),
                                    wait=wait_exponential(multiplier=0.05, max=1.0),
                                    retry=retry_if_exception_type((httpx.TransportError, _NotReady)), reraise=True):
                with attempt:
                    if process.poll() is not None:
                        raise PrometheusServerError(f"prometheus exited with {process.returncode}: "
                                                    f"{log.read_text(errors='replace')[-2000:]}")
                    if httpx.get(f"{config.url}/-/ready", timeout=2).status_code != 200:
                        raise _NotReady()
        except (httpx.TransportError, _NotReady) as exc:
            raise PrometheusServerError(f"prometheus on {config.url} was not ready in {READY_TIMEOUT_S}s: {exc!r}; "
                                        f"{log.read_text(errors='replace')[-2000:]}") from exc
        yield config.url
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # SIGTERM: prometheus shuts down cleanly
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


__all__ = ["PrometheusServerConfig", "PrometheusServerError", "RAY_SERVICE_DISCOVERY", "SCRAPE_CONFIG", "running",
           "scrape_config"]
