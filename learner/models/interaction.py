"""Explicit feature interactions in front of the experts: DCN-v2's cross network (Wang et al., WWW'21).

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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
