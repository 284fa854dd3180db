"""The accuracy-latency figure of a run's artifacts."""

from __future__ import annotations

from pathlib import Path

from compress.files import atomic_path


def accuracy_latency_figure(points: list[dict], title: str = "Accuracy vs latency"):
    """Top-1 against median latency, one labelled point per artifact (dicts with name, latency_ms, top1); the
    dashed line joins the Pareto front (no other point is both faster and more accurate)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas: no display or pyplot state needed
    ax = fig.add_subplot(1, 1, 1)
    if points:
        xs = [float(p["latency_ms"]) for p in points]
        ys = [float(p["top1"]) for p in points]
        ax.scatter(xs, ys, zorder=3)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(str(p["name"]), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front, best = [], -float("inf")
        for x, y in sorted(zip(xs, ys), key=lambda xy: (xy[0], -xy[1])):
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), linestyle="--", linewidth=1, alpha=0.6, zorder=2)
    ax.set_xlabel("median latency (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure atomically; the format comes from the suffix (.png, .svg, .pdf)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path
