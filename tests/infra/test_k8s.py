"""The Kubernetes manifests: every field against KubeRay's (and Kubernetes') API as written down in
kuberay_v1_subset.yaml, serveConfigV2 against `moestream serve-config` and Ray's Serve schema, every command and
`ray start` parameter against the real CLIs, and placement, ports and paths against the configuration."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import MoestreamConfig, load_config
from infra.deploy import serve_config
from tests.infra.commands import parse_any, parse_ray
from tests.infra.test_serve_config import validate

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
SUBSET = yaml.safe_load((Path(__file__).parent / "kuberay_v1_subset.yaml").read_text())
GPU = "nvidia.com/gpu"


def documents() -> dict[str, dict]:
    """kind -> document, over every manifest."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} documents"
            found[doc["kind"]] = doc
    return found


DOCS = documents()


def check_fields(value: Any, type_name: str, path: str) -> list[str]:
    """Every key of ``value`` is a field of ``type_name`` and has its type; returns the violations."""
    if type_name.startswith("[]"):
        if not isinstance(value, list):
            return [f"{path}: expected a list of {type_name[2:]}, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in check_fields(item, type_name[2:], f"{path}[{i}]")]
    if type_name.startswith("map[string]"):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in check_fields(v, type_name[len("map[string]"):], f"{path}.{k}")]
    scalar = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
              "quantity": (int, str)}
    if type_name in scalar:
        wrong_bool = isinstance(value, bool) and type_name != "boolean"
        if wrong_bool or not isinstance(value, scalar[type_name]):
            return [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
        return []
    fields = SUBSET["types"][type_name]
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object, got {type(value).__name__}"]
    errors = [f"{path}.{key}: not a field of {type_name}" for key in value if key not in fields]
    return errors + [e for key, item in value.items() if key in fields
                     for e in check_fields(item, fields[key], f"{path}.{key}")]


def check_document(doc: dict) -> list[str]:
    kind = SUBSET["kinds"].get(f"{doc.get('apiVersion')}/{doc.get('kind')}")
    if kind is None:
        return [f"{doc.get('apiVersion')}/{doc.get('kind')}: not a kind the subset knows"]
    return check_fields(doc, kind, doc["kind"])


@pytest.mark.parametrize("kind", sorted(DOCS))
def test_every_field_is_in_the_api(kind: str) -> None:
    assert check_document(DOCS[kind]) == []


def test_the_field_check_can_fail() -> None:
    service = copy.deepcopy(DOCS["RayService"])
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    service["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "token"}
    assert sorted(check_document(service)) == [
        "RayService.spec.rayClusterConfig.authOptions: not a field of RayClusterSpec",
        "RayService.spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: expected string, got int 0",
        "RayService.spec.rayClusterConfig.workerGroupSpecs[0].replica: not a field of WorkerGroupSpec",
    ]


@pytest.fixture(scope="module")
def config() -> MoestreamConfig:
    return load_config(data=yaml.safe_load(DOCS["ConfigMap"]["data"]["moestream.yaml"]), environ={})


def clusters() -> dict[str, dict]:
    return {"RayService": DOCS["RayService"]["spec"]["rayClusterConfig"],
            "RayJob": DOCS["RayJob"]["spec"]["rayClusterSpec"]}


def groups(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def containers() -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) of every container in the manifests."""
    found = []
    for kind, cluster in clusters().items():
        for name, group in groups(cluster):
            pod = group["template"]["spec"]
            found += [(f"{kind}/{name}", c, pod) for c in pod["containers"]]
    pod = DOCS["RayJob"]["spec"]["submitterPodTemplate"]["spec"]
    found += [("RayJob/submitter", c, pod) for c in pod["containers"]]
    return found


def start_args(params: dict[str, str]) -> list[str]:
    """The `ray start` options KubeRay writes for rayStartParams: ``--key=value`` on a shell command line."""
    return [arg for key, value in params.items() for arg in shlex.split(f"--{key}={value}")]


def offered(group: dict) -> dict[str, float]:
    params = group["rayStartParams"]
    return json.loads(shlex.split(params["resources"])[0]) if "resources" in params else {}


def test_serve_config_v2_is_what_serve_config_generates_and_valid(config) -> None:
    embedded = yaml.safe_load(DOCS["RayService"]["spec"]["serveConfigV2"])
    assert embedded == serve_config(config), "regenerate serveConfigV2 with `moestream serve-config`"
    validate(embedded)


def test_the_configmap_holds_a_cluster_configuration(config) -> None:
    assert config.paths.data_root == Path("/data") and config.http.host == "0.0.0.0"
    assert config.kafka.security_protocol == "SASL_SSL" and config.features.online_store == "redis"


def test_ray_start_parameters_are_real_options() -> None:
    for kind, cluster in clusters().items():
        for name, group in groups(cluster):
            head = ["--head"] if name == "head" else ["--address=head:6379"]
            parse_ray(["ray", "start", *head, *start_args(group["rayStartParams"])])  # raises on a bad option


def test_the_parameter_check_can_fail() -> None:
    with pytest.raises(Exception, match="No such option"):
        parse_ray(["ray", "start", "--head", *start_args({"num-gpu": "1"})])


def test_gpu_groups_ask_for_gpus_and_tolerate_gpu_nodes() -> None:
    for kind, cluster in clusters().items():
        gpu_groups = [(n, g) for n, g in groups(cluster) if n == "gpu"]
        assert gpu_groups, f"{kind} has no GPU worker group"
        for name, group in groups(cluster):
            pod = group["template"]["spec"]
            gpus = [int(c["resources"]["limits"].get(GPU, 0)) for c in pod["containers"]]
            if name == "gpu":
                assert gpus[0] >= 1 and group["rayStartParams"]["num-gpus"] == str(gpus[0])
                assert any(t["key"] == GPU for t in pod.get("tolerations", []))
            else:
                assert gpus == [0] * len(gpus) and "num-gpus" not in group["rayStartParams"]


def test_replicas_go_to_the_cpu_group_only(config) -> None:
    cluster = clusters()["RayService"]
    by_group = {name: offered(group) for name, group in groups(cluster)}
    assert config.ray.ranker_resources
    for resource in config.ray.ranker_resources:
        assert [name for name, res in by_group.items() if resource in res] == ["cpu"]
    replicas = config.serving.num_replicas
    cpu = next(g for n, g in groups(cluster) if n == "cpu")
    assert cpu["minReplicas"] * by_group["cpu"][next(iter(config.ray.ranker_resources))] >= replicas


def test_trainer_job_runs_moestream_train_with_the_mounted_config(config) -> None:
    ((command, params),) = parse_any(DOCS["RayJob"]["spec"]["entrypoint"])
    assert command == "moestream train"
    for where, container, pod in containers():
        if where == "RayJob/submitter":
            continue
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = mounts[str(params["config"])]
        assert volumes[mount["name"]]["configMap"]["name"] == DOCS["ConfigMap"]["metadata"]["name"]
        assert mount["subPath"] == "moestream.yaml"
        data = mounts[str(config.paths.data_root)]
        claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == DOCS["PersistentVolumeClaim"]["metadata"]["name"], where
    assert DOCS["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert config.trainer.workers <= next(g for n, g in groups(clusters()["RayJob"]) if n == "gpu")["maxReplicas"]


def test_every_ray_container_authenticates_with_the_cluster_token() -> None:
    images = set()
    for where, container, _ in containers():
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("moestream-ray-token", "auth_token"), where
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["moestream-secrets"], where
        images.add(container["image"])
    assert len(images) == 1, images


def test_ports_match_the_config(config) -> None:
    for kind, cluster in clusters().items():
        (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265
        if kind == "RayService":
            assert ports["serve"] == config.http.port and ports["grpc"] == config.grpc.port
    for name, group in groups(clusters()["RayService"]):
        if name == "cpu":
            (worker,) = group["template"]["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
            assert ports["serve"] == config.http.port and ports["grpc"] == config.grpc.port


def test_ray_version_is_one_with_token_authentication() -> None:
    for kind, cluster in clusters().items():
        major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 59), f"{kind}: Ray {cluster['rayVersion']} predates token auth by default"
