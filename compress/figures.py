"""Figures and TensorBoard logs of the pipeline's stages. Figures are drawn on matplotlib's Agg canvas directly
(`Figure`, no pyplot), so nothing switches a backend at import and no display is needed."""

from __future__ import annotations

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


def accuracy_latency_figure(points: list[dict], title: str = "Accuracy vs latency"):
    """Top-1 against latency (the fastest call, `compress.timing`), one labelled point per artifact (dicts with name,
    latency_ms, top1); the dashed line joins the Pareto front (no other point is both faster and more accurate)."""
    fig = new_figure((6, 4.5))
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
    ax.set_xlabel("latency, fastest call (ms)")
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


def log_prune(writer, report: dict, top1: float) -> None:
    """The prune stage: widths before/after, top-1 right after pruning (step 0) and any latency target's figures."""
    writer.add_figure("prune/widths", widths_figure(report["widths_before"], report["widths_after"]), 0)
    writer.add_scalar("prune/top1", top1, 0)  # step 0: before fine-tuning; the finetune stage logs step 1
    if "latency" in report:
        for name in ("before_ms", "budget_ms", "predicted_ms"):
            writer.add_scalar(f"prune/latency_{name}", report["latency"][name], 0)


def log_bench(writer, points: list[dict], results: list[dict], main_batch: int, files: list[str], figure) -> None:
    """The bench stage: the accuracy-latency figure, each file's top-1, and every runtime's latency of a file side by
    side (one chart per file, one line per runtime), each its fastest call."""
    writer.add_figure("bench/accuracy_latency", figure, 0)
    for pt in points:
        writer.add_scalar(f"bench/top1/{pt['name']}", pt["top1"], 0)
    for r in results:
        if r["batch"] == main_batch:
            writer.add_scalar(f"bench/latency_ms/{r['artifact']}/{r['provider']}", r["fastest_ms"], 0)
    writer.add_custom_scalars({"bench: latency (ms) by runtime": {
        name: ["Multiline", [rf"bench/latency_ms/{name}/.*"]] for name in files}})
