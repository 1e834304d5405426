"""A real two-node Ray cluster on this machine, for tests: `ray start --head` and `ray start --address`, each
node with a custom resource of its own, token authentication on, and nothing shared with other Ray users here.

Each node gets its own temp dir (so neither writes ``/tmp/ray/ray_current_cluster``, which a plain ``ray.init()``
elsewhere on the machine would otherwise join), free ports for every listener, and a token file of its own
(``RAY_AUTH_TOKEN_PATH``; ``~/.ray/auth_token`` is left alone). Both run ``ray start --block`` in a session of
their own: stopping sends SIGTERM to those two processes, whose handler stops the node's processes, then kills
by pid whatever of the cluster is left, found by session id and temp dir. `ray stop` is never used: it stops
every Ray process of the user on the machine, other people's test runs included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from infra.runtime import SMALL_MACHINE_SERVE_ENV
from tests.conftest import free_ports

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
OBJECT_STORE_BYTES = 200 * 1024 * 1024
STARTS = 3
"""Attempts at starting each node (see ``LocalCluster._start_node``)."""


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path


@dataclass
class LocalCluster:
    head_resources: dict[str, float]
    worker_resources: dict[str, float]
    cpus_per_node: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="msr-", dir="/tmp")))
    """Short on purpose: Ray's unix sockets live under it and their paths are limited to 107 bytes."""
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of, or talking to, this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(SMALL_MACHINE_SERVE_ENV)
        env.update(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        env.update(extra)
        return env

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        for attempt in range(1, STARTS + 1):
            self.gcs_port, self.dashboard_port, client_port = free_ports(3)
            head = ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client_port}"]
            if self._start_node(f"head-{attempt}", head, self.head_resources, attempt, lambda: self._run(
                    ["ray", "health-check", "--address", self.address]).returncode == 0, "the head's GCS to answer"):
                break
        for attempt in range(1, STARTS + 1):
            if self._start_node(f"worker-{attempt}", [f"--address={self.address}"], self.worker_resources, attempt,
                                lambda: len(self.alive_nodes()) == 2, "both nodes to register"):
                break
        return self

    def _start_node(self, name: str, args: list[str], resources: dict[str, float], attempt: int, ready,
                    what: str) -> bool:
        """Start a node and wait until ``ready``; False if Ray gave up on it at startup and it may be retried.

        `ray start` allows a new raylet 30 s to register with the GCS (hard-coded in ``ray._private.node``); on a
        loaded 2-core machine that is sometimes not enough, and a second start then succeeds."""
        self._launch(name, args, resources)
        node = self.nodes[-1]
        try:
            self._wait(ready, what)
            return True
        except RuntimeError:
            timed_out = "timed out during startup" in node.log.read_text(errors="replace")
            if not timed_out or attempt == STARTS:
                raise
        self.nodes.remove(node)
        self._kill(self._leftovers(sessions={node.process.pid}, markers=(str(node.temp_dir),)))
        return False

    def _launch(self, name: str, args: list[str], resources: dict[str, float]) -> None:
        agent, agent_grpc, runtime_env, metrics = free_ports(4)
        temp_dir = self.root / name
        temp_dir.mkdir()
        log = self.root / f"{name}.log"
        command = [
            "ray", "start", "--block", *args, "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
            f"--num-cpus={self.cpus_per_node}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}", "--disable-usage-stats",
        ]
        with log.open("wb") as out:
            # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM a node would otherwise mark itself draining and
            # wait up to 30 s for traffic to move elsewhere before stopping its processes; this cluster is only
            # ever stopped after the test is over, when there is no traffic left to move.
            process = subprocess.Popen(command, env=self.env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"), stdout=out,
                                       stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.nodes.append(Node(name, process, temp_dir, log))

    def _wait(self, condition, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(f"`ray start` of the {node.name} exited ({node.process.returncode}) while "
                                       f"waiting for {what}:\n{self.log_tail(node)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}:\n"
                                   + "\n".join(self.log_tail(n) for n in self.nodes))
            time.sleep(1.0)  # poll interval

    def _run(self, command: list[str], timeout_s: float = 60.0, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env(**extra), capture_output=True, text=True, timeout=timeout_s)

    def state(self, kind: str) -> list[dict]:
        """Ray's state API (`ray list <kind>`), as Ray reports it, through the dashboard."""
        result = self._run(["ray", "list", kind, "--address", self.dashboard, "--format", "json", "--detail",
                            "--limit", "10000"])
        if result.returncode != 0:
            raise RuntimeError(f"ray list {kind} failed: {result.stderr[-2000:]}")
        return json.loads(result.stdout)

    def alive_nodes(self) -> list[dict]:
        try:
            return [n for n in self.state("nodes") if n["state"] == "ALIVE"]
        except (RuntimeError, json.JSONDecodeError, subprocess.TimeoutExpired):
            return []  # the dashboard is not up yet

    def log_tail(self, node: Node, lines: int = 30) -> str:
        text = node.log.read_text(errors="replace") if node.log.exists() else ""
        return f"--- {node.name}: {node.log} ---\n" + "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> list[int]:
        """Stop both nodes and everything they started; return the pids that had to be killed."""
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        for node in self.nodes:
            with suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=STOP_TIMEOUT_S)
        killed = self._leftovers()
        self._kill(killed)
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self._leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        remaining = self._leftovers()
        if remaining:
            raise RuntimeError(f"processes of the test cluster survived SIGKILL: {remaining}")
        shutil.rmtree(self.root, ignore_errors=True)
        return killed

    @staticmethod
    def _kill(pids: list[int]) -> None:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _leftovers(self, sessions: set[int] | None = None, markers: tuple[str, ...] | None = None) -> list[int]:
        """Live processes of this cluster: in a session of one of our `ray start`s, or naming our temp dir."""
        sessions = {node.process.pid for node in self.nodes} if sessions is None else sessions
        markers = (str(self.root),) if markers is None else markers
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError):
                continue
            state, session = stat[0], int(stat[3])
            if state not in ("Z", "X") and (session in sessions or any(m in cmdline for m in markers)):
                found.append(int(entry.name))
        return found

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
