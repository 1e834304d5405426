"""loss / loss_terms against hand-written per-task formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.models import ModelOutput, loss, loss_terms

from .zoo_testkit import assert_close


def fake_output(logits: dict[str, torch.Tensor], types: dict[str, str], aux: float = 0.0) -> ModelOutput:
    n = next(iter(logits.values())).shape[0]
    return ModelOutput(
        logits=logits,
        aux_loss=torch.tensor(aux),
        gates={t: torch.ones(n, 1) for t in logits},
        expert_zero_frac=torch.zeros(1),
        task_types=types,
    )


def test_terms_match_the_per_task_formulas():
    g = torch.Generator().manual_seed(0)
    out = fake_output(
        {"click": torch.randn(8, generator=g), "play_time": torch.randn(8, generator=g)},
        {"click": "binary", "play_time": "regression"},
        aux=0.25,
    )
    labels = {"click": torch.randint(0, 2, (8,), generator=g).float(), "play_time": torch.randn(8, generator=g)}
    mask = {"click": torch.tensor([1, 1, 0, 1, 0, 1, 1, 1.0]), "play_time": torch.ones(8)}
    total, terms = loss_terms(out, labels, mask, loss_weights={"click": 2.0})
    keep = mask["click"].bool()
    bce = F.binary_cross_entropy_with_logits(out.logits["click"][keep], labels["click"][keep])
    mse = F.mse_loss(out.logits["play_time"], labels["play_time"])
    assert_close(terms["click"], bce)
    assert_close(terms["play_time"], mse)
    assert_close(total, 2.0 * bce + mse + 0.25)
    assert_close(loss(out, labels, mask, {"click": 2.0}), total)


@pytest.mark.parametrize(
    "types", [{"a": "binary", "b": "binary"}, {"a": "regression", "b": "regression"}, {"a": "binary", "b": "regression"}]
)
def test_unmasked_fully_labelled_batch_matches_the_per_task_formulas(types):
    g = torch.Generator().manual_seed(1)
    out = fake_output({t: torch.randn(16, generator=g) for t in types}, types, aux=0.5)
    labels = {t: torch.randint(0, 2, (16,), generator=g).float() for t in types}
    total, terms = loss_terms(out, labels)
    for t, kind in types.items():
        formula = F.binary_cross_entropy_with_logits if kind == "binary" else F.mse_loss
        assert_close(terms[t], formula(out.logits[t], labels[t]))
    assert_close(total, terms["a"] + terms["b"] + 0.5)
    # an all-ones mask takes the masked path: the same figures
    masked_total, masked_terms = loss_terms(out, labels, {t: torch.ones(16) for t in types})
    assert_close(masked_total, total)
    for t in types:
        assert_close(masked_terms[t], terms[t])


def test_absent_task_and_all_masked_task_contribute_zero():
    out = fake_output({"a": torch.randn(4), "b": torch.randn(4)}, {"a": "binary", "b": "binary"})
    total, terms = loss_terms(out, {"a": torch.ones(4)})
    assert terms["b"].item() == 0.0
    assert_close(total, terms["a"])
    _, terms = loss_terms(out, {"a": torch.ones(4), "b": torch.ones(4)}, {"a": torch.zeros(4)})
    assert terms["a"].item() == 0.0


def test_unknown_task_is_an_error():
    out = fake_output({"a": torch.randn(4)}, {"a": "binary"})
    with pytest.raises(ValueError, match="zzz"):
        loss(out, {"zzz": torch.ones(4)})
    with pytest.raises(ValueError, match="zzz"):
        loss(out, {"a": torch.ones(4)}, loss_weights={"zzz": 1.0})


@settings(max_examples=40, deadline=None)
@given(
    present=st.lists(st.booleans(), min_size=6, max_size=6),
    junk=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=6, max_size=6),
)
def test_masked_labels_never_matter(present, junk):
    logits = {"a": torch.linspace(-2, 2, 6, requires_grad=True), "r": torch.linspace(0, 1, 6, requires_grad=True)}
    out = fake_output(logits, {"a": "binary", "r": "regression"})
    mask = {t: torch.tensor(present, dtype=torch.float32) for t in logits}
    base = {"a": torch.ones(6), "r": torch.full((6,), 3.0)}
    noisy = {t: torch.where(mask[t].bool(), v, torch.tensor(junk)) for t, v in base.items()}
    clean_total = loss(out, base, mask)
    noisy_total = loss(out, noisy, mask)
    assert torch.equal(clean_total, noisy_total)
    noisy_total.backward()
    assert all(torch.isfinite(v.grad).all() for v in logits.values())
