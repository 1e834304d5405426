"""The run report's figures: matplotlib drawings as inline SVG, self-contained (text as text in the page's fonts,
images as data URIs), so the report opens offline with nothing to fetch.

Every id in a drawing is prefixed with the figure's name (several drawings share one HTML document), and the
artists that carry data are marked ``<name>-data-<n>``: what a browser test counts to see that a plot has data.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

MAX_POINTS = 1500
"""Points drawn per line (a long run's curve is thinned to this many, its last point kept)."""
MAX_COLUMNS = 400
"""Reports drawn per heatmap row (neighbouring reports averaged beyond this)."""


@dataclass
class Panel:
    """One axes of a figure: named lines of ``(steps, values)``."""

    title: str
    lines: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    ylabel: str = ""
    steps: bool = False
    """Draw as a step function (a value holds until the next one: snapshot versions)."""
    ylim: tuple[float, float] | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lines_svg(name: str, panels: Sequence[Panel], cols: int = 3, panel_size: tuple[float, float] = (4.2, 2.6)) -> str:
    """Small multiples: one panel per :class:`Panel`, its lines against the step; a line's colour is its label's
    in every panel, named once in a legend above them (the line of a panel with one is named by its title)."""
    plt = _pyplot()
    cols = max(1, min(cols, len(panels)))
    rows = -(-len(panels) // cols)
    labels = list(dict.fromkeys(label for panel in panels for label in panel.lines))
    named = [label for label in labels if any(label in p.lines and len(p.lines) > 1 for p in panels)]
    legend = 0.3 if named else 0.0  # a panel's only line is named by its title
    fig, axes = _grid(plt, rows, cols, panel_size, margins=(0.7, 0.15, 0.45, 0.3 + legend), gaps=(0.7, 0.75))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    handles, marked = {}, 0
    for i, panel in enumerate(panels):
        ax = axes[i // cols][i % cols]
        for label, (x, y) in panel.lines.items():
            x, y = _thin(np.asarray(x), np.asarray(y, dtype=np.float64))
            line, = ax.plot(x, y, color=colours[label], linewidth=1.2, marker="." if len(x) < 30 else None,
                            drawstyle="steps-post" if panel.steps else "default")
            line.set_gid(f"data-{marked}")
            marked += 1
            if label in named:
                handles.setdefault(label, line)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
    for i in range(len(panels), rows * cols):
        axes[i // cols][i % cols].axis("off")
    if legend:
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 8), fontsize=8,
                   frameon=False)
    return _svg(fig, name)


def heatmap_svg(name: str, steps: np.ndarray, shares: np.ndarray, tasks: Sequence[str], experts: Sequence[str]) -> str:
    """Task x expert utilisation over time: one panel per task, experts down, steps across (``shares``:
    ``(R, T, E)``, each task's routing share at each report)."""
    plt = _pyplot()
    steps, shares = _columns(np.asarray(steps), np.asarray(shares, dtype=np.float64))
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    names = max((len(e) for e in experts), default=4)
    fig, axes = _grid(plt, rows, cols, (4.0, 0.16 * len(experts) + 0.9), margins=(0.3 + 0.055 * names, 1.0, 0.45, 0.3),
                      gaps=(0.25, 0.75), sharey=True)
    vmax = max(float(np.nanmax(shares)) if np.isfinite(shares).any() else 0.0, 1e-9)
    first = float(steps[0])
    last = float(steps[-1]) if len(steps) > 1 else first + 1
    image = None
    for t, task in enumerate(tasks):
        ax = axes[t // cols][t % cols]
        image = ax.imshow(shares[:, t, :].T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                          vmax=vmax, extent=(first, last, len(experts) - 0.5, -0.5))
        image.set_gid(f"data-{t}")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yticks(range(len(experts)), experts, fontsize=6)
        ax.tick_params(axis="x", labelsize=7)
    for t in range(len(tasks), rows * cols):
        axes[t // cols][t % cols].axis("off")
    width = fig.get_figwidth()
    colourbar = fig.colorbar(image, cax=fig.add_axes((1 - 0.75 / width, 0.2, 0.12 / width, 0.6)))
    colourbar.set_label("routing share", fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    return _svg(fig, name)


def events_svg(name: str, events: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A timeline: one row per kind, a marker at each step with any (its size: how many)."""
    plt = _pyplot()
    rows = list(events)
    fig, axes = _grid(plt, 1, 1, (12.6, 0.35 * len(rows) + 0.5), margins=(1.0, 0.2, 0.45, 0.1), gaps=(0, 0))
    ax = axes[0][0]
    for r, kind in enumerate(rows):
        x, counts = events[kind]
        dots = ax.scatter(x, np.full(len(x), r), s=12 + 10 * np.minimum(np.asarray(counts), 8), alpha=0.7,
                          color=f"C{r}")
        dots.set_gid(f"data-{r}")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig, name)


def _grid(plt, rows: int, cols: int, panel: tuple[float, float], margins: tuple[float, float, float, float],
          gaps: tuple[float, float], sharey: bool = False):
    """A figure of ``rows x cols`` axes laid out by hand (a layout engine draws the figure again and again):
    each panel ``panel`` inches, ``margins`` (left, right, bottom, top) and ``gaps`` (across, down) in inches."""
    left, right, bottom, top = margins
    width = left + right + cols * panel[0]
    height = bottom + top + rows * panel[1]
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, sharey=sharey)
    axes_w = panel[0] - gaps[0] * (cols - 1) / cols
    axes_h = panel[1] - gaps[1] * (rows - 1) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gaps[0] / axes_w, hspace=gaps[1] / axes_h)
    return fig, axes


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_POINTS).astype(int))
    return x[keep], y[keep]


def _columns(steps: np.ndarray, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most ``MAX_COLUMNS`` reports: neighbours averaged, each column at its last report's step."""
    if len(steps) <= MAX_COLUMNS:
        return steps, shares
    bins = np.array_split(np.arange(len(steps)), MAX_COLUMNS)
    return np.array([steps[b[-1]] for b in bins]), np.stack([np.nanmean(shares[b], axis=0) for b in bins])


_ID = re.compile(r'(\bid="|href="#|url\(#)')


def _svg(fig, name: str) -> str:
    """The figure as an ``<svg>`` element for an HTML page: no XML prolog or metadata, every id prefixed."""
    import matplotlib.pyplot as plt

    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text, in the page's fonts: no embedded glyphs
        out = io.StringIO()
        fig.savefig(out, format="svg")
    plt.close(fig)
    text = out.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = _ID.sub(lambda m: f"{m.group(1)}{name}-", text)
    return text.replace("<svg ", f'<svg class="plot" role="img" aria-label="{name}" ', 1)


__all__ = ["Panel", "events_svg", "heatmap_svg", "lines_svg"]
