"""Figures and TensorBoard logs of the pipeline's stages. Figures are drawn on matplotlib's Agg canvas directly
(`Figure`, no pyplot), so nothing switches a backend at import and no display is needed."""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .files import atomic_path


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An empty figure on an Agg canvas."""
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def finish_panels(fig, axes, ylabel: str, title: str):
    """The ends of a figure of side-by-side panels (one per precision): each panel titled and gridded by the
    caller's loop; the y label and legend on the first, the figure's title, a tight layout."""
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def widths_figure(before: list[int], after: list[int]) -> Figure:
    """Each layer's output channels before and after pruning, as overlaid bars."""
    fig = new_figure((max(6, len(before) * 0.35), 3.5))
    ax = fig.add_subplot(1, 1, 1)
    idx = range(len(before))
    ax.bar(idx, before, color="#bbbbbb", label="before")
    ax.bar(idx, after, color="#1f77b4", label="after")
    ax.set_xlabel("layer")
    ax.set_ylabel("output channels")
    ax.legend()
    fig.tight_layout()
    return fig


MARKERS = "osD^vP*Xh"


def pareto_front(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (faster and at least as accurate), by increasing latency."""
    front, best = [], -float("inf")
    for x, y in sorted(zip(xs, ys), key=lambda xy: (xy[0], -xy[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def accuracy_latency_figure(points: list[dict], runtime: str = "ORT CPU", batch: int | None = None,
                            notes: list[str] | tuple[str, ...] = (), title: str = "Accuracy vs latency") -> Figure:
    """Top-1 against latency (the fastest call, `compress.timing`) on `runtime` at `batch`, one point per artifact
    (dicts with name, latency_ms, top1), each with its own marker and legend entry (no labels to collide); the
    dashed line is the Pareto front (no other file both faster and more accurate), said so in the legend. `notes`
    (e.g. top-1 from few images) are printed under the plot, in red."""
    fig = new_figure((7.5, 5))
    ax = fig.add_subplot(1, 1, 1)
    xs = [float(p["latency_ms"]) for p in points]
    ys = [float(p["top1"]) for p in points]
    for i, (p, x, y) in enumerate(zip(points, xs, ys)):
        ax.scatter([x], [y], marker=MARKERS[i % len(MARKERS)], s=60, zorder=3,
                   label=f"{p['name']}: {y:.2f}%, {x:.2f} ms")
    front = pareto_front(xs, ys)
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", linewidth=1, color="grey", zorder=2,
                label="Pareto front (no other file is faster and more accurate)")
    at = f", batch {batch}" if batch is not None else ""
    ax.set_xlabel(f"latency (ms): fastest call on {runtime}{at}")
    ax.set_ylabel("top-1 accuracy (%) of the exported file")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=8, loc="best")
    # the notes below the plot, wrapped to its width: on it, they would hide points
    lines = [line for note in notes for line in textwrap.wrap(note, 100)]
    if lines:
        fig.set_figheight(fig.get_figheight() + 0.2 * len(lines))
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=8, va="bottom", ha="left", color="#a00000")
    fig.tight_layout(rect=(0, (0.2 * len(lines) + 0.1) / fig.get_figheight() if lines else 0, 1, 1))
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure atomically; the format comes from the suffix (.png, .svg, .pdf)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path
