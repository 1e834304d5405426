"""One learner step on a batch of joined examples: features in, score, learn, push aggregates, publish.

Order matters and is deliberate:

1. read the examples' features from the online store (as they stand *before* these labels are counted),
   once the previous batch's push has landed;
2. fold the examples' labels into the streaming aggregates and start pushing them to Feast on the push
   thread, which runs while the model steps (the next step's read waits for it); with several workers
   each user and item is folded and pushed by the one worker that owns it, from every worker's batch;
3. score the batch with the current weights and update the progressive metrics (unseen data);
4. take one optimizer step on the same forward pass: per-task BCE/MSE over the rows labelled for that task,
   weighted by ``task_weights``, plus the family's aux loss; with several workers the loss is each worker's
   share of the union batch's loss and the gradients are summed (``learner.distributed``); a step whose
   gradient is not finite is dropped (counted in ``skipped_steps``);
5. every ``snapshot_every_steps`` steps or ``snapshot_every_s`` seconds the caller publishes a guarded
   snapshot (``snapshot_due``), once it knows which source offsets the weights cover;
6. every ``health.every_steps`` steps, an expert-health report (``learner.health``) goes to W&B and to
   ``<run>/health/experts.json`` (read by ``moestream experts``), with a utilisation heatmap beside it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Protocol

import orjson

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from features.aggregates import Events, StreamAggregator
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.distributed import LocalReducer, Reducer
from learner.metrics import ProgressiveValidation
from learner.models import ModelOutput, MultiTaskRanker, load_balance_loss, loss_terms
from learner.health import HealthConfig, HealthMonitor, report_metrics
from learner.snapshots import Manifest, PublishGuard, SnapshotError, SnapshotRefused, SnapshotStore, write_atomic
from learner.telemetry import Telemetry, load_plotting, plot_utilisation
from stream.events import TASKS, TYPICAL_POSITIVE_RATES


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class LearnerConfig:
    family: str = "mmoe"
    tasks: tuple[str, ...] = TASKS
    hparams: Mapping[str, object] = field(default_factory=dict)
    """Family hyper-parameters passed to ``learner.models.build`` (n_experts, expert_dims, ...)."""
    n_buckets: int = 2**18
    emb_dim: int = 16
    lr: float = 1e-2
    base_rates: Mapping[str, float] = field(default_factory=lambda: dict(TYPICAL_POSITIVE_RATES))
    """Each binary task's output starts at its base rate (see ``MultiTaskModel.init_output_bias``)."""
    seed: int = 0
    snapshot_every_steps: int = 20
    metric_window: int = 20_000
    task_weights: Mapping[str, float] = field(default_factory=dict)
    """Weight of each task's loss in the total (a task left out weighs 1)."""
    snapshot_every_s: float | None = None
    """Also publish when this many seconds passed since the last attempt (None: steps only)."""
    guard: PublishGuard = field(default_factory=PublishGuard)
    """When a snapshot is refused for a drop in progressive AUC (non-finite weights always are)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    precision: str = "auto"
    """Forward pass under autocast: "bf16" on any device, "fp32" never, "auto" bf16 on CUDA only. On a
    CPU with native bf16 (AVX512-BF16 or AMX) "bf16" trains about twice as fast at large sizes; see
    docs/benchmarks-models.md for its speed and its AUC against fp32."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"learner.precision must be one of {PRECISIONS}, got {self.precision!r}")
        every_s = self.snapshot_every_s
        if every_s is not None and (isinstance(every_s, bool) or not isinstance(every_s, (int, float))
                                    or not np.isfinite(every_s) or every_s < 0):
            raise ValueError(f"learner.snapshot_every_s must be a number of seconds >= 0 or None, got {every_s!r}")
        stray = sorted(set(self.task_weights) - set(self.tasks))
        if stray:
            raise ValueError(f"learner.task_weights names unknown task(s) {stray}; tasks are {list(self.tasks)}")
        for task, w in self.task_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
                raise ValueError(f"learner.task_weights.{task} must be a finite number >= 0, got {w!r}")


def build_optimizer(parameters, lr: float) -> torch.optim.Adam:
    """Adam, fused: one vectorised pass over all parameters instead of a chain of elementwise ops per
    tensor. The hashed embedding table (2**18 x 16 by default) dominates the parameter count, and its
    update took 13 ms a step in torch's default per-tensor Adam against 1.8 ms fused on the 2-core
    development machine. Same arithmetic, on CPU and GPU alike."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def _column(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    """One column as a numpy array of ``dtype`` (nulls in a float column become NaN)."""
    return np.array(table.column(name).to_numpy(), dtype=dtype)  # a writable copy: torch takes it as is


class FeatureReader(Protocol):
    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray: ...
    def push(self, users: pd.DataFrame, items: pd.DataFrame) -> None: ...


class OnlineLearner:
    def __init__(
        self,
        config: LearnerConfig,
        features: FeatureReader,
        snapshots: SnapshotStore,
        telemetry: Telemetry | None = None,
        device: str = "cpu",
        reducer: Reducer | None = None,
    ) -> None:
        torch.manual_seed(config.seed)
        self.reducer: Reducer = reducer or LocalReducer()
        self.config = config
        self.features = features
        self.snapshots = snapshots
        self.telemetry = telemetry
        self.device = torch.device(device)
        self.model = MultiTaskRanker(
            config.family,
            tasks=list(config.tasks),
            id_fields=list(ID_FIELDS),
            n_dense=len(FEATURE_COLUMNS),
            n_buckets=config.n_buckets,
            emb_dim=config.emb_dim,
            **dict(config.hparams),
        ).to(self.device)
        self.model.init_output_bias(config.base_rates)
        self._norm_stats = [b for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._skipped_last = False
        self._pusher = ThreadPoolExecutor(1, thread_name_prefix="moestream-push")
        self._plotter = ThreadPoolExecutor(1, thread_name_prefix="moestream-plot")
        load_plotting()  # at start-up, not while the first steps train
        self._plot: Future | None = None
        """The heatmap being drawn (on the plot thread, so a drawing never holds up a step)."""
        self._ahead: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        """Features read ahead for the next step: (user ids, item ids, dense) (see ``learn``)."""
        self.features_read_ahead = 0
        """Steps whose features were read ahead on the push thread."""
        self._push: Future | None = None
        self.skipped_steps = 0
        """Steps whose (group) gradient was not finite: their update was dropped."""
        self.nonfinite_features = 0
        """Feature values read as NaN or infinite, replaced by 0."""
        self._bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.optimizer = build_optimizer(self.model.parameters(), config.lr)
        self._lb_experts = self._probe_lb_experts()
        self.metrics = ProgressiveValidation(config.tasks, window=config.metric_window)
        self.aggregator = StreamAggregator()
        self.step = 0
        self.examples = 0
        self.event_time_hwm_ms = 0
        self.published: list[int] = []
        self.refused: dict[str, int] = {}
        """Refused publishes by reason (``non-finite``, ``auc-drop``)."""
        self._last_publish_attempt = time.monotonic()
        self.last_losses: dict[str, float] = {}
        self.summary: dict[str, dict[str, float]] = {}
        """The progressive metrics as of the last :meth:`refresh_summary`."""
        latest = snapshots.latest_manifest()
        self.health = HealthMonitor(
            config.health, config.tasks, self.model.model, latest.data.get("experts") if latest else None
        )
        self.health_dir = snapshots.directory.parent / "health"

    def learn(self, examples: pa.Table, upcoming: pa.Table | None = None) -> dict[str, float]:
        """One step on ``examples``; with none (a worker whose partitions are idle), a zero-weight step.

        ``upcoming``: the examples the next step will most likely get. Their features are then read on the
        push thread once this step's aggregates have landed (the read they would get at the start of the
        next step, but while this one's model step runs); the next step uses them only if it gets exactly
        those examples, and reads its own otherwise."""
        self.wait_for_push()  # the previous batch's aggregates are in the store before this batch reads it
        ahead, self._ahead = self._ahead, None  # a read ahead is for the very next step only, used or not
        examples = examples.combine_chunks()  # a batch spans many fetches: one chunk makes every column read cheap
        if examples.num_rows == 0:
            self._aggregate(examples, None)  # other workers' examples may touch entities this worker owns
            self._optimize(None, {})
            self.step += 1
            return {"loss": 0.0}
        user_ids = _column(examples, "user_id", np.int64)
        item_ids = _column(examples, "item_id", np.int64)
        dense = self._features_of(user_ids, item_ids, ahead)  # (B, F)
        # This batch's labels go into the aggregates now, and the push runs while the model steps: the
        # batch has read its features already, so nothing it sees can include its own labels.
        self._aggregate(examples, upcoming)
        ids = {
            "user_id": torch.from_numpy(user_ids).to(self.device),
            "item_id": torch.from_numpy(item_ids).to(self.device),
        }
        x_dense = torch.from_numpy(dense).to(self.device)
        labels = {  # a missing label (null) becomes NaN and is masked out of its task's loss
            t: torch.from_numpy(_column(examples, t, np.float32)).to(self.device) for t in self.config.tasks
        }

        self.model.train()
        norm_stats = [b.clone() for b in self._norm_stats]  # put back if this step turns out poisoned
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            output = self.model(ids, x_dense)
        self.health.observe(output)
        with torch.no_grad():  # progressive validation: these weights have not seen this batch yet
            probs = {t: torch.sigmoid(output.logits[t]).float().cpu().numpy() for t in self.config.tasks}
        self.metrics.update(probs, {t: labels[t].cpu().numpy() for t in self.config.tasks}, user_ids)

        total, per_task = self._optimize(output, labels)
        if self._skipped_last:
            for buffer, saved in zip(self._norm_stats, norm_stats):
                buffer.copy_(saved)


        self.step += 1
        self.examples += examples.num_rows
        self.event_time_hwm_ms = max(self.event_time_hwm_ms, int(pc.max(examples["ts_ms"]).as_py()))
        self.last_losses = {t: v.item() for t, v in per_task.items()}
        self._log(output, total)
        return {"loss": total.item(), **{f"loss/{t}": v for t, v in self.last_losses.items()}}

    def _optimize(
        self, output: ModelOutput | None, labels: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backward and one optimizer step on this worker's share of the global loss (see
        ``learner.distributed``); ``output`` None is a zero-weight step. Returns the share and the
        local per-task losses."""
        tasks = self.config.tasks
        weights = torch.tensor([float(self.config.task_weights.get(t, 1.0)) for t in tasks], device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if output is None:
            counts = torch.zeros(len(tasks) + 1, device=self.device)  # (T + 1,): labelled rows per task, rows
            lb_stats = None
            if self._lb_experts is not None:
                zeros = torch.zeros(self._lb_experts, device=self.device)
                lb_stats = (zeros, zeros.clone(), torch.zeros((), device=self.device))
            self.reducer.reduce_batch(counts, lb_stats)
            total, per_task = torch.zeros((), device=self.device), {}
        else:
            mask = {t: ~torch.isnan(labels[t]) for t in tasks}
            rows = float(next(iter(labels.values())).shape[0])
            counts = torch.stack([*(mask[t].sum().float() for t in tasks), torch.tensor(rows, device=self.device)])
            lb_local = None if output.lb_stats is None else tuple(s.float() for s in output.lb_stats)
            counts_all, lb_all = self.reducer.reduce_batch(counts, lb_local)
            logits = {t: v.float() for t, v in output.logits.items()}
            _, per_task = loss_terms(ModelOutput(logits, output.aux_loss, {}, output.expert_zero_frac, output.task_types),
                                     labels, mask)
            share = counts[:-1] / counts_all[:-1].clamp_min(1.0)  # (T,): this worker's part of each task's mean
            total = (weights * share * torch.stack([per_task[t] for t in tasks])).sum()
            if lb_all is not None:  # the regulariser on the union's statistics
                total = total + self.model.model.lb_coef * load_balance_loss(*lb_all, self._lb_experts)
            else:
                total = total + output.aux_loss.float() * (counts[-1] / counts_all[-1].clamp_min(1.0))
            total.backward()
        self.reducer.reduce_grads(self.model.parameters())
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # The gradients are the group's sum, the same on every worker, so all of them skip alike.
        self._skipped_last = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if self._skipped_last:
            # An exploding or poisoned step: its update would make every weight non-finite for good
            # (and no snapshot could be published again). Drop it; the weights stay as they were.
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            print(f"moestream: step {self.step}: non-finite gradient, update skipped "
                  f"({self.skipped_steps} so far)", flush=True)
        else:
            self.optimizer.step()
        self.reducer.average_buffers(self.model)
        return total, per_task

    def _features_of(self, user_ids: np.ndarray, item_ids: np.ndarray,
                     ahead: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
        """The dense features of these pairs: ``ahead`` (read on the push thread, see ``learn``) if that read
        was for exactly these pairs, else read now."""
        if ahead is not None and np.array_equal(ahead[0], user_ids) and np.array_equal(ahead[1], item_ids):
            self.features_read_ahead += 1
            return self._finite(ahead[2])
        return self._finite(self.features.lookup(user_ids, item_ids))

    def _aggregate(self, examples: pa.Table, upcoming: pa.Table | None) -> None:
        """Fold the step's labels into the streaming aggregates and start pushing the new rows.

        Each user and item belongs to one worker (``id mod N``): it folds that entity's events from every
        worker's batch and is the only one to push its rows, so the store holds aggregates over everything
        the group trained on, and no worker overwrites them with the partial counts of its own partitions.
        The gather runs here, on the training thread, so every worker's collectives run in one order; the
        fold and push run on the push thread. With one worker this is ``aggregator.update(examples)``."""
        events = Events.of(examples)
        reducer = self.reducer
        if reducer.world_size > 1:
            events = Events.from_matrix(reducer.gather_rows(events.to_matrix()))
            users = events.where(events.user_id % reducer.world_size == reducer.rank)
            items = events.where(events.item_id % reducer.world_size == reducer.rank)
        else:
            users = items = events
        if len(users) or len(items):  # folded and pushed on the push thread, while the model steps
            self._push = self._pusher.submit(self._fold_and_push, users, items, upcoming)

    def _fold_and_push(self, users: Events, items: Events, upcoming: pa.Table | None) -> None:
        user_rows, item_rows = self.aggregator.fold(users, items)
        self.features.push(user_rows, item_rows)
        if upcoming is not None and upcoming.num_rows:  # the next step's read, after this push as it must be
            user_ids = _column(upcoming, "user_id", np.int64)
            item_ids = _column(upcoming, "item_id", np.int64)
            self._ahead = (user_ids, item_ids, self.features.lookup(user_ids, item_ids))

    def wait_for_push(self) -> None:
        """Until the last batch's aggregates are in the feature store (raises what the push raised)."""
        push, self._push = self._push, None
        if push is not None:
            push.result()

    def close(self) -> None:
        self.wait_for_push()
        self._pusher.shutdown()
        if self._plot is not None:
            wait([self._plot])
            self._log_heatmap()
        self._plotter.shutdown()

    def _log_heatmap(self) -> None:
        """Log a heatmap drawn since the last report to W&B (from this thread, at the current step)."""
        plot = self._plot
        if plot is None or not plot.done():
            return
        self._plot = None
        try:
            png = plot.result()
        except Exception as exc:  # a figure that failed to draw costs the figure, not the training
            print(f"moestream: the utilisation heatmap failed to draw: {type(exc).__name__}: {exc}", flush=True)
            return
        if self.telemetry is not None:
            self.telemetry.log_image("health/utilisation", png, step=self.step)

    def refresh_summary(self) -> dict[str, dict[str, float]]:
        """Recompute the progressive metrics (a few sorts over the sliding window per task: tens of ms)
        and keep them in :attr:`summary`. Called on the training thread at the health cadence, at each
        publish and at the end of a run; other threads read :attr:`summary` and never compute it (the
        metrics' windows are only consistent between steps)."""
        self.summary = self.metrics.summary()
        return self.summary

    def _finite(self, dense: np.ndarray) -> np.ndarray:
        """Features as read, with any non-finite value (a poisoned source) replaced by 0 and counted."""
        bad = ~np.isfinite(dense)
        if not bad.any():
            return dense
        self.nonfinite_features += int(bad.sum())
        return np.where(bad, np.float32(0), dense).astype(np.float32, copy=False)

    def _probe_lb_experts(self) -> int | None:
        """Experts in the family's load-balancing statistics (None: it has none), from a one-row forward, so
        that a worker with no data can still contribute statistics of the right shape."""
        ids = {f: torch.zeros(1, dtype=torch.int64, device=self.device) for f in ID_FIELDS}
        was_training = self.model.training
        self.model.eval()  # BatchNorm (HoME) neither needs more than one row nor updates its statistics
        try:
            with torch.no_grad():
                stats = self.model(ids, torch.zeros(1, len(FEATURE_COLUMNS), device=self.device)).lb_stats
        finally:
            self.model.train(was_training)
        return None if stats is None else int(stats[0].numel())

    def state(self) -> tuple[dict[str, torch.Tensor], dict, dict[str, np.ndarray], dict]:
        """Model, optimizer, numpy state and counters: what a checkpoint must hold to resume exactly."""
        self.wait_for_push()  # a push that failed fails the checkpoint too
        arrays = {**{f"agg.{k}": v for k, v in self.aggregator.state().items()}, **self.metrics.state()}
        counters = {
            "step": self.step,
            "examples": self.examples,
            "event_time_hwm_ms": self.event_time_hwm_ms,
            "published": self.published,
            "skipped_steps": self.skipped_steps,
            "nonfinite_features": self.nonfinite_features,
        }
        return self.model.state_dict(), self.optimizer.state_dict(), arrays, counters

    def restore(self, model: dict[str, torch.Tensor], optimizer: dict, arrays: dict[str, np.ndarray], counters: dict) -> None:
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)
        self.aggregator.load_state({k[4:]: v for k, v in arrays.items() if k.startswith("agg.")})
        self.metrics.load_state(arrays)
        self.step, self.examples = counters["step"], counters["examples"]
        self.event_time_hwm_ms = counters["event_time_hwm_ms"]
        self.published = list(counters["published"])
        self.skipped_steps = counters.get("skipped_steps", 0)  # absent from checkpoints of older versions
        self.nonfinite_features = counters.get("nonfinite_features", 0)

    @property
    def snapshot_due(self) -> bool:
        if self.step == 0:
            return False
        every_s = self.config.snapshot_every_s
        late = every_s is not None and time.monotonic() - self._last_publish_attempt >= every_s
        return late or self.step % self.config.snapshot_every_steps == 0

    def publish(self, offsets: dict[int, int]) -> Manifest | None:
        """Publish the current weights unless the guard refuses (non-finite weights, or the recent progressive
        AUC fell more than ``guard.max_auc_drop`` below the last published): a refusal is counted and logged
        with its reason, not fatal."""
        self._last_publish_attempt = time.monotonic()
        try:
            manifest = self.snapshots.publish(
                self.model.state_dict(),
                {
                    "family": self.config.family,
                    "model_config": self.model.config,
                    "step": self.step,
                    "examples": self.examples,
                    "offsets": {str(p): o for p, o in offsets.items()},
                    "event_time_hwm_ms": self.event_time_hwm_ms,
                    "metrics": self.refresh_summary(),
                    "experts": self.health.record(),
                    "learner_config": {
                        **asdict(self.config),
                        "hparams": dict(self.config.hparams),
                        "base_rates": dict(self.config.base_rates),
                    },
                },
                guard=self.config.guard,
            )
        except SnapshotError as exc:
            reason = exc.reason if isinstance(exc, SnapshotRefused) else "error"
            self.refused[reason] = self.refused.get(reason, 0) + 1
            if self.telemetry:
                self.telemetry.log({f"snapshot/refused/{reason}": float(self.refused[reason])}, step=self.step)
                self.telemetry.summarise({"snapshot/last_refusal": f"step {self.step}: {exc}"})
            print(f"moestream: snapshot refused at step {self.step} ({reason}): {exc}")
            return None
        self.published.append(manifest.version)
        self.health.published(manifest.data.get("experts"))
        if self.telemetry:
            self.telemetry.log({"snapshot/version": float(manifest.version)}, step=self.step)
        return manifest

    def _log(self, output, total: torch.Tensor) -> None:
        record = {"loss/total": total.item(), **{f"loss/{t}": v for t, v in self.last_losses.items()}}
        if self.health.due(self.step):  # progressive metrics and expert health share one cadence
            for task, m in self.refresh_summary().items():
                record.update({f"progressive/{task}/{k}": v for k, v in m.items() if np.isfinite(v)})
            if self.reducer.rank == 0:  # one writer of <run>/health (each rank sees only its own gates)
                record.update(self._health_report())
        if self.telemetry is not None:
            self.telemetry.log(record, step=self.step)

    def _health_report(self) -> dict[str, float]:
        """Expert health (``learner.health``): JSON for ``moestream experts``, W&B metrics and alerts, heatmap."""
        now = time.time()
        report = self.health.report(self.step, self.metrics.positive_rates(), now)
        if report is None:
            return {}
        latest = self.snapshots.latest_manifest()
        report["snapshot"] = {
            "version": latest.version if latest else None,
            "staleness_s": now - latest.created_at if latest else None,
            "staleness_steps": self.step - latest.data.get("step", 0) if latest else None,
            "refused": dict(self.refused),
        }
        report["family"] = self.config.family
        self.health_dir.mkdir(parents=True, exist_ok=True)
        self._log_heatmap()
        heatmap = self.health_dir / "utilisation.png"
        if (self.health.reports - 1) % self.config.health.heatmap_every_reports == 0 and self._plot is None:
            steps = [s for s, _ in self.health.history]  # the first report, then every N (one drawing at a time)
            shares = np.stack([share for _, share in self.health.history])  # (R, T, E), a copy
            self._plot = self._plotter.submit(plot_utilisation, steps, shares, report["tasks"], report["experts"],
                                              heatmap)
        report["heatmap"] = str(heatmap) if heatmap.exists() else None  # the latest one drawn, if any yet
        write_atomic(self.health_dir / "experts.json", orjson.dumps(report, option=orjson.OPT_INDENT_2))
        record = report_metrics(report)
        if latest:
            record.update({"snapshot/version": float(latest.version), "snapshot/staleness_s": now - latest.created_at})
        if self.telemetry is not None:
            for a in report["alerts"]:
                self.telemetry.alert(f"expert {a['kind']}", f"step {self.step}: {a['subject']}: {a['detail']}")
            self.telemetry.summarise({"health/anomalies": [f"{a['kind']}: {a['subject']}: {a['detail']}"
                                                           for a in report["anomalies"]]})
        return record
