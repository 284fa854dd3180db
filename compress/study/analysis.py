"""The study's numbers: one row per point (measured latencies, top-1 of the exported files with Wilson intervals,
images seen, widths) and the paired comparisons of strategies at equal measured latency."""

from __future__ import annotations

import itertools

import numpy as np

from ..files import read_predictions
from ..stats import interpolate, paired_bootstrap, shared_latencies, wilson_interval
from .strategies import STRATEGIES

PRECISIONS = ("fp32", "int8")
REFERENCE = "plain"  # every other strategy is compared with it


def stage_widths(widths: list[int], num_blocks: list[int]) -> list[list[int]]:
    """A plain model's per-layer output widths grouped as stem, stage 1..4 (the head's input is stage 4's)."""
    bounds = [0, 1, *(1 + n for n in itertools.accumulate(num_blocks))]
    return [widths[a:b] for a, b in zip(bounds, bounds[1:])]


def correctness(entry: dict) -> np.ndarray:
    """Per-image 0/1 correctness of an exported file, in test-set order."""
    predicted, label = read_predictions(entry["predictions"])
    return (predicted == label).astype(np.float64)


def point_row(point: dict, latency: dict, macs_params: tuple[float, float], num_blocks: list[int]) -> dict:
    """One point's row: the exported files' top-1 (with 95% Wilson intervals) and measured latencies per batch."""
    stages = point["run"].summary["stages"]
    arts = stages["export"]["artifacts"]
    row = {"strategy": point["strategy"], "keep": point["keep"], "seed": point["seed"], "macs_M": macs_params[0] / 1e6,
           "params_M": macs_params[1] / 1e6, "images_seen": point["images_seen"]}
    for precision in PRECISIONS:
        name = next(n for n in arts if n.endswith(precision))
        entry = arts[name]
        low, high = wilson_interval(int(point["correct"][precision].sum()), entry["n"])
        row[f"{precision}_top1"] = entry["top1"]
        row[f"{precision}_ci"] = [100 * low, 100 * high]
        row[f"{precision}_n"] = entry["n"]
        row[f"{precision}_ms"] = {b: ms for (tag, p, b), ms in latency.items() if (tag, p) == (point["tag"], precision)}
    row["pruned_top1"] = stages.get("prune", {}).get("top1")  # right after pruning, before fine-tuning (PyTorch)
    quantize = stages.get("quantize", {})  # INT8 in PyTorch (fake-quant): after calibration alone, then after QAT
    row["ptq_top1"] = quantize.get("ptq_top1", quantize.get("top1"))
    row["qat_top1"] = quantize.get("top1") if quantize.get("mode") == "qat" else None
    widths = point["widths"]
    row["widths"] = widths
    row["stage_widths"] = stage_widths(widths, num_blocks)
    if "prune" in stages and "latency" in stages["prune"]:
        row["latency_target"] = {k: stages["prune"]["latency"][k] for k in ("before_ms", "budget_ms", "predicted_ms")}
    return row


def compare(points: list[dict], rows: list[dict], batches: list[int], resamples: int = 2000) -> list[dict]:
    """`REFERENCE` against every other pruning strategy and scratch, at equal measured latency: for each
    precision and batch, at every latency both curves reach (each curve's own points inside the other's range),
    each side's per-image correctness interpolated along its curve, the difference bootstrapped over the same
    resampled test images for both sides. Every pruning strategy's curve ends at the unpruned model (keep 1:
    nothing pruned), which is not compared with itself; a from-scratch strategy's points are its own."""
    curves, unpruned = {}, None
    for pt, row in zip(points, rows):
        if pt["strategy"] == "unpruned":
            unpruned = (pt, row)
        else:
            curves.setdefault(pt["strategy"], []).append((pt, row))
    if REFERENCE not in curves:
        return []
    for strategy, members in curves.items():
        if not STRATEGIES[strategy].from_scratch and unpruned is not None:
            members.append(unpruned)
    out = []
    for other, precision, batch in itertools.product([s for s in curves if s != REFERENCE], PRECISIONS, batches):
        sides = []
        for strategy in (REFERENCE, other):
            lat = [row[f"{precision}_ms"][batch] for _, row in curves[strategy]]
            correct = np.stack([pt["correct"][precision] for pt, _ in curves[strategy]])
            sides.append((lat, correct))
        itself = unpruned[1][f"{precision}_ms"][batch] if unpruned is not None else None
        for at in (t for t in shared_latencies(sides[0][0], sides[1][0]) if t != itself):
            a, b = (interpolate(lat, correct, at) for lat, correct in sides)
            result = paired_bootstrap(a, b, resamples=resamples)
            out.append({"a": REFERENCE, "b": other, "precision": precision, "batch": batch, "latency_ms": at,
                        "top1_a": 100 * float(a.mean()), "top1_b": 100 * float(b.mean()), **result})
    return out
