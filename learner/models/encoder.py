"""Feature encoder: hashed ID embeddings plus normalised dense features, one row per event.

IDs. Each ``(field, id)`` key is hashed into one embedding table of ``n_buckets`` rows shared by
all fields, a :class:`~learner.models.sparse.RowwiseTable` trained by sparse row-wise Adagrad (a step updates
the rows its batch touched and nothing else: its cost follows the batch, not the table; the learner calls
:meth:`FeatureEncoder.row_tables` and updates each after backward). Bucket ``b`` is the table's row ``b + 1``; row 0,
the table's default row, is not used by hashing (the hashing trick: no vocabulary, so new users and items in the stream need no
re-indexing). The hash runs in torch on int64, on any device, in 32-bit lanes so no product
overflows. With ``mix`` a bijective 32-bit integer finaliser (xor-shift, multiply by 0x45d9f3b,
three rounds) and the id split into 32-bit halves ``hi, lo``:
``bucket = mix(mix(hi ^ salt) ^ lo) mod n_buckets``. The salt is the CRC-32 of the field name
(stable across processes, unlike Python's ``hash``), so user 5 and item 5 land in unrelated
buckets; ids of one field that share their high half (every id below 2^32) never collide before
the modulo.

Collision rate: with ``N`` distinct keys live in the table (summed over fields) and ``M =
n_buckets``, a given key shares its bucket with at least one other key with probability
``1 - (1 - 1/M)^(N-1) ≈ 1 - exp(-N/M)``; the expected number of occupied buckets is
``M · (1 - exp(-N/M))``. E.g. N = 100k keys in M = 2^18 buckets: about 32% of keys collide with
something. Reducing 64-bit ids to a 32-bit hash adds collisions at rate about ``N / 2^32``,
negligible beside that.

Published maps. With per-field tables, serving maps a raw id to its row through the field's published map: the
ids ascending (``map_ids_<field>``) and their rows (``map_rows_<field>``), one ``searchsorted`` for a batch. A
replica applying a version's delta (``learner.delta.apply_delta``) must not re-sort 10^7 ids for a few thousand
changes, so the changes go to a small *overlay* per field first: its ids ascending with their rows, 0 for an id
removed (a tombstone: served the default row). A lookup reads the overlay first, then the map (two
``searchsorted``); a delta merges into the overlay in O(overlay + changes). Once the overlay passes
``max(OVERLAY_MIN, map / OVERLAY_DIVISOR)`` entries it is due to be folded into the map, an O(map) merge that a
replica computes beside the requests (:meth:`FeatureEncoder.plan_fold`, reading tensors that are never written in
place) and installs in O(overlay) (:meth:`FeatureEncoder.install_fold`). ``state_dict`` reads the maps folded,
so a replica's state after deltas is the plain maps, entry for entry.

Dense features. ``symlog(x) = sign(x) · log1p(|x|)`` compresses heavy-tailed counts and
durations to a few units without statistics, then a learnable per-feature scale and shift. No
BatchNorm: batch statistics drift with the stream, break on batches of one and make a row's output
depend on its batch. No LayerNorm across features either: it would mix unrelated features' scales
within a row, erase each row's overall magnitude, and is degenerate for a single feature. NaN
(missing) becomes 0 and ±inf the largest finite value before symlog.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .sparse import RowwiseTable

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**31, so a 32-bit lane times it stays inside int64
OVERLAY_MIN = 1 << 16
OVERLAY_DIVISOR = 64
"""A field's overlay is due to be folded into its map past ``max(OVERLAY_MIN, map entries // OVERLAY_DIVISOR)``."""


def _mix32(h: Tensor) -> Tensor:
    """A bijection on 32-bit values held in int64 (integer hash finaliser)."""
    for _ in range(3):
        h = ((h ^ (h >> 16)) * _MIX) & _MASK32
    return h ^ (h >> 16)


def field_salt(name: str) -> int:
    return zlib.crc32(name.encode("utf-8")) & _MASK32


def hash_ids(ids: Tensor, salts: Tensor, n_buckets: int) -> Tensor:
    """Bucket of each id: ``ids (..., F)`` int64, ``salts (F,)`` -> ``(..., F)`` in ``[0, n_buckets)``."""
    lo, hi = ids & _MASK32, (ids >> 32) & _MASK32
    return _mix32(_mix32(hi ^ salts) ^ lo) % n_buckets


class FeatureEncoder(nn.Module):
    """``(ids: field -> (B,) int64, dense: (B, n_dense)) -> (B, len(id_fields)·emb_dim + n_dense)``.

    Fields beyond ``id_fields`` in ``ids`` are ignored; a missing one is an error.
    """

    salts: Tensor

    def __init__(self, id_fields: Sequence[str], n_dense: int, n_buckets: int = 2**18, emb_dim: int = 16,
                 emb_lr: float = 0.2, tables: Mapping[str, Mapping[str, int]] | None = None,
                 emb_accumulator: float = 0.0) -> None:
        super().__init__()
        if isinstance(id_fields, str):
            raise TypeError("id_fields must be a sequence of field names, not one string")
        self.id_fields = tuple(id_fields)
        if len(set(self.id_fields)) != len(self.id_fields):
            raise ValueError(f"id_fields must be distinct, got {list(self.id_fields)}")
        salts = [field_salt(f) for f in self.id_fields]
        if len(set(salts)) != len(salts):
            raise ValueError(f"two of {list(self.id_fields)} share a CRC-32 salt; rename one")
        if not 1 <= n_buckets <= 2**32:
            raise ValueError(f"n_buckets must be in [1, 2**32], got {n_buckets}")
        if n_dense < 0 or emb_dim < 1:
            raise ValueError(f"need n_dense >= 0 and emb_dim >= 1, got {n_dense}, {emb_dim}")
        self.n_dense, self.n_buckets, self.emb_dim = n_dense, n_buckets, emb_dim
        if tables and set(tables) != set(self.id_fields):
            raise ValueError(f"tables must name exactly the id fields {list(self.id_fields)}, got {sorted(tables)}")
        self.dims = {f: int(tables[f].get("dim", emb_dim)) if tables else emb_dim for f in self.id_fields}
        if self.n_outputs < 1:
            raise ValueError("the encoder needs at least one id field or dense feature")
        self.register_buffer("salts", torch.tensor(salts, dtype=torch.int64), persistent=False)
        # std 1/sqrt(emb_dim): each field's embedding starts with norm about 1, like a symlog feature. Its seed
        # comes from torch's generator, so the learner's seed decides it as it decides every other weight.
        seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        self.table: RowwiseTable | None = None
        self.tables: nn.ModuleDict | None = None
        if tables:
            self.tables = nn.ModuleDict({
                f: RowwiseTable(int(tables[f]["capacity"]), self.dims[f], lr=emb_lr, init_std=self.dims[f] ** -0.5,
                                seed=seed + i, allocated=0, initial_accumulator=emb_accumulator)
                for i, f in enumerate(self.id_fields)
            })
            for f in self.id_fields:  # the ID -> row maps serving reads (the learner keeps them current)
                self.register_buffer(f"map_ids_{f}", torch.zeros(0, dtype=torch.int64))
                self.register_buffer(f"map_rows_{f}", torch.zeros(0, dtype=torch.int64))
                # (2, n): ids ascending over rows (0: removed), changes not yet folded into the map; one tensor,
                # so a reader beside the writer never sees ids of one version with rows of another
                self.register_buffer(f"map_overlay_{f}", torch.zeros(2, 0, dtype=torch.int64), persistent=False)
        elif self.id_fields:
            self.table = RowwiseTable(n_buckets, emb_dim, lr=emb_lr, init_std=emb_dim**-0.5, seed=seed,
                                      initial_accumulator=emb_accumulator)
        self.dense_scale = nn.Parameter(torch.ones(n_dense))
        self.dense_shift = nn.Parameter(torch.zeros(n_dense))

    @property
    def n_outputs(self) -> int:
        return sum(self.dims.values()) + self.n_dense

    @property
    def field_dims(self) -> tuple[int, ...]:
        """Each embedded field's width, in the order its embedding comes first in the output (the dense features
        follow them)."""
        return tuple(self.dims[f] for f in self.id_fields)

    def map_rows(self, field_name: str, ids: Tensor) -> Tensor:
        """Serving's side of a per-field table: each raw id's row in the published map, 0 (the default row) for
        an id it does not hold (never admitted, expired, or new since the snapshot). The overlay's entries
        (changes applied since the last fold) win over the map's."""
        keys, rows = getattr(self, f"map_ids_{field_name}"), getattr(self, f"map_rows_{field_name}")
        overlay = getattr(self, f"map_overlay_{field_name}")
        ids = ids.to(device=keys.device, dtype=torch.int64)
        found = _find(keys, rows, ids)
        if overlay.shape[1] == 0:
            return found
        at = torch.searchsorted(overlay[0], ids).clamp_(max=overlay.shape[1] - 1)
        return torch.where(overlay[0][at] == ids, overlay[1][at], found)

    def set_map(self, field_name: str, ids: Tensor, rows: Tensor) -> None:
        """Publish a field's ``ids -> rows`` (what the learner's ID map holds, ``ids`` ascending as
        ``IdMap.snapshot`` gives them) for :meth:`map_rows`; it replaces any overlay."""
        setattr(self, f"map_ids_{field_name}", ids.to(torch.int64).contiguous())
        setattr(self, f"map_rows_{field_name}", rows.to(torch.int64).contiguous())
        setattr(self, f"map_overlay_{field_name}", self._no_overlay())

    def update_map(self, field_name: str, ids: Tensor, rows: Tensor, tombstones: Tensor) -> None:
        """Apply a version's changes to a field's map: ``ids`` (ascending, distinct) now map to ``rows`` (>= 1),
        ``tombstones`` (ascending, distinct, none in ``ids``) to nothing. Merged into the overlay in
        O(overlay + changes); the caller checks the changes (``learner.delta.apply_delta``) and folds when due."""
        self.set_overlay(field_name, self.merged_overlay(field_name, ids, rows, tombstones))

    def merged_overlay(self, field_name: str, ids: Tensor, rows: Tensor, tombstones: Tensor) -> Tensor:
        """The overlay :meth:`update_map` would leave, computed without changing anything (it reads the overlay,
        which is only ever replaced, never written in place): a replica merges beside its requests and installs
        the result with :meth:`set_overlay` under its lock."""
        overlay = self.overlay(field_name)
        device = overlay.device
        ids, rows, tombstones = (t.to(device=device, dtype=torch.int64) for t in (ids, rows, tombstones))
        if tombstones.numel():  # one sorted change: the tombstones are entries with row 0
            change = _merge(ids, rows, tombstones, torch.zeros_like(tombstones), keep_removed=True)
        else:
            change = torch.stack([ids, rows])
        return _merge(overlay[0], overlay[1], change[0], change[1], keep_removed=True)

    def overlay(self, field_name: str) -> Tensor:
        """A field's map overlay, ``(2, n)``: ids ascending over rows (0: removed)."""
        return getattr(self, f"map_overlay_{field_name}")

    def set_overlay(self, field_name: str, overlay: Tensor) -> None:
        setattr(self, f"map_overlay_{field_name}", overlay)

    def overlay_entries(self) -> dict[str, int]:
        """Each per-field map's overlay entries: changes applied since the last fold."""
        return {f: int(getattr(self, f"map_overlay_{f}").shape[1]) for f in self._mapped_fields()}

    def fold_due(self, slack: int = 1) -> bool:
        """Whether an overlay has grown past ``slack`` times its bound (see the module doc)."""
        return any(n > slack * max(OVERLAY_MIN, getattr(self, f"map_ids_{f}").numel() // OVERLAY_DIVISOR)
                   for f, n in self.overlay_entries().items())

    def plan_fold(self, fold: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
                  ) -> MapFold:
        """The maps with their overlays folded in, computed without changing anything: O(map), and safe beside
        requests and :meth:`update_map` (it reads tensors that are only ever replaced, never written in place).
        One folder at a time: install it with :meth:`install_fold`. ``fold(map ids, map rows, overlay ids, overlay
        rows)``, when given, computes each folded map in place of this module's merge (a serving replica's, in
        slices beside its requests: ``learner.delta.plan_fold``)."""
        fields = {}
        for f in self._mapped_fields():
            # the map first, then its overlay: a map replaced in between (a load) fails install_fold's check
            ids, rows = getattr(self, f"map_ids_{f}"), getattr(self, f"map_rows_{f}")
            overlay = getattr(self, f"map_overlay_{f}")
            if overlay.shape[1]:
                folded = (fold(ids, rows, overlay[0], overlay[1]) if fold is not None
                          else _merge(ids, rows, overlay[0], overlay[1], keep_removed=False, stacked=False))
                fields[f] = _FieldFold(ids, rows, overlay, *folded)
        return MapFold(fields)

    def install_fold(self, fold: MapFold) -> bool:
        """Install a :meth:`plan_fold`: each map becomes the folded one, and its overlay keeps only the entries
        applied since the plan (O(overlay)). False, changing nothing, if a map was replaced since the plan (a
        load, ``set_map`` or another fold): plan again."""
        if not self.fold_is_current(fold):
            return False
        for f, planned in fold.fields.items():
            overlay = getattr(self, f"map_overlay_{f}")
            setattr(self, f"map_ids_{f}", planned.folded_ids)
            setattr(self, f"map_rows_{f}", planned.folded_rows)
            setattr(self, f"map_overlay_{f}", _without(overlay, planned.overlay))
        return True

    def fold_is_current(self, fold: MapFold) -> bool:
        """Whether every map ``fold`` folded is still the encoder's (so :meth:`install_fold` would take it)."""
        return all(getattr(self, f"map_ids_{f}") is planned.ids and getattr(self, f"map_rows_{f}") is planned.rows
                   for f, planned in fold.fields.items())

    def fold_maps(self) -> None:
        """Fold every overlay into its map now (:meth:`plan_fold` and :meth:`install_fold` in one call)."""
        self.install_fold(self.plan_fold())

    def _mapped_fields(self) -> tuple[str, ...]:
        return self.id_fields if self.tables is not None else ()

    def _no_overlay(self) -> Tensor:
        return torch.zeros(2, 0, dtype=torch.int64, device=self.salts.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """The maps as the plain ascending arrays, any overlay folded in (without folding it here)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for f, planned in self.plan_fold().fields.items():
            destination[prefix + f"map_ids_{f}"] = planned.folded_ids
            destination[prefix + f"map_rows_{f}"] = planned.folded_rows

    def buckets(self, ids: Mapping[str, Tensor]) -> Tensor:
        """Hashed bucket per row and field, ``(B, F)``."""
        missing = [f for f in self.id_fields if f not in ids]
        if missing:
            raise ValueError(f"missing id field(s) {missing}")
        stacked = torch.stack([ids[f].to(torch.int64) for f in self.id_fields], dim=-1)  # (B, F)
        return hash_ids(stacked, self.salts, self.n_buckets)

    def field_rows(self, ids: Mapping[str, Tensor], rows: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Each field's table row, ``(B,)``: ``rows`` as given (training, per-field tables), else the published map's
        (serving), or the hashed bucket's row in the shared table."""
        if self.tables is None:
            buckets = self.buckets(ids) + 1  # (B, F)
            return {f: buckets[:, i] for i, f in enumerate(self.id_fields)}
        missing = [f for f in self.id_fields if f not in (rows if rows is not None else ids)]
        if missing:
            raise ValueError(f"missing id field(s) {missing}")
        return {f: rows[f] if rows is not None else self.map_rows(f, ids[f]) for f in self.id_fields}

    def forward(self, ids: Mapping[str, Tensor], dense: Tensor, rows: Mapping[str, Tensor] | None = None) -> Tensor:
        """``rows``: each field's table rows, mapped by the learner's ID maps (training); without it, per-field
        tables map ``ids`` through the published maps (serving)."""
        parts = []
        if self.tables is not None:
            parts += [self.tables[f].lookup(r) for f, r in self.field_rows(ids, rows).items()]  # (B, dim_f) each
        elif self.table is not None:
            emb = self.table.lookup(self.buckets(ids) + 1)  # (B, F, D)
            parts.append(emb.flatten(1))  # (B, F·D)
        if self.n_dense:
            if dense.dim() != 2 or dense.shape[1] != self.n_dense:
                raise ValueError(f"expected dense (B, {self.n_dense}), got {tuple(dense.shape)}")
            dense = torch.nan_to_num(dense.to(self.dense_scale.dtype), nan=0.0)  # a copy: the caller's is not written
            symlog = dense.abs().log1p_().copysign_(dense)  # (B, n_dense): sign(x) log(1 + |x|), one temporary
            parts.append(torch.addcmul(self.dense_shift, symlog, self.dense_scale))
        return torch.cat(parts, dim=1)  # (B, n_outputs)

    def row_tables(self) -> dict[str, RowwiseTable]:
        """Every embedding table by name: the shared hashed one (``""``) or one per id field."""
        if self.tables is not None:
            return dict(self.tables.items())
        return {"": self.table} if self.table is not None else {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Snapshots of earlier versions held the hashed table as ``embedding.weight`` (an ``nn.Embedding``
        trained by Adam): read it as the table's rows 1.. with a fresh accumulator."""
        for f in self._mapped_fields():  # maps of any size: take the stored one's; a loaded map has no overlay
            for name in (f"map_ids_{f}", f"map_rows_{f}"):
                stored = state_dict.get(prefix + name)
                if stored is not None:
                    setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
            setattr(self, f"map_overlay_{f}", self._no_overlay())
        old = state_dict.pop(prefix + "embedding.weight", None)
        if old is not None and self.table is not None:
            state_dict[prefix + "table.weight"] = torch.cat([self.table.weight[:1].to(old), old])
            state_dict[prefix + "table.sum_sq"] = torch.zeros(old.shape[0] + 1, dtype=old.dtype)
            state_dict[prefix + "table.seed"] = self.table.seed.clone()
            state_dict[prefix + "table.resets"] = self.table.resets.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass(frozen=True)
class _FieldFold:
    ids: Tensor  # the map and overlay the fold read
    rows: Tensor
    overlay: Tensor
    folded_ids: Tensor  # the map with that overlay folded in
    folded_rows: Tensor


@dataclass(frozen=True)
class MapFold:
    """The folded maps of :meth:`FeatureEncoder.plan_fold`, by field (those with an overlay)."""

    fields: dict[str, _FieldFold]


def _find(keys: Tensor, rows: Tensor, ids: Tensor) -> Tensor:
    """Each id's row in the map ``keys (ascending) -> rows``, 0 where it has none."""
    if keys.numel() == 0:
        return torch.zeros_like(ids)
    pos = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)
    return torch.where(keys[pos] == ids, rows[pos], torch.zeros_like(ids))


def _merge(base_ids: Tensor, base_rows: Tensor, ids: Tensor, rows: Tensor, keep_removed: bool,
           stacked: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """The map ``base`` (ids ascending) with the entries ``ids -> rows`` (ascending, distinct) written over it:
    stacked ``(2, n)``, or as two tensors. Rows 0 are removals: kept as entries with ``keep_removed`` (an
    overlay's tombstones), else dropped with the base entries they remove (a fold into the map).

    A linear merge, not a sort: O(base + k log base). An entry's place in the output is its place in the base
    (``searchsorted``) plus the entries written before it, less the base entries they replaced."""
    m = base_ids.numel()
    at = torch.searchsorted(base_ids, ids)  # (k,): base entries below each id
    hit = base_ids[at.clamp(max=m - 1)] == ids if m else torch.zeros_like(ids, dtype=torch.bool)
    kept_ids, kept_rows = base_ids, base_rows
    if bool(hit.any()):
        keep = torch.ones(m, dtype=torch.bool, device=base_ids.device)
        keep[at[hit]] = False
        kept_ids, kept_rows = base_ids.masked_select(keep), base_rows.masked_select(keep)
        at = at - (torch.cumsum(hit, 0) - hit.long())  # below each id among the kept: less the replaced ones
    if not keep_removed:
        written = rows != 0
        ids, rows, at = ids[written], rows[written], at[written]
    n = kept_ids.numel() + ids.numel()
    place = at + torch.arange(ids.numel(), device=at.device)  # (k,): each written entry's index in the output
    if stacked:
        out = base_ids.new_empty((2, n))
        out_ids, out_rows = out[0], out[1]
    else:
        out_ids, out_rows = base_ids.new_empty(n), base_rows.new_empty(n)
    written_at = torch.zeros(n, dtype=torch.bool, device=base_ids.device)
    written_at[place] = True
    out_ids[place], out_rows[place] = ids, rows
    out_ids.masked_scatter_(~written_at, kept_ids)
    out_rows.masked_scatter_(~written_at, kept_rows)
    return out if stacked else (out_ids, out_rows)


def _without(overlay: Tensor, folded: Tensor) -> Tensor:
    """``overlay`` less the entries it shares, id and row alike, with ``folded`` (an overlay folded into the map
    since: those entries are in the map now; an entry updated since the fold differs, so stays)."""
    if overlay is folded:
        return overlay.new_zeros(2, 0)
    if folded.shape[1] == 0:
        return overlay
    at = torch.searchsorted(folded[0], overlay[0]).clamp_(max=folded.shape[1] - 1)
    same = (folded[0][at] == overlay[0]) & (folded[1][at] == overlay[1])
    return overlay[:, ~same].contiguous()
