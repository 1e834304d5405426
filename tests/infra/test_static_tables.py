"""Categorical features embedded by tables of their own (issue 20): KuaiRand-1K's static attribute files
loaded into a run's real Feast store, a KuaiRand-1K log replayed straight into the trainer, and the published
snapshot mapping each author and activity level to a row of its own table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from features.static import KUAIRAND_USER_COLUMNS, KUAIRAND_VIDEO_COLUMNS
from learner.snapshots import SnapshotStore
from tests.stream.test_cli_inputs import cli
from tests.stream.test_logfile import kuairand_table, save

pytestmark = pytest.mark.integration


def _static_files(tmp_path: Path) -> tuple[Path, Path]:
    users = pd.DataFrame({c: [0] * 30 for c in KUAIRAND_USER_COLUMNS})
    users["user_id"] = range(30)
    users["user_active_degree"] = [("high_active", "full_active", "middle_active")[u % 3] for u in range(30)]
    videos = pd.DataFrame({c: [None] * 400 for c in KUAIRAND_VIDEO_COLUMNS})
    videos["video_id"] = range(400)
    videos["author_id"] = [7_000 + v % 13 if v % 10 else None for v in range(400)]  # every tenth: no author
    videos.to_csv(tmp_path / "videos.csv", index=False)
    users.to_csv(tmp_path / "users.csv", index=False)
    return tmp_path / "users.csv", tmp_path / "videos.csv"


def test_a_replay_embeds_the_categorical_features_it_names_from_the_static_files(tmp_path: Path) -> None:
    users, videos = _static_files(tmp_path)
    log = save(kuairand_table(800, seed=3), tmp_path / "log.parquet")
    config = tmp_path / "moestream.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"data_root": str(tmp_path / "data")},
        "features": {"static_users": str(users), "static_items": str(videos)},
        "learner": {"tables": {"i_author_id": {"capacity": 64, "dim": 4}, "u_active_degree": {"capacity": 8}},
                    "cadence": {"snapshot_every_steps": 2}},
        "trainer": {"batch_size": 128},
        "telemetry": {"mode": "disabled"},
    }))
    code, output = cli("replay", str(log), "--direct", "--config", str(config))
    assert code == 0, output

    (run,) = (tmp_path / "data" / "runs").iterdir()
    manifest, tensors = SnapshotStore(run / "snapshots").load()
    weights = {k: v.numpy() for k, v in tensors.items()}
    authors = weights["encoder.map_ids_i_author_id"]
    assert sorted(authors.tolist()) == list(range(7_000, 7_013))  # every author, and no row for the missing one
    assert weights["encoder.tables.i_author_id.weight"].shape[1] == 4
    degrees = weights["encoder.map_ids_u_active_degree"]
    assert sorted(degrees.tolist()) == [0, 1, 2]  # the vocabulary's indices of the three levels
    config_of_model = manifest.data["model_config"]
    assert config_of_model["id_fields"] == ["user_id", "item_id", "u_active_degree", "i_author_id"]
    assert json.dumps(config_of_model)  # serving rebuilds the model from it


def test_a_static_file_that_does_not_exist_is_a_configuration_error_naming_the_key(tmp_path: Path) -> None:
    code, output = cli("replay", str(save(kuairand_table(10), tmp_path / "log.parquet")), "--direct",
                       MOESTREAM_FEATURES__STATIC_ITEMS=str(tmp_path / "nowhere.csv"))
    assert code == 2 and "features.static_items" in output and "no file at" in output


def test_features_load_puts_static_attributes_into_the_configured_store(tmp_path: Path) -> None:
    users, videos = _static_files(tmp_path)
    code, output = cli("features", "load", "--users", str(users), "--items", str(videos),
                       MOESTREAM_PATHS__DATA_ROOT=str(tmp_path / "data"))
    assert code == 0, output
    assert "loaded 30 user rows" in output and "loaded 400 item rows" in output
    from features.store import OnlineFeatures
    from infra.config import load_config

    store = OnlineFeatures(load_config(None, overrides={"paths.data_root": str(tmp_path / "data")}).features,
                           apply=False)
    batch = store.lookup_batch(np.array([4, 5]), np.array([11, 20]))
    assert batch.ids["i_author_id"].tolist() == [7_011, -1] and batch.ids["u_active_degree"].tolist() == [1, 2]


def test_features_load_refuses_a_file_in_no_known_format(tmp_path: Path) -> None:
    pd.DataFrame({"uid": [1]}).to_csv(tmp_path / "users.csv", index=False)
    code, output = cli("features", "load", "--users", str(tmp_path / "users.csv"),
                       MOESTREAM_PATHS__DATA_ROOT=str(tmp_path / "data"))
    assert code == 1 and "match no known format" in output
