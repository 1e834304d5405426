"""The report every benchmark produces: a rich table on the terminal and the JSON that anyone can check.

JSON shape: ``{"benchmark": NAME, "machine": {...}, "rows": [{"name", "value", "unit", "anchor",
"anchor_value", "ratio", "goal", "met"}]}``. ``ratio`` is value / anchor_value; ``goal`` says in words what
was aimed at and ``met`` whether the measured figure reaches it (None where a row has no goal).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table


@dataclass
class Row:
    name: str
    value: float
    unit: str
    anchor: str | None = None
    anchor_value: float | None = None
    goal: str | None = None
    met: bool | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.anchor_value:
            self.ratio = self.value / self.anchor_value


def source() -> dict:
    """The commit the run measures and the tracked files that differ from it; {} outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "modified": sorted(line[3:] for line in status.splitlines())}


def machine() -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclass
class Report:
    benchmark: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=machine)
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "machine": self.machine,
            "started_at": self.started_at,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_json())

    def table(self) -> Table:
        table = Table(title=f"moestream bench {self.benchmark}  ({self.machine.get('cpu_model', '?')}, "
                      f"{self.machine.get('cpus')} cpus)")
        for col in ("row", "value", "anchor", "anchor value", "ratio", "goal", "met"):
            table.add_column(col, overflow="fold")
        for r in self.rows:
            met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r.met]
            table.add_row(
                r.name,
                f"{_fmt(r.value)} {r.unit}",
                r.anchor or "-",
                "-" if r.anchor_value is None else f"{_fmt(r.anchor_value)} {r.unit}",
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
                r.goal or "-",
                met,
            )
        return table

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(self.table())
        for note in self.notes:
            console.print(f"[dim]- {note}[/]")

    def markdown(self) -> str:
        lines = ["| row | value | anchor | anchor value | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {' | '.join(markdown_cells(r))} |" for r in self.rows]
        return "\n".join(lines)


def markdown_cells(r: Row) -> list[str]:
    """A row as the cells of the markdown tables: row, value, anchor, anchor value, ratio, goal, met."""
    return [
        r.name, f"{_fmt(r.value)} {r.unit}", r.anchor or "-",
        "-" if r.anchor_value is None else _fmt(r.anchor_value),
        "-" if r.ratio is None else f"{r.ratio:.2f}x", r.goal or "-",
        "-" if r.met is None else ("yes" if r.met else "no"),
    ]


def _fmt(x: float) -> str:
    if x == 0 or 0.01 <= abs(x) < 1e6:
        return f"{x:,.3f}".rstrip("0").rstrip(".")
    return f"{x:.3g}"
