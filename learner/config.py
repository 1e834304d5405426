"""The trainer's settings (``learner`` in ``moestream.yaml`` and what each worker runs with), checked whole.

Every value is checked when the configuration is loaded, not when the trainer first uses it inside a Ray
actor: a bad value there surfaced as a ``ZeroDivisionError`` after a Ray restart, or as 300 lines of
retried tracebacks, while the command line had already reported success. Each error names its config key
(``learner.cadence.snapshot_every_steps``, ``learner.hparams.n_experts``); the family and its hparams are
checked against ``learner.families``, which knows them without torch.

No torch, Ray or Feast here: ``moestream config show`` imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.config import FeatureStoreConfig
from learner.families import check_hparams
from learner.telemetry import TelemetryConfig
from stream.events import TASKS, TYPICAL_POSITIVE_RATES

if TYPE_CHECKING:  # the worker's other sections: imported when a WorkerConfig is made, not with this module
    from learner.distributed import GroupConfig
    from stream.joiner import JoinerConfig
    from stream.kafka_io import KafkaConfig

PRECISIONS = ("auto", "fp32", "bf16")
FIELD_PRODUCTS = ("none", "dot", "product")
"""``learner.models.interaction.FIELD_PRODUCTS``, named here because loading a configuration must not import torch
(a test holds the two equal)."""
GUARD_METRICS = ("window_auc", "window_gauc", "auc", "gauc")
"""Figures of ``ProgressiveValidation.summary()`` the publish guard may compare: higher is better for each."""


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def positive_seconds(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number of seconds, got {value!r}")


TABLE_KEYS = ("capacity", "dim", "min_count", "ttl_ms", "mode", "pending_capacity")
DEFAULT_TABLE: Mapping[str, Any] = {"capacity": 2**20}
"""A field's table unless configured: a million collisionless rows, every ID admitted at first sight, kept until
the least recently seen are evicted."""
ID_FIELDS = ("user_id", "item_id")
"""``features.definitions.ID_FIELDS``, named here because loading a configuration must not import Feast (a
test holds the two equal)."""
CATEGORICAL_FIELDS = (
    "u_active_degree", "u_follow_user_num_range", "u_fans_user_num_range", "u_friend_user_num_range",
    "u_register_days_range", *(f"u_onehot_feat{i}" for i in range(18)),
    "i_author_id", "i_music_id", "i_music_type", "i_video_type", "i_upload_type", "i_first_tag",
)
"""``features.definitions.CATEGORICAL_COLUMNS``: the static attributes' integer codes the feature store hands
out beside the ids (KuaiRand-1K's user ranges and one-hot features, its videos' author, music, type and first
tag). Each gets a table of its own only when ``learner.tables`` names it; a missing code (negative) reads the
default row."""


def check_tables(tables: object, emb_dim: int) -> dict[str, dict[str, Any]] | None:
    """``learner.tables`` checked (every error names its key) and completed: every id field, then the categorical
    fields it names, in ``CATEGORICAL_FIELDS`` order; ``dim`` defaulting to ``emb_dim``; None stays None (the
    shared hashed table, of the id fields only)."""
    from learner.idmap import IdMapConfig  # numpy only

    if tables is None:
        return None
    if not isinstance(tables, Mapping):
        raise ValueError(f"learner.tables must map id fields to table settings, got {tables!r}")
    unknown = sorted(set(tables) - set(ID_FIELDS) - set(CATEGORICAL_FIELDS), key=str)
    if unknown:
        raise ValueError(f"learner.tables names {unknown}, which are neither id fields {list(ID_FIELDS)} nor "
                         f"categorical features {list(CATEGORICAL_FIELDS)}")
    checked = {}
    for name in (*ID_FIELDS, *(f for f in CATEGORICAL_FIELDS if f in tables)):
        table = tables.get(name, DEFAULT_TABLE)
        key = f"learner.tables.{name}"
        if not isinstance(table, Mapping):
            raise ValueError(f"{key} must be a mapping of {list(TABLE_KEYS)}, got {table!r}")
        unknown = sorted(set(table) - set(TABLE_KEYS))
        if unknown:
            raise ValueError(f"{key} has unknown key(s) {unknown}; known: {list(TABLE_KEYS)}")
        if "capacity" not in table:
            raise ValueError(f"{key}.capacity is required (rows for admitted ids)")
        # from an environment variable every value is text: whole numbers are read as such, as YAML would
        table = {"dim": emb_dim, **{k: int(v) if isinstance(v, str) and v.strip().isdigit() else v
                                    for k, v in table.items()}}
        at_least(f"{key}.dim", table["dim"], 1)
        if table.get("mode", "collisionless") != "collisionless":
            # serving maps raw ids through the published id -> row pairs, which a hashed table does not have
            raise ValueError(f"{key}.mode must be 'collisionless' (for hashed ids set learner.tables: null, the "
                             f"shared hashed table of learner.n_buckets rows), got {table['mode']!r}")
        try:
            IdMapConfig(**{k: v for k, v in table.items() if k != "dim"})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{key}.{exc}") from None
        checked[name] = dict(table)
    return checked


def at_least(key: str, value: object, low: int) -> None:
    """``value`` must be an integer >= ``low``; the error names ``key``."""
    if not _is_int(value) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


def fraction(key: str, value: object) -> None:
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{key} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class CadenceConfig:
    """How often the training loop does each job beside the step, for Kafka training and direct replay alike."""
    snapshot_every_steps: int = 20
    snapshot_every_s: float | None = None   # also publish when this many seconds passed since the last attempt
    checkpoint_every_steps: int = 10        # offsets are committed only after a durable checkpoint
    health_every_steps: int = 10            # progressive metrics summary and expert-health report
    stats_every_steps: int = 10             # intake figures (lag, consumed, joiner pending) and ID-table figures to telemetry
    checkpoint_beside: bool = True          # a worker alone writes its checkpoints on a thread of its own (learner.beside)
    checkpoint_max_share: float = 0.1       # ... and spends at most this share of the time writing them

    def __post_init__(self) -> None:
        for name in ("snapshot_every_steps", "checkpoint_every_steps", "health_every_steps", "stats_every_steps"):
            at_least(f"learner.cadence.{name}", getattr(self, name), 1)
        share = self.checkpoint_max_share
        if not _is_number(share) or not 0 < share <= 1:
            raise ValueError(f"learner.cadence.checkpoint_max_share must be in (0, 1], got {share!r}")
        every_s = self.snapshot_every_s
        if every_s is not None and (not _is_number(every_s) or every_s < 0):
            raise ValueError(f"learner.cadence.snapshot_every_s must be a number of seconds >= 0 or null, got {every_s!r}")


@dataclass(frozen=True)
class PublishGuard:
    """Refuse a snapshot whose recent progressive AUC fell too far below the last published one.

    Per task, ``metric`` (a key of ``ProgressiveValidation.summary()``; default the sliding-window AUC)
    of the candidate is compared with the same figure in the manifest of the version ``LATEST`` names.
    A task is compared only when both windows hold at least ``min_class_examples`` positives and as many
    negatives: a window AUC over a few dozen positives moves by more than any useful threshold by chance.
    """

    max_auc_drop: float = 0.02
    min_class_examples: int = 500
    metric: str = "window_auc"

    def __post_init__(self) -> None:
        fraction("learner.guard.max_auc_drop", self.max_auc_drop)
        at_least("learner.guard.min_class_examples", self.min_class_examples, 1)
        if self.metric not in GUARD_METRICS:
            raise ValueError(f"learner.guard.metric must be one of {list(GUARD_METRICS)}, got {self.metric!r}")

    def _comparable(self, m: Mapping[str, float]) -> float | None:
        # Manifests store an undefined metric (NaN) as JSON null: both mean "not comparable".
        value = m.get(self.metric)
        positives = m.get("window_positives") or 0.0
        negatives = (m.get("window_n") or 0.0) - positives
        if value is None or not math.isfinite(value) or min(positives, negatives) < self.min_class_examples:
            return None
        return value

    def check(self, metrics: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]]) -> str | None:
        """Why ``metrics`` must not replace the snapshot that recorded ``reference``; None if it may."""
        drops = []
        for task, m in metrics.items():
            now, before = self._comparable(m), self._comparable(reference.get(task, {}))
            if now is not None and before is not None and before - now > self.max_auc_drop:
                drops.append(f"{task} {self.metric} {now:.4f} < {before:.4f} - {self.max_auc_drop}")
        return "; ".join(drops) or None


STORE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""URI schemes ``pyarrow.fs.FileSystem.from_uri`` opens (``learner.snapshot_files``)."""


def _check_store_uri(uri: str) -> None:
    """A store URI whose form is wrong is refused here, naming the key, rather than by ``pyarrow.fs`` inside
    the trainer actor. Whether the store can be reached is known only when it is opened (no network here)."""
    scheme, _, rest = uri.partition("://")
    if scheme.lower() not in STORE_SCHEMES:
        raise ValueError(f"learner.publish.store: unknown filesystem {scheme!r} in {uri!r}; a directory, or a URI "
                         f"of one of {', '.join(STORE_SCHEMES)}")
    if scheme.lower() == "file" and not rest.startswith("/"):
        raise ValueError(f"learner.publish.store: a file:// URI needs an absolute path (file:///data/snapshots), "
                         f"got {uri!r}")
    if scheme.lower() != "file" and not rest.strip("/"):
        raise ValueError(f"learner.publish.store: {uri!r} names no bucket or path")


@dataclass(frozen=True)
class PublishConfig:
    """How versions are published (``learner.snapshots``, ``learner.weight_store``; docs/telemetry.md, "Snapshots").

    A version is a base (the whole model) or a delta (the dense part, the table rows touched and the ids
    admitted or tombstoned since its parent). A new base is written once the chain has ``max_deltas`` deltas or
    its deltas add up to ``max_delta_fraction`` times its base's bytes, after a trainer restart, and on a
    rollback; ``max_deltas: 0`` publishes every version whole, as before deltas existed. The byte budget is what
    sizes a chain to the model (a delta of a 10^7-id model weighs about a thousandth of its base, of a 10^5-id
    one a few percent); the count bounds what a cold replica applies to catch up.
    """

    store: str | None = None
    """The durable snapshot store: a directory or a ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://...``);
    null: the run's ``snapshots`` directory. What a restarted trainer, a cold replica and ``moestream snapshots``
    read."""
    max_deltas: int = 1000
    max_delta_fraction: float = 0.5
    keep_bases: int = 3
    """Bases kept in the store, each with its chain (rollback reaches any version of them)."""
    via_ray: bool = True
    """Versions also reach replicas through Ray (the run's weight-store actor): replicas on any node follow the
    trainer without a shared filesystem."""
    base_beside: bool = True
    """A base that compaction makes due is written on a thread of its own while training and deltas go on, then
    published with the delta that brings it up to date (``learner.beside``); false: on the training thread, which
    stops for as long as a whole model takes to serialise and write."""
    ray_max_bytes: int = 256 * 2**20
    """A version larger than this (the base of a large model) goes to the weight-store actor as its manifest only,
    and replicas read its payload from the durable store: the object store holds live deltas and small bases, not
    gigabytes per base per copy. Replicas on other nodes then need a store they can reach (``s3://...``)."""

    def __post_init__(self) -> None:
        at_least("learner.publish.max_deltas", self.max_deltas, 0)
        at_least("learner.publish.ray_max_bytes", self.ray_max_bytes, 0)
        at_least("learner.publish.keep_bases", self.keep_bases, 1)
        if not _is_number(self.max_delta_fraction) or not self.max_delta_fraction > 0:
            raise ValueError(f"learner.publish.max_delta_fraction must be a positive number, got {self.max_delta_fraction!r}")
        if self.store is not None and (not isinstance(self.store, str) or not self.store.strip()):
            raise ValueError(f"learner.publish.store must be a directory or a URI, or null, got {self.store!r}")
        if isinstance(self.store, str) and "://" in self.store:
            _check_store_uri(self.store)


@dataclass(frozen=True)
class HealthConfig:
    """The expert-health report's thresholds (``learner.health``); how often it runs is
    ``learner.cadence.health_every_steps``."""

    zero_frac_max: float = 0.9
    scale_ratio: float = 10.0
    degradation_share: float = 0.9
    degradation_min_mass: float = 0.01
    sparse_positive_rate: float = 0.05
    underfit_shared_mass: float = 0.75
    reference_reports: int = 10
    """The drift reference window: the mean routing share of this many previous reports."""
    alert_every_s: float = 600.0
    """An anomaly (kind and subject) raises a W&B alert at most once per this many seconds."""
    heatmap_every_reports: int = 10
    history: int = 200
    """Reports kept for the heatmap (its time axis)."""

    def __post_init__(self) -> None:
        for name in ("reference_reports", "heatmap_every_reports", "history"):
            at_least(f"learner.health.{name}", getattr(self, name), 1)
        for name in ("zero_frac_max", "degradation_share", "degradation_min_mass", "sparse_positive_rate",
                     "underfit_shared_mass"):
            fraction(f"learner.health.{name}", getattr(self, name))
        if not _is_number(self.scale_ratio) or self.scale_ratio <= 1:
            raise ValueError(f"learner.health.scale_ratio must be a finite number > 1, got {self.scale_ratio!r}")
        if not _is_number(self.alert_every_s) or self.alert_every_s < 0:
            raise ValueError(f"learner.health.alert_every_s must be a finite number >= 0, got {self.alert_every_s!r}")


@dataclass(frozen=True)
class WideConfig:
    """``learner.wide``: the wide part beside the experts (``learner.models.wide``), per binary task a factorisation
    machine over the embedded ID fields (with user and item alone, ``b_u + b_i + p_u · q_i``) added to the task's
    logit, as Wide & Deep adds its wide part. On by default, with shared factors of width 16: the best measured
    configuration (docs/quality.md, "Shared factors"). ``lr``, ``initial_accumulator`` and ``tasks`` default as
    ``learner.models.wide.WIDE_DEFAULTS``, named here because loading a configuration must not import torch (a test
    holds them equal); ``dim`` and ``shared`` there keep what a model config from before these keys meant (off;
    per-task factors)."""

    dim: int = 16
    """Factor width per field (and task, unless ``shared``); 0: no wide term."""
    lr: float = 0.3
    """Row-wise Adagrad's learning rate for its rows (the quality floor's tuning chose 0.3 on click and long_view)."""
    initial_accumulator: float = 4e-6
    """Where each of its rows' accumulator starts, in the units of the learner's loss (a mean over the batch):
    4e-6 is about the floor's tuned 1.0 (a sum over the batch) at batch 512, ``1 / 512²``."""
    tasks: list[str] = field(default_factory=list)
    """The binary tasks that get a term; empty: every one."""
    shared: bool = True
    """One factor per row for every task, each task weighting its coordinates (a multi-task factorisation), instead
    of a factor per task: ``dim`` floats a row instead of ``tasks · dim``."""

    def __post_init__(self) -> None:
        at_least("learner.wide.dim", self.dim, 0)
        if not isinstance(self.shared, bool):
            raise ValueError(f"learner.wide.shared must be true or false, got {self.shared!r}")
        if isinstance(self.tasks, str) or not all(isinstance(t, str) for t in self.tasks):
            raise ValueError(f"learner.wide.tasks must be a list of task names, got {self.tasks!r}")
        object.__setattr__(self, "tasks", list(self.tasks))
        if not _is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"learner.wide.lr must be a finite number > 0, got {self.lr!r}")
        if not _is_number(self.initial_accumulator) or self.initial_accumulator < 0:
            raise ValueError(f"learner.wide.initial_accumulator must be a finite number >= 0, got "
                             f"{self.initial_accumulator!r}")


@dataclass(frozen=True)
class LearnerConfig:
    family: str = "mmoe"
    tasks: tuple[str, ...] = TASKS
    hparams: Mapping[str, Any] = field(default_factory=dict)
    """Family hyper-parameters passed to ``learner.models.build`` (n_experts, expert_dims, ...), checked
    against ``learner.families``."""
    n_buckets: int = 2**18
    emb_dim: int = 16
    lr: float = 3e-3
    """Adam's learning rate for the dense network. 3e-3 (0.01 until 2026-12-05): on the quality benchmark's
    stream it raised the rare tasks' AUC by about 0.007 and left click and long_view within ±0.001
    (docs/quality.md, "Learning better")."""
    embedding_lr: float = 0.2
    """Row-wise Adagrad's learning rate for the embedding table (``learner.models.sparse``): each row's steps
    shrink with the gradient it has seen, so rare IDs keep learning fast and frequent ones settle."""
    embedding_accumulator: float = 0.0
    """Where each embedding row's row-wise Adagrad accumulator starts, and restarts when its row is reused
    (``learner.models.sparse``; TensorFlow's ``initial_accumulator_value``). 0: a row's first step is ``lr`` per
    coordinate whatever its gradient. In the units of a row's squared gradient, which is small because the loss
    is a mean over the batch: on the simulator at batch 512 an item row gathers about 1e-8 per impression
    (docs/quality.md, "Learning better")."""
    field_products: str = "none"
    """Products of the embedded fields appended to the experts' input (``learner.models.interaction``): "dot",
    one dot product per pair of fields of equal width (DLRM); "product", their elementwise product (GMF);
    "none"."""
    cross_layers: int = 0
    """DCN-v2 cross layers between the embeddings and the experts (``learner.models.interaction``): explicit
    products of the inputs, e.g. user · item affinities; 0: none."""
    cross_rank: int = 0
    """Rank of each cross layer's matrix; 0: full (input width squared weights per layer)."""
    wide: WideConfig = field(default_factory=WideConfig)
    """Per binary task, an FM over the ID fields' rows added to its logit (``WideConfig``); off by default."""
    base_rates: Mapping[str, float] = field(default_factory=lambda: dict(TYPICAL_POSITIVE_RATES))
    """Each binary task's output starts at its base rate (see ``MultiTaskModel.init_output_bias``)."""
    seed: int = 0
    metric_window: int = 20_000
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    """Weight of each task's loss in the total (a task left out weighs 1). Not ``serving.task_weights``,
    which weighs the tasks' probabilities in the fused ranking score."""
    tables: Mapping[str, Mapping[str, Any]] | None = field(default_factory=dict)
    """An embedding table per ID field (``user_id``, ``item_id``) and per categorical feature named here (any of
    ``CATEGORICAL_FIELDS``, e.g. ``i_author_id``), each ``{capacity, dim, min_count, ttl_ms, mode}``
    (``learner.idmap``): collisionless by default, an ID gets a row of its own after ``min_count`` sightings
    (until then the shared default row), rows unseen for ``ttl_ms`` of event time are freed, and the least
    recently seen are evicted when the table is full. A field left out gets ``DEFAULT_TABLE``. Rows are allocated as IDs arrive, so memory and snapshots follow
    the live IDs, not the capacity. ``null``: the earlier single hashed table of ``n_buckets`` rows shared by
    all fields."""
    cadence: CadenceConfig = field(default_factory=CadenceConfig)
    guard: PublishGuard = field(default_factory=PublishGuard)
    """When a snapshot is refused for a drop in progressive AUC (non-finite weights always are)."""
    publish: PublishConfig = field(default_factory=PublishConfig)
    """Bases and deltas, the durable store's URI, delivery through Ray."""
    health: HealthConfig = field(default_factory=HealthConfig)
    precision: str = "auto"
    """Forward pass under autocast: "bf16" on any device, "fp32" never, "auto" bf16 on CUDA only. On a
    CPU with native bf16 (AVX512-BF16 or AMX) "bf16" trains about twice as fast at large sizes; see
    docs/benchmarks-models.md for its speed and its AUC against fp32."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"learner.precision must be one of {PRECISIONS}, got {self.precision!r}")
        tasks = self.tasks
        if isinstance(tasks, str) or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"learner.tasks must be a non-empty list of distinct tasks, got {tasks!r}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"learner.tasks names task(s) {unknown} the stream does not label; tasks are {list(TASKS)}")
        object.__setattr__(self, "tasks", tuple(tasks))
        object.__setattr__(self, "hparams", check_hparams(self.family, self.hparams, self.tasks))
        if not _is_int(self.n_buckets) or not 1 <= self.n_buckets <= 2**32:
            raise ValueError(f"learner.n_buckets must be an integer in [1, 2**32], got {self.n_buckets!r}")
        at_least("learner.emb_dim", self.emb_dim, 1)
        at_least("learner.metric_window", self.metric_window, 1)
        at_least("learner.seed", self.seed, 0)
        at_least("learner.cross_layers", self.cross_layers, 0)
        at_least("learner.cross_rank", self.cross_rank, 0)
        if self.field_products not in FIELD_PRODUCTS:
            raise ValueError(f"learner.field_products must be one of {list(FIELD_PRODUCTS)}, got "
                             f"{self.field_products!r}")
        if not _is_number(self.embedding_accumulator) or self.embedding_accumulator < 0:
            raise ValueError(f"learner.embedding_accumulator must be a finite number >= 0, got "
                             f"{self.embedding_accumulator!r}")
        if isinstance(self.wide, Mapping):  # built from a plain mapping (the YAML loader builds the dataclass)
            unknown = sorted(set(self.wide) - {f.name for f in fields(WideConfig)}, key=str)
            if unknown:
                raise ValueError(f"learner.wide: unknown keys {unknown}; keys are "
                                 f"{', '.join(f.name for f in fields(WideConfig))}")
            object.__setattr__(self, "wide", WideConfig(**self.wide))
        if not isinstance(self.wide, WideConfig):
            raise ValueError(f"learner.wide must map {', '.join(f.name for f in fields(WideConfig))} to values, got "
                             f"{self.wide!r}")
        stray = sorted(set(self.wide.tasks) - set(self.tasks))
        if stray:
            raise ValueError(f"learner.wide.tasks names task(s) {stray} not in learner.tasks {list(self.tasks)}")
        object.__setattr__(self, "tables", check_tables(self.tables, self.emb_dim))
        for key in ("lr", "embedding_lr"):
            if not _is_number(getattr(self, key)) or getattr(self, key) <= 0:
                raise ValueError(f"learner.{key} must be a finite number > 0, got {getattr(self, key)!r}")
        self._check_per_task("base_rates", lambda r: _is_number(r) and 0 < r < 1, "a rate in (0, 1)")
        self._check_per_task("loss_weights", lambda w: _is_number(w) and w >= 0, "a finite number >= 0")

    def embedded_fields(self) -> list[str]:
        """The fields the model embeds, in the encoder's order: the id fields, then the categorical features
        with a table (the shared hashed table embeds the id fields only)."""
        return list(self.tables) if self.tables else list(ID_FIELDS)

    def _check_per_task(self, name: str, ok, what: str) -> None:
        values = getattr(self, name)
        if not isinstance(values, Mapping):
            raise ValueError(f"learner.{name} must map tasks to values, got {values!r}")
        stray = sorted(set(values) - set(self.tasks), key=str)
        if stray:
            raise ValueError(f"learner.{name} names unknown task(s) {stray}; tasks are {list(self.tasks)}")
        for task, value in values.items():
            if not ok(value):
                raise ValueError(f"learner.{name}.{task} must be {what}, got {value!r}")


def _kafka() -> KafkaConfig:
    from stream.kafka_io import KafkaConfig

    return KafkaConfig()


def _joiner() -> JoinerConfig:
    from stream.joiner import JoinerConfig

    return JoinerConfig()


@dataclass(frozen=True)
class WorkerConfig:
    """What one trainer worker runs with: the sections it reads and where its run keeps its state."""

    kafka: KafkaConfig = field(default_factory=_kafka)
    joiner: JoinerConfig = field(default_factory=_joiner)
    features: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    snapshot_dir: Path = Path(".moestream/snapshots")
    checkpoint_dir: Path = Path(".moestream/checkpoints")
    batch_size: int = 512
    """Joined examples per training step."""
    read_ahead_batches: int = 4
    """How many batches the intake thread may buffer ahead of training (``learner.intake``)."""
    stall_timeout_s: float = 120.0
    """The intake's liveness watchdog (``learner.intake``): a Kafka consumer that fetches nothing this long while
    its partitions have lag, or stays this long outside its group, re-joins the group; a fetch that has not
    returned after this long (or a re-join that did not help within it) fails the worker, which Ray restarts."""
    audit_path: Path | None = None
    """Append ``partition,offset`` of every trained example here (delivery audits; off by default)."""
    device: str = "auto"
    """"auto": CUDA when this process was given a GPU, else CPU."""
    torch_threads: int = 0
    """Intra-op threads for training; 0: every core this process may run on but one, which the source's
    reading thread and the push thread keep busy (with none left to them, torch's threads wait on each other
    behind those threads; docs/learner.md has the measurements). Not Ray's ``OMP_NUM_THREADS``, which is the
    actor's CPU reservation (1)."""
    group: GroupConfig | None = None
    """Data-parallel group this worker belongs to (None: it trains alone)."""
    weight_store: str | None = None
    """The run's weight-store actor (``learner.weight_store.actor_name``) the publisher offers each version to;
    None: the durable store only."""

    @property
    def snapshot_store(self) -> str | Path:
        """The durable store's URI (``learner.publish.store``), else the run's snapshot directory."""
        return self.learner.publish.store or self.snapshot_dir

    def __post_init__(self) -> None:
        at_least("trainer.batch_size", self.batch_size, 1)
        at_least("read_ahead_batches", self.read_ahead_batches, 1)
        at_least("torch_threads", self.torch_threads, 0)
        positive_seconds("trainer.stall_timeout_s", self.stall_timeout_s)


__all__ = ["CadenceConfig", "HealthConfig", "LearnerConfig", "PublishConfig", "PublishGuard", "WideConfig", "WorkerConfig"]
