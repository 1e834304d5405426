"""One learner step on a batch of joined examples: features in, score, learn, push aggregates, publish.

Order matters and is deliberate:

1. read the examples' features from the online store (as they stand *before* these labels are counted);
2. score the batch with the current weights and update the progressive metrics (unseen data);
3. take one optimizer step on the same forward pass;
4. fold the examples' labels into the streaming aggregates and push them to Feast;
5. every ``snapshot_every_steps`` steps the caller publishes a guarded snapshot (``snapshot_due``), once it
   knows which source offsets the weights cover.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from features.aggregates import StreamAggregator
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.metrics import ProgressiveValidation
from learner.models import MultiTaskRanker, loss_terms
from learner.snapshots import Manifest, SnapshotError, SnapshotStore
from learner.telemetry import Telemetry
from stream.events import TASKS, TYPICAL_POSITIVE_RATES


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
    ) -> None:
        torch.manual_seed(config.seed)
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
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.metrics = ProgressiveValidation(config.tasks, window=config.metric_window)
        self.aggregator = StreamAggregator()
        self.step = 0
        self.examples = 0
        self.event_time_hwm_ms = 0
        self.published: list[int] = []
        self.last_losses: dict[str, float] = {}

    def learn(self, examples: pa.Table) -> dict[str, float]:
        cols = examples.to_pydict()
        user_ids = np.asarray(cols["user_id"], dtype=np.int64)
        item_ids = np.asarray(cols["item_id"], dtype=np.int64)
        dense = self.features.lookup(user_ids, item_ids)  # (B, F)
        ids = {
            "user_id": torch.from_numpy(user_ids).to(self.device),
            "item_id": torch.from_numpy(item_ids).to(self.device),
        }
        x_dense = torch.from_numpy(dense).to(self.device)
        labels = {t: torch.as_tensor(np.asarray(cols[t], dtype=np.float32), device=self.device) for t in self.config.tasks}

        self.model.train()
        output = self.model(ids, x_dense)
        with torch.no_grad():  # progressive validation: these weights have not seen this batch yet
            probs = {t: torch.sigmoid(output.logits[t]).float().cpu().numpy() for t in self.config.tasks}
        self.metrics.update(probs, {t: labels[t].cpu().numpy() for t in self.config.tasks})

        total, per_task = loss_terms(output, labels, None)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

        users, items = self.aggregator.update(examples)
        self.features.push(users, items)

        self.step += 1
        self.examples += examples.num_rows
        self.event_time_hwm_ms = max(self.event_time_hwm_ms, int(max(cols["ts_ms"])))
        self.last_losses = {t: v.item() for t, v in per_task.items()}
        self._log(output, total)
        return {"loss": total.item(), **{f"loss/{t}": v for t, v in self.last_losses.items()}}

    def state(self) -> tuple[dict[str, torch.Tensor], dict, dict[str, np.ndarray], dict]:
        """Model, optimizer, numpy state and counters: what a checkpoint must hold to resume exactly."""
        arrays = {**{f"agg.{k}": v for k, v in self.aggregator.state().items()}, **self.metrics.state()}
        counters = {
            "step": self.step,
            "examples": self.examples,
            "event_time_hwm_ms": self.event_time_hwm_ms,
            "published": self.published,
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

    @property
    def snapshot_due(self) -> bool:
        return self.step > 0 and self.step % self.config.snapshot_every_steps == 0

    def publish(self, offsets: dict[int, int]) -> Manifest | None:
        """Publish the current weights if they are finite; a refused snapshot is logged, not fatal."""
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
                    "metrics": self.metrics.summary(),
                    "learner_config": {
                        **asdict(self.config),
                        "hparams": dict(self.config.hparams),
                        "base_rates": dict(self.config.base_rates),
                    },
                },
            )
        except SnapshotError as exc:
            if self.telemetry:
                self.telemetry.log({"snapshot/refused": 1.0}, step=self.step)
            print(f"moestream: snapshot refused at step {self.step}: {exc}")
            return None
        self.published.append(manifest.version)
        if self.telemetry:
            self.telemetry.log({"snapshot/version": float(manifest.version)}, step=self.step)
        return manifest

    def _log(self, output, total: torch.Tensor) -> None:
        if self.telemetry is None:
            return
        record = {"loss/total": total.item(), **{f"loss/{t}": v for t, v in self.last_losses.items()}}
        for task, gate in output.gates.items():
            mean = gate.detach().float().mean(dim=0).cpu().numpy()  # (E,)
            record.update({f"gate/{task}/expert_{e}": float(w) for e, w in enumerate(mean)})
        if self.step % 10 == 0:
            for task, m in self.metrics.summary().items():
                record.update({f"progressive/{task}/{k}": v for k, v in m.items() if np.isfinite(v)})
        self.telemetry.log(record, step=self.step)
