"""Deltas between model versions (issue 22): a version is its parent plus the dense entries, the table rows
that changed and the map entries added or removed; materialising the chain gives back the trainer's state
entry for entry, and tombstoned ids leave the map. The trainer's tracked deltas against the reference diff, a
refused publish included; a replica applying deltas in place against a fresh model loaded with the
materialised version, scores of tombstoned ids included; a delta that does not fit leaves a replica untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import learner.delta
import learner.models.encoder
from learner.delta import (Delta, DeltaError, MapChanges, TableRows, apply_delta, apply_map, compose, diff, from_tensors,
                           without_held,
                           install_fold, materialise, plan_fold, row_tables, split_state, to_tensors)
from learner.models import MultiTaskRanker
from learner.models.sparse import RowwiseTable
from dataclasses import replace

from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.step import Learner
from tests.learner.test_id_tables import CONFIG, _batch, _dense, _learner


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _versions(steps: int) -> list[dict[str, torch.Tensor]]:
    """The state a learner would publish after each step: ids admitted, evicted and expired on the way."""
    torch.manual_seed(0)
    learner = _learner()
    states = []
    for step in range(steps):
        learner.learn(_batch(step, 0, 64), _dense(_batch(step, 0, 64)))
        states.append({k: v.clone() for k, v in learner.weights().items()})
    return states


def test_a_chain_of_reference_deltas_materialises_every_version_exactly() -> None:
    states = _versions(6)
    parts = split_state(states[0])
    assert set(parts.tables) == {"encoder.tables.user_id.", "encoder.tables.item_id."} | {
        f"wide.{part}.{f}." for part in ("factors", "biases") for f in ("user_id", "item_id")}  # the wide term's rows
    assert set(parts.maps) == {"encoder.map_ids_user_id", "encoder.map_ids_item_id"}
    state = states[0]
    for new in states[1:]:
        delta = from_tensors(to_tensors(diff(state, new)))  # through the wire format
        state = materialise(state, delta)
        _equal(state, new)
    assert any(m.tombstones.numel() for m in diff(states[0], states[-1]).maps.values()), "ttl 3 ms expires users"


def test_a_delta_carries_only_the_rows_that_moved() -> None:
    states = _versions(3)
    delta = diff(states[1], states[2])
    full = sum(v.numel() * v.element_size() for v in states[2].values())
    rows = delta.tables["encoder.tables.user_id."].rows
    assert 0 < rows.numel() < states[2]["encoder.tables.user_id.weight"].shape[0]
    assert delta.nbytes < full


def test_tombstoned_ids_leave_the_map_and_upserts_move_rows() -> None:
    ids, rows = torch.tensor([2, 5, 9, 14]), torch.tensor([1, 2, 3, 4])
    change = MapChanges(ids=torch.tensor([3, 9]), rows=torch.tensor([7, 8]), tombstones=torch.tensor([5, 14]))
    new_ids, new_rows = apply_map(ids, rows, change)
    assert new_ids.tolist() == [2, 3, 9] and new_rows.tolist() == [1, 7, 8]


def test_a_delta_that_does_not_fit_its_parent_is_refused() -> None:
    states = _versions(2)
    delta = diff(states[0], states[1])
    wrong_shape = Delta({**delta.dense, next(iter(delta.dense)): torch.zeros(3, 3, 3)}, delta.tables, delta.maps)
    with pytest.raises(DeltaError, match="shape"):
        materialise(states[0], wrong_shape)
    missing = Delta(dict(list(delta.dense.items())[1:]), delta.tables, delta.maps)
    with pytest.raises(DeltaError, match="missing"):
        materialise(states[0], missing)
    with pytest.raises(DeltaError, match="not a delta entry"):
        from_tensors({"weights/x": torch.zeros(1)})


# ---- the trainer's tracked deltas ----------------------------------------------------------------------------

def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def _learn(trainer: Learner, step: int) -> None:
    batch = _batch(step, 0, 64)
    trainer.learn(batch, _dense(batch))


@pytest.fixture
def touched(monkeypatch) -> dict[RowwiseTable, set[int]]:
    """The rows each table's update, reset_rows and ensure_rows (unless growing by zeros) were handed (a spy on the
    real methods)."""
    seen: dict[RowwiseTable, set[int]] = {}

    def spy(method, rows_of):
        def wrapper(table, *args, **kwargs):
            before = table.allocated
            out = method(table, *args, **kwargs)
            seen.setdefault(table, set()).update(rows_of(table, before, *args, **kwargs))
            return out
        return wrapper

    monkeypatch.setattr(RowwiseTable, "update", spy(RowwiseTable.update, lambda t, b, rows, grads: rows.tolist()))
    monkeypatch.setattr(RowwiseTable, "reset_rows", spy(RowwiseTable.reset_rows, lambda t, b, rows: rows.tolist()))
    monkeypatch.setattr(RowwiseTable, "ensure_rows",
                        spy(RowwiseTable.ensure_rows,  # rows grown as zeros are reset before they are read: unchanged
                            lambda t, b, highest, zeros=False: () if zeros else range(b + 1, t.allocated + 1)))
    return seen


def test_tracked_deltas_materialise_every_published_version_and_carry_what_changed(touched) -> None:
    torch.manual_seed(0)
    trainer = _learner()
    with pytest.raises(DeltaError, match="publish"):
        trainer.delta()  # no base yet: a delta of what?
    _learn(trainer, 0)
    published = _clone(trainer.weights())  # the base
    trainer.mark_published()
    touched.clear()
    tables = row_tables(trainer.model)
    refused, tombstones, covered = 6, 0, 0
    for step in range(1, 16):
        _learn(trainer, step)
        if step > 8 and step % 3:
            continue  # every step at first, then every third
        delta = trainer.delta()
        now = _clone(trainer.weights())
        reference = diff(published, now)
        for prefix, table in tables.items():
            tracked = set(delta.tables[prefix].rows.tolist())
            assert set(reference.tables[prefix].rows.tolist()) <= tracked <= touched.get(table, set()), prefix
        for key, change in reference.maps.items():
            for part in ("ids", "rows", "tombstones"):
                assert torch.equal(getattr(delta.maps[key], part), getattr(change, part)), (key, part)
        tombstones += delta.tombstones
        if step == refused:  # the publish fails: no mark, so the next delta covers this interval too
            held = delta.changed_rows
            continue
        if step == refused + 1:
            covered = delta.changed_rows
        published = materialise(published, from_tensors(to_tensors(delta)))
        for key in now:
            assert torch.equal(published[key], now[key]), (step, key)
        assert set(published) == set(now)
        trainer.mark_published()
        touched.clear()
    assert tombstones > 0 and covered > held  # ids expired and evicted; the refused interval's rows came along


def test_a_restored_learner_publishes_a_base_before_deltas() -> None:
    torch.manual_seed(0)
    trainer = _learner()
    _learn(trainer, 0)
    trainer.mark_published()
    restored = _learner()
    restored.restore(*trainer.state())
    with pytest.raises(DeltaError, match="base"):
        restored.delta()
    base = _clone(restored.weights())
    restored.mark_published()
    _learn(restored, 1)
    state = materialise(base, restored.delta())
    assert all(torch.equal(state[k], v) for k, v in restored.weights().items())


# ---- a replica applying deltas in place ----------------------------------------------------------------------

def _replica(state: dict[str, torch.Tensor], config: dict) -> MultiTaskRanker:
    model = MultiTaskRanker.from_config(config)
    model.load_state_dict(state)
    return model.eval()


def _scores(model: MultiTaskRanker, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = _batch(99, 0, len(users))
    with torch.no_grad():
        return model({"user_id": users, "item_id": items}, torch.from_numpy(_dense(batch))).logits


def _deltas(steps: int) -> tuple[Learner, dict[str, torch.Tensor], list[Delta]]:
    """A learner, its base after one step, and its delta after each next step."""
    torch.manual_seed(0)
    trainer = _learner()
    _learn(trainer, 0)
    base = _clone(trainer.weights())
    trainer.mark_published()
    deltas = []
    for step in range(1, steps + 1):
        _learn(trainer, step)
        deltas.append(from_tensors(to_tensors(trainer.delta())))
        trainer.mark_published()
    return trainer, base, deltas


def test_a_replica_applying_deltas_in_place_is_the_materialised_model_bit_for_bit(monkeypatch) -> None:
    monkeypatch.setattr(learner.models.encoder, "OVERLAY_MIN", 8)  # a fold is due within a delta or two
    monkeypatch.setattr(learner.delta, "FOLD_SLACK", 10**6)  # and apply_delta does not fold: the plans below do
    trainer, base, deltas = _deltas(10)
    replica, state = _replica(base, trainer.model.config), base
    users, items = torch.arange(0, 52).repeat(2), torch.arange(0, 104) % 82  # held, tombstoned and unknown ids
    for i, delta in enumerate(deltas):
        apply_delta(replica, delta)
        state = materialise(state, delta)
        if i in (2, 6):
            plan = plan_fold(replica)  # beside the requests; the next delta lands before its install
        if i == 3:
            assert install_fold(replica, plan) and 0 < sum(replica.encoder.overlay_entries().values())
        if i == 6:
            monkeypatch.setattr(learner.delta, "FOLD_SLACK", 1)  # from here apply_delta folds whenever due
        if i == 7:
            assert sum(replica.encoder.overlay_entries().values()) == 0  # folded by the apply
            assert not install_fold(replica, plan)  # so the plan of the map before is refused
        fresh = _replica(state, trainer.model.config)
        applied, loaded = _scores(replica, users, items), _scores(fresh, users, items)
        for task in loaded:
            assert torch.equal(applied[task], loaded[task]), (i, task)
        got = replica.state_dict()
        assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items()), i
    assert all(torch.equal(v, trainer.weights()[k]) for k, v in replica.state_dict().items())


def test_a_tombstoned_id_scores_with_the_default_row_never_its_old_one() -> None:
    trainer, base, deltas = _deltas(4)
    replica = _replica(base, trainer.model.config)
    for delta in deltas:
        tombstones = delta.maps["encoder.map_ids_user_id"].tombstones
        old_rows = replica.encoder.map_rows("user_id", tombstones)
        apply_delta(replica, delta)
        if tombstones.numel():
            break
    assert tombstones.numel() and (old_rows > 0).all()  # mapped to a row of their own until this delta
    assert (replica.encoder.map_rows("user_id", tombstones) == 0).all()
    unknown = torch.full_like(tombstones, 10**12)
    items = torch.zeros_like(tombstones)
    dead, never = _scores(replica, tombstones, items), _scores(replica, unknown, items)
    with torch.no_grad():  # what the old rows would score: not what the tombstoned ids get
        old = replica({"user_id": tombstones, "item_id": items}, torch.from_numpy(_dense(_batch(99, 0, len(items)))),
                      {"user_id": old_rows, "item_id": replica.encoder.map_rows("item_id", items)}).logits
    for task in dead:
        assert torch.equal(dead[task], never[task]), task
    assert any(not torch.equal(dead[task], old[task]) for task in dead)  # (a task's head may not read users yet)


@pytest.mark.parametrize("tables", [CONFIG.tables, None], ids=["per-field", "hashed"])
def test_deltas_of_every_kind_of_table_apply_to_a_replica(tables) -> None:
    """The wide term's tables beside the embeddings, per field (grown and reset with them) or hashed."""
    torch.manual_seed(0)
    trainer = Learner(replace(CONFIG, tables=tables, n_buckets=128, wide={"dim": 2}), list(ID_FIELDS),
                      len(FEATURE_COLUMNS))
    _learn(trainer, 0)
    replica = _replica(trainer.weights(), trainer.model.config)
    trainer.mark_published()
    moving = ({"encoder.table.", "wide.factors.hashed.", "wide.biases.hashed."} if tables is None else
              {f"{t}.{f}." for t in ("encoder.tables", "wide.factors", "wide.biases") for f in ID_FIELDS})
    for step in range(1, 5):
        _learn(trainer, step)
        delta = trainer.delta()
        assert {p for p, t in delta.tables.items() if t.rows.numel()} == moving
        apply_delta(replica, delta)
        trainer.mark_published()
    assert all(torch.equal(v, trainer.weights()[k]) for k, v in replica.state_dict().items())


def _bad(delta: Delta, what: str) -> Delta:
    """``delta`` broken in one way, everything else left as it was."""
    dense, tables, maps = dict(delta.dense), dict(delta.tables), dict(delta.maps)
    prefix, key = "encoder.tables.user_id.", "encoder.map_ids_user_id"
    t, m = tables[prefix], maps[key]
    if what == "dense shape":
        first = next(iter(dense))
        dense[first] = torch.zeros(*dense[first].shape, 2)
    elif what == "dense missing":
        dense.pop(next(iter(dense)))
    elif what == "unknown table":
        tables["encoder.tables.nobody."] = t
    elif what == "row beyond the table":
        tables[prefix] = TableRows(torch.cat([t.rows, torch.tensor([t.size])]), torch.cat([t.weight, t.weight[:1]]),
                                   torch.cat([t.sum_sq, t.sum_sq[:1]]), t.size)
    elif what == "rows out of order":
        tables[prefix] = TableRows(t.rows.flip(0), t.weight.flip(0), t.sum_sq.flip(0), t.size)
    elif what == "beyond capacity":  # every added row comes along, but the table holds 40 ids
        rows = torch.cat([t.rows, torch.arange(t.size, 42)])
        zeros = t.weight.new_zeros(len(rows), t.weight.shape[1])
        tables[prefix] = TableRows(rows, zeros, t.sum_sq.new_zeros(len(rows)), 42)
    elif what == "ids out of order":
        maps[key] = MapChanges(m.ids.flip(0), m.rows.flip(0), m.tombstones)
    elif what == "row 0 mapped":
        maps[key] = MapChanges(m.ids, torch.zeros_like(m.rows), m.tombstones)
    elif what == "mapped and tombstoned":
        maps[key] = MapChanges(m.ids, m.rows, torch.unique(torch.cat([m.tombstones, m.ids[:1]])))
    return Delta(dense, tables, maps)


@pytest.mark.parametrize("what", ["dense shape", "dense missing", "unknown table", "row beyond the table",
                                  "rows out of order", "beyond capacity", "ids out of order", "row 0 mapped",
                                  "mapped and tombstoned"])
def test_a_delta_that_does_not_fit_is_refused_before_anything_is_written(what: str) -> None:
    trainer, base, deltas = _deltas(2)
    replica = _replica(base, trainer.model.config)
    apply_delta(replica, deltas[0])
    before = _clone(replica.state_dict())
    overlays = replica.encoder.overlay_entries()
    assert deltas[1].maps["encoder.map_ids_user_id"].ids.numel() > 1  # so that each way of breaking it breaks it
    assert deltas[1].tables["encoder.tables.user_id."].rows.numel() > 1
    with pytest.raises(DeltaError):
        apply_delta(replica, _bad(deltas[1], what))
    after = replica.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and replica.encoder.overlay_entries() == overlays
    apply_delta(replica, deltas[1])  # the good one still applies
    assert all(torch.equal(v, trainer.weights()[k]) for k, v in replica.state_dict().items())


def test_a_prepared_delta_writes_nothing_until_installed_and_a_stale_one_is_refused() -> None:
    """A replica prepares a delta (checks, map merges) beside its requests and installs it under its lock: the
    preparing changes nothing; installing gives what apply_delta gives; one prepared against maps that have
    changed since is refused whole."""
    trainer, base, deltas = _deltas(3)
    replica = _replica(base, trainer.model.config)
    before = _clone(replica.state_dict())
    first, second = learner.delta.prepare_delta(replica, deltas[0]), learner.delta.prepare_delta(replica, deltas[1])
    assert all(torch.equal(replica.state_dict()[k], v) for k, v in before.items())
    learner.delta.install_delta(replica, first)
    reference = _replica(base, trainer.model.config)
    apply_delta(reference, deltas[0])
    _equal(replica.state_dict(), reference.state_dict())
    installed = _clone(replica.state_dict())
    with pytest.raises(DeltaError, match="changed since the delta was prepared"):
        learner.delta.install_delta(replica, second)  # merged into the overlays before the first went in
    assert all(torch.equal(replica.state_dict()[k], v) for k, v in installed.items())
    learner.delta.install_delta(replica, learner.delta.prepare_delta(replica, deltas[1]))
    apply_delta(reference, deltas[1])
    _equal(replica.state_dict(), reference.state_dict())



def test_an_installed_delta_is_served_whole_before_its_rows_are_written() -> None:
    """Under serving's lock a replica installs a delta without writing its rows: the tables keep the parent's
    values, yet every score and the state are the new version's; ``settle_delta`` then writes the rows beside the
    requests, changing no score."""
    trainer, base, deltas = _deltas(2)
    replica, reference = _replica(base, trainer.model.config), _replica(base, trainer.model.config)
    for delta in deltas:
        apply_delta(reference, delta)
        prepared = learner.delta.prepare_delta(replica, delta)
        tables = {prefix: table.weight.clone() for prefix, table in row_tables(replica).items()}
        learner.delta.install_delta(replica, prepared)
        assert delta.tables and all(torch.equal(row_tables(replica)[p].weight[: len(w)], w)  # a growth adds zeros
                                    for p, w in tables.items())
        _equal(replica.state_dict(), reference.state_dict())
        users, items = torch.arange(0, 52).repeat(2), torch.arange(0, 104) % 82  # held, tombstoned and unknown ids
        for task, logits in _scores(reference, users, items).items():
            assert torch.equal(_scores(replica, users, items)[task], logits), task
        learner.delta.settle_delta(prepared)
        assert all(table._staged is None for table in row_tables(replica).values())
        for task, logits in _scores(reference, users, items).items():
            assert torch.equal(_scores(replica, users, items)[task], logits), task
        _equal(replica.state_dict(), reference.state_dict())
        for prefix, table in row_tables(replica).items():
            assert torch.equal(table.weight, row_tables(reference)[prefix].weight), prefix



@pytest.mark.parametrize("seed", range(6))
def test_a_replicas_overlay_merge_is_the_encoders(seed: int) -> None:
    """``prepare_delta`` merges map changes through numpy on the CPU: the same overlay as the encoder's own torch
    merge, entry for entry: ids replaced, ids new, tombstones of held and of unknown ids, an empty overlay."""
    g = torch.Generator().manual_seed(seed)
    encoder = learner.models.encoder.FeatureEncoder(["user_id"], 0, emb_dim=4, tables={"user_id": {"capacity": 10**6}})
    for step in range(4):
        held = encoder.overlay("user_id")[0]
        reused = held[torch.randperm(held.numel(), generator=g)[: held.numel() // 3]]
        pool = torch.unique(torch.cat([reused, torch.randint(0, 5_000, (300,), generator=g)]))
        pool = pool[torch.randperm(pool.numel(), generator=g)]
        cut = pool.numel() // (3 + seed % 3)
        ids, tombstones = pool[cut:].sort().values, pool[:cut].sort().values
        rows = torch.randint(1, 10**6, (ids.numel(),), generator=g)
        change = MapChanges(ids, rows, tombstones)
        ours = learner.delta.merged_overlay(encoder, "user_id", encoder.overlay("user_id"), change)
        theirs = encoder.merged_overlay("user_id", ids, rows, tombstones)
        assert torch.equal(ours, theirs), step
        encoder.set_overlay("user_id", ours)



@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 18])
def test_a_replicas_fold_in_chunks_is_the_encoders(chunk: int, monkeypatch) -> None:
    """``learner.delta.plan_fold`` folds a map through numpy in chunks, pausing between them: the same maps as the
    encoder's own fold, entry for entry (ids replaced, inserted before, between and after the map's, removed,
    removals of ids the map lacks), and a pause between every two chunks."""
    monkeypatch.setattr(learner.delta, "FOLD_CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    encoder = learner.models.encoder.FeatureEncoder(["user_id"], 0, emb_dim=4, tables={"user_id": {"capacity": 10**6}})
    held = torch.unique(torch.randint(100, 5_000, (300,), generator=g))
    encoder.set_map("user_id", held, torch.randperm(held.numel(), generator=g) + 1)
    changed = torch.unique(torch.cat([held[torch.randperm(held.numel(), generator=g)[:120]],
                                      torch.randint(0, 6_000, (150,), generator=g)]))
    rows = torch.randint(1, 10**6, (changed.numel(),), generator=g)
    rows[torch.rand(changed.numel(), generator=g) < 0.4] = 0  # removals, of held ids and of unknown ones
    encoder.set_overlay("user_id", torch.stack([changed, rows]))
    pauses = []
    ours = learner.delta.plan_fold(torch.nn.ModuleDict({"encoder": encoder}), pause=lambda: pauses.append(1))
    theirs = encoder.plan_fold()
    mine = ours["encoder"].fields["user_id"]
    assert torch.equal(mine.folded_ids, theirs.fields["user_id"].folded_ids)
    assert torch.equal(mine.folded_rows, theirs.fields["user_id"].folded_rows)
    chunks = -(-held.numel() // chunk)
    assert len(pauses) == chunks - 1 + chunks // 4  # between two merges, and every four chunks copied
    assert learner.delta.install_fold(torch.nn.ModuleDict({"encoder": encoder}), ours)


# ---- a base written beside training ---------------------------------------------------------------------------

def test_a_composed_delta_brings_every_version_of_its_stretch_to_the_last() -> None:
    """What a base written beside training goes out with: the deltas published while it was written, composed
    with the change since the last. A replica on any version of that stretch applies it in place of the base."""
    trainer, base, deltas = _deltas(12)
    states = [base]
    for delta in deltas:
        states.append(materialise(states[-1], delta))
    assert sum(d.tombstones for d in deltas[3:]) > 0  # ids expired or evicted within the stretch
    composed = from_tensors(to_tensors(compose(deltas[3:])))
    assert composed.changed_rows <= sum(d.changed_rows for d in deltas[3:])
    for start in range(3, len(states)):
        _equal(materialise(states[start], composed), states[-1])
    replica = _replica(states[6], trainer.model.config)
    left = without_held(replica, composed)  # what the replica on v6 still has to write
    assert left.changed_rows <= composed.changed_rows
    apply_delta(replica, left)
    _equal(replica.state_dict(), states[-1])
    assert without_held(replica, composed).changed_rows == 0  # on the last version, nothing is left to write
    with pytest.raises(DeltaError):
        compose([])


def test_a_captured_state_is_the_weights_of_its_moment_whatever_is_learned_after() -> None:
    torch.manual_seed(0)
    trainer = _learner()
    for step in range(4):
        _learn(trainer, step)
    assemble = trainer.capture()
    expected = _clone(trainer.weights())
    for step in range(4, 9):
        _learn(trainer, step)  # rows move, ids come and go, tables may grow
    _equal(assemble(), expected)
