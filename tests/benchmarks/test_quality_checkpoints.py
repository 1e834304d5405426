"""``bench quality``'s checkpoints: a finished seed is taken from disk by a later run with the same inputs, and
only then; the report says which seeds were resumed."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import orjson
import pytest

from benchmarks import quality
from benchmarks.quality import CHECKPOINTS, QualityPlan, SeedFigures, run
from benchmarks.quality_checkpoints import Checkpoints, run_key
from benchmarks.quality_floor import FloorConfig, Tuning
from benchmarks.quality_train import CONFIG_FILE

PLAN = QualityPlan(200, seeds=(0, 1), families=("mmoe",), staleness_s=(1,), windows=4)


def _seeds(out_dir: Path) -> list[dict]:
    return orjson.loads((out_dir / "figures.json").read_bytes())["seeds"]


def test_a_second_run_takes_every_finished_seed_from_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    first = run(quick=True, out_dir=tmp_path, plan=PLAN)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["seed-0.json", "seed-1.json", "tuning.json"]
    assert not any(n.startswith("resumed") for n in first.notes)
    before = _seeds(tmp_path)

    def no(*args, **kwargs):
        raise AssertionError("a checkpointed seed was computed again")

    monkeypatch.setattr(quality, "simulate", no)
    monkeypatch.setattr(quality, "train_family", no)
    monkeypatch.setattr(quality, "tune", no)
    again = run(quick=True, out_dir=tmp_path, plan=PLAN)
    assert _seeds(tmp_path) == before  # the same figures, curves (NaN windows included) and timings
    assert [r.value for r in again.rows] == pytest.approx([r.value for r in first.rows], nan_ok=True)
    resumed = [n for n in again.notes if n.startswith("resumed")]
    assert len(resumed) == 1 and "seed 0 on " in resumed[0] and "seed 1 on " in resumed[0]


def test_only_the_missing_seed_is_computed_and_a_damaged_checkpoint_is_computed_again(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    run(quick=True, out_dir=tmp_path, plan=PLAN)
    (tmp_path / CHECKPOINTS / "seed-1.json").write_text('{"key": "trunc')
    trained: list[int] = []
    real = quality.train_family

    def counted(stream, family, seed, *args, **kwargs):
        trained.append(seed)
        return real(stream, family, seed, *args, **kwargs)

    monkeypatch.setattr(quality, "train_family", counted)
    report = run(quick=True, out_dir=tmp_path, plan=PLAN)
    assert trained == [1]
    assert any(n.startswith("resumed") and "seed 0 on " in n and "seed 1" not in n for n in report.notes)
    assert [s["seed"] for s in _seeds(tmp_path)] == [0, 1]


def test_the_key_follows_the_plan_the_configuration_and_the_code_not_the_seeds(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "repo"
    for package in ("stream", "features", "learner", "benchmarks", "infra"):
        (root / package).mkdir(parents=True)
    (root / "learner" / "model.py").write_text("x = 1\n")
    (root / "infra" / "config.py").write_text("c = 1\n")
    (root / "benchmarks" / "quality_train.py").write_text("y = 1\n")
    (root / "benchmarks" / "quality_rows.py").write_text("w = 1\n")
    (root / "benchmarks" / "serving.py").write_text("z = 1\n")
    config = tmp_path / "moestream.yaml"
    shutil.copy(CONFIG_FILE, config)
    plan = asdict(PLAN)
    keys = [run_key(plan, config, root)]
    assert run_key({**plan, "seeds": (5,)}, config, root) == keys[0]
    assert run_key({**plan, "windows": 5}, config, root) != keys[0]
    for unrelated in ("serving.py", "quality_rows.py"):  # not what the figures depend on
        (root / "benchmarks" / unrelated).write_text("changed = True\n")
        assert run_key(plan, config, root) == keys[0]
    for changed in ("learner/model.py", "infra/config.py", "benchmarks/quality_train.py"):
        (root / changed).write_text("changed = True\n")
        keys.append(run_key(plan, config, root))
    config.write_text(config.read_text().replace("family: mmoe", "family: home"))
    keys.append(run_key(plan, config, root))
    monkeypatch.setenv("MOESTREAM_LEARNER__LR", "0.01")  # the environment overrides the file
    keys.append(run_key(plan, config, root))
    assert len(set(keys)) == len(keys)


def test_a_checkpoint_of_another_key_or_another_tuning_is_not_read(tmp_path: Path) -> None:
    tuning = Tuning([FloorConfig(0.3, 16, 1.0)], {(0.3, 16, 1.0): [0.7]})
    Checkpoints(tmp_path, "a").save_tuning(tuning, {"simulate": 1.0, "floor": 2.0})
    assert Checkpoints(tmp_path, "b").tuning() is None
    got, sections = Checkpoints(tmp_path, "a").tuning()
    assert got == tuning and sections == {"simulate": 1.0, "floor": 2.0}
    Checkpoints(tmp_path, "a").save_seed(3, asdict(SeedFigures(3, 10)), tuning)
    assert Checkpoints(tmp_path, "a").seed(3, tuning) is not None
    other = Tuning([FloorConfig(1.0, 16, 1.0)], {(1.0, 16, 1.0): [0.7]})
    assert Checkpoints(tmp_path, "a").seed(3, other) is None  # its floor was scored with another tuning
    assert Checkpoints(tmp_path, "b").seed(3, tuning) is None


def test_a_seed_round_trips_with_nan_windows_integer_lags_and_where_it_came_from(tmp_path: Path) -> None:
    tuning = Tuning([FloorConfig(0.3, 16, 1.0)], {(0.3, 16, 1.0): [0.7]})
    figures = SeedFigures(0, 8, figures={"mmoe": {"click": {"auc": 0.7, "gauc": float("nan")}}},
                          curves={"mmoe": {"click": [0.6, float("nan")]}}, window_ends=[4, 8],
                          frozen={"freeze_at": 2}, staleness={1: {"events": 6}, 600: {"events": 2}},
                          train_seconds={"mmoe": 1.5}, sections={"train": 1.5})
    store = Checkpoints(tmp_path, "k", commit="0123456789abcdef+modified")
    store.save_seed(0, asdict(figures), tuning)
    got, provenance = store.seed(0, tuning)
    back = SeedFigures(**got)
    assert back.staleness.keys() == {1, 600} and back.window_ends == [4, 8] and back.train_seconds == {"mmoe": 1.5}
    assert back.curves["mmoe"]["click"][0] == 0.6 and math.isnan(back.curves["mmoe"]["click"][1])
    assert math.isnan(back.figures["mmoe"]["click"]["gauc"])
    assert provenance.commit == "0123456789abcdef+modified" and provenance.machine
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, then renamed


def test_fresh_computes_every_seed_again(tmp_path: Path, monkeypatch) -> None:
    plan = QualityPlan(200, seeds=(0,), families=("mmoe",), staleness_s=(1,), windows=4)
    run(quick=True, out_dir=tmp_path, plan=plan)
    trained: list[int] = []
    real = quality.train_family
    monkeypatch.setattr(quality, "train_family", lambda stream, family, seed, *a, **k: (
        trained.append(seed), real(stream, family, seed, *a, **k))[1])
    report = run(quick=True, out_dir=tmp_path, plan=plan, resume=False)
    assert trained == [0] and not any(n.startswith("resumed") for n in report.notes)
    assert (tmp_path / CHECKPOINTS / "seed-0.json").exists()  # and kept again for the next run


def test_fresh_is_refused_for_a_benchmark_that_keeps_nothing() -> None:
    import benchmarks

    with pytest.raises(KeyError, match="--fresh applies to quality only"):
        benchmarks.run("serving", quick=True, fresh=True)


@pytest.mark.parametrize("body", ['{"key": "k", "figures": 3}', '{"key": "k"}', '[1, 2]', '{"key": "k", "chosen": [{"x": 1}]}'])
def test_a_checkpoint_of_the_right_key_but_the_wrong_shape_is_computed_again(tmp_path: Path, body: str) -> None:
    tuning = Tuning([FloorConfig(0.3, 16, 1.0)], {(0.3, 16, 1.0): [0.7]})
    store = Checkpoints(tmp_path, "k")
    store.save_seed(0, asdict(SeedFigures(0, 8)), tuning)
    digest = orjson.loads((tmp_path / "seed-0.json").read_bytes())["tuning"]
    (tmp_path / "seed-0.json").write_text(body.replace('"key": "k"', f'"key": "k", "tuning": "{digest}"'))
    (tmp_path / "tuning.json").write_text(body)
    assert store.seed(0, tuning) is None and store.tuning() is None
