"""The two embedding paths ``bench embeddings`` compares (issue #20), each one training step on a batch.

- :class:`RowwisePath`, the learner's since a0e62ec: per ID field an ``IdMap`` gives each raw 64-bit ID its own
  row of a ``RowwiseTable``; rows handed to a new ID are reset (weights and row-wise state); the network is
  trained by fused Adam, the rows the batch touched by row-wise Adagrad (``learner.step``).
- :class:`HashedAdamPath`, the learner before 1c96301: one ``nn.Embedding`` shared by the ID fields
  (``encoder.hash_ids``, mod its rows), trained with the network by fused Adam, so every row moves every step.

Both feed the fields' embeddings and the dense features to the learner's default family (its hparams, tasks and
output biases, Adam at ``learner.lr``), built from the path's seed first, so the two paths of one seed start from
the same network. The timing rows (``benchmarks.embeddings``) and the learning-quality rows
(``benchmarks.embeddings_quality``) run these same classes.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor, nn

from features.definitions import ID_FIELDS
from learner.config import LearnerConfig
from learner.idmap import IdMap, IdMapConfig
from learner.models import ModelOutput, build, loss_terms
from learner.models.encoder import field_salt, hash_ids
from learner.models.sparse import RowwiseTable
from learner.step import build_optimizer

FILL_CHUNK = 1 << 16

Batch = tuple[dict[str, np.ndarray], Tensor, dict[str, Tensor]]
"""Raw IDs per field ``(B,)``, dense features ``(B, n_dense)``, labels per task ``(B,)``."""


def dense_network(n_inputs: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The learner's default family, hparams, tasks and output biases over ``n_inputs``, drawn from ``seed``;
    Adam at the learner's ``lr``."""
    config = LearnerConfig()
    torch.manual_seed(seed)
    net = build(config.family, n_inputs=n_inputs, tasks=list(config.tasks), **dict(config.hparams))
    net.init_output_bias(config.base_rates)
    return net, build_optimizer(net.parameters(), config.lr)


def size_name(n: int) -> str:
    exponent = round(np.log10(n))
    return f"10^{exponent}" if 10**exponent == n else f"{n:,}"


class RowwisePath:
    """Per field an ``IdMap`` and a ``RowwiseTable`` of its capacity (row-wise Adagrad at the learner's
    ``embedding_lr``); the dense network by fused Adam."""

    def __init__(self, capacity: int, emb_dim: int, n_dense: int, seed: int = 0) -> None:
        lr = LearnerConfig().embedding_lr
        self.net, self.optimizer = dense_network(len(ID_FIELDS) * emb_dim + n_dense, seed)
        self.maps = {f: IdMap(IdMapConfig(capacity=capacity)) for f in ID_FIELDS}
        self.tables = {f: RowwiseTable(capacity, emb_dim, lr=lr, seed=seed * len(ID_FIELDS) + i)
                       for i, f in enumerate(ID_FIELDS)}

    def fill(self, universe: dict[str, np.ndarray], progress: Progress | None = None) -> None:
        """Every ID of ``universe`` gets its row (at time 0), in chunks, as a stream of new IDs would."""
        for f, ids in universe.items():
            task = progress.add_task(f"filling {f}: {size_name(len(ids))} IDs", total=len(ids)) if progress else None
            for i in range(0, len(ids), FILL_CHUNK):
                chunk = ids[i:i + FILL_CHUNK]
                self.tables[f].reset_rows(torch.from_numpy(self.maps[f].rows(chunk, 0).fresh))
                if progress is not None and task is not None:
                    progress.advance(task, len(chunk))
            if progress is not None and task is not None:
                progress.remove_task(task)

    def embed(self, field: str, ids: np.ndarray, now_ms: int) -> Tensor:
        """Look up (and admit) the IDs, reset the rows new IDs were given, read the rows: ``(B, dim)``."""
        found = self.maps[field].rows(ids, now_ms)
        table = self.tables[field]
        table.reset_rows(torch.from_numpy(found.fresh))
        return table.lookup(torch.from_numpy(found.rows))

    def step(self, batch: Batch, now_ms: int) -> ModelOutput:
        """One training step; returns its forward pass, the batch scored before the update."""
        ids, dense, labels = batch
        x = torch.cat([*(self.embed(f, ids[f], now_ms) for f in ID_FIELDS), dense], dim=1)  # (B, F·dim + n_dense)
        output = self.net(x)
        total, _ = loss_terms(output, labels)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()  # Adam: the dense network
        for table in self.tables.values():
            table.apply_gradients()  # row-wise Adagrad: the rows this batch touched
        return output

    def live_ids(self) -> int:
        return sum(m.stats()["live"] for m in self.maps.values())

    def bytes_per_live_id(self) -> float:
        """(table rows + row-wise accumulator + map) bytes over both fields, per live ID."""
        nbytes = sum(t.weight.nbytes + t.sum_sq.nbytes for t in self.tables.values())
        return (nbytes + sum(m.nbytes for m in self.maps.values())) / self.live_ids()


class HashedAdamPath:
    """The learner before 1c96301: one hashed ``nn.Embedding`` of ``n_rows`` rows (std ``dim ** -0.5``), trained
    with the network by fused Adam at the learner's ``lr``."""

    def __init__(self, n_rows: int, emb_dim: int, n_dense: int, seed: int = 0) -> None:
        self.n_rows = n_rows
        self.salts = torch.tensor([field_salt(f) for f in ID_FIELDS], dtype=torch.int64)
        self.net, _ = dense_network(len(ID_FIELDS) * emb_dim + n_dense, seed)
        self.embedding = nn.Embedding(n_rows, emb_dim)
        nn.init.normal_(self.embedding.weight, std=emb_dim**-0.5)
        self.optimizer = build_optimizer([self.embedding.weight, *self.net.parameters()], LearnerConfig().lr)

    def step(self, batch: Batch, now_ms: int) -> ModelOutput:
        """One training step; returns its forward pass, the batch scored before the update."""
        ids, dense, labels = batch
        raw = torch.stack([torch.from_numpy(ids[f]) for f in ID_FIELDS], dim=-1)  # (B, F)
        emb = self.embedding(hash_ids(raw, self.salts, self.n_rows))  # (B, F, dim)
        output = self.net(torch.cat([emb.flatten(1), dense], dim=1))
        total, _ = loss_terms(output, labels)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()  # every row, every step
        return output


__all__ = ["Batch", "HashedAdamPath", "RowwisePath", "dense_network", "size_name"]
