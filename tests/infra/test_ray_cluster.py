"""infra/ray/cluster.yaml, the `ray up` cluster: Ray's own preparation and schema validation of it, its start
commands against `ray start`, and its placement against the configuration it ships to the nodes."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from infra.config import load_config
from tests.infra.commands import parse_any, parse_ray

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "ray" / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def ray_commands(command: str) -> list[list[str]]:
    """The `ray ...` commands of a start-command line (``ulimit ...; ray start ...``)."""
    return [shlex.split(part) for part in command.split(";") if shlex.split(part)[:1] == ["ray"]]


def test_ray_accepts_the_cluster_config(cluster) -> None:
    validate_config(prepare_config(cluster))  # `ray up` runs these two before touching any machine


def test_ray_rejects_a_misspelt_key(cluster) -> None:
    broken = copy.deepcopy(cluster)
    broken["docker"]["worker_run_option"] = broken["docker"].pop("worker_run_options")
    with pytest.raises(jsonschema.ValidationError, match="worker_run_option"):
        validate_config(prepare_config(broken))


def test_start_commands_are_real_ray_start_commands(cluster) -> None:
    parsed = {}
    for role in ("head", "worker"):
        commands = [c for line in cluster[f"{role}_start_ray_commands"] for c in ray_commands(line)]
        starts = [parse_ray(c) for c in commands if c[1] == "start"]
        assert len(starts) == 1, f"{role}: one `ray start`, got {len(starts)}"
        parsed[role] = starts[0][1]
    assert parsed["head"]["head"] and not parsed["worker"]["head"]
    assert parsed["worker"]["address"] == f"$RAY_HEAD_IP:{parsed['head']['port']}"


def test_placement_matches_the_shipped_configuration(cluster) -> None:
    mounts = {target: source for target, source in cluster["file_mounts"].items()}
    (config_dir,) = [t for t, s in mounts.items() if (ROOT / s).resolve() == CLUSTER.parent]
    run_options = " ".join(cluster["docker"]["run_options"])
    config_path = run_options.split("MOESTREAM_CONFIG=")[1].split()[0]
    assert Path(config_path).parent == Path(config_dir)
    config = load_config(CLUSTER.parent / Path(config_path).name, environ={})

    resources = {}
    for role in ("head", "worker"):
        (start,) = [parse_ray(c)[1] for line in cluster[f"{role}_start_ray_commands"] for c in ray_commands(line)
                    if c[1] == "start"]
        resources[role] = json.loads(start["resources"] or "{}")
    for resource in config.ray.trainer_resources:
        assert resource in resources["worker"] and resource not in resources["head"]
    for resource in config.ray.ranker_resources:
        assert resource in resources["head"] and resource not in resources["worker"]
    assert "--gpus all" in cluster["docker"]["worker_run_options"] and "--gpus" not in run_options
    assert "/data" in run_options and str(config.paths.data_root) == "/data"
    assert config.trainer.workers <= len(cluster["provider"]["worker_ips"])


def test_documented_job_commands_parse(cluster) -> None:
    lines = [line.split("#", 1)[1].strip() for line in CLUSTER.read_text().splitlines()
             if line.startswith("#") and "ray job submit" in line]
    assert lines
    for line in lines:
        parsed = parse_any(line.replace("<head_ip>", "10.0.0.10"))
        assert parsed[-1][0] in ("moestream train", "moestream serve")
