"""The everyday commands answer without importing torch, Ray, Feast or W&B, whose imports take seconds (issue 23:
`--help`, `config show`, `snapshots list`, `experts` and `report --help` within a second). Checked by what a
fresh interpreter imported, not by timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import torch

from learner.snapshots import SnapshotStore

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "feast", "wandb", "pandas", "sklearn", "matplotlib")


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "data" / "runs" / "live"
    SnapshotStore(run / "snapshots").publish({"w": torch.zeros(3)}, {"family": "mmoe", "step": 4, "examples": 8})
    (run / "health").mkdir(parents=True)
    report = {"step": 4, "family": "mmoe", "tasks": ["click"], "experts": ["e0", "e1"], "routing_share": [[0.6, 0.4]],
              "mean_gate": [[0.6, 0.4]], "zero_frac": [0.1, 0.2], "load_balance": 1.04, "anomalies": []}
    (run / "health" / "experts.json").write_bytes(orjson.dumps(report))
    return run


def test_everyday_commands_import_neither_torch_ray_feast_nor_wandb(tmp_path: Path) -> None:
    _run(tmp_path)
    commands = [["--help"], ["--version"], ["config", "show"], ["snapshots", "list"], ["experts"], ["report", "--help"]]
    probe = ("import sys\n"
             "from typer.testing import CliRunner\n"
             "from infra.cli import app\n"
             f"for args in {commands!r}:\n"
             "    result = CliRunner().invoke(app, args)\n"
             "    assert result.exit_code == 0, (args, result.output)\n"
             f"print(','.join(name for name in {HEAVY!r} if name in sys.modules))\n")
    env = {"PATH": "/usr/bin:/bin", "MOESTREAM_PATHS__DATA_ROOT": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"the everyday commands imported {done.stdout.strip()}"


def test_serve_detach_without_a_cluster_says_why_instead_of_serving_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from infra.cli import app

    result = CliRunner().invoke(app, ["serve", "--detach", "--data-root", str(tmp_path)], env={"RAY_ADDRESS": ""})
    assert result.exit_code == 2
    assert "--detach needs a Ray cluster" in result.output and "Traceback" not in result.output


def test_run_latest_is_the_run_written_last_and_every_run_lives_under_runs(tmp_path: Path) -> None:
    import os

    from typer.testing import CliRunner

    from infra.cli import app

    data = tmp_path / "data"
    empty = CliRunner().invoke(app, ["snapshots", "list", "--run", "latest", "--data-root", str(data)], env={})
    assert empty.exit_code == 1 and "no run in" in empty.output
    for age, name in ((200, "demo-old"), (100, "replay-new")):
        snapshots = data / "runs" / name / "snapshots"
        SnapshotStore(snapshots).publish({"w": torch.zeros(2)}, {"family": name, "step": 1, "examples": 1})
        for path in (snapshots.parent, snapshots):
            os.utime(path, (1_000_000 - age, 1_000_000 - age))
    result = CliRunner().invoke(app, ["snapshots", "list", "--run", "latest", "--data-root", str(data)], env={})
    assert result.exit_code == 0, result.output
    assert "replay-new" in result.stdout and "demo-old" not in result.stdout  # the family column holds the name
    assert f"run replay-new in {data / 'runs' / 'replay-new'}" in result.stderr
