"""The docker-compose stack, checked without a Docker engine: every command against the real CLIs, every
environment name against the config (or the tool that reads it), every port and path against the config,
and the file itself by docker-compose's own `config` (installed from Debian's packages when missing)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from infra.config import SECRETS, MoestreamConfig, env_key, load_config
from infra.kafka.broker import BrokerConfig
from tests.infra.commands import parse_any

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "infra" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
ENV_FILE = COMPOSE_DIR / ".env"
TOKEN = "0123456789abcdef" * 4
MOESTREAM_SERVICES = ("ray-head", "ray-worker", "trainer", "serve", "simulator", "replayer")
LONG_RUNNING = ("kafka", "redis", "ray-head", "ray-worker", "serve", "prometheus", "grafana")

# Variables that are neither moestream's config nor its credentials, with the tool that reads each.
OTHER_TOOLS = {
    "COMPOSE_PROJECT_NAME": "docker compose (the project name)",
    "RAY_AUTH_MODE": "Ray token authentication (infra.runtime)",
    "RAY_AUTH_TOKEN": "Ray token authentication (infra.runtime)",
}
# apache/kafka turns KAFKA_* variables into server.properties (docker/resources/ub/ub.go, ConvertKey: "_" -> ".",
# "__" -> "_", "___" -> "-"), except its JVM variables (docker/resources/common-scripts/kafka-propertiesSpec.json).
KAFKA_JVM_VARIABLES = {"KAFKA_HEAP_OPTS", "KAFKA_OPTS", "KAFKA_JVM_PERFORMANCE_OPTS", "KAFKA_LOG4J_OPTS"}
KAFKA_IMAGE_VARIABLES = {"CLUSTER_ID"}
# Broker settings the containerised broker needs beyond the local one's (a static KRaft quorum; its log dir).
KAFKA_COMPOSE_ONLY = {"controller.quorum.voters", "log.dirs"}


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution, enough for this file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name, "")
        if op == ":?" and not current:
            raise ValueError(f"${{{name}}} is required: {arg}")
        return current or (arg if op == ":-" else "")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", substitute, value)


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return {**read_env_file(), "RAY_AUTH_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def compose(env) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def config(env) -> MoestreamConfig:
    """What moestream in the containers loads: the mounted moestream.yaml with .env's overrides."""
    return load_config(ROOT / "moestream.yaml", environ=env)


def container_env(service: dict, env: dict[str, str]) -> dict[str, str]:
    names = dict(env) if service.get("env_file") else {}
    names.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return names


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise KeyError(f"{name} not in {args}")


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source of each volume."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_the_stack_has_every_role(services) -> None:
    assert set(services) == {"kafka", "redis", "prometheus", "grafana", *MOESTREAM_SERVICES}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in MOESTREAM_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"


def test_every_command_is_a_real_cli_entry_point(services) -> None:
    seen = set()
    for name in MOESTREAM_SERVICES:
        parsed = parse_any(command_of(services[name]))  # raises on an unknown command or option
        seen |= {command for command, _ in parsed}
    assert {"moestream train", "moestream serve", "moestream simulate", "moestream replay", "ray start",
            "ray job submit"} <= seen


def test_the_checker_rejects_a_made_up_command() -> None:
    with pytest.raises(Exception, match="No such option: --epochs"):
        parse_any(["ray", "job", "submit", "--", "moestream", "train", "--epochs", "3"])
    with pytest.raises(ValueError, match="has no command"):
        parse_any(["moestream", "fit"])


def test_every_environment_name_is_known(services, env) -> None:
    referenced = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    for name in MOESTREAM_SERVICES:
        for variable in container_env(services[name], env):
            if env_key(variable) is not None:
                continue  # an override: checked by loading them all, below
            assert (variable in SECRETS or variable in OTHER_TOOLS or variable in referenced), \
                f"{name}: {variable} is neither a moestream config key, a credential, nor read by any tool"
    overrides = {k: v for k, v in env.items() if env_key(k) is not None}
    assert overrides, ".env sets no config overrides"
    load_config(ROOT / "moestream.yaml", environ=overrides)  # strict: an unknown key raises, naming it


def test_the_kafka_variables_are_broker_settings(services) -> None:
    local = {line.split("=", 1)[0] for line in (ROOT / "infra/kafka/server.properties").read_text().splitlines()
             if line and not line.startswith("#") and "=" in line}
    for variable in services["kafka"]["environment"]:
        if variable in KAFKA_JVM_VARIABLES | KAFKA_IMAGE_VARIABLES:
            continue
        assert variable.startswith("KAFKA_"), variable
        key = re.sub(r"(?<!_)_(?!_)", ".", variable[len("KAFKA_"):]).replace("___", "-").replace("__", "_").lower()
        assert key in local | KAFKA_COMPOSE_ONLY, f"{variable} -> {key} is set neither for the local broker nor listed"


def test_addresses_and_ports_match_the_config(services, config) -> None:
    kafka_env = services["kafka"]["environment"]
    host, port = config.kafka.bootstrap_servers.split(":")
    assert host == services["kafka"]["hostname"]
    advertised = dict(item.split("://") for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = dict(item.split("://") for item in kafka_env["KAFKA_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == config.kafka.bootstrap_servers and listeners["PLAINTEXT"] == f":{port}"
    published = {p.split(":")[-1]: p for p in services["kafka"]["ports"]}
    host_port = advertised["HOST"].rsplit(":", 1)[1]
    assert published[host_port] == f"127.0.0.1:{host_port}:{host_port}" and listeners["HOST"] == f":{host_port}"
    assert int(host_port) == BrokerConfig().port, "host clients use the local broker's address"

    redis_host, redis_port = config.features.redis_connection.split(":")
    assert config.features.online_store == "redis" and redis_host == services["redis"]["hostname"]
    assert option(command_of(services["redis"]), "--port") == redis_port
    assert option(services["redis"]["healthcheck"]["test"], "-p") == redis_port

    head, worker = command_of(services["ray-head"]), command_of(services["ray-worker"])
    gcs_port, dashboard_port = option(head, "--port"), option(head, "--dashboard-port")
    assert option(worker, "--address") == f"{services['ray-head']['hostname']}:{gcs_port}"
    assert option(services["ray-head"]["healthcheck"]["test"], "--address") == f"localhost:{gcs_port}"
    for name in ("trainer", "serve"):
        url = urlparse(option(command_of(services[name]), "--address"))
        assert (url.hostname, str(url.port)) == (services["ray-head"]["hostname"], dashboard_port)
    head_ports = {p.rsplit(":", 1)[1]: p for p in services["ray-head"]["ports"]}
    assert f"127.0.0.1:{dashboard_port}:{dashboard_port}" in services["ray-head"]["ports"]
    assert str(config.http.port) in head_ports and config.http.host == "0.0.0.0"
    assert str(config.grpc.port) in head_ports
    health = urlparse(re.search(r"http://[^']+", " ".join(services["serve"]["healthcheck"]["test"])).group(0))
    assert (health.hostname, health.port, health.path) == (services["ray-head"]["hostname"], config.http.port, "/healthz")


def test_trainer_and_ranker_resources_are_offered_by_different_nodes(services, config) -> None:
    head = json.loads(option(command_of(services["ray-head"]), "--resources"))
    worker = json.loads(option(command_of(services["ray-worker"]), "--resources"))
    assert config.ray.trainer_resources and config.ray.ranker_resources
    for resource, amount in config.ray.trainer_resources.items():
        assert worker.get(resource, 0) >= amount and resource not in head
    for resource, amount in config.ray.ranker_resources.items():
        assert head.get(resource, 0) >= amount and resource not in worker


def test_volumes_hold_the_run_layout_and_the_config(services, compose, config) -> None:
    layout = config.layout()
    for name in ("ray-head", "ray-worker"):  # where the trainer actors and the ranking replicas run
        mounted = mounts(services[name])
        assert mounted[str(config.paths.data_root)] == "moestream-data"
        assert mounted[str(layout.snapshots)] == "moestream-snapshots"
        assert mounted[str(layout.wandb)] == "moestream-wandb"
    config_paths = {str(params["config"]) for name in MOESTREAM_SERVICES
                    for command, params in parse_any(command_of(services[name]))
                    if command.startswith("moestream ")}
    assert len(config_paths) == 1, config_paths
    (config_path,) = config_paths
    for name in MOESTREAM_SERVICES:  # jobs read it on the head; the one-shot services in their own container
        assert (COMPOSE_DIR / mounts(services[name])[config_path]).resolve() == ROOT / "moestream.yaml", name
    assert set(compose["volumes"]) == {"kafka-data", "moestream-data", "moestream-snapshots", "moestream-wandb",
                                       "ray-tmp", "prometheus-data"}


def test_prometheus_scrapes_the_ray_nodes_the_head_lists(services) -> None:
    """Prometheus runs the shipped scrape configuration, whose service-discovery file lies in the Ray temp dir
    the head writes it to, shared under the same path (the file names the session's files by absolute path)."""
    from infra.prometheus_server import RAY_SERVICE_DISCOVERY, SCRAPE_CONFIG

    prometheus = services["prometheus"]
    args = command_of(prometheus)
    mounted = mounts(prometheus)
    config_file = option(args, "--config.file")
    assert (COMPOSE_DIR / mounted[config_file]).resolve() == SCRAPE_CONFIG
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [RAY_SERVICE_DISCOVERY]
    temp_dir = str(Path(RAY_SERVICE_DISCOVERY).parent)
    assert mounted[temp_dir] == mounts(services["ray-head"])[temp_dir] == "ray-tmp"
    assert "--dashboard-host=0.0.0.0" in command_of(services["ray-head"]), "the head's dashboard writes the file"
    assert mounted[option(args, "--storage.tsdb.path")] == "prometheus-data"
    port = option(args, "--web.listen-address").rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}:{port}" in prometheus["ports"]
    assert f"localhost:{port}/" in " ".join(prometheus["healthcheck"]["test"])


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(services) -> None:
    grafana = services["grafana"]
    mounted = {target: (COMPOSE_DIR / source).resolve() for target, source in mounts(grafana).items()}
    grafana_dir = ROOT / "infra" / "grafana"
    assert mounted["/etc/grafana/provisioning"] == grafana_dir / "provisioning"
    (provider,) = yaml.safe_load((grafana_dir / "provisioning/dashboards/moestream.yml").read_text())["providers"]
    assert mounted[provider["options"]["path"]] == grafana_dir / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (grafana_dir / "dashboards" / Path(home).relative_to(provider["options"]["path"])).is_file()
    (source,) = yaml.safe_load((grafana_dir / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    url = urlparse(source["url"])
    prometheus_port = option(command_of(services["prometheus"]), "--web.listen-address").rsplit(":", 1)[1]
    assert (url.hostname, str(url.port)) == (services["prometheus"]["hostname"], prometheus_port)
    assert "prometheus" in grafana["depends_on"]


def test_healthchecks_gate_the_dependencies(services) -> None:
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"
    assert {"kafka", "redis", "ray-worker"} <= set(services["trainer"]["depends_on"])
    assert {"kafka"} <= set(services["simulator"]["depends_on"]) and {"kafka"} <= set(services["replayer"]["depends_on"])


def test_one_shot_services_do_not_restart(services) -> None:
    for name in ("simulator", "replayer"):
        assert services[name]["restart"] == "no"
    assert services["replayer"]["profiles"] == ["replay"]


def test_credentials_in_env_file_are_empty_placeholders() -> None:
    env = read_env_file()
    for name in (*SECRETS, "RAY_AUTH_TOKEN"):
        assert name in env and env[name] == "", f"{name} must be an empty placeholder in the committed .env"


def test_the_dockerfile_installs_the_package_and_the_config_compose_mounts(services) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in _packages():
        assert re.search(rf"^COPY {package} \./{package}$", dockerfile, re.M), f"Dockerfile does not copy {package}/"
    target = re.search(r"MOESTREAM_CONFIG=(\S+)", dockerfile).group(1)
    assert re.search(rf"^COPY moestream.yaml {re.escape(target)}$", dockerfile, re.M)
    assert target in mounts(services["ray-head"]), "compose mounts the config where the image expects it"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".moestream", "infra/compose/.env"} <= set(ignored)


def _packages() -> list[str]:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]


# -- docker-compose's own check ------------------------------------------------------------------------


def docker_compose() -> list[str]:
    """``docker compose`` (the v2 plugin) if present, else Debian's ``docker-compose``, installed if missing."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        if os.geteuid() != 0:
            pytest.fail("docker-compose is not installed and installing it needs root: apt-get install docker-compose")
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "docker-compose"]
        if subprocess.run(install, env=environment, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=environment, capture_output=True)
            done = subprocess.run(install, env=environment, capture_output=True, text=True)
            assert done.returncode == 0, f"apt-get install docker-compose failed: {done.stderr[-2000:]}"
    return ["docker-compose"]


def run_compose_config(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"} | extra_env
    return subprocess.run([*docker_compose(), "-f", str(COMPOSE), "config"], cwd=COMPOSE_DIR, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_docker_compose_accepts_the_file() -> None:
    """`config` validates the file against compose's schema and resolves it; no engine is contacted."""
    result = run_compose_config({"RAY_AUTH_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) >= {"kafka", "redis", "ray-head", "ray-worker", "trainer", "serve", "simulator"}
    head = resolved["services"]["ray-head"]
    assert head["environment"]["RAY_AUTH_TOKEN"] == TOKEN
    assert head["environment"]["MOESTREAM_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"  # from .env
    assert head["image"] == "moestream:latest"


def test_docker_compose_refuses_to_start_without_a_ray_token() -> None:
    result = run_compose_config({})
    assert result.returncode != 0
    assert "set RAY_AUTH_TOKEN in infra/compose/.env" in result.stderr
