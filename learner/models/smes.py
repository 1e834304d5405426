"""SMES: sparse experts with progressive routing (Zhang et al., "SMES: Towards Scalable Multi-Task
Recommendation via Expert Sparsity", arXiv 2602.09386).

Only the abstract is public. What it fixes: per instance, a task-shared expert subset is selected
jointly across tasks, each task adds task-adaptive private experts, per-instance execution is
bounded, and a global multi-gate load-balancing regulariser acts on expert utilisation aggregated
over all tasks. Every other choice is ours, made as follows:

1. Router: one stacked projection gives logits ``(B, T, E)``; ``p_t = softmax`` over all ``E``
   experts per task. No routing noise: routing is deterministic, so train and eval route alike.
2. Shared subset ``S``: the ``k_shared`` experts with the largest task-aggregated score, the
   *mean of the task probabilities* ``mean_t p_t`` (probabilities, not logits, so no task
   dominates by logit scale).
3. Private experts ``P_t``: the ``k_private`` largest ``p_t`` among experts not in ``S``. Two
   tasks may pick the same private expert; it then runs once.
4. Mixing: task ``t`` mixes ``S ∪ P_t`` with ``p_t`` renormalised over that set (exact zeros
   elsewhere in ``gates``). The gate learns through these weights and the regulariser; top-k
   itself passes no gradient.
5. Bound: the executed set is ``S ∪ (∪_t P_t)``, at most ``k_shared + T·k_private`` experts per
   instance, and only those run: rows are dispatched to experts (as transformers' Mixtral
   ``expert_hit`` loop does) and laid out in blocks, one per expert, as tall as the layout planned
   for the batch; an expert with more rows than that spills the rest into a second block
   (``SMES.plan_blocks``, ``layers.Blocks``). Each layer is then one batched GEMM over all first
   blocks and one over the spill blocks, instead of ``E`` small GEMMs and their autograd nodes.
   Routing is kept in slots: row ``b`` has ``K = k_shared + T·k_private`` candidate experts (the
   shared subset, then the private picks, a repeated pick left unfilled), each task's weights live
   on those ``K`` slots, not on all ``E`` experts, and each expert output lands in its row's slot,
   which the task weights then mix in one batched product. No capacity factor, so no row is ever
   dropped and a row's output never depends on the rest of the batch; balance comes from the
   regulariser.
6. Regulariser: Switch-style ``N · Σ_i f_i · P_i``, with ``f_i`` the fraction of all routing
   choices (instance × task × selected expert) that went to expert ``i`` and ``P_i`` the mean of
   ``p_{t,i}`` over (instance, task) slots; times ``lb_coef``. Both are ratios of sums, so
   ``lb_stats = (counts, prob_sums, n_slots)`` can be all-reduced across workers and
   ``load_balance_loss`` on the sums is exactly the regulariser on the union of their batches.
   It equals 1 whenever the router is uniform and grows as load concentrates.
7. ``k_shared=0`` gives independent per-task top-k routing (the baseline the paper improves on);
   ``k_private=0`` makes all tasks share one subset.

``extras``: ``executed_per_instance`` ``(B,)`` experts run per row; ``rows_per_expert`` ``(E,)``;
``shared_experts`` ``(B, k_shared)``; ``router_probs`` ``(B, T, E)``. ``expert_zero_frac`` is
measured over the rows each expert processed (0 for an expert that got none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .diagnostics import diagnostics_on
from .layers import BatchedMLP, Blocks, StackedLinear, TaskTowers, near_zero
from .output import ModelOutput
from .registry import MultiTaskModel, check_dims, check_positive, register


SPILL_COST_ROWS = 16
"""What one more spilling expert costs, in rows of expert GEMM: its weights are copied for the spill
GEMM and its gradient added back (see ``SMES.plan_blocks``)."""


def load_balance_loss(counts: Tensor, prob_sums: Tensor, n_slots: Tensor | float, n_experts: int) -> Tensor:
    """``N · Σ_i f_i · P_i`` from summable statistics (see the module docstring, point 6).

    ``counts``: routing choices per expert ``(E,)``; ``prob_sums``: router probability summed over
    (instance, task) slots ``(E,)``; ``n_slots``: number of such slots. Sum each across workers
    first to get the global regulariser.
    """
    f = counts / counts.sum().clamp_min(1.0)  # (E,)
    p = prob_sums / torch.as_tensor(n_slots, dtype=prob_sums.dtype, device=prob_sums.device).clamp_min(1.0)
    return n_experts * (f * p).sum()


class Routing(NamedTuple):
    """One batch's routing, in slots: row ``b``'s ``K = k_shared + T·k_private`` candidate experts."""

    probs: Tensor  # (B, T, E) router probabilities
    experts: Tensor  # (B, K) candidate experts: the shared subset, then the private picks (sorted)
    filled: Tensor  # (B, K) bool: the slot runs (False for a private expert repeated in its row)
    chosen: Tensor  # (B, T, K) bool: task t mixes slot k (the shared slots and its own private picks)
    shared: Tensor  # (B, k_shared) the shared subset


@register("smes")
class SMES(MultiTaskModel):
    """Sparse multi-task MoE with progressive routing. hparams: ``n_experts`` (total), ``k_shared``,
    ``k_private``, ``expert_dims``, ``tower_dims``, ``activation``, ``lb_coef``."""

    def __init__(
        self,
        *,
        n_inputs: int,
        tasks: Sequence[str],
        task_types: Mapping[str, str] | None = None,
        n_experts: int = 16,
        k_shared: int = 2,
        k_private: int = 1,
        expert_dims: Sequence[int] = (64, 32),
        tower_dims: Sequence[int] = (32,),
        activation: str = "relu",
        lb_coef: float = 0.01,
    ) -> None:
        super().__init__(n_inputs, tasks, task_types)
        check_positive(n_experts=n_experts)
        for name, k in (("k_shared", k_shared), ("k_private", k_private)):
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {k!r}")
        if not 1 <= k_shared + k_private <= n_experts:
            raise ValueError(
                f"need 1 <= k_shared + k_private <= n_experts, got {k_shared} + {k_private} vs {n_experts}"
            )
        if not lb_coef >= 0:
            raise ValueError(f"lb_coef must be >= 0, got {lb_coef!r}")
        expert_dims = check_dims("expert_dims", expert_dims)
        tower_dims = check_dims("tower_dims", tower_dims, allow_empty=True)
        n_tasks = len(self.tasks)
        self.n_gate_experts = self.lb_experts = n_experts
        self.k_shared, self.k_private, self.lb_coef = k_shared, k_private, float(lb_coef)
        self.max_executed = min(n_experts, k_shared + n_tasks * k_private)
        self.capacity: int | None = None  # first-block height; None plans it per batch (tests pin it)
        self.experts = BatchedMLP(n_experts, n_inputs, expert_dims, activation)
        self.router = StackedLinear(n_tasks, n_inputs, n_experts)
        self.towers = TaskTowers(n_tasks, expert_dims[-1], tower_dims, activation)

    def route(self, x: Tensor) -> Routing:
        """Progressive routing (see the module docstring, points 1-4), in slots: each row's candidate
        experts, the shared subset first, then the tasks' private picks with repeats left unfilled."""
        probs = torch.softmax(self.router(x), dim=-1)  # (B, T, E)
        n_rows, n_tasks, n_experts = probs.shape
        shared = probs.mean(dim=1).topk(self.k_shared, dim=-1).indices  # (B, k_shared)
        if not self.k_private:
            experts = shared
            filled = torch.ones_like(shared, dtype=torch.bool)
            chosen = filled.unsqueeze(1).expand(-1, n_tasks, -1)  # (B, T, k_shared)
        else:
            in_shared = probs.new_zeros(n_rows, n_experts, dtype=torch.bool).scatter(1, shared, True)  # (B, E)
            rest = probs.detach().masked_fill(in_shared.unsqueeze(1), -1.0)  # probabilities are >= 0
            private = rest.topk(self.k_private, dim=-1).indices  # (B, T, k_private), never in the shared subset
            picks = private.reshape(n_rows, -1).sort(dim=1).values  # (B, T·k_private): repeats side by side
            first = torch.ones_like(picks, dtype=torch.bool)
            first[:, 1:] = picks[:, 1:] != picks[:, :-1]  # a private expert two tasks picked runs once
            experts = torch.cat([shared, picks], dim=1)  # (B, K)
            filled = torch.cat([torch.ones_like(shared, dtype=torch.bool), first], dim=1)
            # task t mixes the shared slots and the filled slots holding one of its own picks
            own = (picks.view(n_rows, 1, -1, 1) == private.unsqueeze(2)).any(dim=-1)  # (B, T, T·k_private)
            all_shared = filled[:, : self.k_shared].unsqueeze(1).expand(-1, n_tasks, -1)
            chosen = torch.cat([all_shared, own & first.unsqueeze(1)], dim=2)
        return Routing(probs, experts, filled, chosen, shared)

    def dispatch(self, x: Tensor, routing: Routing, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run each expert on the rows routed to it only and combine back.

        ``weights (B, T, K)`` each task's mixing weight per slot of ``routing``. Returns mixed expert
        output ``(B, T, H)``, zero fraction ``(E,)`` and rows per expert ``(E,)``.

        An expert's output for a row lands in that row's slot, so the mix is one batched
        ``(T, K) @ (K, H)`` product per row instead of a ``(pairs, T, H)`` temporary.
        """
        n_rows, n_slots = routing.experts.shape
        n_experts = self.n_gate_experts
        rows, slot = routing.filled.nonzero(as_tuple=True)  # (R,) (row, slot) pairs, sorted by row
        experts = routing.experts[rows, slot]  # (R,)
        position = rows * n_slots + slot  # (R,) where each pair's output goes in the (B·K) slot table

        rows_per_expert = torch.bincount(experts, minlength=n_experts)  # (E,)
        blocks = self.plan_blocks(rows_per_expert)
        at = self.block_positions(experts, rows_per_expert, blocks)  # (R,) each pair's row in the block table
        # A padding row reads row 0 of x; its output is never read, so it adds nothing and gets no gradient.
        source = torch.zeros(blocks.rows, dtype=torch.long, device=x.device).index_copy(0, at, rows)
        table = self.experts.forward_blocks(x.index_select(0, source), blocks)  # (N, H)
        # Each slot reads its pair's output straight from the table; an unfilled slot reads row 0 and is
        # weighted 0.
        slot_source = torch.zeros(n_rows * n_slots, dtype=torch.long, device=x.device).index_copy(0, position, at)
        slots = table.index_select(0, slot_source)  # (B·K, H)
        mixed = torch.bmm(weights.to(table.dtype), slots.view(n_rows, n_slots, -1))  # (B, T, H)

        if not diagnostics_on():  # scoring: NaN, "not computed" (diagnostics.without_diagnostics)
            return mixed, x.new_full((n_experts,), math.nan), rows_per_expert
        zeros_per_row = near_zero(table).sum(dim=1, dtype=torch.float32)  # (N,)
        zero_frac = x.new_zeros(n_experts).index_add(0, experts, zeros_per_row[at].to(x.dtype))
        zero_frac = zero_frac / (rows_per_expert.clamp_min(1) * table.shape[1])  # (E,) over the rows each expert ran on
        return mixed, zero_frac, rows_per_expert

    def plan_blocks(self, rows_per_expert: Tensor) -> Blocks:
        """The block layout the experts run in (``layers.Blocks``): first blocks as tall as
        ``self.capacity`` if set, else the height that minimises the rows computed; experts with more
        rows spill the rest into blocks as tall as the largest excess.

        Padding everything to the busiest expert cost a quarter more expert GEMM than the routed rows
        with 64 balanced experts (the busiest of 64 sits ~2.5 standard deviations above the mean);
        spilling the busiest few cuts that to a few percent. A skewed batch (an expert with most rows)
        spills that expert alone instead of padding every block to its height.
        """
        counts = rows_per_expert.tolist()
        ranked = sorted(counts, reverse=True)
        busiest = ranked[0] if ranked else 0
        if self.capacity is not None:
            capacity = min(self.capacity, busiest)
        else:  # spilling the k busiest costs E·ranked[k] first-block rows + k spill blocks (and weight copies)
            costs = [(len(ranked) * c + k * (busiest - c + SPILL_COST_ROWS), c) for k, c in enumerate(ranked)]
            capacity = min(costs)[1] if costs else 0
        spill = rows_per_expert.topk(sum(c > capacity for c in counts)).indices  # the experts with rows left over
        return Blocks(len(counts), capacity, spill, busiest - capacity)

    @staticmethod
    def block_positions(experts: Tensor, rows_per_expert: Tensor, blocks: Blocks) -> Tensor:
        """Each (row, expert) pair's row in the block table: the ``i``-th pair of expert ``e`` goes to
        row ``i`` of ``e``'s first block, or past its end into ``e``'s spill block."""
        order = torch.argsort(experts, stable=True)  # pairs grouped by expert
        start = torch.cumsum(rows_per_expert, 0) - rows_per_expert  # (E,) first pair of each expert
        grouped_rank = torch.arange(experts.shape[0], device=experts.device) - start[experts[order]]
        rank = torch.empty_like(grouped_rank).index_copy(0, order, grouped_rank)  # (R,) i of each pair
        spill_of = torch.zeros_like(rows_per_expert).index_copy(
            0, blocks.spill, torch.arange(blocks.spill.shape[0], device=experts.device)
        )  # (E,) each spilling expert's spill block
        first = experts * blocks.capacity + rank
        spilled = blocks.n * blocks.capacity + spill_of[experts] * blocks.spill_capacity + (rank - blocks.capacity)
        return torch.where(rank < blocks.capacity, first, spilled)

    def forward(self, x: Tensor) -> ModelOutput:
        self.check_input(x)
        routing = self.route(x)
        probs, experts, chosen = routing.probs, routing.experts, routing.chosen
        n_rows, n_tasks, n_experts = probs.shape
        slot_experts = experts.unsqueeze(1).expand(-1, n_tasks, -1)  # (B, T, K)
        weights = probs.gather(2, slot_experts) * chosen  # (B, T, K)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        mixed, zero_frac, rows_per_expert = self.dispatch(x, routing, weights)  # (B, T, H)
        logits = self.towers(mixed)  # (B, T)
        # The contract's gates over all E experts (telemetry reads them); the loss reads the slot weights.
        gates = probs.new_zeros(probs.shape).scatter_add(2, slot_experts, weights)
        choices = chosen.sum(dim=1, dtype=probs.dtype)  # (B, K) tasks that chose each slot
        lb_stats = (
            probs.new_zeros(n_experts).index_add(0, experts.flatten(), choices.flatten()),  # routing choices per expert
            probs.sum(dim=(0, 1)),  # router probability mass per expert
            probs.new_tensor(float(n_rows * n_tasks)),  # (instance, task) slots
        )
        aux = self.lb_coef * load_balance_loss(*lb_stats, self.n_gate_experts)
        extras = {
            "executed_per_instance": routing.filled.sum(dim=1),
            "rows_per_expert": rows_per_expert,
            "shared_experts": routing.shared,
            "router_probs": probs,
        }
        return self.output(logits, gates, zero_frac, aux_loss=aux, lb_stats=lb_stats, extras=extras)
