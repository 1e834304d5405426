"""The sections of the run report (``infra.report``), each an HTML fragment built from a run's files: the run
at a glance, progressive quality, expert utilisation and drift, anomalies, snapshots and freshness, intake, and
the configuration. A part the run has no data for says so in a note instead of drawing an empty plot."""

from __future__ import annotations

import time
from html import escape
from typing import TYPE_CHECKING

import numpy as np
import orjson

from infra.report_plots import Panel, events_svg, heatmap_svg, lines_svg
from learner.history import LOSS_EVERY_STEPS, History

if TYPE_CHECKING:
    from infra.report import RunFiles

KINDS = ("collapse", "degradation", "underfitting")
AUC_KEYS = {"auc": "AUC", "window_auc": "window AUC", "gauc": "GAUC", "window_gauc": "window GAUC"}
SUMMARY_KEYS = {**AUC_KEYS, "logloss": "logloss", "calibration": "calibration", "positive_rate": "positive rate",
                "n": "examples"}


# -- the run at a glance -------------------------------------------------------------------------------------


def header(files: RunFiles) -> str:
    history, root = files.history, files.layout.root
    steps = [s for s in (history.last_step if history else None, files.latest("step")) if s is not None]
    first, last = (history.first_t, history.last_t) if history else (None, None)
    if last is None and files.manifests:
        last = files.manifests[-1].get("created_at")
    facts = {
        "run": f"<code>{escape(str(root))}</code>",
        "family": escape(str(files.latest("family") or _config_value(history, "learner", "family") or "?")),
        "tasks": escape(", ".join(files.tasks) or "-"),
        "steps": f"{max(steps):,}" if steps else "-",
        "examples trained": _count(files.manifests[-1].get("examples") if files.manifests else None),
        "trained": f"{when(first)} to {when(last)}" + (f" ({duration(last - first)})" if first and last else ""),
        "trainer starts": str(len(history.starts)) if history else "-",
        "W&amp;B": _wandb(files),
        "report written": when(time.time()),
    }
    rows = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts.items())
    notes = "".join(f'<p class="problem">{escape(p)}</p>' for p in files.problems)
    if history is None:
        notes += _note(f"No run history ({files.layout.history.relative_to(root)}): the trainer of this run wrote none "
                       "(telemetry off, or a version before it). Curves over time are missing; the latest "
                       "expert-health report and the snapshot manifests are shown.")
    return f'<h1>moestream run {escape(root.name)}</h1>\n<dl class="facts">{rows}</dl>\n{notes}'


def _wandb(files: RunFiles) -> str:
    runs = sorted(files.layout.wandb.glob("wandb/*run-*")) if files.layout.wandb.is_dir() else []
    if not runs:
        return "off for this run (this report is the run's record)"
    run = runs[-1]
    if run.name.startswith("offline-"):
        return f"offline run <code>{escape(str(run))}</code> (viewable after <code>wandb sync</code>)"
    return f"<code>{escape(str(run))}</code>"


def _config_value(history: History | None, *keys: str):
    node = history.starts[-1].data.get("config") if history and history.starts else None
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


# -- progressive quality ----------------------------------------------------------------------------------


def quality(files: RunFiles) -> str:
    history, tasks = files.history, files.tasks
    parts = ["<h2>Progressive validation</h2>",
             _note("Every batch is scored before the model learns from it: these figures are measured on data the "
                   "model had not yet seen. Window figures cover the last metric_window examples.")]
    latest = {t: {k: history.series[f"progressive/{t}/{k}"].last for k in SUMMARY_KEYS
                  if f"progressive/{t}/{k}" in history.series} for t in tasks} if history else {}
    if not any(latest.values()) and files.manifests:
        latest = files.manifests[-1].get("metrics") or {}
        parts.append(_note(f"Latest figures from the manifest of snapshot v{files.manifests[-1]['version']}."))
    if any(latest.values()):
        head = "".join(f"<th>{name}</th>" for name in SUMMARY_KEYS.values())
        rows = "".join(f"<tr><td>{escape(t)}</td>" + "".join(f"<td>{_figure(k, m.get(k))}</td>" for k in SUMMARY_KEYS)
                       + "</tr>" for t, m in latest.items())
        parts.append(f"<table><tr><th>task</th>{head}</tr>{rows}</table>")
    else:
        parts.append(_note("No progressive metrics yet (they are logged every learner.cadence.health_every_steps)."))
    if history is None:
        return _section("quality", parts)
    auc = [Panel(t, {label: history.series[f"progressive/{t}/{k}"].arrays() for k, label in AUC_KEYS.items()
                     if _has(history, f"progressive/{t}/{k}")}, ylabel="AUC") for t in tasks]
    auc = [p for p in auc if p.lines]
    if auc:
        parts += ["<h3>AUC and GAUC per task</h3>", _plot(lines_svg("auc", auc))]
    losses = [Panel(name, {"loss": history.series[f"loss/{name}"].arrays()}, ylabel="loss")
              for name in ["total", *tasks] if _has(history, f"loss/{name}")]
    if losses:
        parts += ["<h3>Training loss</h3>", _plot(lines_svg("loss", losses, cols=4, panel_size=(3.2, 2.3)),
                                                   f"mean over each {LOSS_EVERY_STEPS} steps")]
    elif not auc:
        parts.append(_note("The history holds no metric or loss yet."))
    return _section("quality", parts)


def _figure(key: str, value) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if key == "n":
        return f"{value:,.0f}"
    if key == "positive_rate":
        return f"{value:.2%}"
    return f"{value:.4f}"


# -- experts ------------------------------------------------------------------------------------------------


def experts(files: RunFiles) -> str:
    history, health, tasks = files.history, files.health, files.tasks
    parts = ["<h2>Expert utilisation and drift</h2>"]
    utilisation = _utilisation(history, tasks) if history else None
    if utilisation is not None:
        steps, shares, names = utilisation
        parts += ["<h3>Utilisation per task over time</h3>", _plot(
            heatmap_svg("utilisation", steps, shares, tasks, names),
            "routing share of each expert (rows) in each task's gate mass, or its routing choices for sparse "
            "families, at each health report")]
    if health:
        parts.append(_share_table(health))
    if utilisation is None and not health:
        parts.append(_note("No expert-health report yet (written every learner.cadence.health_every_steps steps)."))
    if history is not None:
        panels = [Panel(title, {t: history.series[f"health/drift_{kind}/{t}"].arrays() for t in tasks
                                if _has(history, f"health/drift_{kind}/{t}")}, ylabel="Jensen-Shannon")
                  for kind, title in (("published", "drift vs the published snapshot"),
                                      ("reference", "drift vs the previous reports"))]
        if _has(history, "health/load_balance"):
            balance = history.series["health/load_balance"].arrays()
            panels.append(Panel("load balance (1 = even)", {"load balance": balance}))
        panels = [p for p in panels if p.lines]
        if panels:
            parts += ["<h3>Drift per task</h3>", _plot(lines_svg("drift", panels),
                                                      "Jensen-Shannon divergence (base 2: 0 same, 1 disjoint) of each "
                                                      "task's routing share")]
    return _section("experts", parts)


def _utilisation(history: History, tasks: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The routing shares of the history: report steps, ``(R, T, E)`` shares (NaN where none) and the experts."""
    prefix = "health/share/"
    keys = [(k, *k[len(prefix):].split("/", 1)) for k in history.keys(prefix)]
    keys = [(key, task, expert) for key, task, expert in keys if task in tasks]
    if not keys:
        return None
    names = list(dict.fromkeys(expert for _, _, expert in keys))
    steps = np.unique(np.concatenate([history.series[key].arrays()[0] for key, _, _ in keys]))
    shares = np.full((len(steps), len(tasks), len(names)), np.nan)
    for key, task, expert in keys:
        at, values = history.series[key].arrays()
        shares[np.searchsorted(steps, at), tasks.index(task), names.index(expert)] = values
    return steps, shares, names


def _share_table(r: dict) -> str:
    head = "".join(f"<th>{escape(t)}</th>" for t in r["tasks"])
    rows = []
    for e, name in enumerate(r["experts"]):
        cells = []
        for t in range(len(r["tasks"])):
            share = r["routing_share"][t][e]
            if r["mean_gate"][t][e] > 0:
                cells.append(f'<td style="background: rgba(49, 104, 142, {min(1.0, 2.5 * share):.2f}); '
                             f'color: {"#fff" if share > 0.25 else "inherit"}">{100 * share:.1f}</td>')
            else:
                cells.append("<td>·</td>")
        rows.append(f"<tr><td>{escape(name)}</td>{''.join(cells)}</tr>")
    drift = ""
    for kind in ("published", "reference"):
        figures = r.get(f"drift_vs_{kind}") or {}
        if figures:
            drift += "<tr><td>drift vs " + ("published" if kind == "published" else "reference") + "</td>" + "".join(
                f"<td>{figures[t]:.3f}</td>" if t in figures else "<td>-</td>" for t in r["tasks"]) + "</tr>"
    return (f"<h3>Routing share at step {r['step']:,} (%)</h3>"
            f"<p>load balance {r['load_balance']:.3f} (1 = even); · : an expert the task cannot see</p>"
            f"<table><tr><th>expert</th>{head}</tr>{''.join(rows)}{drift}</table>")


# -- anomalies ---------------------------------------------------------------------------------------------


def anomalies(files: RunFiles) -> str:
    history, health = files.history, files.health
    parts = ["<h2>Anomalies</h2>",
             _note("HoME's three: collapse (an expert mostly zero, or its output scale far from the others'), "
                   "degradation (a shared expert used by one task only), underfitting (a sparse task leaning on "
                   "shared experts). Checked at every health report.")]
    events = {}
    for kind in KINDS:
        if history is not None and kind in {k.rsplit("/", 1)[1] for k in history.keys("health/anomalies/")}:
            steps, counts = history.series[f"health/anomalies/{kind}"].arrays()
            events[kind] = (steps[counts > 0], counts[counts > 0])
    episodes = _episodes(history) if history else []
    if any(len(x) for x, _ in events.values()):
        parts.append(_plot(events_svg("anomalies", events), "anomalies found at each health report (marker size: "
                                                            "how many)"))
    if episodes:
        rows = "".join(
            f'<tr><td class="text anomaly">{escape(e["kind"])}</td><td class="text">{escape(e["subject"])}</td>'
            f"<td>{_step(e['from_step'])}</td><td>{when(e['from_t'])}</td>"
            f"<td>{'ongoing' if e['until_step'] is None else _step(e['until_step'])}</td>"
            f'<td class="text">{escape(e["detail"])}</td></tr>' for e in episodes)
        parts.append("<h3>Timeline</h3><table><tr><th>kind</th><th class='text'>subject</th><th>from step</th>"
                     f"<th>at</th><th>cleared at step</th><th class='text'>last detail</th></tr>{rows}</table>")
    elif health and health.get("anomalies"):
        rows = "".join(f'<tr><td class="text anomaly">{escape(a["kind"])}</td><td class="text">{escape(a["subject"])}'
                       f'</td><td class="text">{escape(a["detail"])}</td></tr>' for a in health["anomalies"])
        parts.append(f"<h3>At step {health['step']:,}</h3><table><tr><th>kind</th><th class='text'>subject</th>"
                     f"<th class='text'>detail</th></tr>{rows}</table>")
    balance = history.series.get("health/load_balance") if history else None
    reports = len(balance.steps) if balance else 0
    if not episodes and not (health and health.get("anomalies")):
        parts.append(_note(f"No anomalies in {reports} health reports." if reports else
                           "No anomalies" + (f" at step {health['step']:,}." if health else
                                             ": no health report yet.")))
    for check, why in ((health or {}).get("skipped") or {}).items():
        parts.append(_note(f"{check} check skipped: {why}."))
    if history is not None and history.alerts:
        cells = ("level", "title", "text")
        rows = "".join(f"<tr><td>{when(a.t)}</td><td>{_step(a.step)}</td>"
                       + "".join(f"<td class='text'>{escape(str(a.data.get(k)))}</td>" for k in cells)
                       + "</tr>" for a in history.alerts)
        parts.append("<h3>Alerts</h3>" + _note("Raised to W&B too; one per anomaly per health.alert_every_s.")
                     + f"<table><tr><th>at</th><th>step</th><th class='text'>level</th><th class='text'>title</th>"
                       f"<th class='text'>text</th></tr>{rows}</table>")
    return _section("anomalies", parts)


def _episodes(history: History) -> list[dict]:
    """Each anomaly (kind and subject) from the report that first found it to the one that no longer did, from
    the ``health/anomalies`` summaries (written whenever the list changes)."""
    open_: dict[tuple[str, str], dict] = {}
    done: list[dict] = []
    for event in history.summaries:
        if "health/anomalies" not in event.data:
            continue
        now = {}
        for line in event.data["health/anomalies"] or []:
            kind, subject, detail = (str(line).split(": ", 2) + ["", ""])[:3]
            now[(kind, subject)] = detail
        for key in [k for k in open_ if k not in now]:
            episode = open_.pop(key)
            episode["until_step"] = event.step
            done.append(episode)
        for (kind, subject), detail in now.items():
            episode = open_.setdefault((kind, subject), {"kind": kind, "subject": subject, "from_step": event.step,
                                                          "from_t": event.t, "until_step": None})
            episode["detail"] = detail
    return sorted(done + list(open_.values()), key=lambda e: (e["from_step"] or 0, e["kind"], e["subject"]))


# -- snapshots ---------------------------------------------------------------------------------------------


def snapshots(files: RunFiles) -> str:
    history, manifests = files.history, files.manifests
    parts = ["<h2>Snapshots and freshness</h2>"]
    panels = []
    if history is not None and _has(history, "snapshot/version"):
        panels.append(Panel("version LATEST names", {"version": history.series["snapshot/version"].arrays()},
                            ylabel="version", steps=True))
    if history is not None and _has(history, "snapshot/staleness_s"):
        panels.append(Panel("age of the latest snapshot", {"age": history.series["snapshot/staleness_s"].arrays()},
                            ylabel="seconds"))
    lagged = [m for m in manifests if m.get("event_time_hwm_ms") and m.get("step") is not None]
    if lagged:
        panels.append(Panel("newest trained event, behind publish time", {"lag": (
            np.array([m["step"] for m in lagged]),
            np.array([m["created_at"] - m["event_time_hwm_ms"] / 1000 for m in lagged]))}, ylabel="seconds"))
    if panels:
        parts.append(_plot(lines_svg("snapshots", panels)))
    if manifests:
        rows = []
        for m in reversed(manifests):
            lag = m["created_at"] - m["event_time_hwm_ms"] / 1000 if m.get("event_time_hwm_ms") else None
            rows.append((m, lag, f"rollback of v{m['rollback_of']}" if "rollback_of" in m else ""))
        gaps = [b["created_at"] - a["created_at"] for a, b in zip(manifests, manifests[1:])]
        body = "".join(
            f"<tr><td>v{m['version']}</td><td>{_step(m.get('step'))}</td><td>{_count(m.get('examples'))}</td>"
            f"<td>{when(m['created_at'])}</td><td>{'-' if lag is None else duration(lag)}</td>"
            f"<td class='text'>{escape(str(m.get('sha256', ''))[:12])}</td><td class='text'>{escape(note)}</td></tr>"
            for m, lag, note in rows)
        every = f"; one every {duration(float(np.median(gaps)))} (median)" if gaps else ""
        parts.append(f"<h3>Kept versions ({len(manifests)}{every})</h3>"
                     "<table><tr><th>version</th><th>step</th><th>examples</th><th>published</th>"
                     "<th>behind newest event</th><th class='text'>sha256</th><th class='text'>note</th></tr>"
                     f"{body}</table>")
    else:
        parts.append(_note("No snapshot in this run yet (published every learner.cadence.snapshot_every_steps)."))
    refusals = history.keys("snapshot/refused/") if history else []
    refused = {k.rsplit("/", 1)[1]: history.series[k].last for k in refusals}
    if refused:
        parts.append(_note("Refused by the publish guard: " + ", ".join(f"{r} {n:.0f}" for r, n in refused.items())))
    if history is not None and _has(history, "snapshot/publish_failures"):
        parts.append(_note(f"Failed writes to the snapshot directory: "
                           f"{history.series['snapshot/publish_failures'].last:.0f}"))
    return _section("snapshots", parts)


# -- intake and configuration -----------------------------------------------------------------------------


def intake(files: RunFiles) -> str:
    history = files.history
    if history is None:
        return ""
    names = {"kafka/lag": "Kafka lag (events)", "joiner/pending": "impressions waiting for labels",
             "ids/collision_rate": "id hash collisions"}
    panels = [Panel(title, {key: history.series[key].arrays()}) for key, title in names.items() if _has(history, key)]
    if not panels:
        return ""
    return _section("intake", ["<h2>Intake</h2>", _plot(lines_svg("intake", panels))])


def configuration(files: RunFiles) -> str:
    config = files.history.starts[-1].data.get("config") if files.history and files.history.starts else None
    if not config:
        return ""
    text = orjson.dumps(config, option=orjson.OPT_INDENT_2).decode()
    return _section("configuration", [
        "<h2>Configuration</h2>", f"<details><summary>as the trainer last started "
                                  f"({when(files.history.starts[-1].t)})</summary><pre>{escape(text)}</pre></details>"])


# -- helpers ----------------------------------------------------------------------------------------------


def _has(history: History, key: str) -> bool:
    return key in history.series and len(history.series[key].steps) > 0


def _section(name: str, parts: list[str]) -> str:
    return f'<section id="{name}">\n' + "\n".join(parts) + "\n</section>"


def _plot(svg: str, caption: str = "") -> str:
    caption = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="plot">{svg}{caption}</figure>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _step(step) -> str:
    return "-" if step is None else f"{step:,}"


def _count(n) -> str:
    return "-" if n is None else f"{n:,}"


def when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["anomalies", "configuration", "experts", "header", "intake", "quality", "snapshots"]
