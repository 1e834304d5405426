"""Embedding tables trained by sparse row-wise Adagrad: a step costs what the batch touches, not the table.

    table = RowwiseTable(n_rows=10_000_000, dim=32, lr=0.05)
    emb = table.lookup(rows)                       # (B, K, dim); rows in [0, n_rows], 0 the default row
    loss(emb).backward()                           # a (U, dim) gradient for the batch's U unique rows only
    table.apply_gradients()                        # row-wise Adagrad on those U rows, nothing else moves

Invariant: only the rows looked up since the last update move, and so does only their accumulator. A row
that no batch touched keeps its weights and its optimizer state bit for bit (dense Adam keeps moving every
row through its momentum, and pays for every row each step).

The weights are buffers, not parameters: the dense optimizer never sees them, yet ``state_dict`` (and so
a checkpoint or a safetensors snapshot) carries them with their optimizer state:

- ``weight``  (n_rows + 1, dim): row 0 is the shared default row, rows 1..n_rows belong to admitted IDs;
- ``sum_sq``  (n_rows + 1,): the row-wise Adagrad accumulator (``(n_rows + 1, groups)`` with groups);
- ``seed``, ``resets`` (): the table's seed and how many ``reset_rows`` calls it has had, which together seed
  the next re-initialisation (so a restored table draws what the original would have drawn).

The update is FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` (no weight decay): per touched row, with ``g`` the row's
gradient summed over the batch's duplicates, ``state += mean(g**2)`` and ``w -= lr * g / (sqrt(state) + eps)``.
One scalar of state per row instead of Adam's two vectors: a row costs ``(dim + 1) * 4`` bytes.

The default row 0 is trained like any other row. Every lookup of an ID that has no row of its own (not yet
admitted, expired, unknown at serving) reads row 0, so row 0 learns the best single embedding for those IDs:
what serving returns for an ID it has never seen. Keeping it at its initial value would serve noise.

Determinism: unique rows come sorted from ``torch.unique``, gradients reach the leaf and duplicates are
summed through ``embedding_dense_backward`` (deterministic on CPU and CUDA, no atomics), the update writes
distinct rows only, and initial values come from a CPU generator seeded by ``(seed, resets)``, so every
data-parallel replica that resets the same rows in the same order draws the same values on any device.

Delta publishing: the table keeps the set of rows that changed since the publisher's last mark (an update's rows,
a reset's, the rows a growth added; a ``load_state_dict`` changes them all), so a version can ship only those rows
(``learner.delta``): :meth:`RowwiseTable.changed_rows` reads the set, :meth:`RowwiseTable.mark_published` empties
it. Keeping it costs O(rows changed) per step (a bit per row and the list of rows set since the mark), not
O(table). A serving replica writes a version's rows with :meth:`RowwiseTable.load_rows`, or in two halves:
:meth:`RowwiseTable.stage_rows` (O(1), under serving's lock: from then on lookups read those rows' new values from
the staged copy) and :meth:`RowwiseTable.settle_rows` (O(rows), beside the requests: the values written into the
table, then the staged copy dropped). A lookup reads the staged copy before the table, so a row being written is
never read half-written; ``state_dict`` reads the table with the staged rows in it.

A copy beside training: :meth:`RowwiseTable.snapshot` returns a :class:`~learner.models.row_snapshot.RowSnapshot`,
whose ``copy()`` (on another thread, while training goes on) gives the weights and their accumulators exactly as
they were when it was taken. The copy runs in chunks; before an update or a reset writes a row the copy has not
reached yet, the table keeps that row's values (once), and the copy puts them back at the end: the training thread
pays for the rows it writes meanwhile, not for the table (a whole clone of a 10^7-row table held it for 0.3 to 2 s).

Data parallel (replicated tables): each worker takes its local ``gradients()``, the caller all-gathers the
``(rows, grads)`` pairs (padding to the longest, or ``all_gather_object``), concatenates them in rank order
and calls ``update(rows, grads)`` on every worker; ``update`` sums duplicates, so every worker applies the same
update from the same input and every replica holds identical rows. Design and measurements: docs/embeddings.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from learner.models.row_snapshot import RowSnapshot

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, resets) over the 64-bit seed space


class RowwiseTable(nn.Module):
    """``n_rows`` ID rows plus the default row 0, trained by sparse row-wise Adagrad (see the module doc).

    ``lr`` and ``eps`` are the update's; ``init_std`` (default ``dim ** -0.5``) scales the N(0, 1) initial
    values of every row, at construction and in ``reset_rows``; ``seed`` makes those values reproducible.
    ``initial_accumulator``: where every row's ``sum_sq`` starts (and restarts in ``reset_rows``), TensorFlow's
    ``initial_accumulator_value``. With 0 a row's first step has norm ``lr · sqrt(dim)`` whatever the size of
    its gradient (the gradient divided by its own root mean square), so an ID's first impression moves it as far
    as a strong signal would; a start above the gradients' square makes the first steps plain SGD at
    ``lr / sqrt(initial_accumulator)`` until the row has seen that much gradient. It is in the units of the
    squared gradient, which depend on the loss's scale (the learner's loss is a mean over the batch).

    ``groups``: a row's ``dim`` columns split into that many equal groups, each with an accumulator of its own
    (``sum_sq`` then ``(n_rows + 1, groups)``): several small rows stored side by side (a wide term's tasks) that
    Adagrad treats as separate rows, with one lookup and one update for all of them.
    """

    weight: Tensor  # (n_rows + 1, dim)
    sum_sq: Tensor  # (n_rows + 1,), or (n_rows + 1, groups)
    seed: Tensor  # ()
    resets: Tensor  # ()

    def __init__(
        self, n_rows: int, dim: int, lr: float, eps: float = 1e-8, init_std: float | None = None, *, seed: int = 0,
        allocated: int | None = None, initial_accumulator: float = 0.0, groups: int = 1,
    ) -> None:
        super().__init__()
        if n_rows < 0 or dim < 1:
            raise ValueError(f"a table needs n_rows >= 0 and dim >= 1, got n_rows={n_rows}, dim={dim}")
        if groups < 1 or dim % groups:
            raise ValueError(f"groups must divide dim, got dim={dim}, groups={groups}")
        if not lr > 0 or not eps > 0:
            raise ValueError(f"lr and eps must be positive, got lr={lr}, eps={eps}")
        if not initial_accumulator >= 0:
            raise ValueError(f"initial_accumulator must be >= 0, got {initial_accumulator}")
        self.n_rows = n_rows
        self.dim = dim
        self.groups = groups
        self.lr = float(lr)
        self.eps = float(eps)
        self.initial_accumulator = float(initial_accumulator)
        self.init_std = float(dim**-0.5 if init_std is None else init_std)
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))
        start = n_rows if allocated is None else max(0, min(int(allocated), n_rows))
        self.register_buffer("weight", self._initial(start + 1, draw=0))
        self.register_buffer("sum_sq", torch.full((start + 1, *self._group_shape), self.initial_accumulator))
        self.register_buffer("resets", torch.zeros((), dtype=torch.int64))
        # (unique rows, their leaf) per lookup since the last update; the leaf's .grad is the rows' gradient
        self._pending: list[tuple[Tensor, Tensor]] = []
        # Rows changed since the last mark: a bit per row, and the rows whose bit was set since, each once (None
        # once they pass a fraction of the table: then the bits are read instead). Not in the state dict.
        self._changed: Tensor
        self._changed_list: list[Tensor] | None
        self._changed_count: int
        # (weight, sum_sq) storage with room to grow into, when load_rows grew the table (weight is a view of it)
        self._room: tuple[Tensor, Tensor] | None
        self._snapshots: list[RowSnapshot] = []
        """Copies under way (:meth:`snapshot`): each keeps the rows a write is about to change."""
        self._staged: tuple[Tensor, Tensor, Tensor] | None = None
        """Rows (ascending) a version changed, with their weights and accumulators, served from here until
        :meth:`settle_rows` has written them into the table (:meth:`stage_rows`)."""
        self._forget_published()  # nothing is published yet: every row counts as changed

    def extra_repr(self) -> str:
        return (f"n_rows={self.n_rows}, dim={self.dim}, lr={self.lr}, eps={self.eps}, init_std={self.init_std:.4g}, "
                f"initial_accumulator={self.initial_accumulator:g}"
                + (f", groups={self.groups}" if self.groups > 1 else ""))

    @property
    def _group_shape(self) -> tuple[int, ...]:
        """A row's accumulator shape: a scalar, or one per group."""
        return (self.groups,) if self.groups > 1 else ()

    @property
    def row_bytes(self) -> int:
        """Bytes one row holds: its weights and its row-wise accumulator(s)."""
        return self.weight[0].numel() * self.weight.element_size() + self.sum_sq[0].numel() * self.sum_sq.element_size()

    @property
    def allocated(self) -> int:
        """ID rows held in memory (rows ``1..allocated``): the table grows on demand up to ``n_rows``, so its
        memory, checkpoints and snapshots follow the rows in use, not the capacity."""
        return self.weight.shape[0] - 1

    def ensure_rows(self, highest: int, zeros: bool = False) -> None:
        """Hold rows up to ``highest`` (at most ``n_rows``): grows by at least half, new rows drawn as fresh
        ones (the same values on every replica that grows alike) and counted as changed.

        ``zeros``: the new rows are zeros (weights and accumulator) and not changed, for a caller that resets every
        row before it is first read (a collisionless ID map hands each new ID a row through ``reset_rows``): a
        delta then carries its table's new size but none of the rows it added, and a replica that grows by a
        delta (:meth:`load_rows`) fills them with zeros alike."""
        if highest <= self.allocated:
            return
        if highest > self.n_rows:
            raise IndexError(f"row {highest} is beyond the table's {self.n_rows} rows")
        target = min(self.n_rows, max(highest, self.allocated + self.allocated // 2 + 1))
        extra = target - self.allocated
        if zeros:
            self.weight = torch.cat([self.weight, self.weight.new_zeros((extra, self.dim))])
            self.sum_sq = torch.cat([self.sum_sq, self.sum_sq.new_zeros((extra, *self._group_shape))])
            return
        fresh = self._initial(extra, draw=-1 - self.allocated).to(self.weight)  # a draw index of its own per size
        self.weight = torch.cat([self.weight, fresh])
        fresh_state = self.sum_sq.new_full((extra, *self._group_shape), self.initial_accumulator)
        self.sum_sq = torch.cat([self.sum_sq, fresh_state])
        self._mark_changed(torch.arange(self.weight.shape[0] - extra, self.weight.shape[0], device=self.weight.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A state of another allocated size (a grown table) replaces this one's size before it is copied."""
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.shape != self.weight.shape and weight.dim() == 2 and weight.shape[1] == self.dim:
            self.weight = self.weight.new_empty(weight.shape)
            self.sum_sq = self.sum_sq.new_empty((weight.shape[0], *self._group_shape))
        self._staged = None  # the loaded rows replace anything staged
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._forget_published()  # every row may differ from what was published

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """The table as served: rows staged and not settled yet are saved with their staged values."""
        staged = self._staged  # read before the table: a settle that ends meanwhile wrote these same values
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if staged is not None:
            rows, weight, sum_sq = staged
            for name, values in (("weight", weight), ("sum_sq", sum_sq)):
                destination[prefix + name] = destination[prefix + name].detach().index_copy(0, rows, values)

    def snapshot(self) -> RowSnapshot:
        """The weights and their accumulators as they are now, to be copied beside training: ``copy()`` gives
        ``(weight, sum_sq)`` of this moment (``learner.models.row_snapshot``)."""
        self._snapshots = [s for s in self._snapshots if not s.done]
        snap = RowSnapshot((self.weight, self.sum_sq), torch.zeros(self.weight.shape[0], dtype=torch.bool,
                                                                   device=self.weight.device), torch.empty_like)
        self._snapshots.append(snap)
        return snap

    def column_snapshots(self) -> tuple[RowSnapshot, RowSnapshot]:
        """:meth:`snapshot` as one snapshot of the weights and one of the accumulators, so that each can be streamed
        whole in turn (``RowSnapshot.stream``: a checkpoint file lays each tensor out in one piece)."""
        self._snapshots = [s for s in self._snapshots if not s.done]
        snaps = tuple(RowSnapshot((array,), torch.zeros(self.weight.shape[0], dtype=torch.bool, device=self.weight.device),
                                  torch.empty_like, owner=self.weight) for array in (self.weight, self.sum_sq))
        self._snapshots.extend(snaps)
        return snaps

    def _before_write(self, rows: Tensor) -> None:
        if self._snapshots:
            self._snapshots = [s for s in self._snapshots if not s.done]
            for snap in self._snapshots:
                snap.before_write(self.weight, rows)

    # -- what changed since the last publish ----------------------------------------------------------------

    def changed_rows(self) -> Tensor:
        """The rows changed since the last :meth:`mark_published` (or since construction or a load), ascending
        int64 on the table's device. Reads the set and leaves it as it is: a publish that fails keeps them."""
        mask = self._changed_mask()
        if self._changed_list is None:
            return mask.nonzero().flatten()
        if not self._changed_list:
            return torch.zeros(0, dtype=torch.int64, device=self.weight.device)
        listed = torch.cat(self._changed_list).to(self.weight.device)
        self._changed_list = [listed]  # one tensor from now on: the next read does not concatenate again
        return torch.sort(listed).values

    def mark_published(self) -> None:
        """The rows as they are now are published: empties the set of changed rows, in O(rows in it)."""
        mask = self._changed_mask()
        if self._changed_list is None:
            mask.zero_()
        elif self._changed_list:
            mask[torch.cat(self._changed_list).to(mask.device)] = False
        self._changed_list, self._changed_count = [], 0

    def _changed_mask(self) -> Tensor:
        """The bit per row, on the weights' device (``module.to`` moves buffers, not this) and as long as they."""
        mask, rows = self._changed, self.weight.shape[0]
        if mask.device != self.weight.device:
            mask = mask.to(self.weight.device)
        if mask.shape[0] < rows:  # rows added by growth are marked by their grower
            mask = torch.cat([mask, mask.new_zeros(rows - mask.shape[0])])
        elif mask.shape[0] > rows:  # a replica cut to fewer rows: the rows beyond are no longer the table's
            mask = mask[:rows].clone()
            if self._changed_list is not None:
                self._changed_list = [listed[listed < rows] for listed in self._changed_list]
        self._changed = mask
        return mask

    def _mark_changed(self, rows: Tensor) -> None:
        """Adds distinct ``rows`` to the changed set: O(len(rows))."""
        mask = self._changed_mask()
        if self._changed_list is None:  # the bits alone say it
            mask[rows] = True
            return
        new = rows[~mask[rows]]
        mask[new] = True
        self._changed_count += int(new.numel())
        if self._changed_count > max(1024, self.weight.shape[0] // 8):  # a list as long as the mask's 1/8: read it
            self._changed_list = None
        else:
            self._changed_list.append(new)

    def _forget_published(self) -> None:
        """Every row counts as changed (nothing of this table's contents is known to be published)."""
        rows = self.weight.shape[0]
        self._changed = torch.ones(rows, dtype=torch.bool, device=self.weight.device)
        self._changed_list, self._changed_count = None, rows
        self._room = None

    def load_rows(self, rows: Tensor, weight: Tensor, sum_sq: Tensor, size: int) -> None:
        """A version's changed rows written in place (a serving replica applying a delta): the table holds ``size``
        rows, then ``rows`` (distinct) get ``weight`` and ``sum_sq``. A growth keeps room for the trainer's next
        one (:meth:`ensure_rows` grows by half: the table is a view of a larger storage), so a replica copies its
        whole table on every other growth, not on every version that adds rows;
        the rows a growth adds are zeros until written (a delta carries those the trainer drew). The caller
        checks shapes and ranges (``learner.delta.apply_delta``). :meth:`stage_rows` then :meth:`settle_rows`."""
        self.stage_rows(*self.staging(rows, weight, sum_sq), size)
        self.settle_rows()

    def staging(self, rows: Tensor, weight: Tensor, sum_sq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``rows`` (ascending, distinct) and their values on the table's device and dtype, for :meth:`stage_rows`
        (the conversion costs the rows: done before the lock is taken)."""
        device = self.weight.device
        return (rows.to(device=device, dtype=torch.int64), weight.to(device=device, dtype=self.weight.dtype),
                sum_sq.to(device=device, dtype=self.sum_sq.dtype))

    def stage_rows(self, rows: Tensor, weight: Tensor, sum_sq: Tensor, size: int) -> None:
        """Serve ``rows`` (ascending, distinct, as :meth:`staging` gives them) with ``weight`` from now on, without
        writing them: the table holds ``size`` rows (a resize, rare, copies it), and the rows' values are kept
        beside it until :meth:`settle_rows`. O(1) otherwise: what serving's lock covers. Rows staged earlier and
        not settled are settled first."""
        if self._staged is not None:
            self.settle_rows()
        if size != self.weight.shape[0]:
            self._resize(size)
        self._staged = (rows, weight, sum_sq)

    def settle_rows(self) -> None:
        """Write the staged rows into the table, then serve them from it: O(rows), beside the requests. A lookup
        meanwhile reads them from the staged copy, so never half-written."""
        staged = self._staged
        if staged is None:
            return
        rows, weight, sum_sq = staged
        with torch.no_grad():
            self.weight.index_copy_(0, rows, weight)
            self.sum_sq.index_copy_(0, rows, sum_sq)
        self._mark_changed(rows)
        self._staged = None

    def _resize(self, size: int) -> None:
        """``size`` rows (1..n_rows + 1), the first ones kept; growth into room kept by an earlier growth."""
        if not 1 <= size <= self.n_rows + 1:
            raise IndexError(f"a table of {self.n_rows} rows cannot hold {size - 1}")
        room = self._room
        if room is None or room[0].shape[0] < size or room[0].data_ptr() != self.weight.data_ptr():
            held = self.weight.shape[0]
            capacity = min(self.n_rows + 1, size + size // 2 + 2)  # room for the trainer's next growth by half
            keep = min(held, size)
            room = (self.weight.new_empty((capacity, self.dim)), self.sum_sq.new_empty((capacity, *self._group_shape)))
            room[0][:keep], room[1][:keep] = self.weight[:keep], self.sum_sq[:keep]
            self._room = room
        held = self.weight.shape[0]
        self.weight, self.sum_sq = room[0][:size], room[1][:size]
        if size > held:  # rows a delta does not carry are zeros, as the trainer grew them (``ensure_rows(zeros=True)``)
            self.weight[held:].zero_()
            self.sum_sq[held:].zero_()

    def _initial(self, count: int, draw: int) -> Tensor:
        """``count`` fresh rows of N(0, init_std^2), drawn on the CPU so that every device gets the same."""
        if torch.get_default_device().type == "meta":  # sized, not built (``with torch.device("meta")``)
            return torch.empty(count, self.dim)
        g = torch.Generator().manual_seed((int(self.seed) + _GOLDEN * (draw + 1)) % (1 << 63))
        return torch.randn(count, self.dim, generator=g, device="cpu").mul_(self.init_std)

    def _rows(self, rows: Tensor) -> Tensor:
        """``rows`` validated and on the table's device."""
        if not isinstance(rows, Tensor) or rows.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"rows must be an integer tensor, got {getattr(rows, 'dtype', type(rows))}")
        return rows.to(device=self.weight.device, dtype=torch.int64)

    def _check_range(self, unique: Tensor) -> None:
        # unique is sorted: its ends bound every row (two scalars read, no pass over the batch)
        if unique.numel() and (int(unique[0]) < 0 or int(unique[-1]) > self.allocated):
            raise IndexError(f"rows must lie in [0, {self.allocated}] (of {self.n_rows}), got "
                             f"[{int(unique[0])}, {int(unique[-1])}]")

    def lookup(self, rows: Tensor) -> Tensor:
        """The embeddings of ``rows`` (any shape), shaped ``(*rows.shape, dim)``.

        With grad enabled only the batch's U unique rows become a leaf requiring grad, so backward yields a
        ``(U, dim)`` gradient that ``apply_gradients`` (or ``gradients``) takes. Without grad, or in eval mode
        (serving), it is a plain gather that records nothing.
        """
        rows = self._rows(rows)
        if not (torch.is_grad_enabled() and self.training):  # eval mode records nothing either: no leak
            staged = self._staged  # before the table: a settle under way writes only rows staged here
            if rows.numel():
                self._check_range(torch.stack([rows.min(), rows.max()]))
            emb = F.embedding(rows, self.weight)
            return emb if staged is None else _with_staged(emb, rows, staged)
        unique, inverse = torch.unique(rows.reshape(-1), sorted=True, return_inverse=True)  # (U,), (N,)
        self._check_range(unique)
        leaf = self.weight.index_select(0, unique).requires_grad_(True)  # (U, dim): all the graph holds of the table
        self._pending.append((unique, leaf))
        return F.embedding(inverse, leaf).view(*rows.shape, self.dim)  # (*rows.shape, dim)

    def gradients(self) -> tuple[Tensor, Tensor]:
        """Takes the gradients of the rows looked up since the last update: distinct ``rows (R,)`` and their
        summed ``grads (R, dim)``. Lookups whose output got no gradient contribute nothing. Clears them."""
        pending, self._pending = self._pending, []
        parts = [(unique, leaf.grad) for unique, leaf in pending if leaf.grad is not None]
        if not parts:
            return self.weight.new_zeros(0, dtype=torch.int64), self.weight.new_zeros(0, self.dim)
        if len(parts) == 1:
            return parts[0][0], parts[0][1].to(self.weight.dtype)
        return _coalesce(torch.cat([r for r, _ in parts]), torch.cat([g for _, g in parts]).to(self.weight.dtype))

    def update(self, rows: Tensor, grads: Tensor) -> None:
        """Row-wise Adagrad on ``rows`` with gradients ``grads (len(rows), dim)``; duplicate rows are summed
        first. Data-parallel callers pass every worker's ``gradients()`` concatenated in rank order."""
        rows = self._rows(rows).reshape(-1)
        grads = grads.to(device=self.weight.device, dtype=self.weight.dtype).reshape(-1, self.dim)
        if rows.shape[0] != grads.shape[0]:
            raise ValueError(f"{rows.shape[0]} rows but {grads.shape[0]} gradient rows")
        if not rows.numel():
            return
        unique, grads = _coalesce(rows, grads)  # (R,), (R, dim)
        self._check_range(unique)
        with torch.no_grad():
            grouped = grads.view(len(unique), self.groups, -1)  # (R, G, dim / G)
            state = self.sum_sq.index_select(0, unique).add_(grouped.square().mean(dim=2).view(-1, *self._group_shape))
            step = grouped.mul_((self.lr / state.sqrt().add_(self.eps)).view(-1, self.groups, 1)).view(-1, self.dim)
            self._before_write(unique)
            self.sum_sq.index_copy_(0, unique, state)
            self.weight.index_copy_(0, unique, self.weight.index_select(0, unique).sub_(step))
        self._mark_changed(unique)

    def apply_gradients(self) -> int:
        """Updates exactly the rows looked up since the last update and clears them; returns how many rows.
        The same as ``update(*gradients())``."""
        rows, grads = self.gradients()
        self.update(rows, grads)
        return int(rows.numel())

    def clear(self) -> None:
        """Drops the pending gradients without an update (a skipped step)."""
        self._pending = []

    def reset_rows(self, rows: Tensor) -> None:
        """Fresh weights and a fresh accumulator (``initial_accumulator``) for ``rows``: the ID map reuses the rows
        of expired IDs."""
        unique = torch.unique(self._rows(rows).reshape(-1), sorted=True)
        self._check_range(unique)
        if not unique.numel():
            return
        with torch.no_grad():
            fresh = self._initial(unique.numel(), draw=int(self.resets) + 1)
            self._before_write(unique)
            self.weight.index_copy_(0, unique, fresh.to(device=self.weight.device, dtype=self.weight.dtype))
            self.sum_sq.index_fill_(0, unique, self.initial_accumulator)
            self.resets.add_(1)
        self._mark_changed(unique)


def _with_staged(emb: Tensor, rows: Tensor, staged: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``emb`` (the table's rows ``rows``) with the staged rows' values in place of the table's."""
    staged_rows, staged_weight, _ = staged
    if staged_rows.numel() == 0:
        return emb
    at = torch.searchsorted(staged_rows, rows).clamp_(max=staged_rows.numel() - 1)
    hit = (staged_rows[at] == rows).unsqueeze(-1)
    return torch.where(hit, F.embedding(at, staged_weight), emb)


def _coalesce(rows: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct sorted ``rows`` and the sums of their ``grads``, in a fixed order on every device."""
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    if unique.numel() == rows.numel():  # already distinct: only the order may change
        return unique, grads.new_empty(grads.shape).index_copy_(0, inverse, grads)
    # embedding's backward is the deterministic scatter-add (sorted segments, no atomics on CUDA)
    summed = torch.ops.aten.embedding_dense_backward(grads, inverse, unique.numel(), -1, False)
    return unique, summed
