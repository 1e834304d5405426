"""``moestream report``: one self-contained HTML page about a run, drawn from its files alone.

It reads what the trainer leaves in the run directory: the run history (``telemetry/history.jsonl``, every
telemetry record: ``learner.history``), the latest expert-health report (``health/experts.json``) and the
kept snapshot manifests (``snapshots/vNNNNNN.json``). No server, no network: the figures are inline SVG
(``infra.report_plots``), the style is inline, there is no script. A run that lacks some of these files (a run
from before the history existed, one with no snapshot yet) gets a note where the missing part would be.

Snapshot freshness comes from two places: the history's ``snapshot/staleness_s`` (how old the snapshot
``LATEST`` named was at each health report) and the manifests' ``created_at - event_time_hwm_ms`` (how far
behind the newest event it had trained on a snapshot was when it was published).
"""

from __future__ import annotations

import contextlib
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from infra import report_sections as sections
from infra.layout import RunLayout
from learner.history import History, read_history


HEALTH_KEYS = {"step", "tasks", "experts", "routing_share", "mean_gate", "load_balance", "anomalies"}
"""What the report reads of ``health/experts.json`` (``learner.health``)."""


class ReportError(RuntimeError):
    """No run to report on at the path given, or no writing the report where asked."""


@dataclass
class RunFiles:
    """What a run directory holds for the report; None (or empty) where a part is missing."""

    layout: RunLayout
    history: History | None = None
    health: dict | None = None
    manifests: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Files that were there but could not be read."""

    @property
    def tasks(self) -> list[str]:
        if self.health:
            return list(self.health["tasks"])
        found: list[str] = []
        for key in self.history.series if self.history else ():
            parts = key.split("/")
            if parts[0] in ("progressive", "loss") and len(parts) >= 2 and parts[1] not in (*found, "total"):
                found.append(parts[1])
        return found or list((self.manifests[-1].get("metrics") or {}) if self.manifests else [])

    def latest(self, key: str):
        """A run-wide figure from the newest source that has it: expert health, then the latest manifest."""
        for source in (self.health, self.manifests[-1] if self.manifests else None):
            if source and source.get(key) is not None:
                return source[key]
        return None


def read_run(root: Path) -> RunFiles:
    root = Path(root).absolute()
    layout = RunLayout(root)
    if not root.is_dir():
        raise ReportError(f"no run directory at {root}")
    files = RunFiles(layout)
    try:
        files.history = read_history(layout.history)
    except FileNotFoundError:
        pass
    except OSError as exc:
        files.problems.append(f"cannot read {layout.history}: {exc}")
    if files.history is not None and files.history.unreadable:
        files.problems.append(f"{files.history.unreadable} unreadable line(s) in {layout.history} (a trainer killed "
                              "mid-write leaves one)")
    files.health = _json(root / "health" / "experts.json", files.problems)
    if files.health is not None and not HEALTH_KEYS <= files.health.keys():
        missing = ", ".join(sorted(HEALTH_KEYS - files.health.keys()))
        files.problems.append(f"{root / 'health' / 'experts.json'} is not an expert-health report (no {missing})")
        files.health = None
    for path in sorted(layout.snapshots.glob("v*.json")) if layout.snapshots.is_dir() else ():
        manifest = _json(path, files.problems)
        if manifest is not None and "version" in manifest:
            files.manifests.append(manifest)
    files.manifests.sort(key=lambda m: m["version"])
    if files.history is None and files.health is None and not files.manifests and not files.problems:
        raise ReportError(f"{root} holds no run files ({layout.history.relative_to(root)}, health/experts.json, "
                          "snapshots/v*.json): is it a run directory?")
    return files


def _json(path: Path, problems: list[str]) -> dict | None:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        problems.append(f"cannot read {path}: {exc}")
        return None
    return data if isinstance(data, dict) else None


def write_report(run: Path, output: Path | None = None) -> Path:
    """Render the report of the run at ``run`` to ``output`` (default ``<run>/report.html``); its path."""
    files = read_run(Path(run))
    output = Path(output) if output is not None else files.layout.report
    page = render(files)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write the report to {output}: {exc.strerror or exc}") from None
    return output


def render(files: RunFiles) -> str:
    body = [sections.header(files), sections.quality(files), sections.experts(files), sections.anomalies(files),
            sections.snapshots(files), sections.intake(files), sections.configuration(files)]
    title = f"moestream run {files.layout.root.name}"
    return PAGE.format(title=html.escape(title), style=STYLE, body="\n".join(part for part in body if part))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; }
main { max-width: 1280px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.6rem; margin: 0 0 0.4rem; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 0.6rem; border-bottom: 1px solid #ddd; padding-bottom: 0.3rem; }
h3 { font-size: 1rem; margin: 1.4rem 0 0.4rem; }
section { background: #fff; border: 1px solid #e5e5e5; border-radius: 6px; padding: 0.2rem 1.2rem 1rem;
          margin-top: 1.2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
th { background: #f3f3f3; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; font-size: 0.9rem; }
dl.facts dt { color: #666; }
dl.facts dd { margin: 0; }
.note { color: #666; font-style: italic; font-size: 0.9rem; }
.problem { color: #a33; font-size: 0.9rem; }
.anomaly { color: #a60; }
figure { margin: 0.6rem 0; overflow-x: auto; }
figure svg.plot { max-width: 100%; height: auto; }
figcaption { font-size: 0.8rem; color: #666; }
pre { font-size: 0.75rem; background: #f6f6f6; padding: 0.6rem; overflow-x: auto; max-height: 30rem; }
code { font-size: 0.85rem; }
"""

__all__ = ["ReportError", "RunFiles", "read_run", "render", "write_report"]
