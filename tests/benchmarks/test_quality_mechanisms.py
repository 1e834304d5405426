"""The mechanisms study's plumbing on a tiny stream: one run of SMES without its regulariser, every record
kept (``benchmarks.quality_mechanisms`` is the measurement)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from benchmarks.quality_mechanisms import (
    ANOMALY_KINDS, VARIANTS, Variant, anomaly_counts, record, spread, train_probed, variant_config,
)
from benchmarks.quality_stream import simulate
from benchmarks.quality_train import CONFIG_FILE, worker_config
from stream.events import TASKS


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``moestream.yaml`` with small batches and a health report every step, so a tiny stream gets several."""
    raw = yaml.safe_load(CONFIG_FILE.read_text())
    raw["trainer"]["batch_size"] = 128
    raw["learner"]["cadence"]["health_every_steps"] = 1
    path = tmp_path_factory.mktemp("base") / "moestream.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_variants_cover_every_home_switch_and_smes_with_and_without_its_regulariser():
    names = [v.name for v in VARIANTS]
    assert names[:2] == ["mmoe", "home"]
    assert {k for v in VARIANTS if v.family == "home" for k in v.hparams} == {
        "expert_norm", "hierarchy", "feature_gate", "self_gate"}
    assert [v.hparams for v in VARIANTS if v.family == "smes"] == [{}, {"lb_coef": 0.0}]


def test_variant_config_sets_the_family_and_its_hparams(tmp_path, base):
    path = variant_config(Variant("home self_gate=off", "home", {"self_gate": False}), tmp_path, base)
    config = worker_config(tmp_path, "home", 0, path)
    assert config.learner.family == "home" and config.learner.hparams == {"self_gate": False}


def test_anomaly_counts_count_reports_not_anomalies():
    reports = [{"anomalies": [{"kind": "collapse", "subject": "expert e1"}] * 2, "skipped": {}},
               {"anomalies": [], "skipped": {}},
               {"anomalies": [{"kind": "collapse", "subject": "expert e0"}], "skipped": {}}]
    counts = anomaly_counts(reports)
    assert counts["collapse"] == {"reports": 2, "reports_second_half": 1, "checked": True,
                                  "subjects": {"expert e1": 1, "expert e0": 1}}
    assert counts["degradation"]["reports"] == 0


def test_spread_of_a_uniform_share_is_even():
    even, uneven = spread(np.full(4, 0.25)), spread(np.array([0.7, 0.1, 0.1, 0.1]))
    assert even["cv"] == 0 and even["max_over_min"] == 1
    assert uneven["cv"] > 0 and uneven["max_over_min"] == pytest.approx(7)


def test_one_tiny_run_records_auc_anomalies_load_and_executed_experts(tmp_path, base):
    stream = simulate(7, 400, tmp_path)
    variant = Variant("smes lb_coef=0", "smes", {"lb_coef": 0.0})
    run, probe = train_probed(stream, variant, 0, tmp_path / "run", base)
    out = record(variant, run, probe, stream)
    assert out["reports"] >= 2 and out["examples"] == len(stream)
    assert set(out["auc"]) == set(TASKS) and all(0 <= out["auc"][t] <= 1 for t in ("click", "long_view"))
    assert set(out["anomalies"]) == set(ANOMALY_KINDS)
    assert out["anomalies"]["underfitting"]["checked"] is False  # SMES has no task-specific experts
    assert set(out["load"]) == set(TASKS) and all(math.isfinite(v["cv"]) for v in out["load"].values())
    assert 1 <= out["executed"]["mean"] <= out["executed"]["max"] <= out["executed"]["budget"] == 8
    assert 0 <= out["margins"]["zero_frac"]["max"] <= 1 and out["margins"]["scale_ratio"] == {}  # SMES: no probe
    assert sum(out["routing_choices"]["share"]) == pytest.approx(1, abs=1e-3)
