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
   instance, and only those run: rows are dispatched to experts (transformers' Mixtral
   ``expert_hit`` loop; expert weights are unbound once per layer, see
   ``StackedLinear.forward_groups``) or, while the load is even, padded to the busiest expert's row
   count and run as one batched GEMM per layer (``SMES.run_experts``, at most ``PAD_LIMIT`` times
   the routed rows), and each output lands in one of its row's ``max_executed``
   slots, which the task weights then mix in one batched product. No capacity factor, so no row is ever dropped and
   a row's output never depends on the rest of the batch; balance comes from the regulariser.
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

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .layers import ZERO_EPS, BatchedMLP, StackedLinear, TaskTowers
from .output import ModelOutput
from .registry import MultiTaskModel, check_dims, check_positive, register


PAD_LIMIT = 1.5
"""Padded dispatch while the padded table is at most this many times the routed rows (see
``SMES.run_experts``); with 64 experts and 10 of them per row, balanced routing pads about 1.2x."""


def load_balance_loss(counts: Tensor, prob_sums: Tensor, n_slots: Tensor | float, n_experts: int) -> Tensor:
    """``N · Σ_i f_i · P_i`` from summable statistics (see the module docstring, point 6).

    ``counts``: routing choices per expert ``(E,)``; ``prob_sums``: router probability summed over
    (instance, task) slots ``(E,)``; ``n_slots``: number of such slots. Sum each across workers
    first to get the global regulariser.
    """
    f = counts / counts.sum().clamp_min(1.0)  # (E,)
    p = prob_sums / torch.as_tensor(n_slots, dtype=prob_sums.dtype, device=prob_sums.device).clamp_min(1.0)
    return n_experts * (f * p).sum()


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
        self.n_gate_experts = n_experts
        self.k_shared, self.k_private, self.lb_coef = k_shared, k_private, float(lb_coef)
        self.max_executed = min(n_experts, k_shared + n_tasks * k_private)
        self.pad_limit = PAD_LIMIT
        self.experts = BatchedMLP(n_experts, n_inputs, expert_dims, activation)
        self.router = StackedLinear(n_tasks, n_inputs, n_experts)
        self.towers = TaskTowers(n_tasks, expert_dims[-1], tower_dims, activation)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Progressive routing: router probabilities ``(B, T, E)``, each task's selected experts
        ``(B, T, E)`` (bool) and the shared subset ``(B, k_shared)``."""
        probs = torch.softmax(self.router(x), dim=-1)  # (B, T, E)
        n_rows, n_tasks, n_experts = probs.shape
        shared = probs.mean(dim=1).topk(self.k_shared, dim=-1).indices  # (B, k_shared)
        in_shared = probs.new_zeros(n_rows, n_experts, dtype=torch.bool).scatter(1, shared, True)  # (B, E)
        selected = in_shared.unsqueeze(1).expand(-1, n_tasks, -1)  # (B, T, E)
        if self.k_private:
            rest = probs.detach().masked_fill(in_shared.unsqueeze(1), -1.0)  # probabilities are >= 0
            private = rest.topk(self.k_private, dim=-1).indices  # (B, T, k_private)
            selected = selected.scatter(2, private, True)
        return probs, selected, shared

    def dispatch(self, x: Tensor, weights: Tensor, executed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run each expert on the rows routed to it only and combine back.

        ``weights (B, T, E)`` per-task mixing weights, ``executed (B, E)`` which experts run for
        which rows. Returns mixed expert output ``(B, T, H)``, zero fraction ``(E,)`` and rows
        per expert ``(E,)``.

        Each row has at most ``max_executed`` slots; an expert's output for a row lands in that row's
        slot, so the mix is one batched ``(T, K) @ (K, H)`` product per row instead of a ``(pairs, T, H)``
        temporary.
        """
        n_rows, n_experts = executed.shape
        n_slots = self.max_executed
        rows, experts = executed.nonzero(as_tuple=True)  # (R,) (row, expert) pairs, sorted by row
        per_row = executed.sum(dim=1)  # (B,)
        slot = torch.arange(rows.shape[0], device=x.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
        position = rows * n_slots + slot  # (R,) where each pair's output goes in the (B·K) slot table
        expert_at = torch.zeros(n_rows * n_slots, dtype=torch.long, device=x.device).index_copy(0, position, experts)
        filled = torch.zeros(n_rows * n_slots, dtype=torch.bool, device=x.device).index_fill(0, position, True)

        order = torch.argsort(experts, stable=True)  # pairs grouped by expert
        rows_per_expert = torch.bincount(experts, minlength=n_experts)  # (E,)
        table, at = self.run_experts(x, rows[order], experts[order], rows_per_expert)  # (N, H), (R,)
        # Each slot reads its pair's output straight from the experts' table; an empty slot reads row 0
        # and is weighted 0 below, so it adds nothing and passes no gradient.
        source = torch.zeros(n_rows * n_slots, dtype=torch.long, device=x.device).index_copy(0, position[order], at)
        slots = table[source]  # (B·K, H)
        slot_weights = weights.gather(2, expert_at.view(n_rows, 1, n_slots).expand(-1, weights.shape[1], -1))
        slot_weights = slot_weights * filled.view(n_rows, 1, n_slots)  # (B, T, K)
        mixed = torch.bmm(slot_weights.to(table.dtype), slots.view(n_rows, n_slots, -1))  # (B, T, H)

        h = table.detach()[at]  # (R, H): each pair's output, grouped by expert
        zeros_per_pair = (h.abs() <= ZERO_EPS).float().mean(dim=1)  # (R,)
        zero_frac = zeros_per_pair.new_zeros(n_experts).index_add(0, experts[order], zeros_per_pair)
        zero_frac = zero_frac / rows_per_expert.clamp_min(1)  # (E,) over the rows each expert ran on
        return mixed, zero_frac, rows_per_expert

    def run_experts(self, x: Tensor, rows: Tensor, expert_of: Tensor, rows_per_expert: Tensor) -> tuple[Tensor, Tensor]:
        """Each expert on its own rows. ``rows (R,)`` are the rows of ``x`` routed to ``expert_of (R,)``,
        grouped by expert. Returns a table of outputs ``(N, H)`` and, per pair, its row in the table ``(R,)``.

        Padded when the load is even enough: every expert's rows are laid into a block of ``capacity``
        rows (the busiest expert's count) and each layer is one batched GEMM over all experts' blocks; a
        padding row copies some row of ``x`` and its output is never read, so it gets no gradient.
        Otherwise (the busiest expert would make the padded table more than ``pad_limit`` times the routed
        rows) one GEMM per expert that received rows. Both compute every routed row and nothing of an
        unrouted pair; the padded one trades at most ``pad_limit - 1`` of the routed work in padding for a
        few large GEMMs instead of ``2 x E x layers`` small ones and their autograd nodes.
        """
        n_routed, n_experts = rows.shape[0], self.n_gate_experts
        capacity = int(rows_per_expert.max()) if n_routed else 0
        if n_routed and n_experts * capacity <= self.pad_limit * n_routed:
            start = torch.cumsum(rows_per_expert, 0) - rows_per_expert  # (E,) first pair of each expert
            at = expert_of * capacity + (torch.arange(n_routed, device=x.device) - start[expert_of])  # (R,)
            source = torch.zeros(n_experts * capacity, dtype=torch.long, device=x.device).index_copy(0, at, rows)
            blocks = x[source].view(n_experts, capacity, -1).transpose(0, 1)  # (C, E, d_in), member-major underneath
            return self.experts(blocks).transpose(0, 1).reshape(n_experts * capacity, -1), at  # (E·C, H)
        groups = x[rows].split(rows_per_expert.tolist())  # one (R_e, d_in) block per expert
        ran = [o for o in self.experts.forward_groups([g if g.shape[0] else None for g in groups]) if o is not None]
        table = torch.cat(ran) if ran else x.new_zeros(0, self.experts.d_out)
        return table, torch.arange(n_routed, device=x.device)

    def forward(self, x: Tensor) -> ModelOutput:
        self.check_input(x)
        probs, selected, shared = self.route(x)  # (B, T, E)
        weights = probs * selected
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        executed = selected.any(dim=1)  # (B, E)
        mixed, zero_frac, rows_per_expert = self.dispatch(x, weights, executed)  # (B, T, H)
        logits = self.towers(mixed)  # (B, T)
        lb_stats = (
            selected.sum(dim=(0, 1)).to(probs.dtype),  # routing choices per expert
            probs.sum(dim=(0, 1)),  # router probability mass per expert
            probs.new_tensor(float(probs.shape[0] * probs.shape[1])),  # (instance, task) slots
        )
        aux = self.lb_coef * load_balance_loss(*lb_stats, self.n_gate_experts)
        extras = {
            "executed_per_instance": executed.sum(dim=1),
            "rows_per_expert": rows_per_expert,
            "shared_experts": shared,
            "router_probs": probs,
        }
        return self.output(logits, weights, zero_frac, aux_loss=aux, lb_stats=lb_stats, extras=extras)
