"""Data-parallel training across trainer workers: every worker holds the same weights after every step.

N trainer workers share one Kafka consumer group, so each reads its own partitions. They train in
lockstep: step ``s`` is one global step over the union of the N local batches, and it is exact, not
an approximation of one. Per step, :class:`OnlineLearner` makes these collectives through a reducer:

1. **Batch statistics, before backward** (one all-reduce SUM of a small vector): per task, the
   number of labelled examples ``c_t`` and, for sparse families, SMES's load-balancing statistics
   ``lb_stats = (counts, prob_sums, n_slots)`` (``learner/models/smes.py``, point 6). The learner
   then forms the *global* loss

       Σ_t w_t · (Σ_{local labelled rows} ℓ_t) / C_t  +  lb_coef · LB(S_local + stopgrad(S_global − S_local))

   where ``C_t`` is the global count and ``S`` the summed statistics. The task terms are each
   worker's share of the union's masked mean (so the average is weighted by example count, per
   task); the regulariser is computed on the union's statistics, global rather than per worker, and
   its gradient flows through the local share only.
2. **Gradients, after backward** (one all-reduce SUM of all gradients flattened into one buffer).
   Because each worker's loss already is its share of the global loss, the *sum* of the workers'
   gradients is the gradient of the union batch's loss; the same optimizer step then runs
   everywhere on the same gradient, so the weights stay identical.
3. **Examples for the streaming aggregates** (one all-gather of the step's ids, times and labels): each
   user and item is owned by one worker (``id mod N``), which folds its events from every worker's batch
   and alone pushes its rows, so no worker overwrites an entity's aggregates with its partial counts.
4. **Buffers, after the step**, for families that have them (HoME's BatchNorm running statistics):
   one all-reduce averaging them, so the workers' models stay identical buffer for buffer too.

Lockstep when data is uneven: before each step the workers agree (an all-reduce MAX of a few
flags: "I have a full batch", "stop") on whether to step. If any worker has a full batch, all step;
a worker with fewer rows contributes what it has, and one with none contributes a **zero-weight
step**: zero counts, zero statistics, zero gradients, but it takes part in both collectives and
in the optimizer step, so its weights, step counter and checkpoint cadence move with the others.
A stop requested on any worker stops them all at the same step.

Rendezvous: the driver (``infra``) picks a TCP store address and hosts the store; each worker
joins it and builds a process group under a prefix that counts its own (re)starts, so a group that
restarts together (Ray actor restarts) meets again under a fresh prefix. gloo on CPU, nccl on GPU.
A collective that fails because a peer died raises :class:`PeerLost`; the caller decides (infra's
actor exits so that Ray restarts it and the group re-forms from the last checkpoint).

``LocalReducer`` is the one-worker case: every collective is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

LbStats = tuple[Tensor, Tensor, Tensor]


class PeerLost(RuntimeError):
    """A collective failed: another worker of the group died or left."""


class Reducer(Protocol):
    rank: int
    world_size: int

    def agree(self, flags: Sequence[bool]) -> list[bool]: ...
    def reduce_batch(self, task_counts: Tensor, lb_stats: LbStats | None) -> tuple[Tensor, LbStats | None]: ...
    def reduce_grads(self, parameters: Iterable[nn.Parameter]) -> None: ...
    def average_buffers(self, module: nn.Module) -> None: ...
    def broadcast_parameters(self, module: nn.Module) -> None: ...
    def gather_rows(self, rows: np.ndarray) -> np.ndarray: ...
    def gather_sparse(self, rows: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]: ...
    def close(self) -> None: ...


class LocalReducer:
    """One worker: the global batch is the local batch."""

    rank, world_size = 0, 1

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        return list(flags)

    def reduce_batch(self, task_counts: Tensor, lb_stats: LbStats | None) -> tuple[Tensor, LbStats | None]:
        return task_counts, lb_stats

    def reduce_grads(self, parameters: Iterable[nn.Parameter]) -> None:
        return None

    def average_buffers(self, module: nn.Module) -> None:
        return None

    def broadcast_parameters(self, module: nn.Module) -> None:
        return None

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def gather_sparse(self, rows: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        return rows, grads

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class GroupConfig:
    """Where and how the workers of one trainer group meet. ``rank`` 0 publishes snapshots."""

    store_host: str
    store_port: int
    world_size: int
    rank: int
    backend: str = "auto"
    """"auto": nccl when the worker trains on CUDA, gloo otherwise."""
    timeout_s: float = 120.0
    """How long a collective waits for a peer before the group is declared broken."""


def host_store(host: str, port: int, world_size: int) -> dist.TCPStore:
    """The rendezvous store, hosted by the driver for the life of the group (it outlives worker restarts)."""
    return dist.TCPStore(host, port, world_size=None, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=60))


class GroupReducer:
    """The N-worker reducer over a ``torch.distributed`` process group (see the module docstring)."""

    def __init__(self, config: GroupConfig, device: torch.device) -> None:
        if not 0 <= config.rank < config.world_size:
            raise ValueError(f"rank {config.rank} outside world_size {config.world_size}")
        self.rank, self.world_size, self.device = config.rank, config.world_size, device
        self._flats: dict[str, Tensor] = {}
        backend = config.backend if config.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        timeout = timedelta(seconds=config.timeout_s)
        store = dist.TCPStore(config.store_host, config.store_port, is_master=False, timeout=timeout)
        generation = store.add(f"starts/{config.rank}", 1)
        self.group_store = dist.PrefixStore(f"generation-{generation}/", store)
        dist.init_process_group(backend, store=self.group_store, rank=config.rank, world_size=config.world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Per flag, true if it is true on any worker."""
        t = torch.tensor([float(f) for f in flags], device=self.device)
        self._all_reduce(t, dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def reduce_batch(self, task_counts: Tensor, lb_stats: LbStats | None) -> tuple[Tensor, LbStats | None]:
        """Global task counts and, with ``lb_stats``, global statistics that carry the local gradient."""
        parts = [task_counts.detach().float().reshape(-1)]
        if lb_stats is not None:
            parts += [s.detach().float().reshape(-1) for s in lb_stats]
        flat = torch.cat(parts)
        self._all_reduce(flat, dist.ReduceOp.SUM)
        sizes = [p.numel() for p in parts]
        pieces = flat.split(sizes)
        counts = pieces[0].reshape(task_counts.shape)
        if lb_stats is None:
            return counts, None
        summed = tuple(
            local + (total.reshape(local.shape) - local.detach()).to(local.dtype)
            for local, total in zip(lb_stats, pieces[1:])
        )
        return counts, summed  # type: ignore[return-value]

    def reduce_grads(self, parameters: Iterable[nn.Parameter]) -> None:
        """Sum every gradient over workers, in one flat buffer kept across steps (a missing gradient counts
        as zero)."""
        params = [p for p in parameters if p.requires_grad]
        flat = self._flat("grads", sum(p.numel() for p in params), params[0].dtype if params else torch.float32)
        pieces = [piece.view_as(p) for p, piece in zip(params, flat.split([p.numel() for p in params]))]
        for p, piece in zip(params, pieces):
            piece.copy_(p.grad) if p.grad is not None else piece.zero_()
        self._all_reduce(flat, dist.ReduceOp.SUM)
        for p, piece in zip(params, pieces):
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)

    def average_buffers(self, module: nn.Module) -> None:
        """Average BatchNorm running statistics over workers after a step, so that every worker keeps
        identical buffers as well as identical weights: each worker's BatchNorm normalises its own batch,
        and the running statistics become the mean of the workers'. The number of batches seen takes the
        largest (a worker that took a zero-weight step ran no forward pass and counted nothing). Other
        buffers are constants set at construction and broadcast at the start."""
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return
        for kind, op in (("stats", dist.ReduceOp.SUM), ("counts", dist.ReduceOp.MAX)):
            if kind == "stats":
                buffers = [b for m in norms for b in (m.running_mean, m.running_var)]
                dtype = buffers[0].dtype
            else:
                buffers = [m.num_batches_tracked for m in norms]
                dtype = torch.float64  # counts < 2**53 stay exact
            flat = self._flat(kind, sum(b.numel() for b in buffers), dtype)
            pieces = [piece.view_as(b) for b, piece in zip(buffers, flat.split([b.numel() for b in buffers]))]
            for b, piece in zip(buffers, pieces):
                piece.copy_(b)
            self._all_reduce(flat, op)
            if kind == "stats":
                flat.div_(self.world_size)
            for b, piece in zip(buffers, pieces):
                b.copy_(piece)

    def _flat(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """A flat buffer of ``numel`` elements reused from step to step (no allocation per collective)."""
        flat = self._flats.get(name)
        if flat is None or flat.numel() != numel or flat.dtype != dtype:
            flat = self._flats[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return flat

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (start of a group: identical weights by construction)."""
        try:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerLost(f"worker {self.rank}: broadcast failed: {exc}") from exc

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every worker's ``(N_r, C)`` int64 rows, concatenated in rank order, on every worker (the step's
        examples for the aggregates, see ``OnlineLearner``). Two collectives: the row counts, then the rows
        padded to the longest."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        counts[self.rank] = rows.shape[0]
        self._all_reduce(counts, dist.ReduceOp.SUM)
        sizes = counts.tolist()
        padded = torch.zeros(max(sizes), rows.shape[1], dtype=torch.int64, device=self.device)
        padded[: rows.shape[0]] = torch.from_numpy(rows).to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        try:
            dist.all_gather(parts, padded)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerLost(f"worker {self.rank}: a collective failed (a peer died or left?): {exc}") from exc
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).cpu().numpy()

    def gather_sparse(self, rows: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """Every worker's embedding-row gradients ``rows (R_r,)``, ``grads (R_r, D)``, concatenated in rank order
        on every worker: each then applies the same row-wise update to the same rows, and the replicated tables
        stay identical. Two collectives: the counts, then rows and gradients padded to the longest."""
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        counts[self.rank] = rows.shape[0]
        self._all_reduce(counts, dist.ReduceOp.SUM)
        sizes = counts.tolist()
        longest = max(sizes)
        packed = torch.zeros(longest, 1 + grads.shape[1], dtype=torch.float64, device=self.device)
        packed[: rows.shape[0], 0] = rows.to(self.device, torch.float64)  # row numbers < 2**53: exact
        packed[: rows.shape[0], 1:] = grads.to(self.device, torch.float64)
        parts = [torch.empty_like(packed) for _ in range(self.world_size)]
        try:
            dist.all_gather(parts, packed)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerLost(f"worker {self.rank}: a collective failed (a peer died or left?): {exc}") from exc
        whole = torch.cat([part[:n] for part, n in zip(parts, sizes)])
        return whole[:, 0].to(torch.int64), whole[:, 1:].to(grads.dtype)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _all_reduce(self, t: Tensor, op) -> None:
        try:
            dist.all_reduce(t, op=op)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerLost(f"worker {self.rank}: a collective failed (a peer died or left?): {exc}") from exc


__all__ = ["GroupConfig", "GroupReducer", "LocalReducer", "PeerLost", "Reducer", "host_store"]
