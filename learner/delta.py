"""A model version as the change from its parent: what delta publishing ships instead of the whole model.

A snapshot's state dict (``MultiTaskRanker.state_dict()``) has three kinds of entries, told apart by name:

- **tables**: a row-wise embedding table's ``<prefix>weight (rows, dim)`` and ``<prefix>sum_sq (rows, ...)``
  (:class:`~learner.models.sparse.RowwiseTable`): the bulk of the bytes, and a step changes only the rows its
  batch touched;
- **maps**: a field's published ``<prefix>map_ids_<field>`` (ascending raw ids) and ``<prefix>map_rows_<field>``
  (each id's row): what serving maps raw ids with; a step admits, expires and evicts a few ids;
- **dense**: everything else (the experts, gates, towers, the tables' ``seed`` and ``resets``): small, and
  every step moves all of it.

A :class:`Delta` holds all the dense entries, each table's rows that changed since the parent (their numbers,
weights and accumulators, and the table's size now), and each map's changes: ids now mapped to a row they were
not mapped to before (``ids``, ``rows``) and ids no longer mapped at all (``tombstones``: expired or evicted,
so serving must score them with the default row, never with their old one).

``materialise(parent_state, delta)`` is the version's whole state, equal entry for entry to the state dict the
trainer had when it published (``tests/learner/test_delta.py``); ``diff(old, new)`` is the reference delta
between two states, computed the slow way (whole tables compared), which the trainer's tracked deltas must
reproduce. A delta travels as flat safetensors (:func:`to_tensors`, :func:`from_tensors`, no pickle): names
``dense/<key>``, ``table/<prefix>/{rows,weight,sum_sq,size}``, ``map/<ids key>/{ids,rows,tombstones}``.

The trainer's deltas are tracked, not diffed (``Learner.delta``): each table keeps the rows changed since the
publisher's last mark and each ID map journals the ids it moved, so a delta costs what changed, not the model.

A serving replica applies a delta to its live model in place with :func:`apply_delta`: checked whole first (a
delta that does not fit raises :class:`DeltaError` with the model untouched), then the dense entries copied into
the parameters and buffers, the rows written into the tables and the map changes merged into each field's map
overlay (``learner.models.encoder``). A replica runs it in three parts: the checks, the map merges and the rows'
conversion beside the requests (:func:`prepare_delta`); under the serving lock only what must change at once, and
costs nothing per row (:func:`install_delta`: the dense entries copied, each table's changed rows staged
(``RowwiseTable.stage_rows``: lookups read them from the delta from then on), the merged overlays put in place);
then the rows written into the tables beside the requests (:func:`settle_delta`). The result is bit for bit the
model that ``materialise`` loaded into a fresh one would be. The overlay folds into the map beside the requests
(:func:`plan_fold` off the serving lock, :func:`install_fold` under it); past ``FOLD_SLACK`` times its bound,
``apply_delta`` folds it itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from learner.models.encoder import FeatureEncoder, MapFold
from learner.models.sparse import RowwiseTable

FOLD_SLACK = 4
"""``apply_delta`` folds a field's map itself once its overlay passes this many times the bound at which a fold is
due: a replica that folds beside its requests never gets there, one that never folds still keeps lookups cheap."""
_MAP_IDS, _MAP_ROWS = "map_ids_", "map_rows_"


class DeltaError(ValueError):
    """A delta that does not fit its parent, or tensors that are no delta."""


@dataclass(frozen=True)
class TableRows:
    """The rows of one table that changed since the parent, and the table's row count now (tables grow)."""

    rows: Tensor  # (k,) int64, ascending, each < size
    weight: Tensor  # (k, dim)
    sum_sq: Tensor  # (k,) or (k, groups)
    size: int  # the table's rows now: weight.shape[0] of the version


@dataclass(frozen=True)
class MapChanges:
    """A field map's changes since the parent: ``ids`` now map to ``rows``; ``tombstones`` map to nothing."""

    ids: Tensor  # (u,) int64, ascending
    rows: Tensor  # (u,) int64
    tombstones: Tensor  # (t,) int64, ascending, disjoint from ids


@dataclass(frozen=True)
class Delta:
    dense: dict[str, Tensor]
    tables: dict[str, TableRows] = field(default_factory=dict)
    """By table prefix (``encoder.tables.user_id.``)."""
    maps: dict[str, MapChanges] = field(default_factory=dict)
    """By the map's ids key (``encoder.map_ids_user_id``)."""

    @property
    def nbytes(self) -> int:
        tensors = [*self.dense.values(), *(t for r in self.tables.values() for t in (r.rows, r.weight, r.sum_sq)),
                   *(t for m in self.maps.values() for t in (m.ids, m.rows, m.tombstones))]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def changed_rows(self) -> int:
        return sum(int(r.rows.numel()) for r in self.tables.values())

    @property
    def tombstones(self) -> int:
        return sum(int(m.tombstones.numel()) for m in self.maps.values())


@dataclass(frozen=True)
class StateParts:
    dense: dict[str, Tensor]
    tables: dict[str, tuple[Tensor, Tensor]]
    """prefix -> (weight, sum_sq)"""
    maps: dict[str, tuple[Tensor, Tensor]]
    """ids key -> (ids, rows)"""


def table_prefixes(state: dict[str, Tensor]) -> list[str]:
    """The prefixes of the row-wise tables in a state dict: ``P`` with both ``Pweight`` and ``Psum_sq``."""
    return sorted(k[: -len("sum_sq")] for k in state if k.endswith("sum_sq") and k[: -len("sum_sq")] + "weight" in state)


def map_keys(state: dict[str, Tensor]) -> list[str]:
    """The ids keys of the published maps in a state dict (each with its ``map_rows_`` sibling)."""
    return sorted(k for k in state if _MAP_IDS in k and rows_key(k) in state)


def rows_key(ids_key: str) -> str:
    head, _, field_name = ids_key.rpartition(_MAP_IDS)
    return f"{head}{_MAP_ROWS}{field_name}"


def split_state(state: dict[str, Tensor]) -> StateParts:
    tables = {p: (state[p + "weight"], state[p + "sum_sq"]) for p in table_prefixes(state)}
    maps = {k: (state[k], state[rows_key(k)]) for k in map_keys(state)}
    taken = {p + s for p in tables for s in ("weight", "sum_sq")} | {k for m in maps for k in (m, rows_key(m))}
    return StateParts({k: v for k, v in state.items() if k not in taken}, tables, maps)


def map_changes(old_ids: Tensor, old_rows: Tensor, new_ids: Tensor, new_rows: Tensor) -> MapChanges:
    """What turns map ``old`` into map ``new`` (both with ascending ids)."""
    kept_old = torch.isin(old_ids, new_ids)
    tombstones = old_ids[~kept_old]
    at = torch.searchsorted(old_ids, new_ids).clamp_(max=max(old_ids.numel() - 1, 0))
    same = (old_ids[at] == new_ids) & (old_rows[at] == new_rows) if old_ids.numel() else torch.zeros_like(new_ids, dtype=torch.bool)
    return MapChanges(new_ids[~same].clone(), new_rows[~same].clone(), tombstones.clone())


def diff(old: dict[str, Tensor], new: dict[str, Tensor]) -> Delta:
    """The reference delta from state ``old`` to state ``new``: every row that differs, or that ``new``'s larger
    table added other than zeros; every map entry added, moved or removed. Costs the whole model: for tests and verification."""
    a, b = split_state(old), split_state(new)
    if set(a.tables) != set(b.tables) or set(a.maps) != set(b.maps):
        raise DeltaError("the two states have different tables or maps")
    tables = {}
    for prefix, (weight, sum_sq) in b.tables.items():
        old_weight, old_sum_sq = a.tables[prefix]
        shared = min(old_weight.shape[0], weight.shape[0])
        moved = _rows_any(weight[:shared] != old_weight[:shared]) | _rows_any(sum_sq[:shared] != old_sum_sq[:shared])
        grown = _rows_any(weight[shared:] != 0) | _rows_any(sum_sq[shared:] != 0)  # a row not carried is zeros
        rows = torch.cat([moved.nonzero().flatten(), grown.nonzero().flatten() + shared])
        tables[prefix] = TableRows(rows, weight[rows].clone(), sum_sq[rows].clone(), int(weight.shape[0]))
    maps = {k: map_changes(*a.maps[k], *b.maps[k]) for k in b.maps}
    return Delta({k: v.clone() for k, v in b.dense.items()}, tables, maps)


def _rows_any(flags: Tensor) -> Tensor:
    """Per row (first dimension), whether any of its flags is set."""
    return flags.flatten(1).any(1) if flags.dim() > 1 else flags


def compose(deltas: list[Delta]) -> Delta:
    """One delta for ``deltas`` applied in order: every row and map entry any of them carries, at the value the last
    one carrying it gave, and the last one's dense entries and table sizes. ``materialise(s, compose(ds))`` is
    ``materialise`` of each in turn; and since whatever it does not carry is unchanged since the first one's
    parent, it also brings any version of that stretch of the chain to the last one (a replica adopting a base
    written beside training: ``learner.loop``, ``serving.weights``)."""
    if not deltas:
        raise DeltaError("no deltas to compose")
    tables = {}
    for prefix in sorted({p for d in deltas for p in d.tables}):
        parts = [d.tables[prefix] for d in deltas if prefix in d.tables]
        rows = torch.cat([p.rows for p in parts])
        keep = _last_of_each(rows)
        size = parts[-1].size
        keep = keep[rows[keep] < size]
        tables[prefix] = TableRows(rows[keep], torch.cat([p.weight for p in parts])[keep],
                                   torch.cat([p.sum_sq for p in parts])[keep], size)
    maps = {}
    for key in sorted({k for d in deltas for k in d.maps}):
        parts = [d.maps[key] for d in deltas if key in d.maps]
        ids = torch.cat([t for p in parts for t in (p.ids, p.tombstones)])
        rows = torch.cat([t for p in parts for t in (p.rows, torch.zeros_like(p.tombstones))])  # 0: no row
        keep = _last_of_each(ids)
        ids, rows = ids[keep], rows[keep]
        mapped = rows > 0
        maps[key] = MapChanges(ids[mapped], rows[mapped], ids[~mapped])
    return Delta(dict(deltas[-1].dense), tables, maps)


def without_held(model: nn.Module, delta: Delta) -> Delta:
    """``delta`` less the table rows ``model`` already holds with those very values (weights and accumulator): the
    same result once applied, with fewer rows to write. For a replica taking a base written beside training through
    its catch-up delta (:func:`compose` of versions the replica mostly applied already): run beside the requests,
    it leaves the write under the serving lock about the size of one ordinary delta."""
    tables, kept = row_tables(model), {}
    with torch.no_grad():
        for prefix, change in delta.tables.items():
            table = tables.get(prefix)
            if table is None:
                kept[prefix] = change
                continue
            rows = change.rows.to(table.weight.device)
            held = rows < table.weight.shape[0]
            at = rows[held]
            same = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
            weight, sum_sq = change.weight.to(table.weight.device), change.sum_sq.to(table.sum_sq.device)
            same[held] = (_rows_all(table.weight.index_select(0, at) == weight[held])
                          & _rows_all(table.sum_sq.index_select(0, at) == sum_sq[held]))
            keep = (~same).to(change.rows.device)
            kept[prefix] = TableRows(change.rows[keep], change.weight[keep], change.sum_sq[keep], change.size)
    return Delta(delta.dense, kept, delta.maps)


def _rows_all(flags: Tensor) -> Tensor:
    """Per row (first dimension), whether all its flags are set."""
    return flags.flatten(1).all(1) if flags.dim() > 1 else flags


def _last_of_each(values: Tensor) -> Tensor:
    """The position of each distinct value's last occurrence in ``values``, in ascending order of the values."""
    distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
    positions = torch.arange(values.numel(), device=values.device)
    return torch.full((distinct.numel(),), -1, dtype=torch.int64, device=values.device).scatter_reduce_(
        0, inverse, positions, "amax")


def materialise(parent: dict[str, Tensor], delta: Delta) -> dict[str, Tensor]:
    """The version's whole state: ``parent`` (left unchanged) with ``delta`` applied."""
    parts = split_state(parent)
    check_fits(parts, delta)
    state = dict(delta.dense)
    for prefix, (weight, sum_sq) in parts.tables.items():
        change = delta.tables.get(prefix)
        if change is None:
            state[prefix + "weight"], state[prefix + "sum_sq"] = weight, sum_sq
            continue
        weight, sum_sq = _resized(weight, change.size), _resized(sum_sq, change.size)
        weight[change.rows], sum_sq[change.rows] = change.weight.to(weight.dtype), change.sum_sq.to(sum_sq.dtype)
        state[prefix + "weight"], state[prefix + "sum_sq"] = weight, sum_sq
    for key, (ids, rows) in parts.maps.items():
        change = delta.maps.get(key)
        state[key], state[rows_key(key)] = (ids, rows) if change is None else apply_map(ids, rows, change)
    return state


def apply_map(ids: Tensor, rows: Tensor, change: MapChanges) -> tuple[Tensor, Tensor]:
    """A map (ascending ``ids``) with ``change`` applied, as new tensors."""
    drop = torch.isin(ids, torch.cat([change.tombstones, change.ids]))
    merged_ids = torch.cat([ids[~drop], change.ids.to(ids.dtype)])
    merged_rows = torch.cat([rows[~drop], change.rows.to(rows.dtype)])
    order = torch.argsort(merged_ids, stable=True)
    return merged_ids[order].contiguous(), merged_rows[order].contiguous()


def _resized(tensor: Tensor, size: int) -> Tensor:
    """A copy with ``size`` rows: cut, or grown with zero rows (rows a delta does not carry are zeros: see
    ``RowwiseTable.ensure_rows``)."""
    if size <= tensor.shape[0]:
        return tensor[:size].clone()
    out = tensor.new_zeros((size, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def check_fits(parent: StateParts, delta: Delta) -> None:
    """Raise :class:`DeltaError` unless ``delta`` can apply to a state with ``parent``'s entries."""
    if set(delta.dense) != set(parent.dense):
        missing, extra = sorted(set(parent.dense) - set(delta.dense)), sorted(set(delta.dense) - set(parent.dense))
        raise DeltaError(f"dense entries differ from the parent's: missing {missing[:3]}, unknown {extra[:3]}")
    for key, value in delta.dense.items():
        if value.shape != parent.dense[key].shape:
            raise DeltaError(f"{key}: shape {tuple(value.shape)} where the parent has {tuple(parent.dense[key].shape)}")
    if not set(delta.tables) <= set(parent.tables) or not set(delta.maps) <= set(parent.maps):
        raise DeltaError("the delta names a table or map its parent does not have")
    for prefix, change in delta.tables.items():
        weight, sum_sq = parent.tables[prefix]
        k = change.rows.numel()
        if change.weight.shape != (k, *weight.shape[1:]) or change.sum_sq.shape != (k, *sum_sq.shape[1:]):
            raise DeltaError(f"{prefix}: rows of shape {tuple(change.weight.shape)} for a table of {tuple(weight.shape)}")
        if k and (int(change.rows.min()) < 0 or int(change.rows.max()) >= change.size):
            raise DeltaError(f"{prefix}: a row beyond the table's {change.size}")


def row_tables(model: nn.Module) -> dict[str, RowwiseTable]:
    """The model's row-wise tables by their state-dict prefix (``encoder.tables.user_id.``)."""
    return {f"{name}." if name else "": m for name, m in model.named_modules() if isinstance(m, RowwiseTable)}


def field_maps(model: nn.Module) -> dict[str, tuple[FeatureEncoder, str]]:
    """The model's published maps by their ids key (``encoder.map_ids_user_id``): the encoder and the field."""
    return {f"{name}.{_MAP_IDS}{f}" if name else f"{_MAP_IDS}{f}": (m, f) for name, m in model.named_modules()
            if isinstance(m, FeatureEncoder) and m.tables is not None for f in m.id_fields}


def _entries(model: nn.Module) -> dict[str, Tensor]:
    """The model's state-dict entries, the tensors themselves: its parameters and persistent buffers, read as
    ``Module._save_to_state_dict`` reads them, without ``state_dict``'s work (a replica's folds the overlays)."""
    out: dict[str, Tensor] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        out |= {prefix + k: p for k, p in m._parameters.items() if p is not None}
        skip = m._non_persistent_buffers_set
        out |= {prefix + k: b for k, b in m._buffers.items() if b is not None and k not in skip}
    return out


def _ascending(values: Tensor) -> bool:
    return values.numel() < 2 or bool((values[1:] > values[:-1]).all())


def _check_applies(delta: Delta, tables: dict[str, RowwiseTable], maps: dict[str, tuple[FeatureEncoder, str]]) -> None:
    """What ``check_fits`` leaves to a live model: distinct rows, sizes within capacity, and map changes a map
    can take (int64, ids and tombstones ascending and disjoint, rows inside the field's table)."""
    for prefix, change in delta.tables.items():
        table = tables[prefix]
        if change.rows.dtype != torch.int64 or change.rows.dim() != 1 or not _ascending(change.rows):
            raise DeltaError(f"{prefix}: rows must be distinct int64, ascending")
        if not 1 <= change.size <= table.n_rows + 1:
            raise DeltaError(f"{prefix}: {change.size} rows for a table of {table.n_rows} (+ the default row)")
    for key, change in delta.maps.items():
        encoder, field_name = maps[key]
        parts = (change.ids, change.rows, change.tombstones)
        if any(t.dtype != torch.int64 or t.dim() != 1 for t in parts) or change.ids.shape != change.rows.shape:
            raise DeltaError(f"{key}: ids, rows and tombstones must be int64 vectors, as many rows as ids")
        if not _ascending(change.ids) or not _ascending(change.tombstones):
            raise DeltaError(f"{key}: ids and tombstones must be distinct and ascending")
        if change.tombstones.numel() and change.ids.numel():
            at = torch.searchsorted(change.ids, change.tombstones).clamp_(max=change.ids.numel() - 1)
            if bool((change.ids[at] == change.tombstones).any()):
                raise DeltaError(f"{key}: an id both mapped and tombstoned")
        table = encoder.tables[field_name]
        prefix = next(p for p, t in tables.items() if t is table)
        size = delta.tables[prefix].size if prefix in delta.tables else table.weight.shape[0]
        if change.rows.numel() and (int(change.rows.min()) < 1 or int(change.rows.max()) >= size):
            raise DeltaError(f"{key}: rows must lie in [1, {size - 1}], the field's table")


@dataclass(frozen=True)
class PreparedDelta:
    """A delta checked against a model, with each changed map's new overlay already merged (:func:`prepare_delta`):
    what is left is writing it (:func:`install_delta`)."""

    delta: Delta
    overlays: dict[str, tuple[FeatureEncoder, str, Tensor, Tensor]]
    """Per ids key: the encoder, the field, the overlay merged from and the merged one."""
    dense: tuple[list[Tensor], list[Tensor]]
    """The model's dense entries the delta sets, and their new values."""
    rows: list[tuple[RowwiseTable, tuple[Tensor, Tensor, Tensor], int]]
    """Per table: the table, its changed rows with their values (``RowwiseTable.staging``), its size."""


def prepare_delta(model: nn.Module, delta: Delta) -> PreparedDelta:
    """Check ``delta`` against ``model`` and merge its map changes into new overlays, writing nothing: O(overlay +
    changes), the part of an apply that can run beside requests. A delta that does not fit raises
    :class:`DeltaError`."""
    entries, tables, maps = _entries(model), row_tables(model), field_maps(model)
    check_fits(split_state(entries), delta)
    _check_applies(delta, tables, maps)
    overlays = {}
    for key, change in delta.maps.items():
        encoder, field_name = maps[key]
        overlay = encoder.overlay(field_name)
        overlays[key] = (encoder, field_name, overlay, merged_overlay(encoder, field_name, overlay, change))
    dense = ([entries[key] for key in delta.dense], list(delta.dense.values()))
    rows = [(tables[prefix], tables[prefix].staging(change.rows, change.weight, change.sum_sq), change.size)
            for prefix, change in delta.tables.items()]
    return PreparedDelta(delta, overlays, dense, rows)


def merged_overlay(encoder: FeatureEncoder, field_name: str, overlay: Tensor, change: MapChanges) -> Tensor:
    """``FeatureEncoder.merged_overlay`` of ``overlay``, the field's overlay now, with ``change``: through numpy on the
    CPU, where ``np.insert`` merges a replica's overlay (tens of thousands of entries) two to five times faster than
    torch's masked selects and scatters (``learner.models`` itself imports torch only)."""
    if overlay.device.type != "cpu":
        return encoder.merged_overlay(field_name, change.ids, change.rows, change.tombstones)
    ids, rows, tombstones = (t.to("cpu", torch.int64).numpy() for t in (change.ids, change.rows, change.tombstones))
    if tombstones.size:  # one sorted change: the tombstones are entries with row 0
        ids, rows = _insert_sorted(ids, rows, tombstones, np.zeros_like(tombstones))
    return torch.from_numpy(np.stack(_insert_sorted(overlay[0].numpy(), overlay[1].numpy(), ids, rows)))


def _insert_sorted(base_ids: np.ndarray, base_rows: np.ndarray, ids: np.ndarray, rows: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The map ``base`` (ids ascending) with ``ids -> rows`` (ascending, distinct) written over it, row 0 (a
    tombstone) kept as an entry: an id the base holds gets its row written over, the others are inserted in place."""
    at = np.searchsorted(base_ids, ids)  # (k,): base entries below each id
    hit = base_ids[np.minimum(at, base_ids.size - 1)] == ids if base_ids.size else np.zeros(ids.size, dtype=bool)
    if hit.any():
        base_rows = base_rows.copy()
        base_rows[at[hit]] = rows[hit]
    new = ~hit
    return np.insert(base_ids, at[new], ids[new]), np.insert(base_rows, at[new], rows[new])


def install_delta(model: nn.Module, prepared: PreparedDelta) -> None:
    """Make ``model`` serve a prepared delta: dense entries copied into the parameters and buffers, each table's
    changed rows staged (``RowwiseTable.stage_rows``), the merged overlays put in place, and a map folded only past
    ``FOLD_SLACK`` times its bound. What serving's lock must cover; costs the dense part, not the rows (a table's
    growth aside, which copies it). :func:`settle_delta` then writes the rows into the tables. Raises
    :class:`DeltaError`, changing nothing, if an overlay was replaced since the delta was prepared."""
    stale = [key for key, (encoder, name, merged_from, _) in prepared.overlays.items()
             if encoder.overlay(name) is not merged_from]
    if stale:
        raise DeltaError(f"maps {stale} changed since the delta was prepared: prepare it again")
    targets, values = prepared.dense
    if targets:
        with torch.no_grad():  # one call: each call out of Python may wait for the GIL under serving's lock
            torch._foreach_copy_(targets, values)
    for table, staged, size in prepared.rows:
        table.stage_rows(*staged, size)
    for encoder, name, _, merged in prepared.overlays.values():
        encoder.set_overlay(name, merged)
    for encoder in _encoders(model).values():
        if encoder.fold_due(FOLD_SLACK):
            encoder.fold_maps()


def settle_delta(prepared: PreparedDelta) -> None:
    """Write an installed delta's staged rows into their tables (``RowwiseTable.settle_rows``): O(rows), beside
    the requests, which read those rows from the delta until each table's are written."""
    for table, _, _ in prepared.rows:
        table.settle_rows()


def apply_delta(model: nn.Module, delta: Delta) -> None:
    """Apply ``delta`` to ``model`` (the version it is the delta of, as loaded from a base and earlier deltas)
    in place: afterwards the model is the one ``materialise`` gives, loaded, bit for bit. Costs the delta, not the
    model. Everything is checked before anything is written: a delta that does not fit raises :class:`DeltaError`
    and leaves the model as it was. A replica runs the three parts apart: :func:`prepare_delta` beside its
    requests, :func:`install_delta` under its lock, :func:`settle_delta` beside the requests again."""
    prepared = prepare_delta(model, delta)
    install_delta(model, prepared)
    settle_delta(prepared)


def _encoders(model: nn.Module) -> dict[str, FeatureEncoder]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FeatureEncoder) and m.tables is not None}


def fold_due(model: nn.Module) -> bool:
    """Whether a map's overlay has grown past the bound where it should be folded (``learner.models.encoder``)."""
    return any(encoder.fold_due() for encoder in _encoders(model).values())


FOLD_CHUNK = 1 << 16
"""Map entries a replica folds between two pauses (:func:`plan_fold`): about a millisecond of work."""


def plan_fold(model: nn.Module, pause: Callable[[], object] | None = None) -> dict[str, MapFold]:
    """The model's maps with their overlays folded in, changing nothing: O(map), to run beside the requests
    (outside serving's lock). Install it with :func:`install_fold`; one folder at a time. On the CPU the maps are
    folded through numpy a :data:`FOLD_CHUNK` of entries at a time, with ``pause``, when given, called between two
    chunks: at 10^7 ids a fold is a few hundred milliseconds of work, which a replica spreads rather than take a
    core from its requests for all of it."""
    def fold(ids: Tensor, rows: Tensor, overlay_ids: Tensor, overlay_rows: Tensor) -> tuple[Tensor, Tensor]:
        return _fold_in_chunks(ids, rows, overlay_ids, overlay_rows, pause)
    return {name: encoder.plan_fold(fold if encoder.salts.device.type == "cpu" else None)
            for name, encoder in _encoders(model).items()}


def _fold_in_chunks(ids: Tensor, rows: Tensor, overlay_ids: Tensor, overlay_rows: Tensor,
                    pause: Callable[[], object] | None) -> tuple[Tensor, Tensor]:
    """The map ``ids -> rows`` (ascending) with the overlay written over it, its rows 0 removing their ids:
    ``learner.models.encoder``'s fold, through numpy, the map cut into chunks of :data:`FOLD_CHUNK` entries with
    each chunk's share of the overlay (its ids below the next chunk's first)."""
    b, r, o_ids, o_rows = (t.numpy() for t in (ids, rows, overlay_ids, overlay_rows))
    starts = list(range(0, b.size, FOLD_CHUNK)) or [0]
    cuts = [0, *np.searchsorted(o_ids, b[starts[1:]]).tolist(), o_ids.size]  # the overlay's share of each chunk
    folded = []
    for j, start in enumerate(starts):
        if j and pause is not None:
            pause()
        chunk_ids, chunk_rows = _insert_sorted(b[start:start + FOLD_CHUNK], r[start:start + FOLD_CHUNK],
                                               o_ids[cuts[j]:cuts[j + 1]], o_rows[cuts[j]:cuts[j + 1]])
        kept = chunk_rows != 0  # a map has no row 0: the ids removed, and removals of ids it did not hold
        folded.append((chunk_ids, chunk_rows) if kept.all() else (chunk_ids[kept], chunk_rows[kept]))
    total = sum(part[0].size for part in folded)
    out_ids, out_rows = torch.empty(total, dtype=ids.dtype), torch.empty(total, dtype=rows.dtype)
    at, into_ids, into_rows = 0, out_ids.numpy(), out_rows.numpy()
    for j, (part_ids, part_rows) in enumerate(folded):
        if j % 4 == 3 and pause is not None:  # copying is cheaper than merging: a pause every four chunks
            pause()
        into_ids[at:at + part_ids.size], into_rows[at:at + part_ids.size] = part_ids, part_rows
        at += part_ids.size
    return out_ids, out_rows


def install_fold(model: nn.Module, fold: dict[str, MapFold]) -> bool:
    """Install a :func:`plan_fold` in O(overlay) (under serving's lock); False, changing nothing, if a map was
    replaced since it was planned (a load or another fold)."""
    encoders = _encoders(model)
    if set(fold) - set(encoders):
        raise DeltaError(f"a fold of encoders {sorted(set(fold) - set(encoders))} the model does not have")
    stale = [name for name, planned in fold.items() if not encoders[name].fold_is_current(planned)]
    if stale:
        return False
    return all([encoders[name].install_fold(planned) for name, planned in fold.items()])


def to_tensors(delta: Delta) -> dict[str, Tensor]:
    out = {f"dense/{k}": v for k, v in delta.dense.items()}
    for prefix, t in delta.tables.items():
        out |= {f"table/{prefix}/rows": t.rows, f"table/{prefix}/weight": t.weight,
                f"table/{prefix}/sum_sq": t.sum_sq, f"table/{prefix}/size": torch.tensor(t.size, dtype=torch.int64)}
    for key, m in delta.maps.items():
        out |= {f"map/{key}/ids": m.ids, f"map/{key}/rows": m.rows, f"map/{key}/tombstones": m.tombstones}
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def from_tensors(tensors: dict[str, Tensor]) -> Delta:
    dense, tables, maps = {}, {}, {}
    table_parts: dict[str, dict[str, Tensor]] = {}
    map_parts: dict[str, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        key, _, part = rest.rpartition("/")
        if kind == "dense":
            dense[rest] = value
        elif kind == "table" and part in ("rows", "weight", "sum_sq", "size"):
            table_parts.setdefault(key, {})[part] = value
        elif kind == "map" and part in ("ids", "rows", "tombstones"):
            map_parts.setdefault(key, {})[part] = value
        else:
            raise DeltaError(f"not a delta entry: {name!r}")
    for key, p in table_parts.items():
        if set(p) != {"rows", "weight", "sum_sq", "size"} or p["rows"].dtype != torch.int64:
            raise DeltaError(f"table {key!r} lacks a part or has non-integer rows")
        tables[key] = TableRows(p["rows"], p["weight"], p["sum_sq"], int(p["size"]))
    for key, p in map_parts.items():
        if set(p) != {"ids", "rows", "tombstones"} or any(v.dtype != torch.int64 for v in p.values()):
            raise DeltaError(f"map {key!r} lacks a part or is not int64")
        if p["ids"].shape != p["rows"].shape:
            raise DeltaError(f"map {key!r}: {p['ids'].numel()} ids but {p['rows'].numel()} rows")
        maps[key] = MapChanges(p["ids"], p["rows"], p["tombstones"])
    return Delta(dense, tables, maps)


__all__ = ["FOLD_CHUNK", "FOLD_SLACK", "Delta", "DeltaError", "MapChanges", "PreparedDelta", "StateParts", "TableRows",
           "apply_delta", "apply_map", "check_fits", "compose", "diff", "field_maps", "fold_due", "from_tensors",
           "install_delta", "install_fold", "map_changes", "map_keys", "materialise", "merged_overlay", "plan_fold",
           "prepare_delta", "row_tables", "rows_key", "settle_delta", "split_state", "table_prefixes", "to_tensors",
           "without_held"]
