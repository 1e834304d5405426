"""The one configuration of a moestream deployment: ``moestream.yaml``, typed, strict, overridable from the environment.

Each stage owns its section's type beside its code (``stream.kafka_io.KafkaConfig``, ``learner.config.LearnerConfig``,
``serving.config.ServingConfig``, ...); :class:`MoestreamConfig` only composes them, with the few sections that
belong to the composition root itself (paths, the trainer processes, the HTTP proxy, Ray). Pydantic validates
the whole tree against those types, and each type checks every value it holds (the model family and its
hparams against ``learner.families``), so that a bad value fails here, naming its key, and not inside a Ray
actor after topics were created. Those types live in light modules: loading imports neither torch, Ray nor
Feast.

Keys renamed in a release keep working for one more with a warning naming the new key (:data:`RENAMED`);
setting a key under both names is an error.

Layers, later wins: the types' defaults, the YAML file, ``MOESTREAM_<SECTION>__<KEY>`` environment variables
(``MOESTREAM_LEARNER__GUARD__MAX_AUC_DROP=0.05``; ``KAFKA_BOOTSTRAP_SERVERS`` and ``RAY_ADDRESS`` keep working as
aliases), then command-line flags. Loading is strict: an unknown key anywhere is an error naming its path
(``learner.lr_typo``) and where it came from; so is a value of the wrong type or range.

Secrets never live here. Kafka SASL/TLS credentials are read by ``stream.kafka_io.client_options`` from
``SECRET_ENV`` when a client connects, the W&B key by wandb from ``WANDB_API_KEY``; a credential written into the
file is refused with the variable to use instead. ``moestream config show`` prints which of them are set, never
their values.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from features.config import FeatureStoreConfig
from features.redact import redact_connection
from infra.layout import RunLayout
from infra.runtime import RayConfig
from learner.config import LearnerConfig, WorkerConfig, positive_seconds
from learner.telemetry import TelemetryConfig
from learner.weight_store import actor_name
from serving.config import ServingConfig
from stream.joiner import JoinerConfig
from stream.kafka_io import SASL_PASSWORD_ENV, SASL_USERNAME_ENV, SSL_KEY_PASSWORD_ENV, KafkaConfig
from stream.simulator import SimulatorConfig

ENV_PREFIX = "MOESTREAM_"
ENV_SEPARATOR = "__"
CONFIG_ENV = "MOESTREAM_CONFIG"
"""Path of the YAML file when ``--config`` is not given."""
ENV_ALIASES = {"KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"), "RAY_ADDRESS": ("ray", "address")}
"""Older or Ray's own names for a config key; the ``MOESTREAM_`` form wins when both are set."""
WANDB_KEY_ENV = "WANDB_API_KEY"
SECRETS: dict[str, str] = {
    SASL_USERNAME_ENV: "Kafka SASL user name",
    SASL_PASSWORD_ENV: "Kafka SASL password",
    SSL_KEY_PASSWORD_ENV: "password of the Kafka client's TLS key",
    WANDB_KEY_ENV: "W&B API key (telemetry.mode: online)",
}
"""Every credential moestream uses, by the only place it is read from: the environment."""
_SECRET_KEYS = {
    "sasl_username": SASL_USERNAME_ENV, "sasl_plain_username": SASL_USERNAME_ENV, "username": SASL_USERNAME_ENV,
    "sasl_password": SASL_PASSWORD_ENV, "sasl_plain_password": SASL_PASSWORD_ENV, "password": SASL_PASSWORD_ENV,
    "ssl_password": SSL_KEY_PASSWORD_ENV, "ssl_key_password": SSL_KEY_PASSWORD_ENV,
    "api_key": WANDB_KEY_ENV, "wandb_api_key": WANDB_KEY_ENV,
}
DERIVED = {
    ("features", "data_dir"): "features", ("telemetry", "directory"): "wandb", ("telemetry", "history"): "history",
}
"""Keys set from ``paths`` (the run layout), not by hand: ``RunLayout`` attribute of each."""
RENAMED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("learner", "task_weights"): ("learner", "loss_weights"),
    ("learner", "snapshot_every_steps"): ("learner", "cadence", "snapshot_every_steps"),
    ("learner", "snapshot_every_s"): ("learner", "cadence", "snapshot_every_s"),
    ("learner", "health", "every_steps"): ("learner", "cadence", "health_every_steps"),
    ("trainer", "checkpoint_every_steps"): ("learner", "cadence", "checkpoint_every_steps"),
}
"""Old key -> new key. The old names are read, with a :class:`ConfigDeprecationWarning`, until the next release."""
_KEY_FIRST = re.compile(r"([A-Za-z_]\w*(?:\.[\w-]+)+)(: | )(.*)", re.S)
"""A check's message that starts with the full key it concerns (``learner.cadence.snapshot_every_steps must ...``)."""


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending key and where it was set."""


class ConfigDeprecationWarning(DeprecationWarning):
    """A key was set under its old name; the message names the new one."""


def _default(cls: type, name: str) -> Any:
    field = next(f for f in fields(cls) if f.name == name)
    return field.default


@dataclass(frozen=True)
class PathsConfig:
    data_root: Path = Path(".moestream")
    """Everything a run writes lives under ``data_root/runs/<run>``: Feast stores, snapshots, checkpoints, W&B files.
    Use an absolute path on a cluster: every node and replica resolves it alike (a shared volume)."""
    run: str = "live"
    """The run: its state lives in ``data_root/runs/<run>``. ``train`` and ``serve`` default to ``live``; ``demo``
    and ``replay --direct`` start runs of their own (``demo-<time>``, ``replay-<time>``); ``latest`` names the
    run written most recently."""

    def __post_init__(self) -> None:
        run = Path(self.run)
        if not self.run or run.is_absolute() or ".." in run.parts:
            raise ValueError(f"paths.run must be a relative directory inside paths.data_root, got {self.run!r}")


@dataclass(frozen=True)
class TrainerConfig:
    """How ``moestream train`` runs the trainer workers (``learner.worker.WorkerConfig`` holds the rest)."""

    workers: int = 1
    """Data-parallel trainer actors in one consumer group (at most ``kafka.partitions``)."""
    batch_size: int = _default(WorkerConfig, "batch_size")
    device: str = _default(WorkerConfig, "device")
    """"auto": CUDA when Ray gave the actor a GPU, else CPU. How often workers checkpoint is
    ``learner.cadence.checkpoint_every_steps``."""
    max_restarts: int = 3
    """Ray restarts a crashed trainer actor this many times; it resumes from its last checkpoint."""
    stall_timeout_s: float = _default(WorkerConfig, "stall_timeout_s")
    """The intake's liveness watchdog: no fetch progress while the partitions have lag (or the member out of
    its group) this long re-joins the group; a fetch stuck this long fails the worker for Ray to restart."""

    def __post_init__(self) -> None:
        positive_seconds("trainer.stall_timeout_s", self.stall_timeout_s)
        for name in ("workers", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_restarts < 0:
            raise ValueError(f"trainer.max_restarts must be >= 0, got {self.max_restarts!r}")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"trainer.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class HttpConfig:
    """Ray Serve's HTTP proxy, which fronts the ranking app (``http_options`` and ``proxy_location``)."""

    host: str = "127.0.0.1"
    """0.0.0.0 in a container or pod, so that other hosts reach it."""
    port: int = 8000
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"http.port must be in 1..65535, got {self.port!r}")


@dataclass(frozen=True)
class GrpcConfig:
    """Ray Serve's gRPC proxy beside the HTTP one: ``moestream.v1.Ranking`` (``serving/proto/ranking.proto``) on
    the same replicas. Serve binds it on every interface (``[::]``), whatever ``http.host`` says."""

    port: int | None = 9000
    """Serve's default; null: no gRPC proxy (HTTP only)."""

    def __post_init__(self) -> None:
        if self.port is not None and (isinstance(self.port, bool) or not isinstance(self.port, int)
                                      or not 1 <= self.port <= 65535):
            raise ValueError(f"grpc.port must be in 1..65535 or null, got {self.port!r}")


class MoestreamConfig(BaseModel):
    """The whole configuration; each field is one section of ``moestream.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: PathsConfig = PathsConfig()
    kafka: KafkaConfig = KafkaConfig()
    joiner: JoinerConfig = JoinerConfig()
    features: FeatureStoreConfig = FeatureStoreConfig()
    learner: LearnerConfig = LearnerConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    trainer: TrainerConfig = TrainerConfig()
    serving: ServingConfig = ServingConfig()
    http: HttpConfig = HttpConfig()
    grpc: GrpcConfig = GrpcConfig()
    ray: RayConfig = RayConfig()
    simulator: SimulatorConfig = SimulatorConfig()

    @model_validator(mode="after")
    def _derive_paths(self) -> MoestreamConfig:
        # The run layout decides where Feast and W&B write; the sections then hold those paths, so that
        # whoever reads ``config.features`` gets the store the trainer and the replicas really share.
        layout = self.layout()
        object.__setattr__(self, "features", replace(self.features, data_dir=layout.features))
        object.__setattr__(self, "telemetry", replace(self.telemetry, directory=layout.wandb, history=layout.history))
        if self.trainer.workers > self.kafka.partitions:
            raise ValueError(f"trainer.workers ({self.trainer.workers}) exceeds kafka.partitions "
                             f"({self.kafka.partitions}): each worker reads its own share of the partitions")
        return self

    def layout(self) -> RunLayout:
        return RunLayout.of(self.paths.data_root, self.paths.run)

    def worker_config(self) -> WorkerConfig:
        """What each trainer worker runs with."""
        layout = self.layout()
        return WorkerConfig(
            kafka=self.kafka,
            joiner=self.joiner,
            features=self.features,
            learner=self.learner,
            telemetry=self.telemetry,
            snapshot_dir=layout.snapshots,
            checkpoint_dir=layout.checkpoints,
            batch_size=self.trainer.batch_size,
            device=self.trainer.device,
            stall_timeout_s=self.trainer.stall_timeout_s,
            weight_store=actor_name(self.paths.run) if self.learner.publish.via_ray else None,
        )

    def to_data(self, sections: tuple[str, ...] | None = None, changed_only: bool = False) -> dict[str, Any]:
        """Plain data that :func:`load_config` reads back to an equal config (derived paths left out);
        ``changed_only``: just the keys whose values differ from the defaults."""
        data = self.model_dump(mode="json")
        for section, key in DERIVED:
            data[section].pop(key, None)
        if changed_only:
            data = _changed(data, MoestreamConfig().to_data())
        if sections is not None:
            data = {name: data.get(name, {}) for name in sections}
        return data


def _changed(data: dict[str, Any], defaults: dict[str, Any], keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``data`` that differ from ``defaults``. Sections and their sub-sections are compared key
    by key; a free-form mapping (``learner.loss_weights``) is one value, as it replaces its default whole."""
    out = {}
    for key, value in data.items():
        default = defaults.get(key)
        if value == default:
            continue
        here = (*keys, key)
        if isinstance(value, dict) and isinstance(default, dict) and _fields_of(_type_at(here)):
            out[key] = _changed(value, default, here)
        else:
            out[key] = value
    return out


SECTIONS = tuple(MoestreamConfig.model_fields)


# -- loading ------------------------------------------------------------------------------------------


def load_config(
    path: Path | str | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> MoestreamConfig:
    """The effective configuration: defaults, then the YAML file at ``path`` (or ``data``), then the
    environment (``os.environ`` unless given), then ``overrides`` (dotted key -> value, from CLI flags)."""
    environ = os.environ if environ is None else environ
    sources: dict[tuple[str, ...], str] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        origin = str(path)
    else:
        raw = _copy(data or {})
        origin = "config data"
    _refuse_secrets(raw, origin)
    for keys, value, _ in _renamed([((), raw, origin)])[1:]:  # entry 0 is the file itself, old keys taken out
        _set(raw, keys, value, origin)
    _record(raw, (), origin, sources)
    for keys, value, source in _renamed(_env_overrides(environ)):
        _set(raw, keys, value, source)
        sources[keys] = source
    flags = [(tuple(dotted.split(".")), value, f"command line ({dotted})")
             for dotted, value in (overrides or {}).items() if value is not None]
    for keys, value, source in _renamed(flags):
        _set(raw, keys, value, source)
        sources[keys] = source
    for (section, key) in DERIVED:
        if isinstance(raw.get(section), Mapping) and key in raw[section]:
            where = sources.get((section, key), origin)
            raise ConfigError(f"{section}.{key} (from {where}) is derived from paths.data_root and paths.run "
                              f"({getattr(RunLayout(Path('<data_root>', 'runs', '<run>')), DERIVED[(section, key)])}); "
                              "set those instead")
    try:
        return MoestreamConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources, origin)) from None


def _renamed(entries: list[tuple[tuple[str, ...], Any, str]]) -> list[tuple[tuple[str, ...], Any, str]]:
    """One layer's settings (key, value, source) with every old key of :data:`RENAMED` under its new name,
    a deprecation warning for each; an old key found inside a section's mapping is taken out of it and
    becomes an entry of its own. The same setting under both names in one layer is an error."""
    out: list[tuple[tuple[str, ...], Any, str]] = []
    given: dict[tuple[tuple[str, ...], str], tuple[str, ...]] = {}  # (key, source) -> the key as it was set
    for keys, value, source in entries:
        for old, new in RENAMED.items():
            if keys[:len(old)] == old:
                _deprecated(old, new, source)
                given[(new + keys[len(old):], source)] = keys
                keys = new + keys[len(old):]
        out.append((keys, value, source))
        if not isinstance(value, dict):
            continue
        for old, new in RENAMED.items():
            if len(old) > len(keys) and old[:len(keys)] == keys and _has(value, old[len(keys):]):
                moved = _pop(value, old[len(keys):])
                if new[:len(keys)] == keys and _has(value, new[len(keys):]):
                    raise ConfigError(f"{'.'.join(old)} and {'.'.join(new)} (both in {source}) are one setting under "
                                      f"its old and its new name; keep only {'.'.join(new)}")
                _deprecated(old, new, source)
                out.append((new, moved, source))
    by_key: dict[tuple[str, ...], str] = {}
    for keys, _, source in out:
        if keys in by_key:
            first, second = ((k, src, given.get((k, src), k)) for k, src in ((keys, by_key[keys]), (keys, source)))
            named = " and ".join(f"{'.'.join(as_set)} (from {src})" for _, src, as_set in (first, second))
            raise ConfigError(f"{named} are one setting under its old and its new name; keep only {'.'.join(keys)}")
        by_key[keys] = source
    return out


def _deprecated(old: tuple[str, ...], new: tuple[str, ...], source: str) -> None:
    where = f"from {source}" if source.startswith((ENV_PREFIX, "command line")) else f"in {source}"
    use = ".".join(new)
    if source.startswith(ENV_PREFIX):
        use += f" ({ENV_PREFIX}{ENV_SEPARATOR.join(k.upper() for k in new)})"
    warnings.warn(f"{'.'.join(old)} ({where}) is deprecated and will be removed in the next release; use {use}",
                  ConfigDeprecationWarning, stacklevel=4)


def _has(data: Mapping[str, Any], keys: tuple[str, ...]) -> bool:
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return False
        data = data[key]
    return True


def _pop(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys[:-1]:
        data = data[key]
    return data.pop(keys[-1])


def _copy(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested mappings (renamed keys are moved in it, never in the caller's data)."""
    return {key: _copy(value) if isinstance(value, Mapping) else value for key, value in data.items()}


DEFAULT_CONFIG_FILE = Path("moestream.yaml")
"""Read from the working directory when neither ``--config`` nor ``$MOESTREAM_CONFIG`` names a file."""


def config_path(option: Path | None, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The file to load: ``--config``, else ``$MOESTREAM_CONFIG``, else ``./moestream.yaml`` if there is one, else
    none (built-in defaults and the environment)."""
    environ = os.environ if environ is None else environ
    if option is not None:
        return option
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    here = (cwd or Path.cwd()) / DEFAULT_CONFIG_FILE
    return here if here.is_file() else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    return raw


def _refuse_secrets(raw: Mapping[str, Any], origin: str, prefix: tuple[str, ...] = ()) -> None:
    for key, value in raw.items():
        keys = (*prefix, str(key))
        if str(key).lower() in _SECRET_KEYS:
            raise ConfigError(f"{'.'.join(keys)} (in {origin}): credentials are read from the environment only; "
                              f"set {_SECRET_KEYS[str(key).lower()]} instead")
        if keys == ("features", "redis_connection") and isinstance(value, str) and redact_connection(value) != value:
            raise ConfigError(f"features.redis_connection (in {origin}) carries a password; put the whole "
                              "connection string in MOESTREAM_FEATURES__REDIS_CONNECTION instead")
        if isinstance(value, Mapping):
            _refuse_secrets(value, origin, keys)


def _record(raw: Mapping[str, Any], prefix: tuple[str, ...], origin: str, sources: dict) -> None:
    for key, value in raw.items():
        sources[(*prefix, str(key))] = origin
        if isinstance(value, Mapping):
            _record(value, (*prefix, str(key)), origin, sources)


def env_key(name: str) -> tuple[str, ...] | None:
    """The config key an environment variable overrides, or None if it is not an override.

    ``MOESTREAM_LEARNER__GUARD__MAX_AUC_DROP`` -> ``("learner", "guard", "max_auc_drop")``; names without the
    ``__`` separator (``MOESTREAM_KAFKA_HOME``, the secrets) are not overrides.
    """
    if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
        return None
    return tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_SEPARATOR))


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any, str]]:
    found: dict[tuple[str, ...], tuple[Any, str]] = {}
    for alias, keys in ENV_ALIASES.items():
        if environ.get(alias):
            found[keys] = (environ[alias], alias)
    for name in sorted(environ):
        keys = env_key(name)
        if keys is None:
            continue
        if any(not k for k in keys):
            raise ConfigError(f"{name}: empty key between '__' separators")
        if keys[-1] in _SECRET_KEYS:
            raise ConfigError(f"{name}: credentials are not config keys; set {_SECRET_KEYS[keys[-1]]} instead")
        found[keys] = (_env_value(environ[name]), name)
    return [(keys, value, source) for keys, (value, source) in found.items()]


def _env_value(text: str) -> Any:
    """An environment value as config data: ``null`` is None, ``[...]`` and ``{...}`` are YAML flow
    collections; anything else stays a string for the section's type to parse (``"4"`` -> 4)."""
    stripped = text.strip()
    if stripped in ("null", "~"):
        return None
    if stripped[:1] in ("[", "{"):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return text  # reported by validation as the wrong type, with its key
    return text


def _set(raw: dict, keys: tuple[str, ...], value: Any, source: str) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)} (from {source}): {'.'.join(keys[:i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


# -- error messages -----------------------------------------------------------------------------------


def _explain(exc: ValidationError, sources: Mapping[tuple[str, ...], str], origin: str) -> str:
    lines = []
    for error in exc.errors():
        keys = tuple(str(k) for k in error["loc"])
        where = _source_of(keys, sources, origin)
        if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            known = _known_keys(keys[:-1])
            hint = difflib.get_close_matches(keys[-1], known, n=1)
            detail = f"unknown key{f' (did you mean {hint[0]}?)' if hint else ''}; known: {', '.join(known)}"
        else:
            detail = error["msg"].removeprefix("Value error, ")
            named = _KEY_FIRST.fullmatch(detail)
            if named and keys and (named[1] + ".").startswith(".".join(keys) + "."):
                # A section's own check names the key inside it: report that key and where it was set.
                keys, detail = tuple(named[1].split(".")), named[3]
                where = _source_of(keys, sources, origin)
        lines.append(f"{'.'.join(keys)} (from {where}): {detail}" if keys else detail)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _source_of(keys: tuple[str, ...], sources: Mapping[tuple[str, ...], str], origin: str) -> str:
    """Where the value at ``keys`` was set: its own source, else those of the keys set below it (a section's
    own check names a key inside it), else its nearest parent's."""
    if keys in sources:
        return sources[keys]
    below = sorted({source for k, source in sources.items() if k[:len(keys)] == keys and len(k) > len(keys)})
    if below:
        return ", ".join(below)
    for n in range(len(keys) - 1, 0, -1):
        if keys[:n] in sources:
            return sources[keys[:n]]
    return f"defaults and {origin}"


def _known_keys(keys: tuple[str, ...]) -> list[str]:
    """The keys the section at ``keys`` accepts (none known for a free-form mapping)."""
    cls = _type_at(keys)
    return sorted(_fields_of(cls)) if cls is not None else []


def _fields_of(cls: Any) -> list[str]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    if isinstance(cls, type) and is_dataclass(cls):
        return [f.name for f in fields(cls)]
    return []


def _type_at(keys: tuple[str, ...]) -> Any:
    """The config type at ``keys`` (``("learner", "guard")`` -> ``PublishGuard``), or None."""
    cls: Any = MoestreamConfig
    for key in keys:
        if not _fields_of(cls):
            return None
        hint = get_type_hints(cls).get(key)
        if hint is None:
            return None
        if get_origin(hint) is not None:  # ``X | None`` -> X; a generic mapping -> None
            sections = [a for a in get_args(hint) if _fields_of(a)]
            hint = sections[0] if sections else None
        cls = hint
    return cls


# -- showing ------------------------------------------------------------------------------------------


def masked(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with what could hold a secret masked (a Redis password given in the environment)."""
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    features = data.get("features")
    if isinstance(features, dict) and isinstance(features.get("redis_connection"), str):
        features["redis_connection"] = redact_connection(features["redis_connection"])
    return data


def render(config: MoestreamConfig, environ: Mapping[str, str] | None = None) -> str:
    """The effective configuration as YAML (loadable again), secrets masked, with the credentials the
    environment provides and the paths the run layout derives as comments."""
    environ = os.environ if environ is None else environ
    body = yaml.safe_dump(masked(config.to_data()), sort_keys=False, default_flow_style=False)
    layout = config.layout()
    lines = ["# derived from paths:"]
    lines += [f"#   {name}: {getattr(layout, name)}"
              for name in ("features", "snapshots", "checkpoints", "wandb", "history")]
    lines.append("# credentials (environment only, never shown):")
    lines += [f"#   {name}: {'set' if environ.get(name) else 'not set'}  ({what})" for name, what in SECRETS.items()]
    return body + "\n".join(lines) + "\n"


__all__ = [
    "CONFIG_ENV", "DEFAULT_CONFIG_FILE", "RENAMED", "ConfigDeprecationWarning", "ConfigError", "GrpcConfig",
    "HttpConfig", "MoestreamConfig", "PathsConfig", "SECRETS", "TrainerConfig", "config_path", "env_key", "load_config", "render",
]
