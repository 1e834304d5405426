"""A real Apache Kafka broker for development and tests, without Docker.

One KRaft node plays broker and controller on loopback. Its jars come from Maven Central: `provision`
resolves ``kafka_2.13`` with its runtime dependencies plus the Log4j 2 backend the broker leaves to its
user, and caches them outside the repo. `up` formats storage once and starts the JVM in its own session,
so the broker outlives the command that started it; `down` stops it and makes sure no JVM of that data
dir is left. Process checks read ``/proc``, so this module is Linux-only, like our CI and dev hosts.
"""

from __future__ import annotations

import base64
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

KAFKA_VERSION = "4.4.0"
# The Log4j 2 line that kafka-server 4.4.0 itself depends on; pinned so core, api and the SLF4J 1.x
# binding (Kafka logs through slf4j-api 1.7) always come from one release.
LOG4J_VERSION = "2.25.5"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
_MARKER = ".provisioned"

# Test-only libraries (JUnit, Mockito, the Kerberos test KDC) that some Kafka 4.x POMs publish with
# runtime scope. The binary distribution does not ship them and the broker never loads them.
_TEST_ONLY_GROUPS = (
    "org.junit.jupiter",
    "org.junit.platform",
    "org.mockito",
    "org.apache.directory.api",
    "org.apache.directory.server",
)

_POM = Template("""\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>moestream</groupId><artifactId>kafka-runtime</artifactId><version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>${kafka}</version>
      <exclusions>
${exclusions}
      </exclusions>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>${log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>${log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>${log4j}</version>
    </dependency>
  </dependencies>
</project>
""")


class BrokerError(RuntimeError):
    """The local broker could not be provisioned, started or stopped."""


def kafka_home() -> Path:
    """Root of the jar cache: ``$MOESTREAM_KAFKA_HOME`` or ``~/.cache/moestream/kafka``."""
    return Path(os.environ.get("MOESTREAM_KAFKA_HOME") or "~/.cache/moestream/kafka").expanduser()


def _default_data_dir() -> Path:
    return Path(os.environ.get("MOESTREAM_KAFKA_DATA") or "~/.local/share/moestream/kafka")


@dataclass(frozen=True)
class BrokerConfig:
    """Where the local broker keeps its state, which ports it listens on and how big its heap is."""

    data_dir: Path = field(default_factory=_default_data_dir)
    port: int = 19092
    controller_port: int = 19093
    heap: str = "512m"
    version: str = KAFKA_VERSION

    def __post_init__(self) -> None:
        # Absolute, because the path is how we recognise our JVM among the processes in /proc.
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().absolute())

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"


@dataclass(frozen=True)
class BrokerStatus:
    """What `status` found: whether our broker JVM is alive, and where clients reach it."""

    running: bool
    pid: int | None
    bootstrap: str
    version: str


@dataclass(frozen=True)
class _Files:
    """The files of one broker, all under its data dir."""

    properties: Path
    log4j: Path
    log_dirs: Path
    logs: Path
    console: Path
    pid: Path

    @classmethod
    def of(cls, cfg: BrokerConfig) -> _Files:
        root = cfg.data_dir
        return cls(
            properties=root / "config" / "server.properties",
            log4j=root / "config" / "log4j2.properties",
            log_dirs=root / "kraft-logs",
            logs=root / "logs",
            console=root / "logs" / "console.log",
            pid=root / "broker.pid",
        )


# -- provisioning -------------------------------------------------------------------------------------


def _libs_dir(version: str) -> Path:
    return kafka_home() / version / "libs"


def provisioned(cfg: BrokerConfig | None = None) -> bool:
    """Whether the jars of this version are complete in the cache, so `provision` will not run Maven."""
    version = (cfg or BrokerConfig()).version
    return (_libs_dir(version).parent / _MARKER).is_file()


def provision(cfg: BrokerConfig | None = None) -> Path:
    """Fetch the broker jars into the cache once and return the directory that holds them.

    The marker file is written only after Maven has copied every jar, so an interrupted download is
    redone from scratch; once it exists this returns without starting Maven.
    """
    version = (cfg or BrokerConfig()).version
    libs = _libs_dir(version)
    marker = libs.parent / _MARKER
    if marker.is_file():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(libs.parent / ".lock"):
        if not marker.is_file():  # another process may have finished while we waited for the lock
            shutil.rmtree(libs, ignore_errors=True)
            _copy_dependencies(version, libs)
            marker.write_text(f"kafka_2.13 {version}\n")
    return libs


def _copy_dependencies(version: str, libs: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (mvn) is needed once to fetch the Kafka jars from Maven Central; install it")
    exclusions = "\n".join(
        f"        <exclusion><groupId>{group}</groupId><artifactId>*</artifactId></exclusion>"
        for group in _TEST_ONLY_GROUPS
    )
    # Maven keeps its downloads in the default local repository (~/.m2), shared with other builds;
    # the cache holds only the flat copy that goes on the broker's classpath.
    command = [
        mvn, "-B", "-q", f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={libs}",
    ]
    with tempfile.TemporaryDirectory(prefix="moestream-kafka-pom-") as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_POM.substitute(kafka=version, log4j=LOG4J_VERSION, exclusions=exclusions))
        try:
            result = subprocess.run(
                [*command, "-f", str(pom)], capture_output=True, text=True, timeout=900, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise BrokerError(f"mvn did not fetch the Kafka {version} jars within 15 minutes") from err
    if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(
            f"mvn could not fetch org.apache.kafka:kafka_2.13:{version} (exit {result.returncode}):\n"
            + _tail(result.stdout + result.stderr)
        )


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -- lifecycle ----------------------------------------------------------------------------------------


def up(cfg: BrokerConfig | None = None, timeout: float = READY_TIMEOUT_S) -> str:
    """Start the broker unless it already runs, wait until it answers, and return its bootstrap address.

    Concurrent calls for one data dir (two test sessions, say) take turns, so only one JVM is started
    and every caller gets the running broker.
    """
    cfg = cfg or BrokerConfig()
    files = _Files.of(cfg)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(cfg.data_dir / ".lock"):
        pid = _broker_pid(files)
        if pid is None:
            _require_free_ports(cfg)
            libs = provision(cfg)
            _write_config(cfg, files)
            _format_storage(files, libs)
            pid = _spawn(cfg, files, libs)
        elif _read_pid_file(files) != pid:
            files.pid.write_text(f"{pid}\n")  # found by its command line after the pid file was lost
        _wait_ready(cfg, files, pid, timeout)
    return cfg.bootstrap


def down(cfg: BrokerConfig | None = None, timeout: float = 30.0) -> None:
    """Stop every JVM of this data dir: SIGTERM for a clean shutdown, SIGKILL past the deadline."""
    cfg = cfg or BrokerConfig()
    files = _Files.of(cfg)
    pids = _jvms_of(files)
    _signal(pids, signal.SIGTERM)
    survivors = _wait_gone(pids, timeout)
    _signal(survivors, signal.SIGKILL)
    survivors = _wait_gone(survivors, 10.0)
    if survivors:
        raise BrokerError(f"Kafka JVM(s) {survivors} of {cfg.data_dir} survived SIGKILL")
    files.pid.unlink(missing_ok=True)


def status(cfg: BrokerConfig | None = None) -> BrokerStatus:
    """Whether our broker process is alive; a pid file left by a dead or unrelated process counts as not."""
    cfg = cfg or BrokerConfig()
    pid = _broker_pid(_Files.of(cfg))
    return BrokerStatus(running=pid is not None, pid=pid, bootstrap=cfg.bootstrap, version=cfg.version)


def bootstrap_servers(cfg: BrokerConfig | None = None) -> str:
    """``$KAFKA_BOOTSTRAP_SERVERS`` when set (a shared or containerised broker), else the local broker."""
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or (cfg or BrokerConfig()).bootstrap


def _require_free_ports(cfg: BrokerConfig) -> None:
    for port in (cfg.port, cfg.controller_port):
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
            # Same option the JVM sets on its server sockets, so TIME_WAIT leftovers do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError as err:
                raise BrokerError(
                    f"port {HOST}:{port} is taken by another process, not the moestream broker of "
                    f"{cfg.data_dir}; stop that process or choose other ports ({err.strerror})"
                ) from err


def _write_config(cfg: BrokerConfig, files: _Files) -> None:
    files.properties.parent.mkdir(parents=True, exist_ok=True)
    files.logs.mkdir(parents=True, exist_ok=True)
    template = Template(_asset("server.properties"))
    files.properties.write_text(
        template.substitute(port=cfg.port, controller_port=cfg.controller_port, log_dirs=files.log_dirs)
    )
    files.log4j.write_text(_asset("log4j2.properties"))


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


def _format_storage(files: _Files, libs: Path) -> None:
    """Format the log dir as a fresh single-voter cluster, once; restarts reuse it."""
    if (files.log_dirs / "meta.properties").is_file():
        return
    command = [
        _java(), "-cp", str(libs / "*"), f"-Dlog4j2.configurationFile={files.log4j}",
        f"-Dkafka.logs.dir={files.logs}", "kafka.tools.StorageTool", "format",
        "--config", str(files.properties), "--cluster-id", _cluster_id(),
        "--standalone", "--ignore-formatted",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise BrokerError(f"kafka-storage format failed:\n{_tail(result.stdout + result.stderr)}")


def _cluster_id() -> str:
    """A random cluster id in Kafka's own form: 16 bytes, URL-safe base64, no padding, no leading dash."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not candidate.startswith("-"):
            return candidate


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("a Java runtime (17 or newer) is needed to run Kafka; `java` is not on PATH")
    return java


# Popen handles of the brokers this process started, kept so that we can reap them when they exit.
_children: dict[int, subprocess.Popen] = {}


def _spawn(cfg: BrokerConfig, files: _Files, libs: Path) -> int:
    command = [
        _java(), f"-Xmx{cfg.heap}",
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={files.log4j}", f"-Dkafka.logs.dir={files.logs}",
        "-cp", str(libs / "*"), "kafka.Kafka", str(files.properties),
    ]
    with files.console.open("wb") as console:
        child = subprocess.Popen(
            command, cwd=cfg.data_dir, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal that ran `up` must not reach the broker
        )
    _children[child.pid] = child
    files.pid.write_text(f"{child.pid}\n")
    return child.pid


def _wait_ready(cfg: BrokerConfig, files: _Files, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(cfg.bootstrap):
        if not _alive(pid):
            raise BrokerError(
                f"Kafka (pid {pid}) exited while starting; end of its logs:\n{_log_tail(files)}"
            )
        if time.monotonic() > deadline:
            raise BrokerError(
                f"Kafka (pid {pid}) did not answer on {cfg.bootstrap} within {timeout:.0f} s; "
                f"end of its logs:\n{_log_tail(files)}"
            )
        time.sleep(0.5)  # poll interval, not a guess at how long startup takes


def _answers(bootstrap: str) -> bool:
    """Whether a broker at `bootstrap` serves metadata and lists itself, i.e. is registered and unfenced."""
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False  # cheap pre-check that keeps the client from logging refused connections
    try:
        with KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="moestream-probe",
            bootstrap_timeout_ms=5000, request_timeout_ms=5000,
        ) as admin:
            return bool(admin.describe_cluster()["brokers"])
    except (KafkaError, OSError):
        return False


# -- processes ----------------------------------------------------------------------------------------


def _broker_pid(files: _Files) -> int | None:
    """Pid of this data dir's broker JVM: the pid file's when it names one, else found in /proc."""
    pid = _read_pid_file(files)
    if pid is not None and _alive(pid) and _is_broker(_cmdline(pid), files):
        return pid
    return next((p for p in _jvms_of(files) if _is_broker(_cmdline(p), files)), None)


def _read_pid_file(files: _Files) -> int | None:
    try:
        return int(files.pid.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_broker(argv: list[str], files: _Files) -> bool:
    return "kafka.Kafka" in argv and str(files.properties) in argv


def _jvms_of(files: _Files) -> list[int]:
    """Live JVMs whose command line names this data dir's config: the broker and a running storage format."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if _is_jvm_of(_cmdline(pid), files) and _alive(pid)]


def _is_jvm_of(argv: list[str], files: _Files) -> bool:
    return bool(argv) and Path(argv[0]).name == "java" and str(files.properties) in argv


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie does not.

    An exited child of ours is reaped here, so a long-lived Python process (a test session) that
    starts and stops brokers collects no zombies.
    """
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    if state not in ("Z", "X", "gone"):
        return True
    if (child := _children.pop(pid, None)) is not None:
        child.wait()  # returns at once: the process has already exited
    return False


def _signal(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid has exited or the deadline passes; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if _alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if _alive(pid)]
    return alive


def _log_tail(files: _Files) -> str:
    sections = []
    for log in (files.console, files.logs / "server.log"):
        if log.is_file() and (text := log.read_text(errors="replace").strip()):
            sections.append(f"--- {log} ---\n{_tail(text)}")
    return "\n".join(sections) or f"(no output in {files.logs})"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
