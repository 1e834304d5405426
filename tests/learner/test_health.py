"""Expert-health detection on constructed gate tensors, and one real model driven through the learner."""

from __future__ import annotations

import struct
import time
import os
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from features.memory import InMemoryFeatures
from infra.cli import app
from learner.config import CadenceConfig, HealthConfig, LearnerConfig
from learner.health import (
    AlertLimiter,
    ExpertScaleProbe,
    GateAccumulator,
    HealthMonitor,
    detect_collapse,
    detect_degradation,
    detect_underfitting,
    expert_names,
    expert_visibility,
    js_divergence,
    load_balance_score,
    routing_share,
)
from learner.models import ModelOutput, build
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from learner.telemetry import Telemetry, TelemetryConfig
from stream.events import EXAMPLE_SCHEMA, TASKS

CFG = HealthConfig()
TASKS3 = ["click", "like", "follow"]


def _output(gates: torch.Tensor, zero_frac: torch.Tensor | None = None, **kw) -> ModelOutput:
    """A ModelOutput around constructed gates ``(B, T, E)``."""
    tasks = TASKS3[: gates.shape[1]]
    return ModelOutput(
        logits={t: torch.zeros(gates.shape[0]) for t in tasks},
        aux_loss=torch.zeros(()),
        gates={t: gates[:, i] for i, t in enumerate(tasks)},
        expert_zero_frac=torch.zeros(gates.shape[2]) if zero_frac is None else zero_frac,
        task_types={t: "binary" for t in tasks},
        **kw,
    )


def _pooled():
    """PLE for 3 tasks, one expert per pool: [task:click | task:like | task:follow | shared]."""
    model = build("ple", n_inputs=6, tasks=TASKS3, n_experts=1, n_levels=1, expert_dims=[4], tower_dims=[])
    assert model.pools == {"task:click": (0,), "task:like": (1,), "task:follow": (2,), "shared": (3,)}
    return model


NAMES = ["e0", "e1", "e2", "e3"]


def test_collapse_flags_a_mostly_dead_expert_and_only_it() -> None:
    assert [a.subject for a in detect_collapse(np.array([0.1, 0.95, 0.3, 0.9]), None, CFG, NAMES)] == ["expert e1"]
    assert detect_collapse(np.array([0.1, 0.5, 0.3, 0.9]), None, CFG, NAMES) == []


def test_collapse_flags_an_output_scale_far_from_the_median() -> None:
    found = detect_collapse(np.zeros(4), np.array([1.0, 1.3, 0.8, 15.0]), CFG, NAMES)
    assert [(a.kind, a.subject) for a in found] == [("collapse", "expert e3")]
    assert [a.subject for a in detect_collapse(np.zeros(4), np.array([1.0, 1.3, 0.8, 0.05]), CFG, NAMES)] == ["expert e3"]
    assert detect_collapse(np.zeros(4), np.array([1.0, 1.3, 0.8, 5.0]), CFG, NAMES) == []  # within 10x
    strict = HealthConfig(scale_ratio=3.0)
    assert [a.subject for a in detect_collapse(np.zeros(4), np.array([1.0, 1.3, 0.8, 5.0]), strict, NAMES)] == ["expert e3"]


def test_degradation_flags_a_shared_expert_owned_by_one_task() -> None:
    visible = np.ones((3, 4), dtype=bool)
    balanced = np.array([[0.25, 0.25, 0.25, 0.25]] * 3)
    assert detect_degradation(balanced, visible, TASKS3, CFG, NAMES) == []
    owned = np.array([[0.1, 0.3, 0.3, 0.3], [0.0, 0.5, 0.5, 0.0], [0.005, 0.3, 0.3, 0.395]])  # e0: 95% from click
    found = detect_degradation(owned, visible, TASKS3, CFG, NAMES)
    assert [(a.subject, round(a.value, 3)) for a in found] == [("expert e0", 0.952)]
    assert "click" in found[0].detail
    # A task-specific expert is not shared, so one task owning it is by design.
    pooled = expert_visibility(_pooled(), TASKS3)
    specific = np.array([[0.6, 0, 0, 0.4], [0, 0.6, 0, 0.4], [0, 0, 0.6, 0.4]])
    assert detect_degradation(specific, pooled, TASKS3, CFG, NAMES) == []
    # An expert nobody uses much is ignored (its share is noise).
    unused = np.array([[0.001, 0.3, 0.3, 0.399], [0.0, 0.5, 0.5, 0.0], [0.0, 0.3, 0.3, 0.4]])
    assert detect_degradation(unused, visible, TASKS3, CFG, NAMES) == []


def test_underfitting_flags_a_sparse_task_leaning_on_shared_experts() -> None:
    visible = expert_visibility(_pooled(), TASKS3)
    rates = {"click": 0.3, "like": 0.01, "follow": 0.003}
    mixing = np.array([[0.1, 0, 0, 0.9], [0, 0.1, 0, 0.9], [0, 0, 0.6, 0.4]])  # like: 90% shared
    found = detect_underfitting(mixing, visible, TASKS3, rates, CFG)
    assert [(a.subject, a.value) for a in found] == [("task like", pytest.approx(0.9))]  # click is not sparse
    healthy = np.array([[0.1, 0, 0, 0.9], [0, 0.5, 0, 0.5], [0, 0, 0.6, 0.4]])
    assert detect_underfitting(healthy, visible, TASKS3, rates, CFG) == []
    # Without task-specific experts (MMoE, SMES) the check cannot apply: skipped, not "healthy".
    assert detect_underfitting(mixing, np.ones((3, 4), dtype=bool), TASKS3, rates, CFG) is None


def test_visibility_follows_home_pools_and_groups() -> None:
    model = build("home", n_inputs=6, tasks=["click", "long_view", "like"], n_experts=1, expert_dims=[4], tower_dims=[])
    visible = expert_visibility(model, model.tasks)
    pools = {name: members[0] for name, members in model.pools.items()}
    assert visible[:, pools["global"]].all()
    assert visible[:, pools["group:interaction"]].tolist() == [True, False, True]  # click and like
    assert visible[:, pools["group:watch_time"]].tolist() == [False, True, False]  # long_view alone
    assert visible[:, pools["task:like"]].tolist() == [False, False, True]


def test_families_without_pools_name_experts_by_index_and_show_every_expert_to_every_task() -> None:
    model = build("mmoe", n_inputs=6, tasks=TASKS3, n_experts=3, expert_dims=[4], tower_dims=[])
    assert expert_names(model) == ["e0", "e1", "e2"]
    assert expert_visibility(model, TASKS3).tolist() == [[True] * 3] * 3
    assert expert_names(_pooled()) == ["task:click/0", "task:like/0", "task:follow/0", "shared/0"]


def test_routing_share_drift_and_load_balance_score() -> None:
    gate_sums = np.array([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    counts = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    assert routing_share(gate_sums, counts, sparse=False).tolist() == [[0.75, 0.25, 0, 0], [0.25] * 4]
    assert routing_share(gate_sums, counts, sparse=True).tolist() == [[0.5, 0, 0, 0.5], [0, 0, 0, 1.0]]

    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = np.array([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    m = (p + q) / 2
    kl = lambda a, b: np.sum(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0.0), axis=1)  # noqa: E731
    np.testing.assert_allclose(js_divergence(p, q), 0.5 * kl(p, m) + 0.5 * kl(q, m), atol=1e-12)
    assert js_divergence(p, q).tolist() == pytest.approx([1.0, 0.0])

    assert load_balance_score(np.full(4, 10.0), np.full(4, 5.0), 20) == pytest.approx(1.0)  # even
    assert load_balance_score(np.array([40.0, 0, 0, 0]), np.array([20.0, 0, 0, 0]), 20) == pytest.approx(4.0)


def test_accumulator_counts_routing_choices_for_sparse_families_and_mass_for_dense() -> None:
    gates = torch.tensor([[[0.7, 0.3, 0.0]], [[0.6, 0.0, 0.4]]])  # (B=2, T=1, E=3)
    acc = GateAccumulator()
    acc.add(_output(gates), ["click"])
    dense = acc.take()
    assert not dense.sparse and dense.rows == 2
    np.testing.assert_allclose(dense.mean_gate, [[0.65, 0.15, 0.2]], atol=1e-7)
    np.testing.assert_allclose(dense.lb_counts, [2, 0, 0])  # top-1 choices
    stats = (torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.3, 0.3, 0.4]), torch.tensor(2.0))
    acc.add(_output(gates, lb_stats=stats), ["click"])
    sparse = acc.take()
    assert sparse.sparse
    np.testing.assert_allclose(routing_share(sparse.gate_sums, sparse.choice_counts, True), [[0.5, 0.25, 0.25]])
    assert acc.take() is None  # taken: nothing left


def test_the_scale_probe_measures_each_experts_output_rms() -> None:
    torch.manual_seed(0)
    model = build("mmoe", n_inputs=5, tasks=["click", "like"], n_experts=3, expert_dims=[4], tower_dims=[])
    probe = ExpertScaleProbe(model, model.n_gate_experts)
    x = torch.randn(16, 5)
    model(x)
    expected = model.experts(x).detach().square().mean(dim=(0, 2)).sqrt()  # the hook records this call too
    np.testing.assert_allclose(probe.take(), expected.numpy(), rtol=1e-6)
    assert probe.take() is None


def test_monitor_reports_anomalies_and_rate_limits_alerts() -> None:
    limiter = AlertLimiter(every_s=60)
    assert limiter.allow("a", 0.0) and not limiter.allow("a", 59.0) and limiter.allow("b", 59.0)
    assert limiter.allow("a", 60.0)

    monitor = HealthMonitor(HealthConfig(), TASKS3, _pooled())
    like_on_shared = torch.tensor([[0.5, 0.0, 0.0, 0.5], [0.0, 0.05, 0.0, 0.95], [0.0, 0.0, 0.5, 0.5]])  # (T, E)
    dead = torch.tensor([0.0, 0.0, 0.97, 0.0])
    for now in (0.0, 1.0):
        monitor.observe(_output(like_on_shared.expand(8, -1, -1), dead))
        report = monitor.report(step=int(now) + 1, positive_rate={"click": 0.3, "like": 0.01, "follow": 0.003}, now=now)
        kinds = sorted((a["kind"], a["subject"]) for a in report["anomalies"])
        assert kinds == [("collapse", "expert task:follow/0"), ("underfitting", "task like")]
        orjson.dumps(report)  # JSON as it is
    assert report["alerts"] == []  # the same anomalies one second later: no second alert
    assert report["drift_vs_reference"] == pytest.approx({t: 0.0 for t in TASKS3})
    assert report["drift_vs_published"] == {}  # nothing published yet


def _records(path: Path) -> list:
    """Records of a W&B offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, out, part = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # the writer is mid-record
            break
        if kind == 0:
            pos += block - pos % block
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        part = payload if kind in (1, 2) else part + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
    return out


def _finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The run file's records once W&B's writer has flushed its ``exit`` record (it may lag ``finish()``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _records(path)
        if any(r.HasField("exit") for r in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {path} after {timeout_s:.0f}s"
        time.sleep(0.1)


def _batch(step: int, n: int = 128) -> pa.Table:
    rng = np.random.default_rng(step)
    labels = {t: (rng.random(n) < 0.3).astype(np.float32) for t in TASKS}
    labels["follow"] = (rng.random(n) < 0.01).astype(np.float32)  # a sparse task
    return pa.table(
        {
            "request_id": [f"r{step}.{i}" for i in range(n)],
            "user_id": rng.integers(0, 40, n),
            "item_id": rng.integers(0, 60, n),
            "ts_ms": np.full(n, 1_000 + step, dtype=np.int64),
            **labels,
            "play_time": rng.random(n).astype(np.float32) * 1000,
            "partition": np.zeros(n, dtype=np.int32),
            "offset": np.arange(step * n, (step + 1) * n, dtype=np.int64),
            "is_correction": np.zeros(n, dtype=bool),
        },
        schema=EXAMPLE_SCHEMA,
    )


def test_a_real_model_through_the_learner_writes_health_to_wandb_json_and_png(tmp_path: Path) -> None:
    health = HealthConfig(underfit_shared_mass=0.0)  # any shared weight of a sparse task: flagged
    config = LearnerConfig(family="ple", hparams={"n_experts": 1, "expert_dims": (8,), "tower_dims": ()},
                           n_buckets=256, emb_dim=4, health=health,
                           cadence=CadenceConfig(snapshot_every_steps=3, health_every_steps=2))
    telemetry = Telemetry(TelemetryConfig(directory=tmp_path / "wandb", mode="offline"), run_config={"test": True})
    loop = TrainingLoop.local(config, InMemoryFeatures(), SnapshotStore(tmp_path / "run" / "snapshots"),
                              telemetry=telemetry)
    for step in range(6):
        loop.step(_batch(step))  # reports health at steps 2, 4, 6 and publishes at 3 and 6
    run_dir = Path(telemetry.run.dir).parent
    loop.close()  # the heatmap is drawn off the training thread; closing waits for it, logs it, ends the run

    report = orjson.loads((tmp_path / "run" / "health" / "experts.json").read_bytes())
    assert report["step"] == 6 and report["family"] == "ple" and report["snapshot"]["version"] == 1
    assert len(report["routing_share"]) == len(TASKS) and report["experts"][-1] == "shared/0"
    assert set(report["drift_vs_published"]) == set(TASKS)  # v1 recorded the routing share at step 3
    assert ("underfitting", "task follow") in {(a["kind"], a["subject"]) for a in report["anomalies"]}
    png = tmp_path / "run" / "health" / "utilisation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = _finished_records(next(run_dir.glob("run-*.wandb")))
    keys = {item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item}
    assert {"health/load_balance", "health/share/follow/shared/0", "health/drift_published/click",
            "health/anomalies/underfitting", "snapshot/version", "snapshot/staleness_s",
            "progressive/click/window_gauc"} <= keys
    assert any(k.startswith("health/utilisation") for k in keys)  # the heatmap as a W&B image
    alerts = [r.alert for r in records if r.HasField("alert")]
    assert any(a.title == "expert underfitting" and "task follow" in a.text for a in alerts)
    assert len([a for a in alerts if "task follow" in a.text]) == 1  # rate-limited: reported at steps 2, 4, 6

    shown = CliRunner().invoke(app, ["experts", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "shared/0" in shown.output and "underfitting: task follow" in shown.output
    assert "snapshot v2 " in shown.output  # the run's newest, published after the report was written
    missing = CliRunner().invoke(app, ["experts", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no expert-health report" in missing.output


def test_the_heatmap_is_drawn_in_a_process_of_its_own_and_its_failure_is_an_error_naming_the_cause(
    tmp_path: Path
) -> None:
    """matplotlib holds the interpreter's lock while it draws: on a thread of the trainer it stalled every step
    meanwhile (``learner.plot_process``). The drawing process writes the PNG; what goes wrong in it is raised here."""
    import os

    from learner.plot_process import draw_apart

    path = tmp_path / "health" / "utilisation.png"
    shares = np.random.default_rng(0).random((4, 2, 3))
    assert draw_apart([2, 4, 6, 8], shares, ["click", "like"], ["e0", "e1", "shared/0"], path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(path.parent)) == ["utilisation.png"]  # its inputs removed
    with pytest.raises(RuntimeError, match="heatmap's process failed: IndexError: index 2 is out of bounds"):
        draw_apart([2, 4, 6, 8], shares, ["click", "like", "follow"], ["e0", "e1", "shared/0"], path)  # a task short


def test_one_child_draws_every_heatmap_and_one_that_dies_or_hangs_is_replaced(tmp_path: Path) -> None:
    """The interpreter, numpy and matplotlib are loaded once a run, not once a heatmap (``learner.plot_process``)."""
    import signal

    from learner.plot_process import Plotter

    plotter, shares = Plotter(timeout_s=20), np.random.default_rng(0).random((3, 2, 2))
    args = ([1, 2, 3], shares, ["click", "like"], ["e0", "e1"])
    try:
        for i in range(3):
            assert plotter.draw(*args, tmp_path / f"{i}.png").read_bytes()[:4] == b"\x89PNG"
        with pytest.raises(RuntimeError, match="IndexError"):  # an error in a drawing: the child answers it
            plotter.draw([1, 2, 3], shares, ["click", "like", "follow"], ["e0", "e1"], tmp_path / "bad.png")
        assert plotter.started == 1
        plotter._child.kill()
        plotter._child.wait()
        assert plotter.draw(*args, tmp_path / "after-kill.png").exists() and plotter.started == 2
        plotter.timeout_s = 1
        os.kill(plotter._child.pid, signal.SIGSTOP)  # hung: no answer comes
        with pytest.raises(RuntimeError, match="no answer within 1 s"):
            plotter.draw(*args, tmp_path / "hung.png")
        plotter.timeout_s = 20
        assert plotter.draw(*args, tmp_path / "after-hang.png").exists() and plotter.started == 3
        assert not list(tmp_path.glob(".*.npz"))  # every request's inputs removed
    finally:
        plotter.close()
    assert plotter._child is None
