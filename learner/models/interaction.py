"""Explicit feature interactions in front of the experts: products of field embeddings (DLRM's pairwise dot
products, NCF's GMF elementwise product) and DCN-v2's cross network (Wang et al., WWW'21).

Why: the experts are MLPs on the concatenated field embeddings, and an MLP learns a product of two of its
inputs (the user · item affinity that matrix factorisation models directly) only approximately and slowly
(Rendle et al., RecSys'20, "Neural Collaborative Filtering vs. Matrix Factorization Revisited"). One cross
layer makes every bilinear form of the input available to the next linear layer:

    x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l

With ``x_0 = [u, v, dense]``, the row of ``W`` for a coordinate of ``u`` can read ``v``, so ``x_0 ⊙ (W x_0)``
holds ``u_i · (M v)_i`` and a linear layer after it sums them into ``uᵀ M v``: a dot product per task and a
task-specific bilinear form are each one linear readout away. The output has the input's width, so the
families downstream are unchanged; ``W`` starts at zero, so a fresh cross network is the identity and
training starts from what the model was without it.

``rank`` (DCN-v2's low-rank "mixture" without the mixture): ``W = U Vᵀ`` with ``U, V (d, rank)``, for wide
inputs; 0 is full rank, ``d²`` weights per layer.

:class:`FieldProducts` hands the products over as inputs instead of leaving a layer to find them: for every
pair of embedded fields of equal width (user × item, and any categorical field with either), ``"dot"`` appends
their dot product (DLRM, Naumov et al. 2019: one number per pair) and ``"product"`` their elementwise product
(GMF, He et al. WWW'17: ``dim`` numbers per pair, so each task's first linear layer weighs the coordinates of
the affinity for itself, ``uᵀ diag(w_t) v``). Nothing to learn and nothing to start: the products are there
from the first step, and they move as the embeddings do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

FIELD_PRODUCTS = ("none", "dot", "product")
"""The modes of :class:`FieldProducts` (``learner.field_products``)."""


class CrossNetwork(nn.Module):
    """``(B, d) -> (B, d)``: ``layers`` DCN-v2 cross layers; 0 layers is the identity."""

    def __init__(self, d: int, layers: int = 1, rank: int = 0) -> None:
        super().__init__()
        if layers < 0 or rank < 0 or d < 1:
            raise ValueError(f"need d >= 1, layers >= 0 and rank >= 0, got d={d}, layers={layers}, rank={rank}")
        self.d, self.layers, self.rank = d, layers, rank
        self.weight = self.down = self.up = self.bias = None  # no layers, no parameters: earlier snapshots load
        if not layers:
            return
        if rank and rank < d:
            # U starts at zero (the identity, as full rank); V random so U gets a gradient at the first step
            self.down = nn.Parameter(torch.randn(layers, d, rank) / d**0.5)  # V: (L, d, r)
            self.up = nn.Parameter(torch.zeros(layers, rank, d))  # Uᵀ: (L, r, d)
        else:
            self.weight = nn.Parameter(torch.zeros(layers, d, d))  # Wᵀ: (L, d, d)
        self.bias = nn.Parameter(torch.zeros(layers, d))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0  # (B, d)
        for layer in range(self.layers):
            if self.weight is not None:
                mixed = torch.addmm(self.bias[layer], x, self.weight[layer])  # (B, d)
            else:
                mixed = torch.addmm(self.bias[layer], x @ self.down[layer], self.up[layer])  # (B, r) -> (B, d)
            x = x0 * mixed + x  # (B, d)
        return x

    def extra_repr(self) -> str:
        return f"d={self.d}, layers={self.layers}, rank={self.rank or 'full'}"


class FieldProducts(nn.Module):
    """``(B, d) -> (B, d + n_outputs)``: the input with the products of its field embeddings appended.

    ``field_dims``: the widths of the embeddings at the start of the input, in order (what follows them, the
    dense features, is passed through untouched). ``mode``: ``"none"`` (the identity), ``"dot"`` (one dot product
    per pair of fields of equal width) or ``"product"`` (the elementwise product per such pair). Pairs are taken
    by width (one gather per width: no loop over pairs), in field order within a width.
    """

    def __init__(self, field_dims: Sequence[int], mode: str = "none") -> None:
        super().__init__()
        if mode not in FIELD_PRODUCTS:
            raise ValueError(f"field products must be one of {FIELD_PRODUCTS}, got {mode!r}")
        self.field_dims, self.mode = tuple(field_dims), mode
        starts = [sum(self.field_dims[:i]) for i in range(len(self.field_dims))]
        self.widths: tuple[int, ...] = ()
        pairs: list[tuple[int, int]] = []
        if mode != "none":
            self.widths = tuple(sorted({w for w in self.field_dims if self.field_dims.count(w) > 1}))
            if not self.widths:
                raise ValueError(f"field products {mode!r} need two embedded fields of equal width, got widths "
                                 f"{list(self.field_dims)}")
        for w in self.widths:
            fields = [f for f, dim in enumerate(self.field_dims) if dim == w]
            group = [(a, b) for i, a in enumerate(fields) for b in fields[i + 1:]]
            pairs += group
            # the input columns of each pair's left and right field, (P_w, w) each
            for side, at in (("left", 0), ("right", 1)):
                self.register_buffer(f"{side}_{w}", torch.tensor([[starts[p[at]] + k for k in range(w)] for p in group],
                                                                 dtype=torch.int64), persistent=False)
        self.pairs = tuple(pairs)
        self.n_outputs = len(pairs) if mode == "dot" else sum(self.field_dims[a] for a, _ in pairs)

    def forward(self, x: Tensor) -> Tensor:
        if not self.widths:
            return x
        extra = []
        for w in self.widths:
            products = x[:, getattr(self, f"left_{w}")] * x[:, getattr(self, f"right_{w}")]  # (B, P_w, w)
            extra.append(products.sum(-1) if self.mode == "dot" else products.flatten(1))  # (B, P_w) or (B, P_w·w)
        return torch.cat([x, *extra], dim=1)  # (B, d + n_outputs)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, pairs={len(self.pairs)}"
