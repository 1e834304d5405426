"""The one configuration: strict loading, environment overrides, secrets kept out, `moestream config show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from infra.cli import app
from infra.config import SECRETS, ConfigError, MoestreamConfig, load_config, render
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
    default = MoestreamConfig().learner.snapshot_every_steps
    assert config.learner.snapshot_every_steps == raw["learner"]["snapshot_every_steps"] != default
    assert config.features.data_dir == Path(".moestream").absolute() / "live" / "features"


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
    ({"http": {"port": 70000}}, "http"),
    ({"learner": {"guard": {"max_auc_drop": 5}}}, "learner.guard"),
    ({"kafka": {"security_protocol": "SASL_SSL"}}, "kafka"),
    ({"ray": {"trainer_resources": {"GPU": 1}}}, "ray"),
    ({"trainer": {"device": "tpu"}}, "trainer"),
])
def test_a_bad_value_names_its_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(data=data, environ={})
    assert f"\n  {key} (from config data)" in str(error.value)


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
    with pytest.raises(ConfigError, match=r"learner\.guard \(from MOESTREAM_LEARNER__GUARD__MAX_AUC_DROP\)"):
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
    assert config.features.data_dir == tmp_path / "r1" / "features"
    assert config.telemetry.directory == tmp_path / "r1" / "wandb"
    worker = config.worker_config()
    assert worker.snapshot_dir == tmp_path / "r1" / "snapshots" and worker.features == config.features
    with pytest.raises(ConfigError, match=r"features\.data_dir .* is derived from paths\.data_root"):
        load_config(data={"features": {"data_dir": "/elsewhere"}}, environ={})
    with pytest.raises(ConfigError, match=r"paths .*relative directory"):
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
    body = yaml.safe_load(result.output)
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
    assert yaml.safe_load(result.output)["learner"]["family"] == "ple"


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
