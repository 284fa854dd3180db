"""The prune-or-retrain curve (`study.added_images`): at one latency, what a user holding a trained model pays in
training images to get there by pruning, or by training a small model from scratch.

For each budget N of added training images, and each seed (`study.seeds`):
- the pruned side: the base pruned to `study.budget_keep_latency` of its measured FP32 latency at batch 8 (the
  `plain-latency` strategy, with the recipe's pruning settings), fine-tuned on N images;
- the scratch side: the recipe's architecture at stage widths whose latency matches the pruned model's, searched
  on the same latency table and then timed against the unpruned model the way the prune checks its plan (within
  5% of the pruned model's measured ratio), trained from random init on N images, distilled from the same
  teacher when `study.scratch_distill`;
- the ResRep side (`study.budget_resrep`, on by default): the base pruned by ResRep to the pruned side's latency
  target, its compactors trained on the same N images (`points.resrep_twin`);
- and (`study.budget_equal_total`, on by default) scratch once more at the base's images plus the recipe's
  fine-tune: equal *total* images, counting the base's training for the pruned side.
"""

from __future__ import annotations

import math

import numpy as np

from repvgg import PlainRepVGG

from ..data import Data
from ..prune import load_or_build_table
from ..prune.cost import LatencyCost
from ..prune.measure import measure_ratios
from ..recipe import Recipe
from ..stages.prune import latency_options, resolve_provider
from .points import scratch_recipe, updated

MATCH = 0.05  # a scratch model's measured latency ratio within this (relative) of the pruned model's
PRUNED, SCRATCH, RESREP = "budget-plain", "budget-scratch", "budget-resrep"
SIDE_COLOURS = {PRUNED: "#1f77b4", SCRATCH: "#9467bd", RESREP: "#e377c2"}


def finetune_with(recipe: Recipe, images: int, data: Data) -> Recipe:
    """`recipe` fine-tuning on `images` added images: a subset of the training set, or whole epochs of it."""
    if images <= len(data.train_set):
        return updated(recipe, finetune={"epochs": 1, "train_subset": images})
    return updated(recipe, finetune={"epochs": math.ceil(images / data.images_per_epoch()), "train_subset": None})


def scratch_with(recipe: Recipe, widths: list[int], images: int, data: Data, teacher) -> Recipe:
    """A scratch point at stage `widths` trained from random init on `images` images (a subset of the training
    set, or whole epochs of it), with its warm-up cut to what the schedule leaves."""
    point = scratch_recipe(recipe, widths, data, teacher)
    if images <= len(data.train_set):
        return updated(point, data={"train_subset": images}, train={"epochs": 1, "warmup_epochs": 0})
    epochs = math.ceil(images / data.images_per_epoch())
    return updated(point, train={"epochs": epochs, "warmup_epochs": min(recipe.train.warmup_epochs, epochs - 1)})


def expanded(stage_widths: list[int], depths: list[int]) -> list[int]:
    """Per-stage widths as the per-layer widths of the plain stack (stem, then each stage's blocks)."""
    return [w for w, n in zip(stage_widths, depths) for _ in range(n)]


def grid_widths(full: list[int], cost, target: float, unit: int) -> list[int]:
    """Stage widths on the `unit` grid (a width off it runs about as slowly as the next multiple of the kernels'
    channel block, which a latency table interpolated between grid widths does not see) whose `cost` comes closest
    to `target`: `full` scaled by one factor to just under the target, then the stage furthest below its share
    of `full` widened by one unit at a time while the cost stays under; the first step over is the alternative."""
    def scaled(f: float) -> list[int]:
        return [max(unit, int(w * f / unit) * unit) for w in full]

    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(scaled(mid)) <= target else (lo, mid)
    widths, over = scaled(lo), None
    while True:
        grown = sorted((widths[:i] + [w + unit] + widths[i + 1:] for i, w in enumerate(widths) if w + unit <= full[i]),
                       key=lambda g: min(g[i] / full[i] for i in range(len(g)) if g[i] != widths[i]))
        fits = [g for g in grown if cost(g) <= target]
        if not fits:
            over = min(grown, key=cost, default=None)
            break
        widths = fits[0]
    return min([widths, *([over] if over else [])], key=lambda w: abs(cost(w) / target - 1))


def latency_matched_widths(recipe: Recipe, plain: PlainRepVGG, full: list[int], depths: list[int], prune: dict,
                           image_size: int, unit: int, log=None) -> tuple[list[int], dict]:
    """Stage widths whose plain stack runs as fast as the pruned model (`prune`: its prune-stage summary): searched
    to the pruned plan's predicted time on the same latency table, then timed against the unpruned model and
    searched again, the target scaled by the miss, until the measured ratio is within MATCH of the pruned
    model's (at most three times; each timed in blocks of rounds until two agree within MATCH). Returns the widths
    and what was measured."""
    options, _ = resolve_provider(latency_options(recipe.prune.latency), plain, image_size, log=log)
    table = load_or_build_table(plain, options, image_size, recipe.prune.round_to or unit, log=log)
    cost = LatencyCost(table, plain)
    latency = prune["latency"]
    chosen = next((r for r in latency.get("rounds", []) if r.get("chosen")), None)
    pruned_ratio = chosen["measured_ratio"] if chosen else latency["predicted_ms"] / latency["before_ms"]
    target, tries = latency["predicted_ms"], []
    for _ in range(3):
        widths = grid_widths(full, lambda w: cost.cost(expanded(w, depths)), target, unit)
        # as the prune stage's loop: blocks of rounds until two agree, here within the match's own tolerance
        got = measure_ratios(plain, [tuple(expanded(widths, depths))], options, image_size, log=log,
                             agree=MATCH * pruned_ratio)
        ratio = got["candidates"][0]["ratio"]
        tries.append({"widths": widths, "table_ms": cost.cost(expanded(widths, depths)), "measured_ratio": ratio,
                      "blocks": len(got["blocks"]), "agreed": got["agreed"]})
        if abs(ratio / pruned_ratio - 1) <= MATCH:
            break
        target *= pruned_ratio / ratio
    best = min(tries, key=lambda t: abs(t["measured_ratio"] / pruned_ratio - 1))
    return best["widths"], {"pruned_ratio": pruned_ratio, "tries": tries, "widths": best["widths"],
                            "provider": options.provider}


def side_means(rows: list[dict], side: str, precision: str) -> dict[int, float]:
    """Mean top-1 over seeds of one side's points, by added images."""
    by = {}
    for r in rows:
        if r["side"] == side and r["added_images"] is not None:
            by.setdefault(r["added_images"], []).append(r[f"{precision}_top1"])
    return {n: float(np.mean(v)) for n, v in sorted(by.items())}


def verdict(rows: list[dict], precision: str = "fp32") -> str:
    """The prune-or-retrain sentence: the fewest added images at which scratch matches pruning (means over seeds),
    or that it did not within the budgets run."""
    pruned, scratch = side_means(rows, PRUNED, precision), side_means(rows, SCRATCH, precision)
    shared = [n for n in pruned if n in scratch]
    seeds = len({r["seed"] for r in rows})
    what = f"{precision.upper()} top-1, mean of {seeds} seed{'s' * (seeds != 1)}"
    matched = next((n for n in shared if scratch[n] >= pruned[n]), None)
    if matched is not None:
        return (f"At equal added images, training from scratch matched pruning from {matched:,} images on "
                f"({scratch[matched]:.2f}% vs {pruned[matched]:.2f}%, {what}).")
    if not shared:
        return "No budget was run on both sides."
    last = shared[-1]
    return (f"Training from scratch did not match pruning at equal added images within the budgets run: at "
            f"{last:,} added images, {scratch[last]:.2f}% vs {pruned[last]:.2f}% for the pruned model ({what}).")


def resrep_verdict(rows: list[dict], precision: str = "fp32") -> str | None:
    """Where the pruned side (the toolkit's default pruning) beats ResRep at equal added images, and where it does
    not (means over seeds); None without a ResRep side."""
    pruned, resrep = side_means(rows, PRUNED, precision), side_means(rows, RESREP, precision)
    shared = [n for n in pruned if n in resrep]
    if not shared:
        return None
    ahead = [n for n in shared if pruned[n] > resrep[n]]
    behind = [n for n in shared if n not in ahead]

    def listed(ns: list[int]) -> str:
        return ", ".join(f"{n:,} ({pruned[n]:.2f}% vs {resrep[n]:.2f}%)" for n in ns)

    seeds = len({r["seed"] for r in rows})
    what = f"{precision.upper()} top-1, pruned vs ResRep, mean of {seeds} seed{'s' * (seeds != 1)}"
    parts = [f"pruning beat ResRep at {listed(ahead)}" if ahead else "pruning beat ResRep at no budget",
             f"ResRep matched or beat it at {listed(behind)}" if behind else "ResRep matched it at none"]
    return f"At equal added images, {parts[0]}; {parts[1]} ({what})."


def _side(rows: list[dict], precision: str) -> str:
    """One side's top-1 at one budget: the mean over seeds, the seeds' range and the test-set interval."""
    top1 = [r[f"{precision}_top1"] for r in rows]
    half = np.mean([(r[f"{precision}_ci"][1] - r[f"{precision}_ci"][0]) / 2 for r in rows])
    seeds = f"seeds {min(top1):.2f}-{max(top1):.2f}, " if len(rows) > 1 else ""
    return f"{np.mean(top1):.2f}% ({seeds}test-set 95% interval +-{half:.1f})"


def comparisons(rows: list[dict], precision: str) -> list[str]:
    """The two comparisons of the curve, in `precision`: at equal added images (what a user holding a trained
    model pays), budget by budget, and at equal total images, scratch's longest training against the pruned
    budget whose images, the base's training counted, come closest without exceeding it."""
    def at(side: str, added) -> list[dict]:
        return [r for r in rows if r["side"] == side and r["added_images"] == added]

    shared = [n for n in side_means(rows, PRUNED, precision) if at(SCRATCH, n)]
    lines = [f"at {n:,}: pruned {_side(at(PRUNED, n), precision)}, scratch {_side(at(SCRATCH, n), precision)}"
             + (f", ResRep {_side(at(RESREP, n), precision)}" if at(RESREP, n) else "") for n in shared]
    out = [f"{precision.upper()}, equal added images: " + "; ".join(lines) + "." if lines else
           f"{precision.upper()}, equal added images: no budget was run on both sides."]
    total = at(SCRATCH, None)
    pruned = [r for r in rows if r["side"] == PRUNED and total and r["images_seen"] <= total[0]["images_seen"]]
    if total and pruned:
        seen = max(r["images_seen"] for r in pruned)
        match = [r for r in pruned if r["images_seen"] == seen]
        out.append(f"{precision.upper()}, equal total images: scratch on {total[0]['images_seen']:,} images "
                   f"{_side(total, precision)}; pruned on {seen:,} ({match[0]['added_images']:,} added to the "
                   f"base's training) {_side(match, precision)}.")
    return out


def budget_figure(rows: list[dict]):
    """Top-1 against added images, FP32 and INT8, both sides: every seed's point with its 95% Wilson interval, a
    line through the means; scratch at equal total images as a star."""
    from ..figures import finish_panels, new_figure

    fig = new_figure((12, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, precision in zip(axes, ("fp32", "int8")):
        for side, colour in SIDE_COLOURS.items():
            pts = [r for r in rows if r["side"] == side and r["added_images"] is not None]
            if not pts:
                continue
            x = [r["added_images"] for r in pts]
            y = [r[f"{precision}_top1"] for r in pts]
            err = [[v - r[f"{precision}_ci"][0] for v, r in zip(y, pts)], [r[f"{precision}_ci"][1] - v
                                                                             for v, r in zip(y, pts)]]
            ax.errorbar(x, y, yerr=err, fmt="o", color=colour, capsize=3, alpha=0.7)
            means = side_means(rows, side, precision)
            ax.plot(list(means), list(means.values()), color=colour, label=side)
        for r in (r for r in rows if r["added_images"] is None):
            ax.plot([r["images_seen"]], [r[f"{precision}_top1"]], "*", color="#9467bd", markersize=10,
                    label="scratch, equal total images")
        ax.set_xscale("log")
        ax.set_xlabel("added training images (log)")
        ax.set_title(precision.upper())
        ax.grid(alpha=0.3)
    return finish_panels(fig, axes, "top-1 (%) of the exported file, 95% interval",
                         "Prune or retrain: top-1 at one latency against the images each side is given")


def with_side(row: dict, side: str, added: int | None) -> dict:
    """A points-table row marked with its side of the curve and its added images (None: equal total images)."""
    return {**row, "side": side, "added_images": added}

