"""``bench quality``'s training runs: a family trained on a seed's log by the production loop, every score kept.

A run is ``moestream replay LOG --direct`` in this process: the composition of ``learner.replay_source.train_replay``
(``ReplaySource`` -> ``ReplayIntake``, the label joiner, on its read-ahead thread -> ``learner.worker.compose``:
the feature loop over a Feast store of the run's own, the step, the reporter publishing snapshots), with the
configuration of ``moestream.yaml`` (``--config``'s default) and the family and seed of the run. The one addition is
a :class:`ScoreTap` in place of the learner's ``learn``: it gets what the loop hands the step (the batch, its
features as read before the batch's labels were folded in, its categorical codes), lets the real ``learn`` run,
and keeps the logits of its forward pass, which come before the update (progressive validation). It wraps
``learn`` rather than the loop's ``step`` because only ``learn`` sees the batch's features, which the older
versions below must be scored with.

Older versions of the same model (issue #21, item 2), scored on the same batch with the same features before
the update, and never trained:

- **frozen**: the weights as they were once a quarter of the stream was trained, scoring everything after;
- **lagged**: for each staleness ``L``, the newest version whose training had reached event time ``t - L`` by
  the time of the batch's earliest impression ``t``. Versions are taken after an update every ``L / 10`` of
  event time (:data:`GRID_DIVISOR`; every step for ``L`` <= 10 s, whose grid is finer than a batch), so a
  version scoring an event is between ``L`` and about ``1.1 L`` plus one batch old; the ages are recorded.

A version is what serving would load from a snapshot taken then: ``MultiTaskRanker.from_config`` with the
learner's ``weights()`` (the ID maps published with them, so an ID admitted later reads the default row), and
it scores in the mode the learner scores in (training mode, without gradients: batch statistics for HoME's
BatchNorm), so that a lagged version differs from the live model by its weights' age only. Taking versions
changes nothing in training (their construction runs on a forked torch generator).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks.quality_stream import QualityStream
from infra.config import load_config
from learner.config import WorkerConfig
from learner.models import MultiTaskRanker
from learner.replay_source import train_replay
from learner.step import Learner, StepResult, column
from stream.events import TASKS
from stream.replay import ReplayConfig

CONFIG_FILE = Path(__file__).resolve().parent.parent / "moestream.yaml"
GRID_DIVISOR = 10
"""A lagged version is taken every ``lag / GRID_DIVISOR`` of event time (at most once per step)."""


def worker_config(root: Path, family: str, seed: int, config_file: Path = CONFIG_FILE) -> WorkerConfig:
    """``moestream.yaml`` (and the ``MOESTREAM_*`` environment, as every command reads it) with this run's family
    and seed, its state under ``root`` and W&B off. A family other than the file's gets its default hparams (the
    file's are for its own family)."""
    configured = load_config(config_file).learner
    overrides = {"paths.data_root": str(root), "paths.run": "quality", "telemetry.mode": "disabled",
                 "learner.family": family, "learner.seed": seed}
    if family != configured.family:
        overrides["learner.hparams"] = {}
    return load_config(config_file, overrides=overrides).worker_config()


@dataclass(frozen=True)
class Version:
    """A copy of the model as a snapshot taken at ``stamp_ms`` (its training's event-time high-water mark)."""

    stamp_ms: int
    model: MultiTaskRanker


def take_version(learner: Learner) -> Version:
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the trainer's generator alone
        model = MultiTaskRanker.from_config(learner.model.config)
    model.load_state_dict(learner.weights())
    model.to(learner.device).requires_grad_(False)
    return Version(learner.event_time_hwm_ms, model)


class LaggedVersions:
    """Versions kept on an event-time grid per staleness, each dropped once a newer one is old enough."""

    def __init__(self, lags_ms: tuple[int, ...]) -> None:
        self.lags_ms = lags_ms
        self._kept: dict[int, deque[Version]] = {lag: deque() for lag in lags_ms}
        self._last: dict[int, int | None] = {lag: None for lag in lags_ms}

    def keep(self, stamp_ms: int, take: Callable[[], Version]) -> None:
        """After an update that brought training to ``stamp_ms``: take one version if any lag's grid is due."""
        due = [lag for lag in self.lags_ms
               if self._last[lag] is None or stamp_ms - self._last[lag] >= lag // GRID_DIVISOR]
        if not due:
            return
        version = take()
        for lag in due:
            self._kept[lag].append(version)
            self._last[lag] = stamp_ms

    def version(self, lag_ms: int, t_ms: int) -> Version | None:
        """The newest version whose training ended at or before ``t_ms - lag_ms``; None if there is none yet."""
        kept, limit = self._kept[lag_ms], t_ms - lag_ms
        while len(kept) >= 2 and kept[1].stamp_ms <= limit:
            kept.popleft()
        return kept[0] if kept and kept[0].stamp_ms <= limit else None

    def held(self) -> int:
        return len({id(v) for kept in self._kept.values() for v in kept})


@dataclass
class FamilyRun:
    """One family's run on one seed: scores (logits) per example and task, in the stream's example order."""

    family: str
    seed: int
    scores: np.ndarray  # (N, T): the learner's progressive scores
    frozen: np.ndarray | None = None  # (N, T): the frozen version's, NaN before the freeze
    lagged: dict[int, np.ndarray] = field(default_factory=dict)  # lag ms -> (N, T), NaN where no version was that old
    ages_ms: dict[int, np.ndarray] = field(default_factory=dict)  # lag ms -> (N,) the scoring version's age
    freeze_at: int | None = None
    """Examples trained when the frozen version was taken."""
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


class ScoreTap:
    """Stands in for ``Learner.learn``: scores the older versions on the batch, runs ``learn``, keeps its scores."""

    def __init__(self, learner: Learner, stream: QualityStream, run: FamilyRun, lags_ms: tuple[int, ...] = (),
                 on_examples: Callable[[int], None] | None = None) -> None:
        if tuple(learner.config.tasks) != TASKS:
            raise ValueError(f"bench quality scores every task {TASKS}; the learner trains {learner.config.tasks}")
        self.learner, self.stream, self.run = learner, stream, run
        self._learn = learner.learn
        self._scored = np.zeros(len(stream), bool)
        self._trained = 0
        self.versions = LaggedVersions(lags_ms)
        self.frozen: Version | None = None
        self.on_examples = on_examples
        device, precision = learner.device, learner.config.precision
        self._autocast = dict(device_type=device.type, dtype=torch.bfloat16,
                              enabled=precision == "bf16" or (precision == "auto" and device.type == "cuda"))

    def learn(self, examples: pa.Table, dense: np.ndarray, codes: Mapping[str, np.ndarray] | None = None
              ) -> StepResult:
        if examples.num_rows == 0:
            return self._learn(examples, dense, codes)
        rows = self.stream.positions(examples["request_id"].to_numpy(),
                                     column(examples, "item_id", np.int64))
        if (rows < 0).any() or self._scored[rows].any():
            raise RuntimeError("the trainer got an example that is not one of the stream's, or one twice")
        self._scored[rows] = True
        self._trained += len(rows)
        ts = column(examples, "ts_ms", np.int64)
        if self.frozen is not None or self.versions.lags_ms:
            self._score_versions(rows, ts, self._inputs(examples, dense, codes))
        result = self._learn(examples, dense, codes)
        self.run.scores[rows] = self._logits(result.output.logits)
        if self.run.freeze_at is not None and self.frozen is None and self._trained >= self.run.freeze_at:
            self.frozen = take_version(self.learner)
            self.run.freeze_at = self._trained
        self.versions.keep(self.learner.event_time_hwm_ms, lambda: take_version(self.learner))
        if self.on_examples is not None:
            self.on_examples(len(rows))
        return result

    def unscored(self) -> int:
        return len(self._scored) - self._trained

    def _inputs(self, examples: pa.Table, dense: np.ndarray, codes: Mapping[str, np.ndarray] | None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """What serving hands a version: raw ids (and categorical codes), the features."""
        device = self.learner.device
        raw = {name: column(examples, name, np.int64) for name in ("user_id", "item_id")}
        raw |= {name: np.asarray(codes[name], np.int64) for name in self.learner.code_fields} if codes else {}
        return ({name: torch.from_numpy(values).to(device) for name, values in raw.items()},
                torch.from_numpy(dense).to(device))

    def _score_versions(self, rows: np.ndarray, ts: np.ndarray, inputs: tuple[dict[str, torch.Tensor], torch.Tensor]
                        ) -> None:
        if self.frozen is not None:
            self.run.frozen[rows] = self._version_logits(self.frozen, inputs)
        earliest = int(ts.min())
        for lag in self.versions.lags_ms:
            version = self.versions.version(lag, earliest)
            if version is not None:
                self.run.lagged[lag][rows] = self._version_logits(version, inputs)
                self.run.ages_ms[lag][rows] = ts - version.stamp_ms

    def _version_logits(self, version: Version, inputs: tuple[dict[str, torch.Tensor], torch.Tensor]) -> np.ndarray:
        ids, dense = inputs
        version.model.train()  # as the learner scores: batch statistics, no gradients (nothing recorded)
        with torch.no_grad(), torch.autocast(**self._autocast):
            return self._logits(version.model(ids, dense).logits)

    @staticmethod
    def _logits(logits: Mapping[str, torch.Tensor]) -> np.ndarray:
        return torch.stack([logits[t].detach().float() for t in TASKS], dim=1).cpu().numpy()  # (B, T)


def train_family(stream: QualityStream, family: str, seed: int, root: Path, freeze_at: int | None = None,
                 lags_ms: tuple[int, ...] = (), on_examples: Callable[[int], None] | None = None,
                 config_file: Path = CONFIG_FILE, attach: Callable[[Any], None] | None = None) -> FamilyRun:
    """Train ``family`` on ``stream``'s log with the learner seeded ``seed``, its state under ``root`` (which must
    be fresh: a feature store that had seen this stream would leak its future); ``freeze_at`` examples: also keep
    a frozen version from there on; ``lags_ms``: also score each batch with the versions that old; ``attach``:
    called with the training loop once it is built, after the score tap (another benchmark's probe)."""
    config = worker_config(root, family, seed, config_file)
    n = len(stream)
    run = FamilyRun(family, seed, np.full((n, len(TASKS)), np.nan, np.float32),
                    frozen=np.full((n, len(TASKS)), np.nan, np.float32) if freeze_at is not None else None,
                    lagged={lag: np.full((n, len(TASKS)), np.nan, np.float32) for lag in lags_ms},
                    ages_ms={lag: np.full(n, np.nan) for lag in lags_ms}, freeze_at=freeze_at)
    started = time.perf_counter()
    taps: list[ScoreTap] = []

    def prepare(loop) -> None:
        taps.append(ScoreTap(loop.learner, stream, run, lags_ms, on_examples))
        loop.learner.learn = taps[0].learn  # the loop calls the instance's learn: the tap's, which calls the real one
        if attach is not None:
            attach(loop)

    _, stats = train_replay(config, ReplayConfig(path=stream.log, progress=False), prepare=prepare)
    tap = taps[0]
    if tap.unscored():
        raise RuntimeError(f"{family} on seed {stream.seed}: {tap.unscored()} of {n} examples were never trained")
    run.seconds = time.perf_counter() - started
    run.stats = {k: v for k, v in stats.items() if k in ("steps", "examples_trained", "skipped_steps",
                                                                "nonfinite_features", "snapshots")}
    run.stats["snapshots"] = len(run.stats.get("snapshots", []))
    return run


__all__ = ["CONFIG_FILE", "FamilyRun", "LaggedVersions", "ScoreTap", "Version", "take_version", "train_family",
           "worker_config"]
