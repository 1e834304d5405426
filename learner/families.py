"""The model families' hparams, known without importing torch: what ``moestream config show`` checks.

``learner.models`` builds a family and refuses an unknown or bad hparam when the trainer starts, inside
Ray, after topics were created and W&B started. The configuration is checked when it is loaded instead,
against this spec: per family, each hparam's default and its check. ``tests/learner/test_families.py``
holds the two together: the defaults equal ``learner.models.default_hparams``, values this spec accepts
build, and values it refuses are refused by ``learner.models.build`` too (or are stricter here, listed
there), so neither can drift from the other.

Standard library only: loading the configuration must stay fast.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACTIVATIONS: tuple[str, ...] = ("gelu", "identity", "relu", "silu", "swish", "tanh")
"""The names ``learner.models.get_activation`` accepts."""


class HparamError(ValueError):
    """A family or hparam the models would refuse; the message names the config key."""


@dataclass(frozen=True)
class Hparam:
    default: Any
    check: Callable[[str, Any, Sequence[str]], Any]
    """``(key, value, tasks) -> value``, normalised (a YAML list becomes a tuple), or raises HparamError."""


def _strict_int(key: str, value: Any) -> int:
    if isinstance(value, str):  # environment variables arrive as text
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise HparamError(f"{key} must be an integer, got {value!r}")
    return value


def positive_int(key: str, value: Any, tasks: Sequence[str] = ()) -> int:
    value = _strict_int(key, value)
    if value < 1:
        raise HparamError(f"{key} must be a positive integer, got {value!r}")
    return value


def non_negative_int(key: str, value: Any, tasks: Sequence[str] = ()) -> int:
    value = _strict_int(key, value)
    if value < 0:
        raise HparamError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def non_negative_float(key: str, value: Any, tasks: Sequence[str] = ()) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise HparamError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def flag(key: str, value: Any, tasks: Sequence[str] = ()) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise HparamError(f"{key} must be true or false, got {value!r}")
    return value


def _dims(key: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise HparamError(f"{key} must be a list of layer sizes, got {value!r}")
    dims = tuple(value)
    if (not dims and not allow_empty) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        kind = "list" if allow_empty else "non-empty list"
        raise HparamError(f"{key} must be a {kind} of positive layer sizes, got {value!r}")
    return dims


def expert_dims(key: str, value: Any, tasks: Sequence[str] = ()) -> tuple[int, ...]:
    return _dims(key, value, allow_empty=False)


def tower_dims(key: str, value: Any, tasks: Sequence[str] = ()) -> tuple[int, ...]:
    """May be empty: a linear tower."""
    return _dims(key, value, allow_empty=True)


def activation(key: str, value: Any, tasks: Sequence[str] = ()) -> str:
    if value not in ACTIVATIONS:
        raise HparamError(f"{key}: unknown activation {value!r}; choose from {list(ACTIVATIONS)}")
    return value


def groups(key: str, value: Any, tasks: Sequence[str]) -> dict[str, tuple[str, ...]] | None:
    """HoME's meta-task groups: every task in exactly one non-empty group (None: by watch time)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise HparamError(f"{key} must map group names to lists of tasks, got {value!r}")
    resolved: dict[str, tuple[str, ...]] = {}
    seen: list[str] = []
    for name, members in value.items():
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence) or not members:
            raise HparamError(f"{key}.{name} must list at least one task, got {members!r}")
        resolved[str(name)] = tuple(members)
        seen.extend(members)
    unknown = sorted(set(seen) - set(tasks), key=str)
    twice = sorted({t for t in seen if seen.count(t) > 1}, key=str)
    missing = [t for t in tasks if t not in seen]
    if unknown or twice or missing:
        raise HparamError(f"{key}: every task must be in exactly one group; unknown tasks {unknown}, "
                          f"tasks in several groups {twice}, ungrouped tasks {missing}")
    return resolved


_DENSE = {"expert_dims": Hparam((64, 32), expert_dims), "tower_dims": Hparam((32,), tower_dims),
          "activation": Hparam("relu", activation)}

FAMILY_HPARAMS: dict[str, dict[str, Hparam]] = {
    "shared_bottom": dict(_DENSE),
    "omoe": {"n_experts": Hparam(4, positive_int), **_DENSE},
    "mmoe": {"n_experts": Hparam(4, positive_int), **_DENSE},
    "ple": {"n_experts": Hparam(2, positive_int), "n_levels": Hparam(2, positive_int), **_DENSE},
    "home": {
        "n_experts": Hparam(2, positive_int), **_DENSE, "groups": Hparam(None, groups),
        "expert_norm": Hparam(True, flag), "hierarchy": Hparam(True, flag), "feature_gate": Hparam(True, flag),
        "feature_gate_rank": Hparam(4, positive_int), "self_gate": Hparam(True, flag),
    },
    "smes": {
        "n_experts": Hparam(16, positive_int), "k_shared": Hparam(2, non_negative_int),
        "k_private": Hparam(1, non_negative_int), **_DENSE, "lb_coef": Hparam(0.01, non_negative_float),
    },
}
"""Family -> hparam -> default and check, in the order of the family's constructor."""

FAMILIES: tuple[str, ...] = tuple(FAMILY_HPARAMS)


def default_hparams(family: str) -> dict[str, Any]:
    """Every hparam of ``family`` with its default (what ``learner.models.default_hparams`` returns)."""
    return {name: spec.default for name, spec in _family(family).items()}


def _family(family: str, key: str = "learner.family") -> dict[str, Hparam]:
    try:
        return FAMILY_HPARAMS[family]
    except (KeyError, TypeError):
        hint = difflib.get_close_matches(str(family), FAMILIES, n=1)
        raise HparamError(f"{key}: unknown model family {family!r}{f' (did you mean {hint[0]}?)' if hint else ''}; "
                          f"choose from {list(FAMILIES)}") from None


def check_hparams(family: str, hparams: Mapping[str, Any], tasks: Sequence[str],
                  prefix: str = "learner") -> dict[str, Any]:
    """``hparams`` checked against ``family``'s spec and normalised; raises :class:`HparamError` naming the
    first offending key (``learner.family``, ``learner.hparams.<name>``)."""
    spec = _family(family, f"{prefix}.family")
    if not isinstance(hparams, Mapping):
        raise HparamError(f"{prefix}.hparams must map hparam names to values, got {hparams!r}")
    checked: dict[str, Any] = {}
    for name, value in hparams.items():
        key = f"{prefix}.hparams.{name}"
        if name not in spec:
            hint = difflib.get_close_matches(str(name), spec, n=1)
            raise HparamError(f"{key}: unknown hparam for family {family!r}"
                              f"{f' (did you mean {hint[0]}?)' if hint else ''}; accepted: {', '.join(spec)}")
        checked[name] = spec[name].check(key, value, tasks)
    if family == "smes":
        merged = {**default_hparams(family), **checked}
        k, n = merged["k_shared"] + merged["k_private"], merged["n_experts"]
        if not 1 <= k <= n:
            raise HparamError(f"{prefix}.hparams: k_shared + k_private ({k}) must be in 1..n_experts ({n})")
    return checked


__all__ = ["ACTIVATIONS", "FAMILIES", "FAMILY_HPARAMS", "HparamError", "check_hparams", "default_hparams"]
