"""`moestream serve-config`: a Serve config that Ray's own schema accepts whole, and that builds the ranking app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from ray.serve.schema import (
    DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema,
    gRPCOptionsSchema,
)
from typer.testing import CliRunner

from infra.cli import app
from infra.config import ConfigError, load_config
from infra.deploy import APP_NAME, IMPORT_PATH, ranking_app, serve_config
from learner.weight_store import actor_name

ROOT = Path(__file__).resolve().parents[2]
PLACED = {"ray": {"ranker_resources": {"ranker_node": 1}},
          "serving": {"num_replicas": 3, "num_cpus": 2}, "http": {"host": "0.0.0.0", "port": 8123}}

# The Serve schema ignores keys it does not know (pydantic's default), so validating alone would let a misspelt
# key through. Each level's keys must also be fields of the schema model that reads them.
LEVELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): ServeDeploySchema,
    ("http_options",): HTTPOptionsSchema,
    ("grpc_options",): gRPCOptionsSchema,
    ("applications", "*"): ServeApplicationSchema,
    ("applications", "*", "deployments", "*"): DeploymentSchema,
    ("applications", "*", "deployments", "*", "ray_actor_options"): RayActorOptionsSchema,
}


def unknown_keys(document: Any, path: tuple[str, ...] = ()) -> list[str]:
    found = []
    if isinstance(document, dict):
        model = LEVELS.get(path)
        if model is not None:
            found += [f"{'.'.join(path) or '(top)'}.{k}" for k in document if k not in model.model_fields]
        for key, value in document.items():
            if model is not None or path == ():
                found += unknown_keys(value, (*path, key))
    elif isinstance(document, list):
        for item in document:
            found += unknown_keys(item, (*path, "*"))
    return found


def validate(document: dict) -> ServeDeploySchema:
    assert not unknown_keys(document), unknown_keys(document)
    return ServeDeploySchema.model_validate(document)


def test_the_strict_check_catches_a_misspelt_key() -> None:
    document = serve_config(load_config(data=PLACED, environ={}))
    document["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpu"] = 1
    document["applications"][0]["rout_prefix"] = "/"
    assert unknown_keys(document) == ["applications.*.rout_prefix",
                                      "applications.*.deployments.*.ray_actor_options.num_gpu"]
    ServeDeploySchema.model_validate(document)  # which Ray's schema alone lets through


def test_generated_config_is_a_valid_serve_deploy_schema_with_placement() -> None:
    config = load_config(data=PLACED, environ={})
    schema = validate(serve_config(config))
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8123
    application = schema.applications[0]
    assert (application.name, application.import_path, application.route_prefix) == (APP_NAME, IMPORT_PATH, "/")
    deployment = application.deployments[0]
    assert deployment.ray_actor_options.resources == {"ranker_node": 1.0}
    assert deployment.ray_actor_options.num_cpus == 2.0
    args = application.args["config"]
    assert args["serving"] == {"num_replicas": 3, "num_cpus": 2.0}
    assert args["paths"]["data_root"] == str(Path(".moestream").absolute())


def test_without_placement_the_deployment_keeps_its_own_options() -> None:
    schema = validate(serve_config(load_config(environ={})))
    assert "deployments" not in schema.applications[0].model_fields_set


def test_the_grpc_proxy_serves_the_ranking_service_unless_its_port_is_null() -> None:
    schema = validate(serve_config(load_config(data={"grpc": {"port": 9123}}, environ={})))
    assert schema.grpc_options.port == 9123
    assert schema.grpc_options.grpc_servicer_functions == ["serving.grpc_service.add_ranking_servicer"]
    off = serve_config(load_config(data={"grpc": {"port": None}}, environ={}))
    assert "grpc_options" not in off and validate(off).grpc_options.grpc_servicer_functions == []


def test_the_servicer_function_loads_in_the_proxy_without_the_model_stack() -> None:
    """Serve's proxy imports it in its own process: grpc and the generated messages, not torch, Feast or the
    HTTP API."""
    probe = ("import sys; from ray.serve.config import gRPCOptions; "
             "(f,) = gRPCOptions(grpc_servicer_functions=['serving.grpc_service.add_ranking_servicer'])"
             ".grpc_servicer_func_callable; heavy = {'torch', 'feast', 'serving.api', 'serving.ranker'} & "
             "set(sys.modules); assert not heavy, heavy; print(f.__qualname__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "add_ranking_servicer", result.stderr


def test_the_import_path_builds_the_app_from_the_args(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = load_config(data={**PLACED, "paths": {"data_root": str(tmp_path)}}, environ={})
    args = serve_config(config)["applications"][0]["args"]
    module, attr = IMPORT_PATH.split(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is ranking_app
    monkeypatch.delenv("MOESTREAM_SERVING__NUM_REPLICAS", raising=False)
    deployment = ranking_app(args)._bound_deployment
    assert deployment.num_replicas == 3
    snapshot_dir, features, serving, weight_store = deployment.init_args
    assert Path(snapshot_dir) == tmp_path / "runs" / "live" / "snapshots"
    assert weight_store == actor_name("live")  # replicas follow the run's versions through Ray
    assert features.data_dir == tmp_path / "runs" / "live" / "features" and serving == config.serving
    # The environment of the process that builds the app applies over the args (e.g. a Kubernetes secret).
    monkeypatch.setenv("MOESTREAM_SERVING__NUM_REPLICAS", "5")
    assert ranking_app(args)._bound_deployment.num_replicas == 5


def test_a_redis_password_is_never_written_into_a_serve_config() -> None:
    config = load_config(environ={"MOESTREAM_FEATURES__REDIS_CONNECTION": "redis:6379,password=hunter2"})
    with pytest.raises(ConfigError, match="no place for credentials"):
        serve_config(config)


def test_serve_config_command_prints_the_same_document(tmp_path: Path) -> None:
    path = tmp_path / "moestream.yaml"
    path.write_text(yaml.safe_dump(PLACED))
    result = CliRunner().invoke(app, ["serve-config", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout) == serve_config(load_config(path, environ={}))
    out = tmp_path / "serve.yaml"
    assert CliRunner().invoke(app, ["serve-config", "--config", str(path), "--out", str(out)]).exit_code == 0
    validate(yaml.safe_load(out.read_text()))
