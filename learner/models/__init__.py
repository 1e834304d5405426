"""The model zoo: multi-task ranking families behind one registry and one output contract.

    from learner.models import build, loss
    model = build("mmoe", n_inputs=100, tasks=["click", "like"])
    out = model(x)                                 # ModelOutput
    total = loss(out, labels={"click": y}, mask={"click": m})

Families (``FAMILIES``): shared_bottom, omoe, mmoe (Ma et al. 2018), ple (Tang et al. 2020),
home (Kuaishou 2024), smes (Kuaishou 2026, sparse). Imports torch and the standard library only,
so a model is usable in a notebook. Design notes: docs/models.md.
"""

from .encoder import FeatureEncoder, hash_ids
from .home import HoME
from .layers import BatchedMLP, ExpertBank, FeatureGate, GateBank, StackedLinear, TaskTowers, get_activation
from .losses import loss, loss_terms
from .mmoe import MMoE, OMoE, SharedBottom
from .output import TASK_TYPES, ModelOutput
from .ple import PLE
from .ranker import MultiTaskRanker
from .registry import MultiTaskModel, build, default_hparams, families
from .smes import SMES, load_balance_loss

# The contract's order (simplest first); the registry must hold exactly these.
FAMILIES: tuple[str, ...] = ("shared_bottom", "omoe", "mmoe", "ple", "home", "smes")
if set(FAMILIES) != set(families()):
    raise RuntimeError(f"registered families {families()} differ from FAMILIES {FAMILIES}")

__all__ = [
    "FAMILIES",
    "PLE",
    "SMES",
    "TASK_TYPES",
    "BatchedMLP",
    "ExpertBank",
    "FeatureEncoder",
    "FeatureGate",
    "GateBank",
    "HoME",
    "MMoE",
    "ModelOutput",
    "MultiTaskModel",
    "MultiTaskRanker",
    "OMoE",
    "SharedBottom",
    "StackedLinear",
    "TaskTowers",
    "build",
    "default_hparams",
    "get_activation",
    "hash_ids",
    "load_balance_loss",
    "loss",
    "loss_terms",
]
