"""``learner.config.LearnerConfig``'s model keys added for #21 item 4: refused by name when loaded."""

from __future__ import annotations

import pytest

from learner.config import LearnerConfig


@pytest.mark.parametrize(("key", "value", "message"), [
    ("field_products", "outer", "learner.field_products must be one of"),
    ("embedding_accumulator", -1e-6, "learner.embedding_accumulator must be a finite number >= 0"),
    ("embedding_accumulator", float("nan"), "learner.embedding_accumulator must be a finite number >= 0"),
    ("embedding_accumulator", "small", "learner.embedding_accumulator must be a finite number >= 0"),
    ("wide", {"dim": 1.5}, "learner.wide.dim must be an integer >= 0"),
    ("wide", {"dim": 8, "initial_accumulator": -1}, "learner.wide.initial_accumulator must be a finite number >= 0"),
    ("wide", 8, "learner.wide must map dim, lr, initial_accumulator, tasks, shared to values"),
    ("wide", {"dim": 8, "share": True}, r"learner.wide: unknown keys \['share'\]; keys are dim, lr, initial_accumulator, "
                                        "tasks, shared"),
])
def test_a_bad_model_key_is_refused_naming_it(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LearnerConfig(**{key: value})


def test_the_defaults_are_the_measured_ones_and_the_shipped_file_agrees() -> None:
    """docs/quality.md, "Learning better (item 4)": products and a starting accumulator off, Adam at 3e-3, the wide
    term on with shared factors of width 16."""
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    config = LearnerConfig()
    assert config.field_products == "none" and config.embedding_accumulator == 0.0 and config.lr == 3e-3
    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "moestream.yaml").read_text())["learner"]
    for key in ("lr", "embedding_lr", "embedding_accumulator", "field_products", "cross_layers"):
        assert shipped[key] == getattr(config, key), key
    assert (config.wide.dim, config.wide.shared) == (16, True) and shipped["wide"] == asdict(config.wide)  # shared


def test_the_learner_builds_its_model_with_them_and_a_snapshot_rebuilds_it() -> None:
    from learner.models import MultiTaskRanker
    from learner.step import Learner

    config = LearnerConfig(field_products="product", embedding_accumulator=1e-7, emb_dim=4,
                           hparams={"n_experts": 2, "expert_dims": [4], "tower_dims": [2]})
    learner = Learner(config, ["user_id", "item_id"], n_dense=3)
    assert learner.model.products.mode == "product" and learner.model.products.n_outputs == 4
    assert all(t.initial_accumulator == 1e-7 for t in learner.model.encoder.row_tables().values())
    served = MultiTaskRanker.from_config(learner.manifest()["model_config"])  # what serving builds from a manifest
    served.load_state_dict(learner.weights())
    assert served.products.n_outputs == 4
