"""``moestream bench all``: every benchmark in turn, one results file and one table for the whole run.

The benchmarks run one after the other in this process, each as ``moestream bench NAME`` would run it; the
overall progress bar sits above each benchmark's own (rich draws nested progress displays as one). Between
benchmarks Ray and Serve are shut down, so each starts from what a run of its own would find (the serving
benchmark starts Ray itself, with HAProxy switched on for one of its modes). One local Kafka broker serves
every benchmark that needs one, unless ``KAFKA_BOOTSTRAP_SERVERS`` names another: a broker of the run's own,
on free ports with its own data directory, so no other user of the machine's default local broker can stop it
mid-run (nor find its topics).

A benchmark that fails is recorded with its error and the rest still run; the caller exits non-zero. The
results go to ``benchmarks/results/<date>-<machine>.json`` (machine, date, the commit measured and any
tracked file that differed from it, every report as its own JSON) and a markdown table of the same stem, where each row names the anchor it was compared with in the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.harness import Report, machine, markdown_cells, source

ALL = ("models", "stream", "features", "learner", "replay", "embeddings", "serving", "freshness")
"""What ``bench all`` runs, in this order (``synthetic`` reproduces a paper's accuracy finding, not a speed,
and takes minutes even in its quick mode: it runs on its own)."""
FULL_ONLY = ("quality",)
"""Run last by ``bench all`` in full mode only: model quality against the oracle and the floor (issue #21),
whose goals are read on its full run (every family on 2 M impressions x 3 seeds: hours on 2 cores). Its quick
mode (minutes, longer than the rest of the quick suite together) runs on its own: ``bench quality --quick``."""
NEEDS_KAFKA = frozenset({"stream", "learner", "freshness"})
RESULTS = Path(__file__).parent / "results"


@dataclass
class Outcome:
    """One benchmark of the run: its report, or the error it failed with."""

    name: str
    seconds: float
    report: Report | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.report is not None


@dataclass
class SuiteResult:
    quick: bool
    outcomes: list[Outcome] = field(default_factory=list)
    machine: dict = field(default_factory=machine)
    source: dict = field(default_factory=lambda: source())
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    seconds: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def stem(self) -> str:
        """``<date>-<machine>``: the date the run started and the host's name with its CPU count."""
        host = re.sub(r"[^a-z0-9]+", "-", str(self.machine.get("hostname", "unknown")).lower()).strip("-")
        return f"{self.started_at[:10]}-{host or 'unknown'}-{self.machine.get('cpus', '?')}cpu"

    def describe_machine(self) -> str:
        m = self.machine
        words = f"{m.get('cpu_model', '?')}, {m.get('cpus', '?')} cpus, Python {m.get('python', '?')}"
        if "torch" in m:
            words += f", torch {m['torch']}"
        if "gpu" in m:
            words += f", {m['gpu']}"
        return f"{m.get('hostname', '?')} ({words})"

    def describe_source(self) -> str:
        if not self.source:
            return "not a git checkout"
        words = f"commit {self.source['commit'][:10]}"
        modified = self.source["modified"]
        if modified:
            words += f" with uncommitted changes to {', '.join(modified[:8])}" + (" ..." if len(modified) > 8 else "")
        return words

    def to_json(self) -> bytes:
        body = {
            "suite": "all", "quick": self.quick, "machine": self.machine, "source": self.source,
            "started_at": self.started_at, "seconds": self.seconds,
            "benchmarks": [
                {"benchmark": o.name, "ok": o.ok, "seconds": o.seconds, "error": o.error,
                 "report": o.report.to_dict() if o.report else None}
                for o in self.outcomes
            ],
        }
        return orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)

    def markdown(self) -> str:
        mode = "--quick" if self.quick else "full"
        lines = [
            f"`moestream bench all` ({mode}), started {self.started_at}, {self.seconds:.0f} s in all, on "
            f"{self.describe_machine()}; {self.describe_source()}.",
            "",
            "| benchmark | row | value | anchor | anchor value | ratio | goal | met |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for o in self.outcomes:
            if o.report is None:
                lines.append(f"| {o.name} | **failed** after {o.seconds:.0f} s: {_one_line(o.error)} | | | | | | |")
                continue
            lines += [f"| {o.name} | {' | '.join(markdown_cells(r))} |" for r in o.report.rows]
        return "\n".join(lines) + "\n"

    def table(self) -> Table:
        table = Table(title=f"moestream bench all{' --quick' if self.quick else ''}  ({self.describe_machine()})")
        for col in ("benchmark", "row", "value", "anchor", "anchor value", "ratio", "goal", "met"):
            table.add_column(col, overflow="fold")
        for o in self.outcomes:
            if o.report is None:
                table.add_row(o.name, f"[red]failed[/] after {o.seconds:.0f} s: {_one_line(o.error)}",
                              *["" for _ in range(6)])
                continue
            for i, r in enumerate(o.report.rows):
                cells = markdown_cells(r)
                cells[-1] = {"yes": "[green]yes[/]", "no": "[red]no[/]"}.get(cells[-1], cells[-1])
                cells[3] = cells[3] if r.anchor_value is None else f"{cells[3]} {r.unit}"
                table.add_row(o.name if i == 0 else "", *cells, end_section=i == len(o.report.rows) - 1)
        return table

    def write(self, directory: Path | None = None) -> tuple[Path, Path]:
        """``<stem>.json`` and ``<stem>.md`` in ``directory`` (default ``benchmarks/results``); returns both."""
        directory = directory or RESULTS
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / f"{self.stem}.json", directory / f"{self.stem}.md"
        json_path.write_bytes(self.to_json())
        md_path.write_text(self.markdown())
        return json_path, md_path


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())[:300]


Runner = Callable[[str, bool], Report]


def run_all(
    quick: bool = False, names: Sequence[str] | None = None, runner: Runner | None = None,
    console: Console | None = None,
) -> SuiteResult:
    """Run ``names`` (default :data:`ALL`, then :data:`FULL_ONLY` unless ``quick``) in turn with ``runner``
    (default :func:`benchmarks.run`); failures are recorded, not raised. ``console`` defaults to rich's global
    one, which the benchmarks draw on."""
    import benchmarks

    names = (ALL if quick else ALL + FULL_ONLY) if names is None else tuple(names)
    runner = runner or (lambda name, q: benchmarks.run(name, quick=q))
    result = SuiteResult(quick)
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # The benchmarks' own progress bars draw on rich's global console; this one must be on it too, for rich to
    # show them together under it.
    with _kafka(NEEDS_KAFKA & set(names)), Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("bench all", total=len(names))
        for name in names:
            progress.update(overall, description=f"bench all: {name}")
            t0, ray_was_up = time.perf_counter(), _ray_up()
            try:
                outcome = Outcome(name, 0.0, report=runner(name, quick))
            except Exception as exc:  # one failed benchmark is reported; the others still run
                outcome = Outcome(name, 0.0, error=f"{type(exc).__name__}: {exc}")
                progress.console.print(f"[red]bench {name} failed:[/] {type(exc).__name__}: {exc}")
                progress.console.print("".join(traceback.format_exception(exc))[-3000:], markup=False,
                                       highlight=False, style="dim")
            finally:
                if not ray_was_up:
                    _shut_down_ray()
            outcome.seconds = time.perf_counter() - t0
            result.outcomes.append(outcome)
            progress.console.print(f"bench {name}: {'done' if outcome.ok else '[red]failed[/]'} in "
                                   f"{outcome.seconds:.0f} s")
            progress.advance(overall)
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _kafka(needed: bool) -> Iterator[None]:
    """One broker of the run's own for every benchmark that needs one (each would otherwise start and stop the
    machine's default local broker, which other runs on the machine may stop under it)."""
    if not needed or os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield
        return
    from infra.kafka import broker

    with tempfile.TemporaryDirectory(prefix="moestream-bench-kafka-") as tmp:
        port, controller_port = _free_ports(2)
        config = broker.BrokerConfig(data_dir=Path(tmp), port=port, controller_port=controller_port)
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = broker.up(config)
        try:
            yield
        finally:
            del os.environ["KAFKA_BOOTSTRAP_SERVERS"]
            broker.down(config)


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shut_down_ray() -> None:
    """Shut down the Ray instance and Serve app a benchmark left, so the next starts as it would alone."""
    if _ray_up():
        import ray
        from ray import serve

        with contextlib.suppress(Exception):  # a benchmark that failed mid-way may have left Serve half up
            serve.shutdown()
        ray.shutdown()


__all__ = ["ALL", "FULL_ONLY", "Outcome", "SuiteResult", "run_all"]
