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

Dense features. ``symlog(x) = sign(x) · log1p(|x|)`` compresses heavy-tailed counts and
durations to a few units without statistics, then a learnable per-feature scale and shift. No
BatchNorm: batch statistics drift with the stream, break on batches of one and make a row's output
depend on its batch. No LayerNorm across features either: it would mix unrelated features' scales
within a row, erase each row's overall magnitude, and is degenerate for a single feature. NaN
(missing) becomes 0 and ±inf the largest finite value before symlog.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .sparse import RowwiseTable

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**31, so a 32-bit lane times it stays inside int64


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
        an id it does not hold (never admitted, expired, or new since the snapshot)."""
        keys, rows = getattr(self, f"map_ids_{field_name}"), getattr(self, f"map_rows_{field_name}")
        ids = ids.to(device=keys.device, dtype=torch.int64)
        if keys.numel() == 0:
            return torch.zeros_like(ids)
        pos = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)
        return torch.where(keys[pos] == ids, rows[pos], torch.zeros_like(ids))

    def set_map(self, field_name: str, ids: Tensor, rows: Tensor) -> None:
        """Publish a field's ``ids -> rows`` (what the learner's ID map holds, ``ids`` ascending as
        ``IdMap.snapshot`` gives them) for :meth:`map_rows`."""
        setattr(self, f"map_ids_{field_name}", ids.to(torch.int64).contiguous())
        setattr(self, f"map_rows_{field_name}", rows.to(torch.int64).contiguous())

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
            dense = torch.nan_to_num(dense.to(self.dense_scale.dtype), nan=0.0)
            symlog = torch.sign(dense) * torch.log1p(dense.abs())  # (B, n_dense)
            parts.append(symlog * self.dense_scale + self.dense_shift)
        return torch.cat(parts, dim=1)  # (B, n_outputs)

    def row_tables(self) -> dict[str, RowwiseTable]:
        """Every embedding table by name: the shared hashed one (``""``) or one per id field."""
        if self.tables is not None:
            return dict(self.tables.items())
        return {"": self.table} if self.table is not None else {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Snapshots of earlier versions held the hashed table as ``embedding.weight`` (an ``nn.Embedding``
        trained by Adam): read it as the table's rows 1.. with a fresh accumulator."""
        for f in self.id_fields if self.tables is not None else ():  # maps of any size: take the stored one's
            for name in (f"map_ids_{f}", f"map_rows_{f}"):
                stored = state_dict.get(prefix + name)
                if stored is not None:
                    setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        old = state_dict.pop(prefix + "embedding.weight", None)
        if old is not None and self.table is not None:
            state_dict[prefix + "table.weight"] = torch.cat([self.table.weight[:1].to(old), old])
            state_dict[prefix + "table.sum_sq"] = torch.zeros(old.shape[0] + 1, dtype=old.dtype)
            state_dict[prefix + "table.seed"] = self.table.seed.clone()
            state_dict[prefix + "table.resets"] = self.table.resets.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
