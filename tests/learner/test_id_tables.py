"""Per-field collisionless embedding tables in the learner (issue 20): ID maps beside row-wise tables, exact
restore, the maps serving reads, and two data-parallel workers holding identical maps and rows."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.config import ID_FIELDS as CONFIG_ID_FIELDS
from learner.config import LearnerConfig
from learner.distributed import GroupConfig, GroupReducer, LocalReducer, host_store
from learner.models import MultiTaskRanker
from learner.step import Learner
from tests.conftest import free_port
from tests.learner.test_distributed import SIZES, _batch, _Features

TABLES = {"user_id": {"capacity": 40, "min_count": 2, "ttl_ms": 3}, "item_id": {"capacity": 64, "dim": 8}}
"""Fewer user rows than users (eviction), admission after two sightings, expiry after 3 ms of event time."""
CONFIG = LearnerConfig(family="mmoe", hparams={"n_experts": 3, "expert_dims": (8,), "tower_dims": (4,)},
                       emb_dim=4, tables=TABLES, lr=0.01)


def _learner(reducer=None) -> Learner:
    return Learner(CONFIG, list(ID_FIELDS), len(FEATURE_COLUMNS), reducer=reducer)


def _dense(batch: pa.Table) -> np.ndarray:
    return _Features().lookup(np.asarray(batch["user_id"]), np.asarray(batch["item_id"]))


def test_the_configuration_names_the_same_id_fields_as_the_feature_store() -> None:
    assert CONFIG_ID_FIELDS == ID_FIELDS


def test_tables_default_to_collisionless_per_field_and_null_keeps_the_shared_hashed_table() -> None:
    assert LearnerConfig().tables == {f: {"dim": 16, "capacity": 2**20} for f in ID_FIELDS}
    assert LearnerConfig(tables={"user_id": {"capacity": 10}}).tables["item_id"] == {"dim": 16, "capacity": 2**20}
    assert LearnerConfig(tables=None).tables is None
    shared = Learner(LearnerConfig(tables=None, n_buckets=256), list(ID_FIELDS), len(FEATURE_COLUMNS))
    assert shared.model.encoder.tables is None and shared.model.encoder.table.n_rows == 256


def test_tables_hold_their_own_rows_and_a_restored_learner_continues_exactly() -> None:
    torch.manual_seed(0)
    learner = _learner()
    for step in range(6):
        learner.learn(_batch(step, 0, 64), _dense(_batch(step, 0, 64)))
    stats = learner.id_tables()
    assert stats["user_id"]["live"] <= 40
    assert stats["user_id"]["evicted"] + stats["user_id"]["expired"] > 0  # 50 users through 40 rows, ttl 3 ms
    table = learner.model.encoder.tables["user_id"]
    assert table.allocated <= 40 and learner.model.encoder.tables["item_id"].weight.shape[1] == 8

    model, optimizer, arrays, counters = copy.deepcopy(learner.state())  # as read back from a checkpoint
    restored = _learner()
    restored.restore(model, optimizer, arrays, counters)
    nxt = _batch(6, 0, 64)
    a, b = learner.learn(nxt, _dense(nxt)), restored.learn(nxt, _dense(nxt))
    assert a.loss == b.loss
    after, again = learner.weights(), restored.weights()
    assert after.keys() == again.keys()
    for key in after:
        assert torch.equal(after[key], again[key]), key
    assert learner.id_tables() == restored.id_tables()


@pytest.mark.parametrize("carries_config", [True, False], ids=["checkpoint with its model config", "older checkpoint"])
def test_a_checkpoint_of_another_model_is_refused_naming_what_changed(carries_config: bool) -> None:
    """A default that flipped (the wide part, on since 2026-12-06) must not surface as torch's list of tensor names
    when a run restarts from a checkpoint of the model it built before."""
    from learner.step import ModelMismatch
    from learner.config import WideConfig

    before = Learner(replace(CONFIG, wide=WideConfig(dim=0)), list(ID_FIELDS), len(FEATURE_COLUMNS))
    model, optimizer, arrays, counters = copy.deepcopy(before.state())
    saved = orjson.loads(orjson.dumps(before.model.config)) if carries_config else None  # as meta.json holds it
    now = _learner()  # CONFIG leaves learner.wide out: today's default, shared factors of dim 16
    assert now.model.wide is not None
    with pytest.raises(ModelMismatch, match="wide") as refused:
        now.restore(model, optimizer, arrays, counters, saved)
    assert "checkpoint" in str(refused.value) and "train a new run" in str(refused.value)
    same = Learner(replace(CONFIG, wide=WideConfig(dim=0)), list(ID_FIELDS), len(FEATURE_COLUMNS))
    same.restore(model, optimizer, arrays, counters, saved)  # the model it was written by restores


def test_serving_maps_raw_ids_to_the_rows_training_used() -> None:
    torch.manual_seed(0)
    learner = _learner()
    for step in range(4):
        learner.learn(_batch(step, 0, 64), _dense(_batch(step, 0, 64)))
    weights = learner.weights()
    served = MultiTaskRanker.from_config(learner.model.config)
    served.load_state_dict(weights)
    served.eval()
    batch = _batch(9, 0, 32)
    ids = {f: torch.from_numpy(np.asarray(batch[f], dtype=np.int64)) for f in ID_FIELDS}
    rows = {f: torch.from_numpy(learner.id_maps[f].rows(np.asarray(batch[f], dtype=np.int64), 1_003, train=False).rows)
            for f in ID_FIELDS}
    learner.model.eval()
    dense = torch.from_numpy(_dense(batch))
    with torch.no_grad():
        expected = learner.model(ids, dense, rows).logits
        got = served(ids, dense).logits
    for task in expected:
        torch.testing.assert_close(got[task], expected[task])
    unknown = {"user_id": torch.tensor([10**12]), "item_id": torch.tensor([10**12 + 1])}
    assert served.encoder.map_rows("user_id", unknown["user_id"]).item() == 0  # never seen: the default row


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reducer = GroupReducer(GroupConfig("127.0.0.1", port, world_size=2, rank=rank, timeout_s=60), torch.device("cpu"))
    learner = _learner(reducer)
    reducer.broadcast_parameters(learner.model)
    for step, sizes in enumerate(SIZES):
        batch = _batch(step, rank, sizes[rank])
        learner.learn(batch, _dense(batch))
    weights = {k: v.detach().contiguous() for k, v in learner.weights().items()}
    save_file(weights, f"{out}/rank{rank}.safetensors")
    reducer.close()


def test_two_workers_hold_identical_maps_and_rows_equal_to_one_process_on_the_unions(tmp_path: Path) -> None:
    port = free_port()
    store = host_store("127.0.0.1", port, world_size=2)
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    del store
    first, second = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert first.keys() == second.keys() and any("map_ids" in k for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    torch.manual_seed(0)
    reference = _learner(LocalReducer())
    for step, (n0, n1) in enumerate(SIZES):
        union = pa.concat_tables([_batch(step, 0, n0), _batch(step, 1, n1)])
        reference.learn(union, _dense(union))
    for key, value in reference.weights().items():
        torch.testing.assert_close(first[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("tables, message", [
    ({"user_id": {"capacity": 0}, "item_id": {"capacity": 4}}, "learner.tables.user_id.capacity"),
    ({"user_id": {"capacity": 4, "ttl": 5}, "item_id": {"capacity": 4}}, "learner.tables.user_id has unknown key"),
    ({"user": {"capacity": 4}}, "neither id fields"),
    ({"user_id": {"capacity": 4, "mode": "hash"}, "item_id": {"capacity": 4}}, r"learner.tables.user_id.mode .* null"),
    ({"user_id": {"capacity": 4, "min_count": 0}, "item_id": {"capacity": 4}}, "learner.tables.user_id.min_count"),
])
def test_bad_table_settings_are_refused_naming_the_key(tables, message) -> None:
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, tables=tables)


CODES = {"i_author_id": {"capacity": 16, "dim": 3}, "u_active_degree": {"capacity": 8, "min_count": 2}}


def _codes(batch: pa.Table) -> dict[str, np.ndarray]:
    """A categorical code per example: the author of each item (-1, missing, for every fifth item), the
    activity level of each user."""
    items, users = np.asarray(batch["item_id"], np.int64), np.asarray(batch["user_id"], np.int64)
    return {"i_author_id": np.where(items % 5 == 0, -1, 1000 + items % 7), "u_active_degree": users % 3}


def test_categorical_features_get_tables_of_their_own_in_the_order_of_the_feature_store() -> None:
    from features.definitions import CATEGORICAL_COLUMNS
    from learner.config import CATEGORICAL_FIELDS

    assert CATEGORICAL_FIELDS == CATEGORICAL_COLUMNS
    config = replace(CONFIG, tables={**TABLES, **CODES})
    assert list(config.tables) == ["user_id", "item_id", "u_active_degree", "i_author_id"]
    assert config.tables["u_active_degree"]["dim"] == CONFIG.emb_dim and config.tables["i_author_id"]["dim"] == 3
    assert config.embedded_fields() == list(config.tables)
    assert list(CONFIG.tables) == list(ID_FIELDS)  # categorical features are embedded only when named
    with pytest.raises(ValueError, match="learner.tables.i_author_id.capacity"):
        replace(CONFIG, tables={"i_author_id": {"capacity": -1}})


def test_a_categorical_table_learns_its_codes_and_serving_reads_the_same_rows() -> None:
    torch.manual_seed(0)
    learner = Learner(replace(CONFIG, tables={**TABLES, **CODES}), list(ID_FIELDS), len(FEATURE_COLUMNS))
    assert learner.code_fields == ["u_active_degree", "i_author_id"]
    encoder = learner.model.encoder
    assert encoder.id_fields == ("user_id", "item_id", "u_active_degree", "i_author_id")
    assert encoder.n_outputs == 4 + 8 + 4 + 3 + len(FEATURE_COLUMNS)
    before = encoder.tables["i_author_id"].weight.detach().clone()
    for step in range(3):
        batch = _batch(step, 0, 64)
        learner.learn(batch, _dense(batch), _codes(batch))
    stats = learner.id_tables()
    authors = {int(a) for a in _codes(pa.concat_tables([_batch(s, 0, 64) for s in range(3)]))["i_author_id"] if a >= 0}
    assert stats["i_author_id"]["live"] == len(authors)
    assert stats["u_active_degree"]["live"] <= 3  # admitted at the second sighting
    after = encoder.tables["i_author_id"].weight.detach()
    assert not torch.equal(after[1:len(authors) + 1], before[1:len(authors) + 1])  # their rows learned
    assert 0 < encoder.tables["i_author_id"].sum_sq[0] < float("inf")  # missing codes train the default row

    learner.publish_maps()
    served = MultiTaskRanker.from_config(learner.model.config)
    served.load_state_dict(learner.weights())
    served.eval()
    batch = _batch(7, 0, 32)
    codes = _codes(batch)
    raw = {f: np.asarray(batch[f], dtype=np.int64) for f in ID_FIELDS} | codes
    rows = {f: torch.from_numpy(learner.id_maps[f].rows(np.maximum(v, 0), 1_003, train=False).rows * (v >= 0))
            for f, v in raw.items()}
    learner.model.eval()
    dense = torch.from_numpy(_dense(batch))
    ids = {f: torch.from_numpy(v) for f, v in raw.items()}
    with torch.no_grad():
        expected, got = learner.model(ids, dense, rows).logits, served(ids, dense).logits
    for task in expected:
        torch.testing.assert_close(got[task], expected[task])
    assert served.encoder.map_rows("i_author_id", torch.tensor([-1])).item() == 0


def test_a_categorical_table_without_its_codes_is_a_clear_error() -> None:
    learner = Learner(replace(CONFIG, tables={**TABLES, **CODES}), list(ID_FIELDS), len(FEATURE_COLUMNS))
    batch = _batch(0, 0, 8)
    with pytest.raises(ValueError, match=r"categorical feature\(s\) \['u_active_degree', 'i_author_id'\]"):
        learner.learn(batch, _dense(batch))
    with pytest.raises(ValueError, match="one value per example"):
        learner.learn(batch, _dense(batch), {"i_author_id": np.zeros(3, np.int64), "u_active_degree": np.zeros(8)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_on_a_gpu_the_tables_and_their_optimizer_live_there_and_learn_what_they_learn_on_the_cpu() -> None:
    config = replace(CONFIG, tables={**TABLES, **CODES}, precision="fp32")
    learners = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        learner = Learner(config, list(ID_FIELDS), len(FEATURE_COLUMNS), device=device)
        for step in range(4):
            batch = _batch(step, 0, 64)
            learner.learn(batch, _dense(batch), _codes(batch))
        learners.append(learner)
    cpu, gpu = learners
    for name, table in gpu.model.encoder.tables.items():
        assert table.weight.device.type == "cuda" and table.sum_sq.device.type == "cuda", name
    assert cpu.id_tables() == gpu.id_tables()
    for key, value in cpu.weights().items():
        torch.testing.assert_close(gpu.weights()[key].cpu(), value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_known_population_is_admitted_without_training() -> None:
    learner = Learner(replace(CONFIG, tables={"user_id": {"capacity": 5000}, "item_id": {"capacity": 5000}}),
                      list(ID_FIELDS), len(FEATURE_COLUMNS))
    before = {k: v.clone() for k, v in learner.model.state_dict().items()
              if "tables" not in k and "map_" not in k and not k.startswith(("wide.factors.", "wide.biases."))}
    learner.admit({"user_id": np.arange(3000), "item_id": np.arange(10_000, 13_000)}, now_ms=1)
    assert {f: s["live"] for f, s in learner.id_tables().items()} == {"user_id": 3000, "item_id": 3000}
    assert learner.step == 0 and all(torch.equal(learner.model.state_dict()[k], v) for k, v in before.items())
    rows = learner.model.encoder
    learner.publish_maps()
    assert rows.map_rows("item_id", torch.tensor([10_000, 12_999, 5])).tolist()[2] == 0
    assert (rows.map_rows("item_id", torch.tensor([10_000, 12_999])) > 0).all()
    with pytest.raises(ValueError, match="one length"):
        learner.admit({"user_id": np.arange(3), "item_id": np.arange(4)}, now_ms=1)
