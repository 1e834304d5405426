"""The anchors of ``moestream bench models``: torch-rechub's and DeepCTR-Torch's MMoE, built at our sizes.

Both peers take feature-column descriptions. Each gets the whole input as *one* dense column of width
``n_inputs`` (torch-rechub: ``DenseFeature("x", embed_dim=n_inputs)`` fed ``{"x": x}``; DeepCTR:
``DenseFeat("x", n_inputs)`` fed the ``(B, n_inputs)`` tensor), so neither pays a per-feature Python
loop and both see exactly the tensor our model sees. What stays theirs is the Python loop over
experts, gates and towers, which is what the benchmark measures.

Architecture matched to ``learner.models.MMoE`` (experts ``Linear+ReLU`` per layer, a softmax gate per
task straight on the input, towers ``Linear+ReLU`` then ``Linear(., 1)``):

- torch-rechub's ``MLP`` always puts a ``BatchNorm1d`` after every Linear (experts, gates, towers) and
  has no switch for it; we swap those for ``nn.Identity`` so its graph is ours layer for layer. That
  removes work from the peer, never adds any: the comparison can only flatter it.
- DeepCTR-Torch: ``gate_dnn_hidden_units=()`` (gate = one Linear on the input, as ours), no BN (its
  default). Its gate and final tower layers have no bias and its ``PredictionLayer`` adds one scalar
  bias per task, so it has ``T·E`` fewer parameters than ours; ``parameter_count`` reports it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learner.models import build, loss_terms

PEERS = ("torch-rechub", "deepctr-torch")


@dataclass(frozen=True)
class MMoESize:
    """One MMoE shape, shared by our model and the peers."""

    n_inputs: int
    n_experts: int
    expert_dims: tuple[int, ...]
    tower_dims: tuple[int, ...]
    n_tasks: int = 2

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(f"task{i}" for i in range(self.n_tasks))

    def forward_flops(self) -> int:
        """Matmul FLOPs of one example's forward pass (2 per multiply-add): experts, gates, the
        gate-weighted mix and the towers. Biases and activations are not counted."""
        experts = _mlp_macs(self.n_inputs, self.expert_dims) * self.n_experts
        gates = self.n_inputs * self.n_experts * self.n_tasks
        mix = self.n_experts * self.expert_dims[-1] * self.n_tasks
        towers = _mlp_macs(self.expert_dims[-1], (*self.tower_dims, 1)) * self.n_tasks
        return 2 * (experts + gates + mix + towers)

    def train_flops(self) -> int:
        """Forward + backward matmul FLOPs of one example: backward costs two matmuls per forward one."""
        return 3 * self.forward_flops()


def _mlp_macs(d_in: int, dims: Sequence[int]) -> int:
    sizes = [d_in, *dims]
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


@dataclass
class Contender:
    """A model and how to get its training loss on a batch; the timing loop treats all alike."""

    name: str
    model: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]  # (x (B, n_inputs), y (B, T)) -> scalar


def ours(size: MMoESize, family: str = "mmoe", **hparams) -> Contender:
    model = build(family, n_inputs=size.n_inputs, tasks=size.tasks, n_experts=size.n_experts,
                  expert_dims=size.expert_dims, tower_dims=size.tower_dims, **hparams)
    tasks = size.tasks

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return loss_terms(model(x), {t: y[:, i] for i, t in enumerate(tasks)})[0]

    return Contender(f"ours ({family})", model, loss)


def _peer_loss(probs: Tensor, y: Tensor) -> Tensor:
    """Same objective as ours: per-task mean BCE, summed over tasks (the peers emit probabilities)."""
    return F.binary_cross_entropy(probs.float(), y, reduction="none").mean(dim=0).sum()


def rechub(size: MMoESize, *, keep_batchnorm: bool = False) -> Contender:
    from torch_rechub.basic.features import DenseFeature
    from torch_rechub.models.multi_task import MMOE

    model = MMOE(
        features=[DenseFeature("x", embed_dim=size.n_inputs)],
        task_types=["classification"] * size.n_tasks,
        n_expert=size.n_experts,
        expert_params={"dims": list(size.expert_dims), "activation": "relu"},
        tower_params_list=[{"dims": list(size.tower_dims), "activation": "relu"}] * size.n_tasks,
    )
    if not keep_batchnorm:
        _strip_batchnorm(model)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return _peer_loss(model({"x": x}), y)

    return Contender("torch-rechub MMOE", model, loss)


def _strip_batchnorm(module: nn.Module) -> None:
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm1d):
                setattr(parent, name, nn.Identity())


def deepctr(size: MMoESize) -> Contender:
    DenseFeat, MMOE = _import_deepctr()
    model = MMOE(
        [DenseFeat("x", size.n_inputs)],
        num_experts=size.n_experts,
        expert_dnn_hidden_units=tuple(size.expert_dims),
        gate_dnn_hidden_units=(),
        tower_dnn_hidden_units=tuple(size.tower_dims),
        task_types=("binary",) * size.n_tasks,
        task_names=size.tasks,
        dnn_activation="relu",
        dnn_use_bn=False,
    )

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return _peer_loss(model(x), y)

    return Contender("DeepCTR-Torch MMOE", model, loss)


def _import_deepctr():
    """DeepCTR-Torch starts a thread on import that asks PyPI for its latest version (and prints when
    offline). Benchmarks stay offline and quiet: answer that one request locally while importing."""
    import requests

    class _NoUpdate:
        status_code = 404
        text = "{}"

    real_get = requests.get
    before = set(threading.enumerate())
    requests.get = lambda *args, **kwargs: _NoUpdate()
    try:
        from deepctr_torch.inputs import DenseFeat
        from deepctr_torch.models.multitask import MMOE

        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=5.0)
    finally:
        requests.get = real_get
    return DenseFeat, MMOE


def contenders(size: MMoESize) -> list[Contender]:
    """Ours, torch-rechub, DeepCTR-Torch, built from the same seed."""
    built = []
    for make in (ours, rechub, deepctr):
        torch.manual_seed(0)
        built.append(make(size))
    return built


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def structure(contender: Contender) -> dict[str, int]:
    """Experts, gates and towers as each library lays them out (for the tests and the notes)."""
    m: Any = contender.model
    if hasattr(m, "experts") and hasattr(m.experts, "n"):  # ours: stacked
        return {"experts": m.experts.n, "gates": m.gates.n_gates, "towers": m.towers.mlp.n}
    if hasattr(m, "expert_dnn"):  # DeepCTR-Torch
        return {"experts": len(m.expert_dnn), "gates": len(m.gate_dnn_final_layer),
                "towers": len(m.tower_dnn_final_layer)}
    return {"experts": len(m.experts), "gates": len(m.gates), "towers": len(m.towers)}  # torch-rechub
