"""The wide part beside the experts: per binary task, a factorisation machine over the embedded ID fields added to
the task's logit, as Wide & Deep adds its wide part (Cheng et al., DLRS'16) and DeepFM its FM component (Guo et al.,
IJCAI'17):

    logit_t = deep_t + Σ_f b_{f,t}[r_f] + Σ_{f<g} v_{f,t}[r_f] · v_{g,t}[r_g]

``r_f`` is field ``f``'s row. With the user and item ids alone it is ``b_{u,t} + b_{i,t} + p_{u,t} · q_{i,t}``, the
quality floor's logistic matrix factorisation (``benchmarks/quality_floor.py``): the form that keeps learning the
user × item affinity on the stream after the experts' plateau (docs/quality.md, "Learning better"). Nothing is
shared with the experts' embeddings. Between tasks, two forms: per-task factors (``shared=False``), each task's term
with rows of its own, and shared factors (``shared=True``, the default in ``moestream.yaml``; below).

Rows. Each field's term is indexed by the row of the field's embedding: the ID map's row with per-field tables, the
hashed bucket's row with the one shared table. So admission, expiry, eviction, the default row 0 (an unknown ID's
term is the one every unknown ID learns) and serving's published maps apply unchanged, and the learner grows and
resets a field's wide rows with its embedding rows (``MultiTaskRanker.field_tables``).

Optimizer. Every table is a :class:`~learner.models.sparse.RowwiseTable`, trained by row-wise Adagrad after backward
like the embeddings (``MultiTaskRanker.row_tables``), with the term's own ``lr`` and ``initial_accumulator``. Per
table of rows (a field's, or the hashed one), two tables hold every task side by side: the factors, ``T · dim``
wide with per-task factors (``dim`` wide, one accumulator, when shared), and the biases, ``T`` wide, each with one
accumulator per task (``groups``): the floor keeps one per row, task
and part (a bias's gradient is larger than a factor coordinate's by the size of the other field's factor; sharing
an accumulator would slow the factors down), and one lookup and one update serve all tasks.
``initial_accumulator`` is in the units of the learner's loss, a mean over the batch: the floor's, a sum over the
batch, is ``batch²`` times larger (its 1.0 at batch 512 is about 4e-6 here). Factors start at N(0, 0.01 / dim),
the floor's; biases at 0, so a fresh term adds nothing but a product of two small vectors.

Shared factors (``shared=True``). One factor per row serves every task, each task weighting its coordinates:
``Σ_{f<g} (v_f ⊙ v_g) · w_t``, ``w_t`` a dense parameter (``scale``, ``(T, dim)``, starting at 1, trained by Adam
with the experts). Every task's labels then teach the same vectors, as a multi-task matrix factorisation shares its
user and item factors, and a row holds ``dim`` factors instead of ``T · dim`` (with one accumulator for them, where
per-task factors keep one per task). The biases stay per task.

The pairwise sum uses FM's identity ``Σ_{f<g} v_f · v_g = ½ (|Σ_f v_f|² - Σ_f |v_f|²)``: O(F · dim) per row, no
loop over pairs. Regression tasks get no term (a logit term; their output is a value); ``tasks`` may name fewer binary
tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .sparse import RowwiseTable

WIDE_DEFAULTS = {"dim": 0, "lr": 0.3, "initial_accumulator": 4e-6, "tasks": [], "shared": False}
"""A model config's keys and the values of those it leaves out: dim 0 is off; lr and the accumulator are the quality
floor's tuning on click (see the module doc for the units); ``tasks``, the binary tasks that get a term, none named:
every one; ``shared``, one factor per row for every task (see below) instead of one per task. ``dim`` and ``shared``
keep what they meant before they were keys, so that an older snapshot rebuilds as it was trained; the learner's
shipped defaults (``learner.config.WideConfig``: shared factors of width 16) name both."""
INIT_STD = 0.1
"""Factor entries start at N(0, INIT_STD² / dim), the floor's: small, but not zero (zero is a saddle of p · q)."""


class WideTerm(nn.Module):
    """``rows: field -> (B,)`` -> ``task -> (B,)``: each binary task's FM term over the fields' rows.

    ``capacities``: table name -> rows (``n_rows`` of each of its ``RowwiseTable``s); ``field_tables``: field ->
    the table name whose rows it reads (its own with per-field tables; one name for all fields with hashing).
    ``allocated``: rows held at the start (None: all, as the hashed table; 0: grown on demand, as the ID maps'
    tables).
    """

    def __init__(self, field_tables: Mapping[str, str], capacities: Mapping[str, int], tasks: Sequence[str],
                 dim: int, lr: float, initial_accumulator: float = 0.0, allocated: int | None = None,
                 shared: bool = False) -> None:
        super().__init__()
        if not field_tables or not tasks:
            raise ValueError("the wide term needs at least one id field and one task")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"the wide term's dim must be an integer >= 1, got {dim!r}")
        missing = sorted(set(field_tables.values()) - set(capacities))
        if missing:
            raise ValueError(f"the wide term's fields read tables {missing} without a capacity")
        self.fields, self.tasks, self.dim, self.shared = tuple(field_tables), tuple(tasks), dim, bool(shared)
        self.field_tables = dict(field_tables)
        # the fields grouped by the table they read, in field order: one lookup per table
        self.groups = {name: [f for f in self.fields if self.field_tables[f] == name]
                       for name in dict.fromkeys(self.field_tables.values())}
        seed = int(torch.randint(0, 2**62, (), device="cpu").item())  # the learner's seed decides it
        n_tasks = len(self.tasks)
        per_row = 1 if self.shared else n_tasks  # factors per row
        self.factors = nn.ModuleDict({
            name: RowwiseTable(int(capacities[name]), per_row * dim, lr=lr, init_std=INIT_STD * dim**-0.5,
                               seed=seed + 2 * i, allocated=allocated, initial_accumulator=initial_accumulator,
                               groups=per_row)
            for i, name in enumerate(self.groups)})  # (rows, T · dim): task t's factor in columns t·dim.. (shared: dim)
        self.scale = nn.Parameter(torch.ones(n_tasks, dim)) if self.shared else None  # w_t, per task
        self.biases = nn.ModuleDict({
            name: RowwiseTable(int(capacities[name]), n_tasks, lr=lr, init_std=0.0, seed=seed + 2 * i + 1,
                               allocated=allocated, initial_accumulator=initial_accumulator, groups=n_tasks)
            for i, name in enumerate(self.groups)})  # (rows, T)

    def forward(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [f for f in self.fields if f not in rows]
        if missing:
            raise ValueError(f"the wide term is missing the rows of field(s) {missing}")
        grouped = {name: torch.stack([rows[f] for f in fields], dim=1)  # (B, F_g)
                   for name, fields in self.groups.items()}
        v = torch.cat([self.factors[name].lookup(r) for name, r in grouped.items()], dim=1)  # (B, F, T · k) or (B, F, k)
        b = torch.cat([self.biases[name].lookup(r) for name, r in grouped.items()], dim=1)  # (B, F, T)
        if self.scale is not None:
            products = 0.5 * (v.sum(dim=1).square() - v.square().sum(dim=1))  # (B, k): Σ_{f<g} v_f ⊙ v_g
            # In fp32 under autocast too (there a matmul would run in bf16), as the per-task form's sums are.
            with torch.autocast(products.device.type, enabled=False):
                pairs = products.float() @ self.scale.float().T  # (B, T)
        else:
            v = v.unflatten(-1, (len(self.tasks), self.dim))  # (B, F, T, k)
            pairs = 0.5 * (v.sum(dim=1).square().sum(dim=-1) - v.square().sum(dim=(1, 3)))  # (B, T): Σ_{f<g} v_f · v_g
        z = b.sum(dim=1) + pairs  # (B, T)
        return {t: z[:, j] for j, t in enumerate(self.tasks)}

    def factor(self, field_name: str, task: str) -> Tensor:
        """Every row's factor of ``field_name`` for ``task``, ``(rows + 1, dim)``: a view of the table, or with shared
        factors the shared ones weighted by the square root of the task's ``scale``, so that the dot product of two
        fields' factors is the task's term. A task weight below zero has no such square root: an error."""
        j = self.tasks.index(task)
        weight = self.factors[self.field_tables[field_name]].weight
        if self.scale is None:
            return weight[:, j * self.dim:(j + 1) * self.dim]
        scale = self.scale[j].detach()
        if (scale < 0).any():
            raise ValueError(f"task {task!r} weights some shared coordinates below zero: its term is not a dot "
                             "product of per-field factors")
        return weight * scale.sqrt()

    def bias(self, field_name: str, task: str) -> Tensor:
        """Every row's bias of ``field_name`` for ``task``, ``(rows + 1,)`` (a view)."""
        return self.biases[self.field_tables[field_name]].weight[:, self.tasks.index(task)]

    def row_tables(self) -> dict[str, RowwiseTable]:
        """Every table by a name of its own (``wide.<table>.factors`` / ``.biases``), in a fixed order."""
        return {f"wide.{name}.{part}": tables[name] for name in self.groups
                for part, tables in (("factors", self.factors), ("biases", self.biases))}

    def tables_of(self, field_name: str) -> list[RowwiseTable]:
        """The tables indexed by ``field_name``'s rows (shared with the other fields of its table, if any)."""
        name = self.field_tables[field_name]
        return [self.factors[name], self.biases[name]]

    def extra_repr(self) -> str:
        return f"fields={list(self.fields)}, tasks={list(self.tasks)}, dim={self.dim}, shared={self.shared}"


def check_wide(wide: Mapping[str, object] | None) -> dict[str, float] | None:
    """``wide`` as the ranker's config holds it, the keys it leaves out at :data:`WIDE_DEFAULTS`; None stays None
    (off, as dim 0). Unknown keys are an error naming them."""
    if wide is None:
        return None
    unknown = sorted(set(wide) - set(WIDE_DEFAULTS), key=str)
    if unknown:
        raise ValueError(f"wide: unknown keys {unknown}; keys are {list(WIDE_DEFAULTS)}")
    merged = {**WIDE_DEFAULTS, **wide}
    if not isinstance(merged["shared"], bool):
        raise ValueError(f"wide.shared must be true or false, got {merged['shared']!r}")
    return {"dim": int(merged["dim"]), "lr": float(merged["lr"]),
            "initial_accumulator": float(merged["initial_accumulator"]), "tasks": list(merged["tasks"] or []),
            "shared": merged["shared"]}


__all__ = ["INIT_STD", "WIDE_DEFAULTS", "WideTerm", "check_wide"]
