"""MultiTaskRanker: a JSON config plus a safetensors state dict rebuild the same model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from learner.models import FAMILIES, MultiTaskRanker
from learner.models.diagnostics import diagnostics_on, without_diagnostics

from .zoo_testkit import TINY

TASKS = ["click", "play_time"]


def make_ranker(family: str, seed: int = 0) -> MultiTaskRanker:
    torch.manual_seed(seed)
    return MultiTaskRanker(
        family, TASKS, ["user_id", "item_id"], n_dense=3, task_types={"play_time": "regression"},
        n_buckets=128, emb_dim=4, **TINY[family],
    )


def make_inputs(n_rows: int = 6):
    g = torch.Generator().manual_seed(3)
    ids = {
        "user_id": torch.randint(0, 10**9, (n_rows,), generator=g),
        "item_id": torch.randint(0, 50, (n_rows,), generator=g),
    }
    return ids, torch.randn(n_rows, 3, generator=g).exp()


@pytest.mark.parametrize("family", FAMILIES)
def test_from_config_and_state_dict_reproduce_outputs(family, tmp_path):
    ranker = make_ranker(family)
    ids, dense = make_inputs()
    ranker(ids, dense)  # train-mode pass: BatchNorm statistics
    ranker.eval()
    save_file(ranker.state_dict(), str(tmp_path / "weights.safetensors"))
    (tmp_path / "manifest.json").write_text(json.dumps(ranker.config))

    rebuilt = MultiTaskRanker.from_config(json.loads((tmp_path / "manifest.json").read_text()))
    rebuilt.load_state_dict(load_file(str(tmp_path / "weights.safetensors")))
    rebuilt.eval()
    assert rebuilt.config == ranker.config
    a, b = ranker(ids, dense), rebuilt(ids, dense)
    for t in TASKS:
        assert torch.equal(a.logits[t], b.logits[t])


@pytest.mark.parametrize("family", FAMILIES)
def test_load_balancing_declarations_are_read_through_the_ranker(family):
    ranker = make_ranker(family)
    assert ranker.lb_experts == ranker.model.lb_experts
    assert ranker.lb_coef == ranker.model.lb_coef
    lb_stats = ranker(*make_inputs()).lb_stats
    assert ranker.lb_experts == (None if lb_stats is None else lb_stats[0].numel())
    with pytest.raises(AttributeError):
        ranker.lb_coef = 1.0  # the model's, not the ranker's, to set


def test_config_records_every_hparam():
    config = make_ranker("mmoe").config
    assert config["family"] == "mmoe" and config["tasks"] == TASKS
    assert config["task_types"] == {"click": "binary", "play_time": "regression"}
    assert config["hparams"] == {"n_experts": 3, "expert_dims": [8], "tower_dims": [4], "activation": "relu"}


def test_predict_proba_is_sigmoid_for_binary_and_identity_for_regression():
    ranker = make_ranker("home").eval()
    ids, dense = make_inputs()
    logits = ranker(ids, dense).logits
    proba = ranker.predict_proba(ids, dense)
    assert torch.equal(proba["click"], torch.sigmoid(logits["click"]))
    assert torch.equal(proba["play_time"], logits["play_time"])
    assert not proba["click"].requires_grad


def test_config_with_unknown_key_is_rejected():
    config = dict(make_ranker("omoe").config, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        MultiTaskRanker.from_config(config)


def test_unknown_hparam_in_config_is_rejected():
    config = make_ranker("omoe").config
    config["hparams"]["n_levels"] = 2
    with pytest.raises(TypeError, match="n_levels"):
        MultiTaskRanker.from_config(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_without_diagnostics_leaves_the_logits_and_reports_zero_fractions_as_not_computed(family):
    ranker = make_ranker(family)
    ids, dense = make_inputs(16)
    ranker(ids, dense)  # train-mode pass: BatchNorm statistics
    ranker.eval()
    with torch.inference_mode():
        full = ranker(ids, dense)
        with without_diagnostics():
            lean = ranker(ids, dense)
        after = ranker(ids, dense)
        proba = ranker.predict_proba(ids, dense)
    for t in TASKS:
        assert torch.equal(lean.logits[t], full.logits[t])
    assert torch.equal(proba["click"], torch.sigmoid(full.logits["click"]))
    assert torch.isnan(lean.expert_zero_frac).all() and lean.expert_zero_frac.shape == full.expert_zero_frac.shape
    assert torch.isfinite(full.expert_zero_frac).all() and torch.equal(after.expert_zero_frac, full.expert_zero_frac)
    for key, value in lean.extras.items():  # HoME's meta level: not computed either
        if key.endswith("zero_frac"):
            assert torch.isnan(value).all() and torch.isfinite(full.extras[key]).all()


def test_predict_proba_runs_the_model_without_diagnostics_and_leaves_them_on_after():
    ranker = make_ranker("mmoe").eval()
    seen = []
    ranker.model.register_forward_hook(lambda module, args, output: seen.append(diagnostics_on()))
    ranker.predict_proba(*make_inputs())
    ranker(*make_inputs())
    assert seen == [False, True]


def test_diagnostics_stay_on_for_a_forward_pass_on_another_thread():
    """A trainer's forward on its own thread keeps its telemetry while a scorer in the same process runs without."""
    ranker = make_ranker("mmoe").eval()
    ids, dense = make_inputs()
    with without_diagnostics(), ThreadPoolExecutor(1) as pool:
        elsewhere = pool.submit(lambda: ranker(ids, dense).expert_zero_frac).result()
        here = ranker(ids, dense).expert_zero_frac
    assert torch.isfinite(elsewhere).all() and torch.isnan(here).all()
