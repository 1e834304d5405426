"""The one configuration: strict loading, environment overrides, secrets kept out, `moestream config show`."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from infra.cli import app
from infra.config import (
    CONFIG_ENV, SECRETS, ConfigDeprecationWarning, ConfigError, MoestreamConfig, config_path, load_config, render,
)
from stream.kafka_io import SASL_PASSWORD_ENV, SASL_USERNAME_ENV, SSL_KEY_PASSWORD_ENV, KafkaConfig, client_options

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "moestream.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "moestream.yaml"
    path.write_text(text)
    return path


def test_the_shipped_example_loads_and_sets_what_it_says() -> None:
    config = load_config(EXAMPLE, environ={})
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert set(raw) == set(MoestreamConfig.model_fields), "the example shows every section"
    assert config.kafka.group_id == raw["kafka"]["group_id"] == "moestream.events.trainer"
    assert config.learner.cadence.snapshot_every_steps == raw["learner"]["cadence"]["snapshot_every_steps"]
    assert config.features.data_dir == Path(".moestream").absolute() / "runs" / "live" / "features"


def test_the_shipped_example_states_the_built_in_defaults() -> None:
    """A user who edits ./moestream.yaml starts from what runs without it: the file restates the defaults."""
    assert load_config(EXAMPLE, environ={}).to_data() == MoestreamConfig().to_data()


def test_the_working_directory_s_moestream_yaml_is_read_by_default(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path, "learner:\n  cadence:\n    snapshot_every_steps: 7\n")
    assert config_path(None, environ={}, cwd=tmp_path) == tmp_path / "moestream.yaml"
    assert config_path(None, environ={}, cwd=tmp_path / "elsewhere") is None
    (tmp_path / "elsewhere").mkdir()
    other = _write(tmp_path / "elsewhere", "")
    assert config_path(None, environ={CONFIG_ENV: str(other)}, cwd=tmp_path) == other  # the variable comes first
    assert config_path(Path("x.yaml"), environ={CONFIG_ENV: str(other)}, cwd=tmp_path) == Path("x.yaml")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["config", "show"], env={"MOESTREAM_CONFIG": ""})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["learner"]["cadence"]["snapshot_every_steps"] == 7
    assert f"config: {tmp_path / 'moestream.yaml'}" in result.stderr


def test_an_unknown_key_is_an_error_naming_its_path_and_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  lr_typo: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    message = str(error.value)
    assert "learner.lr_typo" in message and str(path) in message
    assert "known:" in message and "lr," in message


def test_a_typo_deep_in_a_sub_section_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"serving\.autoscaling\.max_replica .*did you mean max_replicas\?"):
        load_config(data={"serving": {"autoscaling": {"max_replica": 3}}}, environ={})


def test_an_unknown_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"learnr .*did you mean learner\?"):
        load_config(data={"learnr": {}}, environ={})


@pytest.mark.parametrize(("data", "key"), [
    ({"learner": {"lr": "fast"}}, "learner.lr"),
    ({"kafka": {"partitions": 2.5}}, "kafka.partitions"),
    ({"joiner": {"late_policy": "keep"}}, "joiner.late_policy"),
    ({"http": {"port": 70000}}, "http.port"),
    ({"grpc": {"port": 0}}, "grpc.port"),
    ({"learner": {"guard": {"max_auc_drop": 5}}}, "learner.guard.max_auc_drop"),
    ({"kafka": {"security_protocol": "SASL_SSL"}}, "kafka.security_protocol"),
    ({"ray": {"trainer_resources": {"GPU": 1}}}, "ray.trainer_resources.GPU"),
    ({"trainer": {"device": "tpu"}}, "trainer.device"),
    ({"learner": {"publish": {"store": "foo://bucket/snapshots"}}}, "learner.publish.store"),
    ({"learner": {"publish": {"store": "file://relative/snapshots"}}}, "learner.publish.store"),
    ({"learner": {"publish": {"store": "s3://"}}}, "learner.publish.store"),
    ({"learner": {"publish": {"store": 42}}}, "learner.publish.store"),
    ({"learner": {"publish": {"ray_max_bytes": -1}}}, "learner.publish.ray_max_bytes"),
    ({"learner": {"publish": {"ray_max_bytes": "256MB"}}}, "learner.publish.ray_max_bytes"),
    ({"learner": {"publish": {"base_beside": "sometimes"}}}, "learner.publish.base_beside"),
])
def test_a_bad_value_names_its_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(data=data, environ={})
    assert f"\n  {key} (from config data): " in str(error.value)


# Each used to pass `config show` and fail only inside the trainer actor (issue 19: a ZeroDivisionError and a
# Ray restart for a zero cadence; ~300 lines of retried tracebacks for a family or hparam typo).
ACTOR_ONLY_FAILURES = [
    ({"learner": {"family": "mmoee"}}, "learner.family", "unknown model family 'mmoee' (did you mean mmoe?)"),
    ({"learner": {"hparams": {"n_expert": 4}}}, "learner.hparams.n_expert", "did you mean n_experts?"),
    ({"learner": {"family": "omoe", "hparams": {"n_levels": 2}}}, "learner.hparams.n_levels", "unknown hparam"),
    ({"learner": {"hparams": {"n_experts": 0}}}, "learner.hparams.n_experts", "positive integer"),
    ({"learner": {"hparams": {"n_experts": "four"}}}, "learner.hparams.n_experts", "must be an integer"),
    ({"learner": {"hparams": {"expert_dims": [64, -1]}}}, "learner.hparams.expert_dims", "positive layer sizes"),
    ({"learner": {"hparams": {"expert_dims": []}}}, "learner.hparams.expert_dims", "non-empty"),
    ({"learner": {"hparams": {"activation": "relu6"}}}, "learner.hparams.activation", "unknown activation"),
    ({"learner": {"family": "home", "hparams": {"expert_norm": "yes"}}}, "learner.hparams.expert_norm", "true or false"),
    ({"learner": {"family": "home", "hparams": {"groups": {"a": ["click"]}}}}, "learner.hparams.groups", "ungrouped"),
    ({"learner": {"family": "smes", "hparams": {"k_shared": 16, "k_private": 1}}}, "learner.hparams", "1..n_experts"),
    ({"learner": {"family": "smes", "hparams": {"lb_coef": -0.1}}}, "learner.hparams.lb_coef", ">= 0"),
    ({"learner": {"lr": float("nan")}}, "learner.lr", "finite number > 0"),
    ({"learner": {"lr": float("inf")}}, "learner.lr", "finite number > 0"),
    ({"learner": {"lr": -1}}, "learner.lr", "finite number > 0"),
    ({"learner": {"lr": 0}}, "learner.lr", "finite number > 0"),
    ({"learner": {"cadence": {"snapshot_every_steps": 0}}}, "learner.cadence.snapshot_every_steps", ">= 1"),
    ({"learner": {"cadence": {"checkpoint_every_steps": 0}}}, "learner.cadence.checkpoint_every_steps", ">= 1"),
    ({"learner": {"cadence": {"health_every_steps": -2}}}, "learner.cadence.health_every_steps", ">= 1"),
    ({"learner": {"cadence": {"stats_every_steps": 0}}}, "learner.cadence.stats_every_steps", ">= 1"),
    ({"learner": {"cadence": {"snapshot_every_s": -1}}}, "learner.cadence.snapshot_every_s", ">= 0"),
    ({"learner": {"cadence": {"checkpoint_max_share": 0}}}, "learner.cadence.checkpoint_max_share", "(0, 1]"),
    ({"learner": {"cadence": {"checkpoint_max_share": 1.5}}}, "learner.cadence.checkpoint_max_share", "(0, 1]"),
    ({"learner": {"cadence": {"checkpoint_beside": "sometimes"}}}, "learner.cadence.checkpoint_beside", "boolean"),
    ({"learner": {"emb_dim": 0}}, "learner.emb_dim", ">= 1"),
    ({"learner": {"n_buckets": 0}}, "learner.n_buckets", "[1, 2**32]"),
    ({"learner": {"metric_window": 0}}, "learner.metric_window", ">= 1"),
    ({"learner": {"tasks": ["click", "share"]}}, "learner.tasks", "['share']"),
    ({"learner": {"base_rates": {"click": 1.0}}}, "learner.base_rates.click", "(0, 1)"),
    ({"learner": {"base_rates": {"share": 0.1}}}, "learner.base_rates", "['share']"),
    ({"learner": {"loss_weights": {"like": -1}}}, "learner.loss_weights.like", ">= 0"),
    ({"learner": {"loss_weights": {"clik": 1}}}, "learner.loss_weights", "['clik']"),
    ({"learner": {"guard": {"min_class_examples": 0}}}, "learner.guard.min_class_examples", ">= 1"),
    ({"learner": {"guard": {"metric": "logloss"}}}, "learner.guard.metric", "window_auc"),
    ({"learner": {"health": {"scale_ratio": 1}}}, "learner.health.scale_ratio", "> 1"),
    ({"learner": {"health": {"history": 0}}}, "learner.health.history", ">= 1"),
    ({"learner": {"precision": "fp16"}}, "learner.precision", "bf16"),
    ({"features": {"aggregates": {"prior_rates": [0.5]}}}, "features.aggregates.prior_rates", "one per task"),
    ({"features": {"aggregates": {"prior_strength": 0}}}, "features.aggregates.prior_strength", "> 0"),
    ({"ray": {"num_cpus": 0}}, "ray.num_cpus", ">= 1"),
]


@pytest.mark.parametrize(("data", "key", "why"), ACTOR_ONLY_FAILURES)
def test_every_value_the_trainer_uses_is_checked_at_load_time_naming_its_key(data: dict, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(data=data, environ={})
    assert f"\n  {key} (from config data): " in str(error.value) and why in str(error.value)


def test_config_show_reports_a_bad_value_exit_2_without_a_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  family: mmoe\n  hparams:\n    n_experts: 0\n")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(path)], env={})
    assert result.exit_code == 2, result.output
    assert "learner.hparams.n_experts" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    zero = CliRunner().invoke(app, ["config", "show", "--config", str(_write(tmp_path, "learner:\n  cadence:\n"
                                                                            "    snapshot_every_steps: 0\n"))])
    assert zero.exit_code == 2 and "learner.cadence.snapshot_every_steps" in zero.output


def test_hparams_from_the_environment_are_typed_by_the_family() -> None:
    config = load_config(environ={"MOESTREAM_LEARNER__FAMILY": "home", "MOESTREAM_LEARNER__HPARAMS__N_EXPERTS": "3",
                                  "MOESTREAM_LEARNER__HPARAMS__SELF_GATE": "false",
                                  "MOESTREAM_LEARNER__HPARAMS__EXPERT_DIMS": "[32, 16]"})
    assert dict(config.learner.hparams) == {"n_experts": 3, "self_gate": False, "expert_dims": (32, 16)}


def test_aggregate_priors_are_configurable() -> None:
    config = load_config(data={"features": {"aggregates": {"prior_strength": 50, "prior_play_s": 9.5}}}, environ={})
    assert config.features.aggregates.prior_strength == 50.0 and config.features.aggregates.prior_play_s == 9.5
    assert config.worker_config().features.aggregates == config.features.aggregates


def test_checks_across_sections_run() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.workers \(5\) exceeds kafka\.partitions \(4\)"):
        load_config(data={"trainer": {"workers": 5}}, environ={})


def test_environment_overrides_win_over_the_file_and_are_typed(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  lr: 0.5\nkafka:\n  topic: from-file\n")
    config = load_config(path, environ={
        "MOESTREAM_LEARNER__LR": "0.05",
        "MOESTREAM_LEARNER__GUARD__MAX_AUC_DROP": "0.1",
        "MOESTREAM_KAFKA__ASSIGN": "[0, 2]",
        "MOESTREAM_RAY__TRAINER_RESOURCES": '{"trainer_node": 1}',
        "MOESTREAM_TELEMETRY__RUN_NAME": "null",
        "MOESTREAM_KAFKA_HOME": "/not/an/override",  # single underscores: another tool's variable
    })
    assert config.learner.lr == 0.05
    assert config.learner.guard.max_auc_drop == 0.1
    assert config.kafka.assign == (0, 2) and config.kafka.topic == "from-file"
    assert dict(config.ray.trainer_resources) == {"trainer_node": 1.0}
    assert config.telemetry.run_name is None


def test_a_bad_environment_override_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"learner\.lr \(from MOESTREAM_LEARNER__LR\): Input should be a valid number"):
        load_config(environ={"MOESTREAM_LEARNER__LR": "fast"})
    with pytest.raises(ConfigError, match=r"learner\.lr_typo \(from MOESTREAM_LEARNER__LR_TYPO\): unknown key"):
        load_config(environ={"MOESTREAM_LEARNER__LR_TYPO": "1"})
    with pytest.raises(ConfigError, match=r"learner\.guard\.max_auc_drop \(from MOESTREAM_LEARNER__GUARD__MAX_AUC_DROP\)"):
        load_config(environ={"MOESTREAM_LEARNER__GUARD__MAX_AUC_DROP": "5"})


def test_older_variable_names_still_point_the_config() -> None:
    config = load_config(environ={"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "RAY_ADDRESS": "head:6379"})
    assert config.kafka.bootstrap_servers == "kafka:9092" and config.ray.address == "head:6379"
    both = {"KAFKA_BOOTSTRAP_SERVERS": "old:1", "MOESTREAM_KAFKA__BOOTSTRAP_SERVERS": "new:2"}
    assert load_config(environ=both).kafka.bootstrap_servers == "new:2"


def test_command_line_overrides_win_over_the_environment() -> None:
    config = load_config(environ={"MOESTREAM_LEARNER__FAMILY": "ple"}, overrides={"learner.family": "home",
                                                                               "kafka.topic": None})
    assert config.learner.family == "home" and config.kafka.topic == KafkaConfig().topic


@pytest.mark.parametrize(("data", "variable"), [
    ({"kafka": {"sasl_password": "hunter2"}}, SASL_PASSWORD_ENV),
    ({"kafka": {"sasl_plain_username": "bob"}}, SASL_USERNAME_ENV),
    ({"kafka": {"ssl_password": "x"}}, SSL_KEY_PASSWORD_ENV),
    ({"telemetry": {"api_key": "x"}}, "WANDB_API_KEY"),
])
def test_credentials_in_the_file_are_refused_with_the_variable_to_use(data: dict, variable: str) -> None:
    with pytest.raises(ConfigError, match=f"credentials are read from the environment only; set {variable}"):
        load_config(data=data, environ={})


def test_credentials_are_not_config_keys_even_from_the_environment() -> None:
    with pytest.raises(ConfigError, match=f"set {SASL_PASSWORD_ENV} instead"):
        load_config(environ={"MOESTREAM_KAFKA__SASL_PASSWORD": "hunter2"})


def test_a_redis_password_goes_in_the_environment_and_is_masked_when_shown() -> None:
    with pytest.raises(ConfigError, match="carries a password"):
        load_config(data={"features": {"redis_connection": "redis:6379,password=hunter2"}}, environ={})
    config = load_config(environ={"MOESTREAM_FEATURES__REDIS_CONNECTION": "redis:6379,password=hunter2,db=0"})
    shown = render(config, environ={})
    assert "hunter2" not in shown and "redis:6379,password=***,db=0" in shown


def test_paths_of_a_run_are_derived_from_data_root(tmp_path: Path) -> None:
    config = load_config(data={"paths": {"data_root": str(tmp_path), "run": "r1"}}, environ={})
    assert config.features.data_dir == tmp_path / "runs" / "r1" / "features"
    assert config.telemetry.directory == tmp_path / "runs" / "r1" / "wandb"
    assert config.telemetry.history == tmp_path / "runs" / "r1" / "telemetry" / "history.jsonl"
    worker = config.worker_config()
    assert worker.snapshot_dir == tmp_path / "runs" / "r1" / "snapshots" and worker.features == config.features
    assert worker.telemetry.history == config.telemetry.history
    with pytest.raises(ConfigError, match=r"features\.data_dir .* is derived from paths\.data_root"):
        load_config(data={"features": {"data_dir": "/elsewhere"}}, environ={})
    with pytest.raises(ConfigError, match=r"telemetry\.history .*\(<data_root>/runs/<run>/telemetry/history\.jsonl\)"):
        load_config(data={"telemetry": {"history": "/elsewhere.jsonl"}}, environ={})
    with pytest.raises(ConfigError, match=r"paths\.run \(from config data\): must be a relative directory"):
        load_config(data={"paths": {"run": "../outside"}}, environ={})


def test_shown_config_loads_back_to_the_same_config() -> None:
    config = load_config(EXAMPLE, environ={"MOESTREAM_SERVING__NUM_REPLICAS": "3"})
    shown = render(config, environ={})
    assert load_config(data=yaml.safe_load(shown), environ={}) == config
    changed = config.to_data(changed_only=True)
    assert changed["serving"] == {"num_replicas": 3}
    assert load_config(data=changed, environ={}) == config


def test_config_show_masks_secrets_and_says_which_are_set(tmp_path: Path) -> None:
    env = {SASL_USERNAME_ENV: "alice", SASL_PASSWORD_ENV: "hunter2-secret", "WANDB_API_KEY": "wandb-secret-key",
           "MOESTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "MOESTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512"}
    result = CliRunner().invoke(app, ["config", "show", "--config", str(EXAMPLE)], env=env)
    assert result.exit_code == 0, result.output
    for value in env.values():
        if value not in ("SASL_SSL", "SCRAM-SHA-512"):
            assert value not in result.output
    assert f"{SASL_PASSWORD_ENV}: set" in result.output and f"{SSL_KEY_PASSWORD_ENV}: not set" in result.output
    assert "WANDB_API_KEY: set" in result.output
    body = yaml.safe_load(result.stdout)
    assert body["kafka"]["security_protocol"] == "SASL_SSL" and body["kafka"]["sasl_mechanism"] == "SCRAM-SHA-512"
    assert set(SECRETS) == {SASL_USERNAME_ENV, SASL_PASSWORD_ENV, SSL_KEY_PASSWORD_ENV, "WANDB_API_KEY"}


def test_a_command_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "trainer:\n  batch_sise: 64\n")
    for command in (["config", "show"], ["serve-config"], ["train"], ["snapshots", "list"]):
        result = CliRunner().invoke(app, [*command, "--config", str(path)], env={})
        assert result.exit_code == 2, (command, result.output)
        assert "trainer.batch_sise" in result.output and "did you mean batch_size?" in result.output


def test_moestream_config_environment_variable_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  family: ple\n")
    result = CliRunner().invoke(app, ["config", "show"], env={"MOESTREAM_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["learner"]["family"] == "ple"


# -- Kafka security settings reach kafka-python, credentials only from the environment ----------------


def test_plaintext_clients_get_no_security_options() -> None:
    assert client_options(KafkaConfig(bootstrap_servers="k:9092")) == {
        "bootstrap_servers": "k:9092", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_options_carry_the_environment_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    config = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", ssl_cafile="/ca.pem",
                         ssl_check_hostname=False)
    monkeypatch.delenv(SASL_USERNAME_ENV, raising=False)
    monkeypatch.setenv(SASL_PASSWORD_ENV, "pw")
    with pytest.raises(ValueError, match=f"{SASL_USERNAME_ENV} is not set"):
        client_options(config)
    monkeypatch.setenv(SASL_USERNAME_ENV, "alice")
    monkeypatch.setenv(SSL_KEY_PASSWORD_ENV, "keypw")
    options = client_options(config)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("alice", "pw")
    assert (options["ssl_cafile"], options["ssl_password"], options["ssl_check_hostname"]) == ("/ca.pem", "keypw", False)
    assert "pw" not in repr(config) and "alice" not in repr(config)


def test_kafka_python_accepts_every_option_we_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """kafka-python rejects unknown settings at construction ("Unrecognized configs"); its own defaults
    tables are the list of what it accepts."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    monkeypatch.setenv(SASL_USERNAME_ENV, "alice")
    monkeypatch.setenv(SASL_PASSWORD_ENV, "pw")
    monkeypatch.setenv(SSL_KEY_PASSWORD_ENV, "keypw")
    options = client_options(KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", ssl_cafile="/ca.pem",
                                         ssl_certfile="/c.pem", ssl_keyfile="/k.pem"))
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        unknown = set(options) - set(client.DEFAULT_CONFIG)
        assert not unknown, f"{client.__name__} does not know {unknown}"


# -- renamed keys: read for one more release, with the new name --------------------------------------


OLD_AND_NEW = [
    ({"learner": {"task_weights": {"click": 2.0}}}, "learner.task_weights", "learner.loss_weights",
     lambda c: dict(c.learner.loss_weights) == {"click": 2.0}),
    ({"learner": {"snapshot_every_steps": 7}}, "learner.snapshot_every_steps", "learner.cadence.snapshot_every_steps",
     lambda c: c.learner.cadence.snapshot_every_steps == 7),
    ({"learner": {"snapshot_every_s": 30}}, "learner.snapshot_every_s", "learner.cadence.snapshot_every_s",
     lambda c: c.learner.cadence.snapshot_every_s == 30),
    ({"learner": {"health": {"every_steps": 5}}}, "learner.health.every_steps", "learner.cadence.health_every_steps",
     lambda c: c.learner.cadence.health_every_steps == 5),
    ({"trainer": {"checkpoint_every_steps": 3}}, "trainer.checkpoint_every_steps",
     "learner.cadence.checkpoint_every_steps", lambda c: c.learner.cadence.checkpoint_every_steps == 3),
]


@pytest.mark.parametrize(("data", "old", "new", "holds"), OLD_AND_NEW)
def test_a_renamed_key_still_works_with_a_warning_naming_the_new_one(data, old, new, holds) -> None:
    with pytest.warns(ConfigDeprecationWarning, match=rf"^{re.escape(old)} \(in config data\) is deprecated.*use {re.escape(new)}$"):
        config = load_config(data=data, environ={})
    assert holds(config)
    assert old.split(".")[-1] not in yaml.safe_load(render(config, environ={}))[old.split(".")[0]]


@pytest.mark.parametrize(("data", "old", "new", "holds"), OLD_AND_NEW)
def test_a_renamed_key_works_from_the_environment_too(data, old, new, holds) -> None:
    keys = old.split(".")
    value = data
    for key in keys:
        value = value[key]
    variable = "MOESTREAM_" + "__".join(k.upper() for k in keys)
    new_variable = "MOESTREAM_" + "__".join(k.upper() for k in new.split("."))
    with pytest.warns(ConfigDeprecationWarning, match=rf"{old} \(from {variable}\).*use {new} \({new_variable}\)"):
        config = load_config(environ={variable: json.dumps(value) if isinstance(value, dict) else str(value)})
    assert holds(config)


@pytest.mark.parametrize(("data", "old", "new", "holds"), OLD_AND_NEW)
def test_a_setting_under_both_names_is_an_error_naming_both(data, old, new, holds) -> None:
    both = copy.deepcopy(data)
    node = both
    for key in new.split(".")[:-1]:
        node = node.setdefault(key, {})
    node[new.split(".")[-1]] = 1
    with pytest.raises(ConfigError, match=rf"{re.escape(old)} and {re.escape(new)} \(both in config data\)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        load_config(data=both, environ={})
    variables = {"MOESTREAM_" + "__".join(k.upper() for k in name.split(".")): "1" for name in (old, new)}
    with pytest.raises(ConfigError, match=rf"(?=.*{re.escape(old)} \(from MOESTREAM_)(?=.*{re.escape(new)} \(from MOESTREAM_)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        load_config(environ=variables)


def test_a_later_layer_under_the_old_name_overrides_the_new_name_in_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  cadence:\n    snapshot_every_steps: 40\n")
    with pytest.warns(ConfigDeprecationWarning):
        config = load_config(path, environ={"MOESTREAM_LEARNER__SNAPSHOT_EVERY_STEPS": "8"})
    assert config.learner.cadence.snapshot_every_steps == 8


def test_the_command_line_notes_a_renamed_key_once_on_stderr_and_prints_new_keys_only(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  task_weights: {click: 2.0}\n  snapshot_every_steps: 7\n"
                            "trainer:\n  checkpoint_every_steps: 3\n")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(path)], env={})
    assert result.exit_code == 0, result.output
    for old, new in (("learner.task_weights", "learner.loss_weights"),
                     ("learner.snapshot_every_steps", "learner.cadence.snapshot_every_steps"),
                     ("trainer.checkpoint_every_steps", "learner.cadence.checkpoint_every_steps")):
        notes = [line for line in result.stderr.splitlines() if line.startswith(f"moestream: {old} ")]
        assert len(notes) == 1 and notes[0].endswith(f"use {new}"), result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["learner"]["loss_weights"] == {"click": 2.0} and "task_weights" not in shown["learner"]
    assert shown["learner"]["cadence"]["snapshot_every_steps"] == 7 and "snapshot_every_steps" not in shown["learner"]
    assert shown["learner"]["cadence"]["checkpoint_every_steps"] == 3 and "checkpoint_every_steps" not in shown["trainer"]


def test_the_caller_s_data_is_not_changed_by_renaming() -> None:
    data = {"learner": {"task_weights": {"click": 2.0}, "health": {"every_steps": 4}}}
    before = copy.deepcopy(data)
    with pytest.warns(ConfigDeprecationWarning):
        load_config(data=data, environ={})
    assert data == before


# -- loading is light ----------------------------------------------------------------------------------


def test_loading_and_showing_the_configuration_imports_neither_torch_ray_nor_feast() -> None:
    """`moestream config show` and every command's start read the configuration: they must not pay the
    seconds that importing torch, Ray Serve or Feast takes."""
    probe = ("import sys\n"
             "from infra.config import load_config, render\n"
             f"render(load_config({str(EXAMPLE)!r}, environ={{}}), environ={{}})\n"
             "heavy = ('torch', 'ray', 'ray.serve', 'feast', 'pandas', 'wandb')\n"
             "print(','.join(name for name in heavy if name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"loading the config imported {done.stdout.strip()}"
