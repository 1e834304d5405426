"""The predict-then-learn step: model, optimizer, loss and progressive metrics, and nothing else.

One call of :meth:`Learner.learn` is the block diagram of online learning on one batch of joined examples
whose features were read before their labels were counted (``learner.feature_loop``):

1. score the batch with the current weights (one forward pass, in training mode);
2. update the progressive metrics with those scores: the weights have not seen these labels yet;
3. one optimizer step on the same forward pass: per-task BCE/MSE over the rows labelled for that task,
   weighted by ``loss_weights``, plus the family's regulariser. With several workers the loss is each
   worker's share of the union batch's loss and the gradients are summed (``learner.distributed``); the
   load-balancing regulariser of a sparse family is computed once on the union's statistics. A step whose
   summed gradient is not finite is dropped on every worker alike (``skipped_steps``), BatchNorm statistics
   included, so a poisoned batch never reaches the weights.

What the step needs of a family comes from the model contract (``lb_experts``, ``lb_coef``), never from
probing the model. Jobs beside the step (features, publishing, health) are other objects' (``learner.loop``).

Publishing reads the model two ways: :meth:`Learner.weights`, the whole state (a base), and :meth:`Learner.delta`,
the change since the publisher's last :meth:`Learner.mark_published` (``learner.delta``), tracked as it happens
(the tables' changed rows, the ID maps' journals) so that it costs what changed. The invariant: ``materialise``
of the last marked version and ``delta()`` is ``weights()``, entry for entry. A mark is the publisher's word that
the version read just before it is durable; nothing may learn in between.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import torch

from learner.beside import Captured
from learner.collisions import IdCollisions, id_collisions
from learner.config import LearnerConfig
from learner.delta import Delta, DeltaError, MapChanges, TableRows, field_maps, row_tables, rows_key, split_state
from learner.distributed import LocalReducer, Reducer
from learner.idmap import IdMap, IdMapConfig, sort_snapshot
from learner.metrics import ProgressiveValidation
from learner.models import ModelOutput, MultiTaskModel, MultiTaskRanker, load_balance_loss, loss_terms
from learner.snapshots import Streamed


def build_optimizer(parameters, lr: float) -> torch.optim.Adam:
    """Adam for the dense network, fused: one vectorised pass over all parameters instead of a chain of
    elementwise ops per tensor (docs/benchmarks-learner.md has the measurement). Same arithmetic on CPU and
    GPU. The embedding table is not among the parameters: it trains itself, row-wise (learner.models.sparse)."""
    return torch.optim.Adam(parameters, lr=lr, fused=True)


def column(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    """One column as a writable numpy array of ``dtype`` (nulls in a float column become NaN)."""
    return np.array(table.column(name).to_numpy(), dtype=dtype)


@dataclass(frozen=True)
class StepResult:
    """What one step did: the loss this worker contributed, its per-task losses, and the forward pass
    (the reporter's health monitor reads the gates); ``output`` None for a zero-weight step."""

    loss: float
    task_losses: dict[str, float]
    output: ModelOutput | None
    skipped: bool = False


class ModelMismatch(ValueError):
    """A checkpoint was written by another model than the one the configuration builds now."""


def check_restorable(model: MultiTaskRanker, state: Mapping[str, torch.Tensor], saved: dict | None) -> None:
    """Raise :class:`ModelMismatch`, naming what differs, when ``state`` (with ``saved``, its model's config) was not
    written by a model of ``model``'s configuration: the configuration changed since (an edited key, or a default
    that changed, as ``learner.wide`` did), and torch's own error would list tensor names instead."""
    advice = ("restore the configuration the run was trained with, or train a new run (paths.run, --run)")
    if saved is not None:
        current = orjson.loads(orjson.dumps(model.config))  # as the checkpoint's JSON holds it: lists, string keys
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            described = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in changed)
            raise ModelMismatch(f"the checkpoint was written by another model ({described}): {advice}")
        return
    mine, theirs = set(model.state_dict()), set(state)
    missing = sorted({k.split(".")[0] for k in mine - theirs})
    unexpected = sorted({k.split(".")[0] for k in theirs - mine})
    if missing or unexpected:
        parts = ([f"this model has {', '.join(missing)}, the checkpoint not"] if missing else []) + (
            [f"the checkpoint has {', '.join(unexpected)}, this model not"] if unexpected else [])
        hint = " (learner.wide: on by default since 2026-12-06)" if "wide" in missing + unexpected else ""
        raise ModelMismatch(f"the checkpoint was written by another model: {'; '.join(parts)}{hint}: {advice}")


def build_model(config: LearnerConfig, fields: list[str], n_dense: int) -> MultiTaskRanker:
    """The model ``config`` trains (family, tables, wide part, every hparam), its output biases at the base rates:
    the one place that reads a :class:`LearnerConfig` into a :class:`MultiTaskRanker`, so that the trainer, the disk
    estimate and the benchmarks size and serve the same model. ``fields``: the embedded fields, id fields first."""
    model = MultiTaskRanker(
        config.family, tasks=list(config.tasks), id_fields=list(fields), n_dense=n_dense,
        n_buckets=config.n_buckets, emb_dim=config.emb_dim, emb_lr=config.embedding_lr,
        emb_accumulator=config.embedding_accumulator, field_products=config.field_products,
        tables={name: {"capacity": t["capacity"], "dim": t["dim"]} for name, t in (config.tables or {}).items()} or None,
        cross_layers=config.cross_layers, cross_rank=config.cross_rank,
        wide=asdict(config.wide) if config.wide.dim else None,
        **dict(config.hparams),
    )
    model.init_output_bias(config.base_rates)
    return model


class Learner:
    def __init__(self, config: LearnerConfig, id_fields: list[str], n_dense: int, device: str = "cpu",
                 reducer: Reducer | None = None) -> None:
        torch.manual_seed(config.seed)
        self.config = config
        self.device = torch.device(device)
        self.reducer: Reducer = reducer or LocalReducer()
        self.id_maps = {name: IdMap(IdMapConfig(**{k: v for k, v in table.items() if k != "dim"}))
                        for name, table in (config.tables or {}).items()}
        """Collisionless ID -> row maps per field (``learner.tables``); none: one hashed table for all fields."""
        self.id_fields = list(id_fields)
        fields = self.id_fields + [name for name in self.id_maps if name not in self.id_fields]  # + categorical
        self.model = build_model(config, fields, n_dense).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), config.lr)
        self.metrics = ProgressiveValidation(config.tasks, window=config.metric_window)
        self._loss_weights = torch.tensor([float(config.loss_weights.get(t, 1.0)) for t in config.tasks],
                                          device=self.device)
        self._norm_stats = [b for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.step = 0
        self.examples = 0
        self.event_time_hwm_ms = 0
        self._id_tables: tuple[int, dict[str, dict[str, int]]] | None = None
        self.skipped_steps = 0
        """Steps whose (group) gradient was not finite: their update was dropped."""
        self.skipped_last = False
        self._marked = False
        """Whether a version was marked published since construction or restore: deltas need a parent."""

    def learn(self, examples: pa.Table, dense: np.ndarray, codes: Mapping[str, np.ndarray] | None = None
              ) -> StepResult:
        """One step on ``examples`` with their features ``dense`` (B, F) and the categorical ``codes`` of the
        fields with a table of their own (name -> (B,) int64, as ``FeatureBatch.ids`` holds them; negative:
        missing); with no rows, a zero-weight step (a worker whose partitions are idle still takes part in the
        group's collectives)."""
        if examples.num_rows == 0:
            if self.id_maps:
                self._map_ids({name: np.zeros(0, np.int64) for name in self.id_maps}, 0)  # the group's gather
            self._optimize(None, {})
            self.step += 1
            return StepResult(0.0, {}, None)
        users = column(examples, "user_id", np.int64)
        raw = {"user_id": users, "item_id": column(examples, "item_id", np.int64)}
        raw |= self._codes(codes, examples.num_rows)
        ids = {name: torch.from_numpy(values).to(self.device) for name, values in raw.items()}
        rows = self._map_ids(raw, int(pc.max(examples["ts_ms"]).as_py())) if self.id_maps else None
        labels = {t: torch.from_numpy(column(examples, t, np.float32)).to(self.device) for t in self.config.tasks}

        self.model.train()
        saved_norms = [b.clone() for b in self._norm_stats]  # put back if this step turns out poisoned
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            output = self.model(ids, torch.from_numpy(dense).to(self.device), rows)  # logits (B,) per task
        self._score(output, labels, users)  # progressive: before the weights see these labels
        total, per_task = self._optimize(output, labels)
        if self.skipped_last:
            for buffer, saved in zip(self._norm_stats, saved_norms):
                buffer.copy_(saved)

        self.step += 1
        self.examples += examples.num_rows
        self.event_time_hwm_ms = max(self.event_time_hwm_ms, int(pc.max(examples["ts_ms"]).as_py()))
        return StepResult(total.item(), {t: v.item() for t, v in per_task.items()}, output, self.skipped_last)

    @property
    def code_fields(self) -> list[str]:
        """The categorical features with a table of their own, whose codes :meth:`learn` takes."""
        return [name for name in self.id_maps if name not in self.id_fields]

    def _codes(self, codes: Mapping[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
        """The categorical fields' codes for a batch of ``n`` rows, checked."""
        wanted = self.code_fields
        if not wanted:
            return {}
        missing = [name for name in wanted if codes is None or name not in codes]
        if missing:
            raise ValueError(f"learner.tables names categorical feature(s) {missing} the features did not carry")
        out = {name: np.asarray(codes[name], dtype=np.int64) for name in wanted}
        wrong = [name for name, values in out.items() if values.shape != (n,)]
        if wrong:
            raise ValueError(f"categorical codes {wrong} do not have one value per example ({n})")
        return out

    def _map_ids(self, ids: dict[str, np.ndarray], now_ms: int) -> dict[str, torch.Tensor]:
        """Each field's table rows for ``ids``, admitting, expiring and evicting in the ID maps (at the batch's
        event time). In a group every worker maps the union of the group's ids, in rank order, so the maps and
        the rows they hand out stay identical on every worker; each then keeps its own part."""
        names = list(self.id_maps)
        reducer, n = self.reducer, len(ids[names[0]])
        if reducer.world_size > 1:
            mine = np.column_stack([np.full(n, reducer.rank, np.int64), np.full(n, now_ms, np.int64),
                                    *(ids[name] for name in names)]).reshape(n, 2 + len(names))
            union = reducer.gather_rows(mine)
            own = union[:, 0] == reducer.rank
            now_ms = int(union[:, 1].max()) if len(union) else now_ms
            ids = {name: union[:, 2 + i] for i, name in enumerate(names)}
        else:
            own = slice(None)
        rows = {}
        for name in names:
            values = ids[name]
            # a categorical feature's missing code (-1) reads the default row, 0 (a negative id is the map's error)
            missing = values < 0 if name not in self.id_fields else np.zeros(0, bool)
            if not missing.any():
                found = self.id_maps[name].rows(values, now_ms, train=True)
                mapped, fresh = found.rows, found.fresh
            else:
                found = self.id_maps[name].rows(values[~missing], now_ms, train=True)
                mapped, fresh = np.zeros(len(values), np.int64), found.fresh
                mapped[~missing] = found.rows
            zeros = self.id_maps[name].config.mode != "hash"  # every row it hands out is reset first: see below
            for table in self.model.field_tables(name):  # the field's embedding and its wide rows
                if len(mapped):
                    table.ensure_rows(int(mapped.max()), zeros=zeros)
                if len(fresh):
                    table.reset_rows(torch.from_numpy(fresh))  # a reused row starts over, optimizer state too
            rows[name] = torch.from_numpy(np.ascontiguousarray(mapped[own])).to(self.device)
        return rows

    def admit(self, ids: Mapping[str, np.ndarray], now_ms: int) -> None:
        """Sight ``ids`` (one array per ID field, of equal length) at event time ``now_ms`` without training: the
        ID maps admit them as a batch would (``min_count`` sightings), their rows start fresh. For a population
        known in advance: a vocabulary carried over from another system, or a benchmark's live IDs."""
        if not self.id_maps:
            return
        n = {len(np.asarray(ids[name])) for name in self.id_maps}
        if len(n) != 1:
            raise ValueError(f"admit needs one array of ids per field, all of one length; got lengths {sorted(n)}")
        self._map_ids({name: np.asarray(ids[name], dtype=np.int64) for name in self.id_maps}, now_ms)

    def publish_maps(self) -> None:
        """Copy each ID map's live ``id -> row`` pairs into the model (what serving maps raw ids with)."""
        for name, id_map in self.id_maps.items():
            published = id_map.snapshot()
            self.model.encoder.set_map(name, torch.from_numpy(published["ids"]).to(self.device),
                                       torch.from_numpy(published["rows"]).to(self.device))

    def id_tables(self) -> dict[str, dict[str, int]]:
        """Each ID map's figures: live ids, admitted, expired, evicted, overflow, collisions, bytes... Computed
        once per step (counting collisions sorts the live rows; ``stats`` may be polled many times a step)."""
        if self._id_tables is None or self._id_tables[0] != self.step:
            self._id_tables = (self.step, {name: id_map.stats() for name, id_map in self.id_maps.items()})
        return self._id_tables[1]

    def _score(self, output: ModelOutput, labels: dict[str, torch.Tensor], users: np.ndarray) -> None:
        with torch.no_grad():
            probs = {t: torch.sigmoid(output.logits[t]).float().cpu().numpy() for t in self.config.tasks}
        self.metrics.update(probs, {t: labels[t].cpu().numpy() for t in self.config.tasks}, users)

    def _optimize(self, output: ModelOutput | None, labels: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backward and one optimizer step on this worker's share of the group's loss; ``output`` None is a
        zero-weight step. Returns the share and the local per-task losses."""
        self.optimizer.zero_grad(set_to_none=True)
        if output is None:
            total, per_task = self._zero_share()
        else:
            total, per_task = self._share(output, labels)
            total.backward()
        self.reducer.reduce_grads(self.model.parameters())
        tables = self.model.row_tables()
        sparse = {name: self.reducer.gather_sparse(*table.gradients()) for name, table in tables.items()}  # the group's
        grads = [p.grad for p in self.model.parameters() if p.grad is not None] + [g for _, g in sparse.values()]
        # The gradients are the group's sum, the same on every worker, so all of them skip alike.
        self.skipped_last = not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if self.skipped_last:
            # An exploding or poisoned step would make every weight non-finite for good: drop it.
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            print(f"moestream: step {self.step}: non-finite gradient, update skipped "
                  f"({self.skipped_steps} so far)", flush=True)
        else:
            self.optimizer.step()  # Adam: the dense network
            for name, (rows, row_grads) in sparse.items():
                tables[name].update(rows, row_grads)  # row-wise Adagrad: the rows this step's batch touched
        self.reducer.average_buffers(self.model)
        return total, per_task

    def _share(self, output: ModelOutput, labels: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This worker's part of the group's loss: each task's mean over the union batch, and the
        regulariser on the union's load-balancing statistics (or this worker's share of the aux loss)."""
        tasks = self.config.tasks
        mask = {t: ~torch.isnan(labels[t]) for t in tasks}
        rows = torch.tensor(float(labels[tasks[0]].shape[0]), device=self.device)
        counts = torch.stack([*(mask[t].sum().float() for t in tasks), rows])  # (T + 1,): labelled rows, rows
        lb_local = None if output.lb_stats is None else tuple(s.float() for s in output.lb_stats)
        counts_all, lb_all = self.reducer.reduce_batch(counts, lb_local)
        logits = {t: v.float() for t, v in output.logits.items()}
        _, per_task = loss_terms(ModelOutput(logits, output.aux_loss, {}, output.expert_zero_frac, output.task_types),
                                 labels, mask)
        share = counts[:-1] / counts_all[:-1].clamp_min(1.0)  # (T,): this worker's part of each task's mean
        total = (self._loss_weights * share * torch.stack([per_task[t] for t in tasks])).sum()
        if lb_all is not None:
            total = total + self.model.lb_coef * load_balance_loss(*lb_all, self.model.lb_experts)
        else:
            total = total + output.aux_loss.float() * (counts[-1] / counts_all[-1].clamp_min(1.0))
        return total, per_task

    def _zero_share(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A worker without rows still joins the group's reductions, with zeros of the right shapes."""
        counts = torch.zeros(len(self.config.tasks) + 1, device=self.device)
        lb_stats = None
        if self.model.lb_experts is not None:
            zeros = torch.zeros(self.model.lb_experts, device=self.device)
            lb_stats = (zeros, zeros.clone(), torch.zeros((), device=self.device))
        self.reducer.reduce_batch(counts, lb_stats)
        return torch.zeros((), device=self.device), {}

    @property
    def multitask(self) -> MultiTaskModel:
        """The family's model behind the feature encoder: its experts and gates (what health reports watch)."""
        return self.model.model

    def weights(self) -> dict[str, torch.Tensor]:
        """Everything a snapshot holds: the encoder's and the family's parameters and buffers, with the ID maps
        as they are now."""
        self.publish_maps()
        return self.model.state_dict()

    def capture(self) -> Captured[dict[str, torch.Tensor]]:
        """:meth:`weights` in two halves, for a base written beside training (``learner.loop``): what is taken now
        (copies of the small entries, and snapshots of each table's rows and each ID map: ``RowwiseTable.snapshot``,
        ``IdMap.snapshot_state``), and the function returned, which copies the tables and the maps, orders the maps
        and assembles the state dict on another thread while training goes on. What it returns equals what
        :meth:`weights` returns now; the training thread pays for the small entries here, and for the rows and
        entries it writes while they are copied, not for the tables or the maps."""
        taken = self._capture_all()
        return Captured(lambda: taken()[0], taken.release)

    def _capture_all(self, stream: bool = False) -> Captured[tuple[dict, dict[str, np.ndarray]]]:
        """:meth:`capture`'s halves, the copy returning the ID maps' state of the moment too (for checkpoints:
        :meth:`capture_state`). ``stream``: the tables come back as :class:`~learner.snapshots.Streamed` tensors
        whose rows are copied as a file is written from them, a chunk at a time (``RowSnapshot.stream``), so that
        no copy of the whole tables is ever held; they keep rows for it until streamed or released."""
        maps, tables = field_maps(self.model), row_tables(self.model)
        if stream:
            rows = {prefix: table.column_snapshots() for prefix, table in tables.items()}
        else:
            rows = {prefix: (table.snapshot(),) for prefix, table in tables.items()}
        id_maps = {name: id_map.snapshot_state() for name, id_map in self.id_maps.items()}
        skip = {*maps, *(rows_key(k) for k in maps), *(f"{prefix}{k}" for prefix in rows for k in ("weight", "sum_sq"))}
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k not in skip}
        device = self.device

        def assemble() -> tuple[dict, dict[str, np.ndarray]]:
            out = dict(state)
            try:  # the maps first: they are quicker to copy, and keep entries for it until they are
                arrays = {name: taken.copy() for name, taken in id_maps.items()}
                for prefix, snaps in rows.items():
                    if stream:
                        for name, snap in zip(("weight", "sum_sq"), snaps):
                            source = snap.sources[0]
                            out[f"{prefix}{name}"] = Streamed(source.dtype, tuple(source.shape),
                                                              (chunk for _, (chunk,) in snap.stream()))
                    else:
                        out[f"{prefix}weight"], out[f"{prefix}sum_sq"] = snaps[0].copy()
            except BaseException:  # a copy that failed must not keep the tables and maps keeping rows
                release()
                raise
            if not stream:
                release()
            for key, (_, name) in maps.items():
                published = sort_snapshot(*id_maps[name].live(arrays[name]))
                out[key] = torch.from_numpy(published["ids"]).to(device)
                out[rows_key(key)] = torch.from_numpy(published["rows"]).to(device)
            return out, {f"idmap.{name}.{k}": v for name, state in arrays.items() for k, v in state.items()}

        def release() -> None:
            for held in (*id_maps.values(), *(snap for snaps in rows.values() for snap in snaps)):
                held.release()
        return Captured(assemble, release)

    def delta(self) -> Delta:
        """The change since the last :meth:`mark_published`: every dense entry, each table's changed rows and each
        ID map's changes, so that ``materialise(marked version, delta())`` equals :meth:`weights` entry for entry.
        Reads only (a refused publish leaves the changes for the next delta) and costs what changed: no table
        copied, no map listed. A :class:`~learner.delta.DeltaError` before the first mark (after construction or
        restore the last published version is unknown: publish a base first)."""
        if not self._marked:
            raise DeltaError("no version marked published since this learner was built or restored: publish "
                             "weights() as a base and mark_published() first")
        dense = {k: v.detach().clone() for k, v in split_state(self.model.state_dict()).dense.items()}
        tables = {}
        for prefix, table in row_tables(self.model).items():
            rows = table.changed_rows()
            tables[prefix] = TableRows(rows, table.weight.index_select(0, rows), table.sum_sq.index_select(0, rows),
                                       int(table.weight.shape[0]))
        maps = {}
        for key, (_, name) in field_maps(self.model).items():
            maps[key] = MapChanges(*(torch.from_numpy(a).to(self.device) for a in self.id_maps[name].changes()))
        return Delta(dense, tables, maps)

    @property
    def has_published_parent(self) -> bool:
        """Whether :meth:`delta` has a version to be the change from (False: publish a base next)."""
        return self._marked

    def mark_published(self) -> None:
        """The version as it is now (what :meth:`weights` or :meth:`delta` just gave) is durably published: the
        next delta starts from it. Only after the publish succeeded, with no step in between."""
        for table in row_tables(self.model).values():
            table.mark_published()
        for id_map in self.id_maps.values():
            id_map.mark_published()
        self._marked = True

    def positive_rates(self) -> dict[str, float]:
        """Each task's positive rate over the metrics' window."""
        return self.metrics.positive_rates()

    def collisions(self, ids: Callable[[], dict[str, np.ndarray]]) -> IdCollisions:
        """How often the ids ``ids()`` returns share a hashed embedding row; with per-field ID maps, their own
        figures (collisionless: 0 collisions among admitted ids), and ``ids`` is not called."""
        if self.id_maps:
            stats = self.id_tables().values()
            live, capacity = sum(s["live"] for s in stats), sum(s["capacity"] for s in stats)
            shared = sum(s["collisions"] for s in stats)
            return IdCollisions(live, capacity, live - shared, shared / live if live else 0.0, 0.0)
        return id_collisions(self.model.encoder, ids())

    def manifest(self) -> dict:
        """What a snapshot's manifest records of the model and of how far training got."""
        config = self.config
        return {
            "family": config.family,
            "model_config": self.model.config,
            "step": self.step,
            "examples": self.examples,
            "event_time_hwm_ms": self.event_time_hwm_ms,
            "learner_config": {**asdict(config), "hparams": dict(config.hparams), "base_rates": dict(config.base_rates),
                               "loss_weights": dict(config.loss_weights)},
        }

    def summary(self) -> dict[str, dict[str, float]]:
        """The progressive metrics now (a few sorts over each task's window: call it at a cadence)."""
        return self.metrics.summary()

    def state(self) -> tuple[dict[str, torch.Tensor], dict, dict[str, np.ndarray], dict]:
        """Weights, optimizer, metric windows and counters: what a checkpoint holds to resume exactly."""
        counters = {"step": self.step, "examples": self.examples, "event_time_hwm_ms": self.event_time_hwm_ms,
                    "skipped_steps": self.skipped_steps}
        maps = {f"idmap.{name}.{k}": v for name, id_map in self.id_maps.items() for k, v in id_map.state().items()}
        return self.weights(), self.optimizer.state_dict(), {**self.metrics.state(), **maps}, counters

    def capture_state(self) -> tuple[Captured[tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]], dict,
                                     dict[str, np.ndarray], dict]:
        """:meth:`state` for a checkpoint written beside training (``learner.beside.CheckpointBeside``): a function
        that gives the weights and the ID maps' state of this moment on the writing thread (the maps copied, the
        tables as streams the checkpoint's file is written from: no copy of them is held), and copies of the
        optimizer's state, the metric windows and the counters now. The training thread pays for those copies and
        for the rows and entries it writes while the tables and maps are read, not for the tables or the maps."""
        counters = {"step": self.step, "examples": self.examples, "event_time_hwm_ms": self.event_time_hwm_ms,
                    "skipped_steps": self.skipped_steps}
        metrics = {k: np.array(v, copy=True) for k, v in self.metrics.state().items()}
        optimizer = copy.deepcopy(self.optimizer.state_dict())  # it holds the optimizer's own tensors
        return self._capture_all(stream=True), optimizer, metrics, counters  # the snapshots last: nothing fails after them

    def restore(self, model: dict[str, torch.Tensor], optimizer: dict, arrays: dict[str, np.ndarray],
                counters: dict, model_config: dict | None = None) -> None:
        """Load a checkpoint's state. ``model_config``: the config of the model it was written by (checkpoints
        carry it since 2026-12-06); a checkpoint restores only into that model."""
        check_restorable(self.model, model, model_config)
        self.model.load_state_dict(model)
        for name in self.id_maps:
            prefix = f"idmap.{name}."
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            self.id_maps[name] = IdMap.from_state(self.id_maps[name].config, mine)
        self.optimizer.load_state_dict(optimizer)
        self.metrics.load_state(arrays)
        self.step, self.examples = counters["step"], counters["examples"]
        self._id_tables = None
        self.event_time_hwm_ms = counters["event_time_hwm_ms"]
        self.skipped_steps = counters.get("skipped_steps", 0)  # absent from checkpoints of older versions
        self._marked = False  # the tables and maps count as all changed: publish a base next
