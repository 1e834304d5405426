"""The benchmark's parts, at tiny sizes: peer adapters, FLOP count, timing and row plumbing, the
bf16 check, and the MMoE paper's synthetic generator. No timed assertions: speed is the benchmark's job."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks import BENCHMARKS
from benchmarks.harness import Report
from benchmarks.models import (
    GRID_GOAL,
    SECTIONS,
    GridPoint,
    GridRepeats,
    Repeats,
    bf16_versus_peers,
    executed_experts,
    grid,
    run,
    streaming_grid,
    versus_peers,
)
from benchmarks.peers import MMoESize, contenders, ours, parameter_count, rechub, structure
from benchmarks.precision import ClickStream, auc_gap, progressive_auc
from benchmarks.synthetic import (
    SIZES,
    Schedule,
    SyntheticTasks,
    markdown,
    paired,
    summarise,
    train_and_test,
)
from benchmarks.timing import TrainingRun, bf16_support, expert_gemm_seconds, gemm_peak, interleave, random_batches
from learner.models import FAMILIES

TINY = MMoESize(n_inputs=8, n_experts=3, expert_dims=(6, 4), tower_dims=(3,))


@pytest.fixture(scope="module")
def tiny_contenders():
    return contenders(TINY)


def test_peers_have_our_experts_gates_and_towers(tiny_contenders) -> None:
    layouts = [structure(c) for c in tiny_contenders]
    assert layouts == [{"experts": 3, "gates": 2, "towers": 2}] * 3


def test_peer_parameter_counts_match_ours(tiny_contenders) -> None:
    mine, hub, ctr = (parameter_count(c.model) for c in tiny_contenders)
    assert hub == mine  # BatchNorm stripped: the same layers, bias for bias
    # DeepCTR: no gate bias (T·E fewer), tower bias moved into its PredictionLayer (same count).
    assert ctr == mine - TINY.n_tasks * TINY.n_experts


def test_rechub_keeps_batchnorm_only_when_asked() -> None:
    stock = rechub(TINY, keep_batchnorm=True).model
    stripped = rechub(TINY).model
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in stock.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in stripped.modules())


def test_every_contender_trains_one_step(tiny_contenders) -> None:
    batches = random_batches(TINY.n_inputs, TINY.n_tasks, batch=16, count=1)
    for contender in tiny_contenders:
        before = [p.detach().clone() for p in contender.model.parameters()]
        run = TrainingRun(contender, batches)
        loss = contender.loss(*batches[0])
        assert loss.dim() == 0 and torch.isfinite(loss)
        run.step()
        changed = [not torch.equal(a, p) for a, p in zip(before, contender.model.parameters())]
        assert any(changed), contender.name


def test_forward_flops_by_hand() -> None:
    # experts 3·(8·6 + 6·4) = 216, gates 8·3·2 = 48, mix 3·4·2 = 24, towers 2·(4·3 + 3·1) = 30 MACs
    assert TINY.forward_flops() == 2 * (216 + 48 + 24 + 30)
    assert TINY.train_flops() == 3 * TINY.forward_flops()


def test_interleave_and_rows() -> None:
    report = Report(benchmark="models")
    runs = versus_peers(report, TINY, 8, Repeats(warmup=1, rounds=3, steps=2), "tiny", goal=1.0)
    assert [len(r.samples) for r in runs] == [3, 3, 3]
    assert all(s > 0 for r in runs for s in r.samples)
    assert [row.anchor for row in report.rows] == ["torch-rechub MMOE", "DeepCTR-Torch MMOE"]
    for row, peer in zip(report.rows, runs[1:]):
        assert row.value == runs[0].median() and row.anchor_value == peer.median()
        assert row.ratio == pytest.approx(row.value / row.anchor_value)
        assert row.met == (row.ratio >= 1.0)
    assert "tensors" in report.notes[-1]


def test_interleave_alternates_contenders() -> None:
    order: list[str] = []

    class Spy(TrainingRun):
        def step(self) -> None:
            order.append(self.name)

    size = TINY
    batches = random_batches(size.n_inputs, size.n_tasks, batch=4, count=1)
    runs = [Spy(c, batches) for c in contenders(size)[:2]]
    interleave(runs, rounds=2, steps=1, warmup=1)
    a, b = runs[0].name, runs[1].name
    assert order == [a, b, a, b, a, b]
    order.clear()
    interleave(runs, rounds=2, steps=(1, 2), warmup=(0, 1))  # per-run step counts
    assert order == [b, a, b, b, a, b, b]
    assert [len(r.samples) for r in runs] == [4, 4]


def test_smes_executed_experts_within_bound() -> None:
    size = MMoESize(n_inputs=8, n_experts=6, expert_dims=(4,), tower_dims=(), n_tasks=3)
    run = TrainingRun(ours(size, "smes", k_shared=2, k_private=1), random_batches(8, 3, batch=32, count=2))
    got = executed_experts(run)
    assert 2 <= got["mean"] <= got["max"] <= run.contender.model.max_executed == 5


def test_gemm_peak_stays_within_its_size() -> None:
    gflops, n = gemm_peak(torch.float32, max_n=256, repeats=2)
    assert gflops > 0 and n == 256


def test_bf16_support_reads_cpu_flags(tmp_path: Path) -> None:
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert bf16_support(with_bf16).native and bf16_support(with_bf16).flags == ("amx_tile", "avx512_bf16")
    assert not bf16_support(without).native and bf16_support(without).flags == ()
    assert not bf16_support(tmp_path / "missing").native


def test_progressive_auc_is_seeded_and_runs_under_bf16() -> None:
    stream = ClickStream(n_inputs=TINY.n_inputs, n_tasks=2, hidden=4)
    kwargs = {"batch": 64, "n_batches": 6}
    first = progressive_auc(lambda: ours(TINY), stream, **kwargs)
    again = progressive_auc(lambda: ours(TINY), stream, **kwargs)
    assert auc_gap(first, again) == 0.0
    bf16 = progressive_auc(lambda: ours(TINY), stream, autocast=torch.bfloat16, **kwargs)
    assert len(first) == len(bf16) == 2 and all(0.0 <= a <= 1.0 for a in first + bf16)


def test_click_stream_labels_are_binary_and_seeded() -> None:
    stream = ClickStream(n_inputs=5, n_tasks=3, seed=7)
    (x1, y1), = stream.batches(50, 1)
    (x2, y2), = stream.batches(50, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(y1.unique().tolist()) <= {0.0, 1.0} and y1.shape == (50, 3)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1.0])
def test_synthetic_task_correlation(p: float) -> None:
    data = SyntheticTasks(p, seed=3)
    w = data.weights.double()
    assert torch.linalg.vector_norm(w, dim=0).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # c = 1
    assert float(w[:, 0] @ w[:, 1]) == pytest.approx(p, abs=1e-6)
    _, y, linear = data.sample(20_000, torch.Generator().manual_seed(0))
    pearson = float(torch.corrcoef(linear.T)[0, 1])
    assert pearson == pytest.approx(p, abs=0.02)
    assert y.shape == (20_000, 2) and torch.isfinite(y).all()


def test_synthetic_labels_follow_the_recipe() -> None:
    data = SyntheticTasks(0.5, seed=1, noise_std=0.0)
    x, y, linear = data.sample(100, torch.Generator().manual_seed(0))
    assert torch.allclose(linear, x @ data.weights)
    waves = sum(torch.sin(data.alpha[k] * linear + data.beta[k]) for k in range(len(data.alpha)))
    assert torch.allclose(y, linear + waves, atol=1e-5)
    assert len(data.alpha) == 10 and data.n_inputs == 100


def test_synthetic_rejects_bad_correlation() -> None:
    with pytest.raises(ValueError, match="correlation"):
        SyntheticTasks(1.5)


def test_synthetic_sizes_cover_every_family() -> None:
    assert set(SIZES) == set(FAMILIES)


def test_train_and_test_tiny() -> None:
    result = train_and_test("mmoe", 0.5, seed=0, schedule=Schedule(steps=3, batch=16, n_test=64))
    assert result["family"] == "mmoe" and len(result["per_task"]) == 2
    assert math.isfinite(result["loss"]) and result["loss"] == pytest.approx(sum(result["per_task"]) / 2)


def _fake_results() -> list[dict]:
    losses = {"shared_bottom": 1.0, "omoe": 0.9, "mmoe": 0.5, "ple": 0.6, "home": 0.7, "smes": 0.8}
    return [
        {"family": f, "correlation": p, "seed": s, "loss": loss + 0.01 * s + (0.0 if p < 1 else 0.6 - loss / 2),
         "per_task": [loss, loss], "parameters": 10, "seconds": 0.1}
        for p in (0.5, 1.0) for s in range(3) for f, loss in losses.items()
    ]


def test_summary_rows_and_the_papers_claim() -> None:
    report = summarise(_fake_results(), Schedule(steps=1, seeds=3), quick=True)
    claims = [r for r in report.rows if r.goal is not None]
    assert [r.anchor for r in claims] == ["shared_bottom", "omoe"]
    assert all(r.met for r in claims) and all(r.name.startswith("corr 0.5") for r in claims)
    assert "QUICK" in report.notes[0]
    assert len([r for r in report.rows if r.anchor == "shared_bottom"]) == 2 * len(FAMILIES)


def test_paired_wins_and_markdown() -> None:
    results = _fake_results()
    vs_omoe = paired(results, 0.5, "mmoe", "omoe")
    assert (vs_omoe["wins"], vs_omoe["n"]) == (3, 3)
    assert vs_omoe["mean_diff"] == pytest.approx(0.5 - 0.9) and vs_omoe["std_diff"] == pytest.approx(0.0, abs=1e-12)
    at_one = paired(results, 1.0, "mmoe", "shared_bottom")  # 0.5 + 0.35 vs 1.0 + 0.1
    assert (at_one["wins"], at_one["mean_diff"]) == (3, pytest.approx(0.85 - 1.1))
    table = markdown(results)
    assert table.splitlines()[0] == "| family | params | corr 0.5 | corr 1.0 |"
    assert "| mmoe | 10 | 0.5100 ± 0.0100 |" in table


def test_synthetic_is_registered() -> None:
    assert BENCHMARKS["synthetic"] == "benchmarks.synthetic"


def test_bf16_rows_hold_the_goal_against_the_peers_as_shipped() -> None:
    report = Report(benchmark="models")
    mine = bf16_versus_peers(report, TINY, 8, Repeats(warmup=1, rounds=2, steps=1))
    assert mine.autocast is torch.bfloat16 and len(mine.samples) == 2
    anchors = [row.anchor for row in report.rows]
    assert anchors == ["torch-rechub MMOE, fp32 as shipped", "DeepCTR-Torch MMOE, fp32 as shipped",
                       "torch-rechub MMOE, bf16 autocast", "DeepCTR-Torch MMOE, bf16 autocast"]
    shipped, in_bf16 = report.rows[:2], report.rows[2:]
    assert all(r.goal == ">= 1.5x" and r.met == (r.ratio >= 1.5) for r in shipped)
    assert all(r.goal is None and r.met is None for r in in_bf16)


def test_streaming_grid_spans_the_box_with_its_centre_and_the_probe() -> None:
    points = streaming_grid()
    corners = [p for p in points if p.kind == "corner"]
    assert len(corners) == 16 and [p.kind for p in points[16:]] == ["centre", "probe"]
    factors = {(p.batch, p.size.n_experts, p.size.expert_dims, p.size.n_tasks) for p in corners}
    assert factors == {(b, e, (w, w // 2), t) for b in (256, 1024) for e in (8, 32) for w in (32, 128) for t in (2, 6)}
    assert {p.size.n_inputs for p in corners} == {128} and {p.size.tower_dims for p in points} == {(16,)}
    probe = points[-1]
    assert (probe.batch, probe.size.n_inputs, probe.size.n_experts, probe.size.expert_dims, probe.size.n_tasks) == (
        512, 96, 24, (48, 24), 2)


def test_grid_rows_and_minimum_per_peer() -> None:
    points = [GridPoint(TINY, 8, "corner"),
              GridPoint(MMoESize(n_inputs=5, n_experts=2, expert_dims=(4, 2), tower_dims=(3,), n_tasks=3), 6, "probe")]
    report = Report(benchmark="models")
    minima = grid(report, points, GridRepeats(warmup=1, rounds=2, block_s=0.0))
    per_point = report.rows[:4]
    summary = [r for r in report.rows[4:] if r.name.startswith("grid minimum")]
    floors = [r for r in report.rows[4:] if r.name.startswith("grid: the expert GEMMs")]
    assert len(summary) + len(floors) == len(report.rows) - 4
    assert [r.anchor for r in per_point] == ["torch-rechub MMOE", "DeepCTR-Torch MMOE"] * 2
    assert all(r.goal is None and r.met is None and r.ratio and r.ratio > 0 for r in per_point)
    assert per_point[0].name.startswith("grid corner:") and per_point[2].name.startswith("grid probe:")
    assert set(minima) == {"torch-rechub MMOE", "DeepCTR-Torch MMOE"}
    for row, (peer, lowest) in zip(summary, minima.items()):
        assert row.anchor == peer and row.ratio == lowest
        assert lowest == min(r.ratio for r in per_point if r.anchor == peer)
        assert row.goal == f">= {GRID_GOAL:g}x" and row.met == (lowest >= GRID_GOAL)
        worst = next(r for r in per_point if r.anchor == peer and r.ratio == lowest)
        assert row.name.endswith(worst.name.split("(", 1)[1]) and row.value == worst.value
    assert "minimum ratio" in report.notes[-1]
    # a peer the goal is missed against gets the GEMM floor row, against the step the goal allows at a missed point
    missed = {peer for peer, lowest in minima.items() if lowest < GRID_GOAL}
    assert {r.anchor.split(": ", 1)[1].rsplit("'s step", 1)[0] for r in floors} == missed
    for row in floors:
        peer = row.anchor.split(": ", 1)[1].rsplit("'s step", 1)[0]
        at = next(r for r in per_point if r.anchor == peer and r.name.split("(", 1)[1] == row.name.split("(", 1)[1])
        batch = int(at.name.split("B=", 1)[1].split(",", 1)[0])
        assert at.ratio < GRID_GOAL and row.value > 0 and row.unit == "ms/step"
        assert row.anchor_value == pytest.approx(batch / at.anchor_value / GRID_GOAL * 1e3)


def test_run_takes_only_the_sections_named() -> None:
    with pytest.raises(ValueError, match="unknown section"):
        run(quick=True, sections=["grid", "nonsense"])
    assert SECTIONS == ("streaming", "grid", "large", "sparse")
    nothing = run(quick=True, sections=[])
    assert nothing.rows == [] and "sections none;" in nothing.notes[0]


def test_expert_gemm_floor_runs_each_layers_forward_and_gradients_in_both_layouts(monkeypatch) -> None:
    """Forward and weight gradient per layer, the input gradient from the second layer on: the same FLOPs in
    the batched and the per-expert layout, warm-up and repeats included."""
    flops = []
    real_mm, real_bmm = torch.mm, torch.bmm

    def counted(real):
        def gemm(a, b):
            flops.append(2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1))
            return real(a, b)
        return gemm

    monkeypatch.setattr(torch, "mm", counted(real_mm))
    monkeypatch.setattr(torch, "bmm", counted(real_bmm))
    n, d_in, dims, batch, repeats = 3, 5, (4, 2), 7, 2
    seconds = expert_gemm_seconds(n, d_in, dims, batch, repeats=repeats)
    per_step = 2 * batch * n * (2 * d_in * 4 + 3 * 4 * 2)
    assert sum(flops) == 2 * (repeats + 1) * per_step
    assert math.isfinite(seconds) and seconds > 0
