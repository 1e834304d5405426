"""The deployable unit: feature encoder + a multi-task model, rebuildable from a JSON config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .diagnostics import without_diagnostics
from .encoder import FeatureEncoder
from .interaction import CrossNetwork, FieldProducts
from .output import ModelOutput
from .registry import build, default_hparams
from .sparse import RowwiseTable
from .wide import WideTerm, check_wide

_CONFIG_KEYS = ("family", "tasks", "id_fields", "n_dense", "task_types", "n_buckets", "emb_dim", "emb_lr",
                "emb_accumulator", "tables", "field_products", "cross_layers", "cross_rank", "wide", "hparams")


def _jsonable(value: Any, path: str) -> Any:
    """Tuples become lists; anything JSON cannot hold is an error naming where it sits."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"{path}: {type(value).__name__} is not JSON-serialisable")


class MultiTaskRanker(nn.Module):
    """``FeatureEncoder``, then the products of its field embeddings appended (``field_products``: "none", "dot"
    or "product"), then ``cross_layers`` DCN-v2 cross layers (both ``learner.models.interaction``; 0: none), then
    ``build(family, ...)``; beside them, ``wide`` (``{dim, lr, initial_accumulator, tasks, shared}``,
    ``learner.models.wide``; None or dim 0: none), a factorisation machine per binary task over the embedded fields'
    rows, added to its logit.

    ``config`` is a plain JSON-serialisable dict (hparams with defaults filled in, so a snapshot
    does not change meaning if a default changes later); ``from_config(config)`` rebuilds the
    same architecture, ready for ``load_state_dict``.
    """

    def __init__(
        self,
        family: str,
        tasks: Sequence[str],
        id_fields: Sequence[str],
        n_dense: int,
        task_types: Mapping[str, str] | None = None,
        n_buckets: int = 2**18,
        emb_dim: int = 16,
        emb_lr: float = 0.2,
        tables: Mapping[str, Mapping[str, int]] | None = None,
        emb_accumulator: float = 0.0,
        field_products: str = "none",
        cross_layers: int = 0,
        cross_rank: int = 0,
        wide: Mapping[str, float] | None = None,
        **hparams: Any,
    ) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(id_fields, n_dense, n_buckets=n_buckets, emb_dim=emb_dim, emb_lr=emb_lr,
                                      tables=tables, emb_accumulator=emb_accumulator)
        self.products = FieldProducts(self.encoder.field_dims, field_products)
        n_inputs = self.encoder.n_outputs + self.products.n_outputs
        self.cross = CrossNetwork(n_inputs, cross_layers, cross_rank)
        self.model = build(family, n_inputs=n_inputs, tasks=tasks, task_types=task_types, **hparams)
        wide = check_wide(wide)
        self.wide = self._wide(wide) if wide and wide["dim"] else None  # after the rest: off draws nothing
        self.config = _jsonable(
            {
                "family": family,
                "tasks": list(self.model.tasks),
                "id_fields": list(self.encoder.id_fields),
                "n_dense": n_dense,
                "task_types": dict(self.model.task_types),
                "n_buckets": n_buckets,
                "emb_dim": emb_dim,
                "emb_lr": emb_lr,
                "emb_accumulator": emb_accumulator,
                "tables": {f: dict(t) for f, t in (tables or {}).items()},
                "field_products": field_products,
                "cross_layers": cross_layers,
                "cross_rank": cross_rank,
                "wide": wide,
                "hparams": {**default_hparams(family), **hparams},
            },
            "config",
        )

    def _wide(self, wide: Mapping[str, float]) -> WideTerm:
        """The wide term over the encoder's fields, reading their tables' rows (per field, or the hashed buckets)."""
        encoder, named = self.encoder, set(wide["tasks"] or self.model.tasks)
        unknown = sorted(named - set(self.model.tasks))
        if unknown:
            raise ValueError(f"wide.tasks names task(s) {unknown} the model does not have")
        binary = [t for t, kind in self.model.task_types.items() if kind == "binary" and t in named]
        if encoder.tables is not None:
            fields = {f: f for f in encoder.id_fields}
            capacities, allocated = {f: encoder.tables[f].n_rows for f in encoder.id_fields}, 0
        else:
            fields = dict.fromkeys(encoder.id_fields, "hashed")
            capacities, allocated = {"hashed": encoder.n_buckets}, None
        return WideTerm(fields, capacities, binary, int(wide["dim"]), lr=wide["lr"],
                        initial_accumulator=wide["initial_accumulator"], allocated=allocated,
                        shared=wide["shared"])

    def init_output_bias(self, base_rates: Mapping[str, float]) -> None:
        """See :meth:`MultiTaskModel.init_output_bias`."""
        self.model.init_output_bias(base_rates)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MultiTaskRanker:
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        missing = [k for k in ("family", "tasks", "id_fields", "n_dense") if k not in config]
        if unknown or missing:
            raise ValueError(f"ranker config: unknown keys {unknown}, missing keys {missing}")
        kwargs = {k: config[k] for k in _CONFIG_KEYS if k in config and k != "hparams"}
        return cls(**kwargs, **dict(config.get("hparams") or {}))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.tasks

    @property
    def lb_experts(self) -> int | None:
        """See :class:`MultiTaskModel`: the length of ``lb_stats``' vectors, None for dense families."""
        return self.model.lb_experts

    @property
    def lb_coef(self) -> float:
        """See :class:`MultiTaskModel`: the load-balancing regulariser's coefficient (0.0 for dense families)."""
        return self.model.lb_coef

    def forward(self, ids: Mapping[str, Tensor], dense: Tensor, rows: Mapping[str, Tensor] | None = None) -> ModelOutput:
        """``rows``: per-field table rows from the learner's ID maps (training); serving passes raw ``ids``."""
        if rows is None and self.wide is not None and self.encoder.tables is not None:
            rows = self.encoder.field_rows(ids)  # the published maps read once for the embeddings and the wide part
        x = self.products(self.encoder(ids, dense, rows))  # (B, n_inputs): fields, dense, the fields' products
        output = self.model(self.cross(x))  # (B, n_inputs): the input and its explicit interactions
        if self.wide is None:
            return output
        wide = self.wide(self.encoder.field_rows(ids, rows))  # task -> (B,), binary tasks only
        logits = {t: v + wide[t].to(v.dtype) if t in wide else v for t, v in output.logits.items()}
        return replace(output, logits=logits)

    def row_tables(self) -> dict[str, RowwiseTable]:
        """Every table trained by row-wise Adagrad after backward: the encoder's embeddings, then the wide term's."""
        return {**self.encoder.row_tables(), **(self.wide.row_tables() if self.wide is not None else {})}

    def field_tables(self, field_name: str) -> list[RowwiseTable]:
        """The per-field tables indexed by ``field_name``'s ID-map rows (its embedding, then its wide rows): the learner
        grows them and resets a reused row in each alike."""
        tables = [self.encoder.tables[field_name]]
        return tables + (self.wide.tables_of(field_name) if self.wide is not None else [])

    @torch.no_grad()
    def predict_proba(self, ids: Mapping[str, Tensor], dense: Tensor) -> dict[str, Tensor]:
        """Per task ``(B,)``: a probability for binary tasks, the predicted value for regression.
        Runs without autograd and without the telemetry's diagnostics (``diagnostics.without_diagnostics``); the caller
        picks train/eval mode (serving uses eval)."""
        with without_diagnostics():
            logits = self(ids, dense).logits
        types = self.model.task_types
        return {t: torch.sigmoid(v) if types[t] == "binary" else v for t, v in logits.items()}
