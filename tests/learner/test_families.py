"""The torch-free spec of the families' hparams (what loading the config checks) and the models themselves
(what builds them) agree: same families, same defaults, and a value is accepted by one exactly when the
other accepts it, but for the few places where the spec is deliberately stricter (listed here)."""

from __future__ import annotations

import math

import pytest

from learner import families
from learner.families import FAMILY_HPARAMS, HparamError, check_hparams
from learner.models import FAMILIES, build, default_hparams
from learner.models.layers import _ACTIVATIONS

TASKS = ("click", "like")
CANDIDATES = (
    0, 1, 3, -1, 2.5, True, False, None, "yes", "3", "true", "", 0.5, math.nan, math.inf,
    (), (8,), [8, 4], (0,), (4, -1), "relu", "gelu", "relu6", {"all": list(TASKS)}, {"a": ["click"]}, {},
)
"""Tried for every hparam of every family: of each type, values that are right and values that are not."""


def _stricter_in_spec(name: str, value: object) -> bool:
    """Values the models would take that the config refuses on purpose: a flag must be a boolean (the models
    read any value as true or false), and the SMES load-balancing coefficient must be a finite number."""
    check = next(spec.check for spec in (f.get(name) for f in FAMILY_HPARAMS.values()) if spec is not None)
    return check is families.flag or (name == "lb_coef" and (isinstance(value, bool) or value == math.inf))


def _builds(family: str, **hparams: object) -> bool:
    try:
        build(family, n_inputs=4, tasks=TASKS, **hparams)
    except (ValueError, TypeError, KeyError):
        return False
    return True


def test_the_spec_knows_every_family_and_its_defaults() -> None:
    assert families.FAMILIES == FAMILIES
    for family in FAMILIES:
        assert families.default_hparams(family) == default_hparams(family), family
    assert set(families.ACTIVATIONS) == set(_ACTIVATIONS)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_value_the_spec_accepts_builds_and_one_it_refuses_does_not(family: str) -> None:
    for name in FAMILY_HPARAMS[family]:
        accepted = refused = 0
        for value in CANDIDATES:
            try:
                checked = check_hparams(family, {name: value}, TASKS)
            except HparamError as error:
                assert f"learner.hparams.{name}" in str(error) or name in ("k_shared", "k_private", "n_experts")
                refused += 1
                if not _stricter_in_spec(name, value):
                    assert not _builds(family, **{name: value}), f"{family}: the model takes {name}={value!r}"
            else:
                accepted += 1
                assert _builds(family, **checked), f"{family}: the model refuses {name}={value!r}"
        assert accepted and refused, f"{family}.{name}: the candidates must cover both outcomes"


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_hparams_and_families_are_refused_by_both(family: str) -> None:
    with pytest.raises(HparamError, match=r"learner\.hparams\.n_expertz: unknown hparam"):
        check_hparams(family, {"n_expertz": 2}, TASKS)
    assert not _builds(family, n_expertz=2)
    with pytest.raises(HparamError, match=r"learner\.family: unknown model family"):
        check_hparams(family + "x", {}, TASKS)
    assert not _builds(family + "x")


def test_smes_needs_as_many_experts_as_it_routes_to() -> None:
    with pytest.raises(HparamError, match=r"k_shared \+ k_private \(3\) must be in 1..n_experts \(2\)"):
        check_hparams("smes", {"n_experts": 2}, TASKS)
    assert not _builds("smes", n_experts=2)
    assert _builds("smes", **check_hparams("smes", {"n_experts": 2, "k_shared": 1}, TASKS))
