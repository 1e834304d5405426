"""How often hashed ids share an embedding row: the figure that tells when the hashed table is too small."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from learner.models import FeatureEncoder


@dataclass(frozen=True)
class IdCollisions:
    n_keys: int
    """Distinct (field, id) keys seen."""
    n_buckets: int
    occupied: int
    rate: float
    """Fraction of keys that share their bucket with at least one other key."""
    expected_rate: float
    """``1 - exp(-n_keys / n_buckets)``: the rate a uniform hash gives (``learner/models/encoder.py``)."""

    def __str__(self) -> str:
        return (f"hashed ids: {self.n_keys:,} keys in {self.n_buckets:,} buckets, collision rate {self.rate:.2%} "
                f"(uniform hashing: {self.expected_rate:.2%})")


def id_collisions(encoder: FeatureEncoder, ids: dict[str, np.ndarray]) -> IdCollisions:
    """Collision rate of the hashed embedding table over the given ids per field (e.g. all ids seen)."""
    n = max((len(v) for v in ids.values()), default=0)
    if n == 0:
        return IdCollisions(0, encoder.n_buckets, 0, 0.0, 0.0)
    device = encoder.salts.device
    buckets = []
    for field_name, values in ids.items():  # one field at a time: the others are padded with a fixed id
        column = {f: torch.zeros(len(values), dtype=torch.int64, device=device) for f in encoder.id_fields}
        column[field_name] = torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)
        buckets.append(encoder.buckets(column)[:, encoder.id_fields.index(field_name)])
    all_buckets = torch.cat(buckets)
    _, inverse, counts = torch.unique(all_buckets, return_inverse=True, return_counts=True)
    n_keys = int(all_buckets.numel())
    rate = float((counts[inverse] > 1).float().mean())
    expected = 1.0 - float(np.exp(-n_keys / encoder.n_buckets))
    return IdCollisions(n_keys, encoder.n_buckets, int(counts.numel()), rate, expected)
