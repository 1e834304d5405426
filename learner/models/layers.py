"""Batched building blocks shared by every family.

All experts of a pool (and all gates, and all task towers) are stored as stacked weights
``(n, d_in, d_out)`` and run as one batched GEMM, instead of a Python loop over ``nn.Linear``
modules as torch-rechub / DeepCTR-Torch / PaddleRec do. ``forward_blocks`` runs each member on
its own subset of rows, which is what the sparse (SMES) dispatch needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .diagnostics import diagnostics_on

# Activations of a group of members run together stay under this many bytes (see BatchedMLP.chunk_size).
CHUNK_BYTES = 4 * 1024 * 1024

# Members reading one shared input with at most this many outputs in all run as one GEMM (see stacked_linear).
WIDE_OUTPUTS = 1024

# An activation whose magnitude is at most this is counted as "zero" by `zero_frac`. ReLU gives
# exact zeros; Swish never does, so a small tolerance is what makes the two comparable.
ZERO_EPS = 1e-6


def _identity(x: Tensor) -> Tensor:
    return x


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "identity": _identity,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """Registry lookup, as timm's ``get_act_layer``: layer choices are strings in configs."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}") from None


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``n`` Linear layers at once: ``x`` ``(B, d_in)`` shared or ``(B, n, d_in)`` per member, ``weight``
    ``(n, d_in, d_out)``, ``bias`` ``(n, d_out)`` -> ``(B, n, d_out)``.

    Narrow members reading a shared input (gates, routers: ``n · d_out`` at most ``WIDE_OUTPUTS``) run
    as one wide GEMM over the members' weights side by side; ``n`` GEMMs of a few dozen columns each
    use the cores poorly (SMES's router, 6 x 64 outputs: 2.8 ms forward and backward as 6 GEMMs, 2.4 ms
    as one)."""
    n, d_in, d_out = weight.shape
    if x.dim() == 2 and n * d_out <= WIDE_OUTPUTS:
        side_by_side = weight.transpose(0, 1).reshape(d_in, n * d_out)  # (d_in, n·d_out), a small copy
        y = x @ side_by_side if bias is None else torch.addmm(bias.reshape(-1), x, side_by_side)
        return y.view(x.shape[0], n, d_out)
    return member_major_linear(x if x.dim() == 2 else x.transpose(0, 1), weight, bias).transpose(0, 1)


def member_major_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The batched GEMM behind every stacked layer: ``x`` ``(B, d_in)`` shared by all members or
    ``(n, B, d_in)`` one block per member -> contiguous ``(n, B, d_out)``, bias fused.

    Member-major is the layout a batched GEMM reads and writes without copies, so a chain of stacked
    layers stays in it and is transposed to ``(B, n, d)`` once at the end. A shared input is broadcast
    (``expand``, no copy) rather than run as one wide GEMM: the per-member outputs stay cache-sized.
    """
    if x.dim() == 2:
        x = x.expand(weight.shape[0], *x.shape)  # (n, B, d_in)
    return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight)


@dataclass(frozen=True)
class Blocks:
    """Where each member's rows sit when members run on different rows (SMES's dispatch).

    Every member ``e`` of ``n`` owns a block of ``capacity`` rows, ``e · capacity`` onwards; the
    members in ``spill`` (``(k,)``, distinct) own a second block of ``spill_capacity`` rows each,
    after all the first blocks, in ``spill`` order. A member's rows fill its first block, then its
    spill block; rows left over in a block are padding, computed and never read. One batched GEMM
    per layer runs all first blocks with the stacked weights as they are, and one more runs the spill
    blocks with the spilling members' weights only, so a few busy members do not pad every block to
    their height.
    """

    n: int
    capacity: int
    spill: Tensor
    spill_capacity: int

    @property
    def rows(self) -> int:
        return self.n * self.capacity + self.spill.shape[0] * self.spill_capacity

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(rows, d)`` -> the first blocks ``(n, capacity, d)`` and the spill blocks ``(k, spill_capacity, d)``,
        as views."""
        head, width = self.n * self.capacity, x.shape[1]
        return x[:head].view(self.n, self.capacity, width), x[head:].view(self.spill.shape[0], self.spill_capacity, width)


class _BlockLinear(torch.autograd.Function):
    """A stacked Linear over a ``Blocks`` layout, with a backward that writes the spilling members'
    weight gradients into the one full-size gradient in place. Through autograd, the spill GEMM's
    ``weight.index_select`` would zero-fill a second full-size gradient and add the two each step
    (4 ms of a 57 ms SMES step)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, blocks: Blocks) -> Tensor:  # type: ignore[override]
        ctx.dtypes = (x.dtype, weight.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # compute as autocast would run a bmm (out= ops are not cast)
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        head, tail = blocks.split(x)
        spill_weight = weight.index_select(0, blocks.spill)
        spill_bias = bias.index_select(0, blocks.spill) if bias is not None else None
        out = x.new_empty(blocks.rows, weight.shape[2])
        out_head, out_tail = blocks.split(out)
        with torch.autocast(device, enabled=False):
            _linear_into(out_head, head, weight, bias)
            _linear_into(out_tail, tail, spill_weight, spill_bias)
        ctx.save_for_backward(x, weight, spill_weight)
        ctx.blocks, ctx.has_bias = blocks, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, spill_weight = ctx.saved_tensors
        x_dtype, weight_dtype = ctx.dtypes
        blocks: Blocks = ctx.blocks
        head, tail = blocks.split(x)
        g_head, g_tail = blocks.split(grad.to(x.dtype).contiguous())
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            gx_head, gx_tail = blocks.split(grad_x)
            torch.bmm(g_head, weight.transpose(1, 2), out=gx_head)
            torch.bmm(g_tail, spill_weight.transpose(1, 2), out=gx_tail)
            grad_x = grad_x.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(head.transpose(1, 2), g_head)  # (n, d_in, d_out)
            if blocks.spill.numel():
                grad_w.index_add_(0, blocks.spill, torch.bmm(tail.transpose(1, 2), g_tail))
            grad_w = grad_w.to(weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_head.sum(dim=1)  # (n, d_out)
            if blocks.spill.numel():
                grad_b.index_add_(0, blocks.spill, g_tail.sum(dim=1))
            grad_b = grad_b.to(weight_dtype)
        return grad_x, grad_w, grad_b, None


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``out = x @ weight (+ bias)`` per member, written into ``out`` (a view of a larger table)."""
    if bias is None:
        torch.bmm(x, weight, out=out)
    else:
        torch.baddbmm(bias.unsqueeze(1), x, weight, out=out)


class StackedLinear(nn.Module):
    """``n`` independent Linear layers held as one ``(n, d_in, d_out)`` weight.

    The input is either shared by all members, ``(B, d_in)``, or one slice per member,
    ``(B, n, d_in)``; the output is always ``(B, n, d_out)``. Initialised like ``nn.Linear``
    (uniform in ``±1/sqrt(d_in)``) so a stacked layer and ``n`` plain layers start alike.
    """

    def __init__(self, n: int, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.n, self.d_in, self.d_out = n, d_in, d_out
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, d_out).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return stacked_linear(x, self.weight, self.bias)

    def chunks(self, size: int) -> list[tuple[Tensor, Tensor | None]]:
        """The members in consecutive groups of ``size``, as ``(weight, bias)`` views from one ``split``
        (whose backward is a single concatenation)."""
        weights = self.weight.split(size)
        biases = self.bias.split(size) if self.bias is not None else (None,) * len(weights)
        return list(zip(weights, biases))

    def forward_blocks(self, x: Tensor, blocks: Blocks) -> Tensor:
        """Each member on its own rows, laid out as ``blocks`` describes: ``(blocks.rows, d_in)`` ->
        ``(blocks.rows, d_out)`` in the same layout (see ``Blocks``)."""
        return _BlockLinear.apply(x, self.weight, self.bias, blocks)

    def extra_repr(self) -> str:
        return f"n={self.n}, d_in={self.d_in}, d_out={self.d_out}, bias={self.bias is not None}"


class BatchedMLP(nn.Module):
    """``n`` MLPs of identical shape run together: ``(B, d_in) | (B, n, d_in) -> (B, n, dims[-1])``.

    ``last_activation=False`` leaves the final layer linear (task towers emit raw logits).
    """

    def __init__(
        self,
        n: int,
        d_in: int,
        dims: Sequence[int],
        activation: str = "relu",
        last_activation: bool = True,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError("an MLP needs at least one layer size")
        sizes = [d_in, *dims]
        self.layers = nn.ModuleList(StackedLinear(n, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = activation
        self.last_activation = last_activation
        self._act = get_activation(activation)
        self.n, self.d_out = n, dims[-1]

    def _activate(self, depth: int, x: Tensor) -> Tensor:
        """``x`` is always a fresh layer output that nothing else holds, so ReLU may overwrite it (its
        backward needs only its own output); other activations need their input and allocate."""
        if depth < len(self.layers) - 1 or self.last_activation:
            return F.relu(x, inplace=True) if self.activation == "relu" else self._act(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        h = x if x.dim() == 2 else x.transpose(0, 1)  # shared (B, d_in) or member-major (n, B, d_in)
        # Groups pay off when every member reads the same input; with one input per member (SMES's padded
        # blocks) there is nothing to keep in cache across members, and regrouping cost a 64-expert SMES
        # step 4.5 ms of 73 in concatenations.
        size = self.chunk_size(x.shape[0], x.element_size()) if x.dim() == 2 else self.n
        if size >= self.n:
            for depth, layer in enumerate(self.layers):
                h = self._activate(depth, member_major_linear(h, layer.weight, layer.bias))  # (n, B, d_layer)
            return h.transpose(0, 1)  # (B, n, d_out)
        # Members in cache-sized groups, each group through every layer before the next starts; only
        # the narrow final outputs are concatenated.
        pieces = [cast(StackedLinear, layer).chunks(size) for layer in self.layers]
        outputs = []
        for g in range(len(pieces[0])):
            hg = h  # a shared (B, d_in) input: only those are grouped
            for depth, layer_pieces in enumerate(pieces):
                hg = self._activate(depth, member_major_linear(hg, *layer_pieces[g]))  # (size, B, d_layer)
            outputs.append(hg)
        return torch.cat(outputs).transpose(0, 1)  # (B, n, d_out)

    def chunk_size(self, batch: int, element_bytes: int = 4) -> int:
        """How many members run together: as many as keep the widest layer's activations within
        ``CHUNK_BYTES``, so the GEMM output and the activation after it stay in cache. Small layers run
        all members at once; wide ones in groups (on a 2-core EPYC a 2048 x 256 x 4096 GEMM ran at 138
        GFLOP/s, the same work as 16 GEMMs of 256 columns at 185)."""
        widest = max(cast(StackedLinear, layer).d_out for layer in self.layers)
        return max(1, CHUNK_BYTES // max(1, batch * widest * element_bytes))

    def forward_blocks(self, x: Tensor, blocks: Blocks) -> Tensor:
        """Each member on its own rows, laid out as ``blocks`` describes (see ``Blocks``):
        ``(blocks.rows, d_in) -> (blocks.rows, d_out)``, one or two batched GEMMs per layer."""
        h = x
        for depth, layer in enumerate(self.layers):
            h = self._activate(depth, cast(StackedLinear, layer).forward_blocks(h, blocks))
        return h


class FeatureGate(nn.Module):
    """HoME's per-expert LoRA-style input gate: ``2 · sigmoid(v · A_e · B_e)``, elementwise on ``v``.

    ``B`` starts at zero (as LoRA's up-projection does), so every gate starts at exactly 1 and the
    model starts as if the gate were absent; the factor 2 lets a gate amplify as well as damp.
    """

    def __init__(self, n: int, d: int, rank: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d)
        self.down = nn.Parameter(torch.empty(n, d, rank).uniform_(-bound, bound))  # A
        self.up = nn.Parameter(torch.zeros(n, rank, d))  # B

    def forward(self, v: Tensor) -> Tensor:
        if v.dim() == 2:
            z = torch.einsum("bd,ndr->bnr", v, self.down)  # (B, n, r)
        else:
            z = torch.einsum("bnd,ndr->bnr", v, self.down)  # (B, n, r)
        return 2.0 * torch.sigmoid(torch.einsum("bnr,nrd->bnd", z, self.up))  # (B, n, d)


class ExpertBank(nn.Module):
    """A pool of ``n`` dense experts run as one batched MLP.

    ``member_input[e]`` names which input path expert ``e`` reads when the input is a stack of
    paths ``(B, P, d_in)`` (PLE/HoME upper levels); with a plain ``(B, d_in)`` input all experts
    read the same row. ``norm=True`` is HoME's expert normalisation: the last layer is linear,
    then BatchNorm per expert and feature, then Swish.
    """

    def __init__(
        self,
        n: int,
        d_in: int,
        dims: Sequence[int],
        activation: str = "relu",
        *,
        norm: bool = False,
        feature_gate_rank: int = 0,
        member_input: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.mlp = BatchedMLP(n, d_in, dims, activation, last_activation=not norm)
        self.norm = nn.BatchNorm1d(n * dims[-1]) if norm else None
        self.feature_gate = FeatureGate(n, d_in, feature_gate_rank) if feature_gate_rank > 0 else None
        if member_input is not None:
            if len(member_input) != n:
                raise ValueError(f"member_input names {len(member_input)} paths for {n} experts")
            self.register_buffer("member_input", torch.tensor(list(member_input)), persistent=False)
        else:
            self.member_input = None
        self.n, self.d_out = n, dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        if self.member_input is not None:
            x = x[:, self.member_input]  # (B, E, d_in)
        if self.feature_gate is not None:
            gate = self.feature_gate(x)  # (B, E, d_in)
            x = (x.unsqueeze(1) if x.dim() == 2 else x) * gate  # (B, E, d_in)
        h = self.mlp(x)  # (B, E, H)
        if self.norm is not None:
            h = F.silu(self._normalise(h.flatten(1)).view_as(h))  # (B, E, H)
        return h

    def _normalise(self, h: Tensor) -> Tensor:
        """BatchNorm; a training batch of one row has no variance to normalise by (BatchNorm raises), so
        it is normalised with the running statistics, as in eval, and leaves them unchanged."""
        norm = cast(nn.BatchNorm1d, self.norm)
        if not (self.training and h.shape[0] == 1):
            return norm(h)
        return F.batch_norm(h, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


SMALL_SOFTMAX = 8
"""Below this many classes ``softmax_lastdim`` computes the softmax itself. PyTorch's CPU kernel runs a row in
vectors of 8 floats: from 8 classes on it is the faster one (torch 2.15, 2048 rows, forward + backward, 2
threads: 0.08-0.11 ms for 8 to 16 classes against 0.22-0.27 ms here); below 8 the two are close (0.13-0.24 ms
for 2 to 7 classes against 0.18-0.22 ms) and it falls behind with more rows (2.2x these ops on 6144 rows of 4
classes, 1 thread)."""


class _SmallSoftmax(torch.autograd.Function):
    """Softmax over a short last dimension in whole-tensor ops; half-precision inputs are computed in fp32 and
    returned in their own dtype, as ``torch.softmax`` does."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        e = (xf - xf.amax(-1, keepdim=True)).exp_()
        y = e.div_(e.sum(-1, keepdim=True))
        ctx.save_for_backward(y)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        g = grad.to(y.dtype)
        return (y * (g - (g * y).sum(-1, keepdim=True))).to(grad.dtype)


def softmax_lastdim(x: Tensor) -> Tensor:
    """``torch.softmax(x, dim=-1)``, by ``_SmallSoftmax`` where the last dimension is short (see ``SMALL_SOFTMAX``)."""
    return cast(Tensor, _SmallSoftmax.apply(x)) if x.shape[-1] < SMALL_SOFTMAX else torch.softmax(x, dim=-1)


class GateBank(nn.Module):
    """Softmax gates, one per row of ``visible``, each over its own subset of ``n_experts``.

    All gates of a bank come from one stacked projection. The weights are scattered back onto all
    ``n_experts`` experts, so an expert a gate cannot see gets exactly 0 (no masking with -inf,
    hence no dead parameters). ``gate_input[g]`` picks gate ``g``'s input path, as in
    ``ExpertBank``. A gate that sees a single expert uses a sigmoid instead of a (constant) softmax,
    as HoME's self-gate does.
    """

    index: Tensor

    def __init__(
        self,
        n_experts: int,
        d_in: int,
        visible: Sequence[Sequence[int]],
        gate_input: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        widths = {len(v) for v in visible}
        if len(widths) != 1:
            raise ValueError("all gates of one bank must see the same number of experts")
        (k,) = widths
        self.n_gates, self.k, self.n_experts = len(visible), k, n_experts
        self.proj = StackedLinear(self.n_gates, d_in, k)
        self.register_buffer("index", torch.tensor([list(v) for v in visible]), persistent=False)
        # every gate sees every expert in order (MMoE, OMoE): the weights need no scattering
        self.sees_all = all(list(v) == list(range(n_experts)) for v in visible)
        if gate_input is not None:
            self.register_buffer("gate_input", torch.tensor(list(gate_input)), persistent=False)
        else:
            self.gate_input = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_input is not None:
            x = x[:, self.gate_input]  # (B, G, d_in)
        logits = self.proj(x)  # (B, G, k)
        w = softmax_lastdim(logits) if self.k > 1 else torch.sigmoid(logits)
        if self.sees_all:
            return w
        full = w.new_zeros(w.shape[0], self.n_gates, self.n_experts)
        return full.scatter(2, self.index.expand(w.shape[0], -1, -1), w)  # (B, G, E)


class TaskTowers(nn.Module):
    """One MLP tower per task, batched: ``(B, T, d_in) -> (B, T)`` raw logits."""

    def __init__(self, n_tasks: int, d_in: int, dims: Sequence[int], activation: str = "relu") -> None:
        super().__init__()
        self.mlp = BatchedMLP(n_tasks, d_in, [*dims, 1], activation, last_activation=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x).squeeze(-1)  # (B, T)


def mix(weights: Tensor, experts: Tensor) -> Tensor:
    """Gate-weighted sum of expert outputs: ``(B, G, E) x (B, E, H) -> (B, G, H)``, one batched GEMM over
    the rows. ``experts`` is usually a bank's member-major output seen as ``(B, E, H)``, which ``bmm`` reads
    through its strides; ``einsum`` ran the same ``bmm`` behind a dozen permutes and reshapes each way."""
    return torch.bmm(weights, experts)


def near_zero(h: Tensor) -> Tensor:
    """``1`` where ``|h| <= ZERO_EPS``, else ``0`` (NaN counts as not zero), in ``h``'s dtype, detached.

    Compared in place on the one temporary ``abs`` makes: a boolean result (``h.abs() <= eps``) took 3-5x
    longer on the CPU (2 threads, alone): 0.97 against 0.17 ms for SMES's (11200, 128) expert table of the
    models benchmark, 7.4 against 2.8 ms for the dense 64-expert batch beside it (64, 131072)."""
    return h.detach().abs().le_(ZERO_EPS)


def zero_frac(h: Tensor) -> Tensor:
    """Fraction of (near-)zero activations per expert over the batch: ``(B, E, H) -> (E,)``, float32.

    Reduced member-major, ``(E, B·H)``: expert banks compute in that layout and hand out ``(B, E, H)``
    as a transposed view, so this reads memory in order (a reduction over dims 0 and 2 of the view
    strides across it and ran several times slower). NaN inside ``diagnostics.without_diagnostics``."""
    if not diagnostics_on():
        return torch.full((h.shape[1],), math.nan, dtype=torch.float32, device=h.device)
    per_expert = h.transpose(0, 1).flatten(1)  # (E, B·H), a view when h is member-major
    return near_zero(per_expert).mean(dim=1, dtype=torch.float32)
