"""The deployable unit: feature encoder + a multi-task model, rebuildable from a JSON config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .encoder import FeatureEncoder
from .interaction import CrossNetwork, FieldProducts
from .output import ModelOutput
from .registry import build, default_hparams

_CONFIG_KEYS = ("family", "tasks", "id_fields", "n_dense", "task_types", "n_buckets", "emb_dim", "emb_lr",
                "emb_accumulator", "tables", "field_products", "cross_layers", "cross_rank", "hparams")


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
    ``build(family, ...)``.

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
        **hparams: Any,
    ) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(id_fields, n_dense, n_buckets=n_buckets, emb_dim=emb_dim, emb_lr=emb_lr,
                                      tables=tables, emb_accumulator=emb_accumulator)
        self.products = FieldProducts(self.encoder.field_dims, field_products)
        n_inputs = self.encoder.n_outputs + self.products.n_outputs
        self.cross = CrossNetwork(n_inputs, cross_layers, cross_rank)
        self.model = build(family, n_inputs=n_inputs, tasks=tasks, task_types=task_types, **hparams)
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
                "hparams": {**default_hparams(family), **hparams},
            },
            "config",
        )

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
        x = self.products(self.encoder(ids, dense, rows))  # (B, n_inputs): fields, dense, the fields' products
        return self.model(self.cross(x))  # (B, n_inputs): the input and its explicit interactions

    @torch.no_grad()
    def predict_proba(self, ids: Mapping[str, Tensor], dense: Tensor) -> dict[str, Tensor]:
        """Per task ``(B,)``: a probability for binary tasks, the predicted value for regression.
        Runs without autograd; the caller picks train/eval mode (serving uses eval)."""
        logits = self(ids, dense).logits
        types = self.model.task_types
        return {t: torch.sigmoid(v) if types[t] == "binary" else v for t, v in logits.items()}
