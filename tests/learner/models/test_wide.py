"""The wide part beside the experts (learner.models.wide): per binary task an FM over the ID fields' rows, added
to its logit, trained row-wise like the embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.config import LearnerConfig
from learner.models import MultiTaskRanker
from learner.models.wide import WIDE_DEFAULTS, WideTerm
from learner.step import Learner

HPARAMS = {"n_experts": 2, "expert_dims": (4,), "tower_dims": (2,)}
TABLES = {"user_id": {"capacity": 16, "dim": 4}, "item_id": {"capacity": 16, "dim": 4}}
WIDE = {"dim": 3, "lr": 0.3, "initial_accumulator": 0.0}


def _ranker(wide=None, tables=TABLES, tasks=("click", "like"), **kwargs) -> MultiTaskRanker:
    torch.manual_seed(0)
    return MultiTaskRanker("mmoe", tasks=list(tasks), id_fields=["user_id", "item_id"], n_dense=2, emb_dim=4,
                           n_buckets=32, tables=tables, wide=wide, **HPARAMS, **kwargs)


def _rows(ranker: MultiTaskRanker, users: list[int], items: list[int]) -> dict[str, torch.Tensor]:
    for f in ("user_id", "item_id"):
        for table in ranker.field_tables(f):
            table.ensure_rows(10)
    return {"user_id": torch.tensor(users), "item_id": torch.tensor(items)}


@pytest.mark.parametrize("shared", [False, True], ids=["per-task", "shared"])
@pytest.mark.parametrize("tables", [TABLES, None], ids=["per-field", "hashed"])
def test_off_the_ranker_is_the_one_without_the_key_and_on_it_adds_the_floors_form(tables, shared) -> None:
    ids = {"user_id": torch.tensor([5, 6, 7]), "item_id": torch.tensor([1, 1, 9])}
    dense = torch.randn(3, 2)
    plain, off = _ranker(tables=tables), _ranker({"dim": 0}, tables=tables)
    on = _ranker({**WIDE, "shared": shared}, tables=tables)
    assert off.wide is None and not any(k.startswith("wide.") for k in off.state_dict())
    assert plain.state_dict().keys() == off.state_dict().keys()
    rows = [_rows(model, [1, 2, 3], [4, 4, 5]) if tables else None for model in (plain, off, on)][0]
    for model in (plain, off, on):
        model.eval()
    with torch.no_grad():
        expected, got_off = plain(ids, dense, rows).logits, off(ids, dense, rows).logits
        got_on = on(ids, dense, rows).logits
        field_rows = on.encoder.field_rows(ids, rows)
    for task in expected:
        torch.testing.assert_close(got_off[task], expected[task], rtol=0, atol=0)
        # b_u + b_i + p_u · q_i, read from the task's own tables (the experts are the same: built before the term)
        p, q = (on.wide.factor(f, task)[field_rows[f]] for f in ("user_id", "item_id"))
        b = sum(on.wide.bias(f, task)[field_rows[f]] for f in ("user_id", "item_id"))
        torch.testing.assert_close(got_on[task], expected[task] + b + (p * q).sum(-1))


def test_the_fm_identity_matches_the_pair_by_pair_sum_over_three_fields() -> None:
    torch.manual_seed(0)
    wide = WideTerm({"a": "a", "b": "b", "c": "c"}, {"a": 8, "b": 8, "c": 8}, ["click"], dim=4, lr=0.1)
    for table in wide.row_tables().values():
        table.weight.normal_()
    rows = {f: torch.tensor([1, 2, 0, 8]) for f in "abc"}
    v = {f: wide.factor(f, "click")[rows[f]] for f in "abc"}
    pairs = (v["a"] * v["b"]).sum(-1) + (v["a"] * v["c"]).sum(-1) + (v["b"] * v["c"]).sum(-1)
    bias = sum(wide.bias(f, "click")[rows[f]] for f in "abc")
    with torch.no_grad():
        torch.testing.assert_close(wide(rows)["click"], bias + pairs)


def test_gradients_reach_only_the_touched_wide_rows_of_each_task() -> None:
    ranker = _ranker(WIDE)
    rows = _rows(ranker, [1, 2, 2], [3, 3, 4])
    wide = ranker.wide
    before = {(f, t, part): get(f, t).clone() for f in ("user_id", "item_id") for t in ("click", "like")
              for part, get in (("factor", wide.factor), ("bias", wide.bias))}
    state = {name: t.sum_sq.clone() for name, t in wide.row_tables().items()}
    out = ranker({}, torch.randn(3, 2), rows)
    out.logits["click"].sum().backward()
    for table in ranker.row_tables().values():
        table.apply_gradients()
    for (f, t, part), was in before.items():
        now = (wide.factor if part == "factor" else wide.bias)(f, t)
        moved = (now != was).reshape(len(now), -1).any(dim=1).nonzero().flatten().tolist()
        # like's term had no gradient (only click's logit was in the loss): its columns stay put
        assert moved == ([1, 2] if f == "user_id" else [3, 4]) if t == "click" else moved == [], (f, t, part)
    for name, table in wide.row_tables().items():  # each task's own accumulator: like's did not move
        assert torch.equal(table.sum_sq[:, 1], state[name][:, 1]) and not torch.equal(table.sum_sq, state[name]), name


def test_a_reset_row_starts_over_in_the_wide_tables_and_the_others_keep_their_state() -> None:
    ranker = _ranker(WIDE)
    rows = _rows(ranker, [1, 2], [3, 3])
    ranker({}, torch.randn(2, 2), rows).logits["click"].sum().backward()
    for table in ranker.row_tables().values():
        table.apply_gradients()
    tables = ranker.field_tables("user_id")
    assert tables[0] is ranker.encoder.tables["user_id"] and len(tables) == 3  # the embedding, factors, biases
    kept = [t.weight[2].clone() for t in tables]
    for table in tables:
        table.reset_rows(torch.tensor([1]))
    for table, row2 in zip(tables[1:], kept[1:]):
        assert (table.sum_sq[1] == table.initial_accumulator).all() and torch.equal(table.weight[2], row2)
    assert (ranker.wide.bias("user_id", "click")[1] == 0).all()  # a bias starts at 0
    assert 0 < ranker.wide.factor("user_id", "click")[1].norm() < 1  # a factor at N(0, 0.01 / dim)


def test_the_config_and_the_state_round_trip_and_older_configs_build_without_the_term() -> None:
    ranker = _ranker(WIDE, tasks=("click", "forward"))  # "forward": a task name nn.Module already uses
    rows = _rows(ranker, [1, 2, 3], [3, 1, 1])
    ranker({}, torch.randn(3, 2), rows).logits["forward"].sum().backward()
    for table in ranker.row_tables().values():
        table.apply_gradients()
    assert ranker.config["wide"] == {**WIDE, "tasks": [], "shared": False}
    rebuilt = MultiTaskRanker.from_config(json.loads(json.dumps(ranker.config)))  # what a manifest holds
    rebuilt.load_state_dict(ranker.state_dict())
    state, again = ranker.state_dict(), rebuilt.state_dict()
    assert state.keys() == again.keys() and any(k.startswith("wide.") for k in state)
    assert all(torch.equal(state[k], again[k]) for k in state)
    ranker.eval(), rebuilt.eval()
    with torch.no_grad():
        dense = torch.randn(3, 2)
        for task, value in ranker({}, dense, rows).logits.items():
            torch.testing.assert_close(rebuilt({}, dense, rows).logits[task], value, rtol=0, atol=0)
    older = {k: v for k, v in _ranker().config.items() if k != "wide"}  # a snapshot from before the key
    assert MultiTaskRanker.from_config(older).wide is None


def test_the_config_leaves_out_keys_at_the_same_defaults_as_the_model() -> None:
    from dataclasses import asdict

    from learner.config import WideConfig

    shipped = asdict(WideConfig())
    assert {k: v for k, v in shipped.items() if k not in ("dim", "shared")} == {
        k: v for k, v in WIDE_DEFAULTS.items() if k not in ("dim", "shared")}
    assert (shipped["dim"], shipped["shared"]) == (16, True)  # on by default, shared factors
    assert (WIDE_DEFAULTS["dim"], WIDE_DEFAULTS["shared"]) == (0, False)  # what a config without the keys meant
    assert _ranker({"dim": 2}).config["wide"] == {**WIDE_DEFAULTS, "dim": 2}
    with pytest.raises(ValueError, match="wide: unknown keys \\['width'\\]"):
        _ranker({"width": 2})


def test_shared_factors_weight_one_factor_per_row_by_each_tasks_scale() -> None:
    """Σ_{f<g} (v_f ⊙ v_g) · w_t over three fields, pair by pair; a row holds dim factors and one accumulator for
    them; the scales are a dense parameter (Adam's, beside the experts) that every task's gradient reaches."""
    torch.manual_seed(0)
    wide = WideTerm({"a": "a", "b": "b", "c": "c"}, {"a": 8, "b": 8, "c": 8}, ["click", "like"], dim=4, lr=0.1,
                    shared=True)
    for table in wide.row_tables().values():
        table.weight.normal_()
    assert all(wide.factors[f].dim == 4 and wide.factors[f].sum_sq.shape[1:] == () for f in "abc")  # one per row
    assert [name for name, _ in wide.named_parameters()] == ["scale"]
    with torch.no_grad():
        wide.scale.copy_(torch.randn(2, 4))  # negative weights too
    rows = {f: torch.tensor([1, 2, 0, 8]) for f in "abc"}
    v = {f: wide.factors[f].weight[rows[f]] for f in "abc"}
    out = wide(rows)
    for j, task in enumerate(("click", "like")):
        w = wide.scale[j].detach()
        pairs = ((v["a"] * v["b"] + v["a"] * v["c"] + v["b"] * v["c"]) * w).sum(-1)
        bias = sum(wide.bias(f, task)[rows[f]] for f in "abc")
        torch.testing.assert_close(out[task].detach(), bias + pairs)
    (out["click"].sum() + out["like"].sum()).backward()
    assert wide.scale.grad is not None and (wide.scale.grad != 0).all()
    with pytest.raises(ValueError, match="below zero"):
        wide.factor("a", "like")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the sum stays fp32 where autocast would run a matmul in bf16
        cast = wide(rows)
    for task in ("click", "like"):
        assert cast[task].dtype == torch.float32
        torch.testing.assert_close(cast[task], out[task])
    with torch.no_grad():
        wide.scale.abs_()  # factor(): the shared factors weighted by sqrt(scale), whose dot product is the term
        p, q = wide.factor("a", "like")[rows["a"]], wide.factor("b", "like")[rows["b"]]
        torch.testing.assert_close((p * q).sum(-1), (v["a"] * v["b"] * wide.scale[1]).sum(-1))


def test_shared_factors_round_trip_train_and_are_configured_by_name() -> None:
    with pytest.raises(ValueError, match="learner.wide.shared must be true or false"):
        LearnerConfig(wide={"dim": 4, "shared": "yes"})
    with pytest.raises(ValueError, match="wide.shared must be true or false"):  # a model config (a manifest's)
        _ranker({**WIDE, "shared": "false"})
    shared = {**WIDE, "shared": True}
    ranker = _ranker(shared)
    assert ranker.config["wide"] == {**shared, "tasks": []}
    assert ranker.wide.factors["user_id"].dim == WIDE["dim"]  # one factor a row, not one per task
    assert any(p is ranker.wide.scale for p in ranker.parameters())  # the dense optimizer's
    rows = _rows(ranker, [1, 2, 3], [3, 1, 1])
    adam = torch.optim.Adam(ranker.parameters(), lr=0.1)
    logits = ranker({}, torch.randn(3, 2), rows).logits
    (logits["click"].sum() - logits["like"].sum()).backward()
    adam.step()
    for table in ranker.row_tables().values():
        table.apply_gradients()
    assert not torch.equal(ranker.wide.scale[0], ranker.wide.scale[1])  # each task weights the factors its own way
    rebuilt = MultiTaskRanker.from_config(json.loads(json.dumps(ranker.config)))
    rebuilt.load_state_dict(ranker.state_dict())
    ranker.eval(), rebuilt.eval()
    with torch.no_grad():
        dense = torch.randn(3, 2)
        for task, value in ranker({}, dense, rows).logits.items():
            torch.testing.assert_close(rebuilt({}, dense, rows).logits[task], value, rtol=0, atol=0)
    config = LearnerConfig(family="mmoe", hparams=dict(HPARAMS), emb_dim=4,
                           tables={"user_id": {"capacity": 6}, "item_id": {"capacity": 64}},
                           wide={"dim": 2, "shared": True})
    learner = Learner(config, list(ID_FIELDS), len(FEATURE_COLUMNS))
    assert learner.model.wide.shared and learner.model.wide.factors["item_id"].dim == 2
    rng = np.random.default_rng(0)
    for step in range(4):
        learner.learn(_batch(rng, step, 32), np.zeros((32, len(FEATURE_COLUMNS)), np.float32))
    served = MultiTaskRanker.from_config(learner.manifest()["model_config"])
    served.load_state_dict(learner.weights())
    assert served.wide is not None and served.wide.shared


def test_regression_tasks_get_no_term_and_tasks_may_name_fewer() -> None:
    torch.manual_seed(0)
    ranker = MultiTaskRanker("mmoe", tasks=["click", "watch"], task_types={"watch": "regression"},
                             id_fields=["user_id"], n_dense=1, emb_dim=4, n_buckets=8, wide=WIDE, **HPARAMS)
    assert ranker.wide.tasks == ("click",)
    some = _ranker({**WIDE, "tasks": ["like"]})
    assert some.wide.tasks == ("like",) and some.wide.factors["user_id"].dim == WIDE["dim"]
    rows = _rows(some, [1], [2])
    some.eval()
    with torch.no_grad():
        with_term, plain = some({}, torch.zeros(1, 2), rows).logits, some.model(some.cross(some.products(
            some.encoder({}, torch.zeros(1, 2), rows)))).logits
    assert torch.equal(with_term["click"], plain["click"]) and not torch.equal(with_term["like"], plain["like"])
    with pytest.raises(ValueError, match="wide.tasks names task\\(s\\) \\['share'\\]"):
        _ranker({**WIDE, "tasks": ["share"]})


def test_the_learner_configures_the_term_by_name_and_trains_grows_and_resets_its_rows() -> None:
    with pytest.raises(ValueError, match="learner.wide.dim must be an integer >= 0"):
        LearnerConfig(wide={"dim": -1})
    with pytest.raises(ValueError, match="learner.wide.lr must be a finite number > 0"):
        LearnerConfig(wide={"dim": 4, "lr": 0})
    with pytest.raises(ValueError, match="learner.wide: unknown keys \\['width'\\]"):
        LearnerConfig(wide={"width": 4})
    with pytest.raises(ValueError, match="learner.wide.tasks names task\\(s\\) \\['share'\\]"):
        LearnerConfig(wide={"dim": 4, "tasks": ["share"]})
    tables = {"user_id": {"capacity": 6}, "item_id": {"capacity": 64}}  # 6 user rows for 20 users: rows are reused
    config = LearnerConfig(family="mmoe", hparams=dict(HPARAMS), emb_dim=4, tables=tables,
                           wide={"dim": 2, "lr": 0.3, "initial_accumulator": 1e-6})
    learner = Learner(config, list(ID_FIELDS), len(FEATURE_COLUMNS))
    wide = learner.model.wide
    assert wide.dim == 2 and len(learner.model.row_tables()) == 2 + 2 * 2
    rng = np.random.default_rng(0)
    for step in range(8):
        batch = _batch(rng, step, 32)
        learner.learn(batch, np.zeros((32, len(FEATURE_COLUMNS)), np.float32))
    user = wide.factors["user_id"]
    assert user.allocated == learner.model.encoder.tables["user_id"].allocated
    assert user.resets > 0  # the ID map reused rows: the wide tables were reset with the embedding's
    assert (wide.bias("item_id", "click") != 0).any()  # trained
    served = MultiTaskRanker.from_config(learner.manifest()["model_config"])  # what serving builds from a manifest
    served.load_state_dict(learner.weights())
    assert served.wide is not None and served.wide.dim == 2


def test_the_wide_term_learns_a_user_item_factorisation_the_experts_alone_learn_more_slowly() -> None:
    """Labels from a logistic MF of user × item (the floor's form): after the same steps, the ranker with the wide
    term scores the next batches better than the one without."""
    gen = torch.Generator().manual_seed(0)
    n_users, n_items, rank = 60, 60, 4
    p, q = torch.randn(n_users, rank, generator=gen), torch.randn(n_items, rank, generator=gen)
    tables = {"user_id": {"capacity": n_users, "dim": 4}, "item_id": {"capacity": n_items, "dim": 4}}

    def log_loss(wide) -> float:
        torch.manual_seed(0)
        ranker = MultiTaskRanker("mmoe", tasks=["click"], id_fields=["user_id", "item_id"], n_dense=1, emb_dim=4,
                                 tables=tables, wide=wide, **HPARAMS)
        for table in ranker.row_tables().values():
            table.ensure_rows(n_users)
        adam = torch.optim.Adam(ranker.parameters(), lr=3e-3)
        data = torch.Generator().manual_seed(1)
        losses = []
        for step in range(200):
            u = torch.randint(0, n_users, (64,), generator=data)
            i = torch.randint(0, n_items, (64,), generator=data)
            y = torch.bernoulli(torch.sigmoid((p[u] * q[i]).sum(-1)), generator=data)
            logit = ranker({}, torch.zeros(64, 1), {"user_id": u + 1, "item_id": i + 1}).logits["click"]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
            if step >= 150:  # progressive: scored before the update
                losses.append(loss.item())
            adam.zero_grad()
            loss.backward()
            adam.step()
            for table in ranker.row_tables().values():
                table.apply_gradients()
        return float(np.mean(losses))

    without, with_wide = log_loss(None), log_loss({"dim": 4, "lr": 0.3, "initial_accumulator": 0.0})
    assert with_wide < without - 0.05, (with_wide, without)
    shared = log_loss({"dim": 4, "lr": 0.3, "initial_accumulator": 0.0, "shared": True})
    assert shared < without - 0.05, (shared, without)


def _batch(rng: np.random.Generator, step: int, n: int) -> pa.Table:
    from stream.events import EXAMPLE_SCHEMA, TASKS

    labels = {t: (rng.random(n) < 0.3).astype(np.float32) for t in TASKS}
    return pa.table({
        "request_id": [f"r{step}.{i}" for i in range(n)],
        "user_id": rng.integers(0, 20, n),
        "item_id": rng.integers(0, 40, n),
        "ts_ms": np.full(n, 1_000 + step, dtype=np.int64),
        **labels,
        "play_time": rng.random(n).astype(np.float32) * 1000,
        "partition": np.zeros(n, dtype=np.int32),
        "offset": np.arange(n, dtype=np.int64),
        "is_correction": np.zeros(n, dtype=bool),
    }, schema=EXAMPLE_SCHEMA)
