"""The study's numbers: one row per point (measured latencies, top-1 of the exported files with Wilson intervals,
images seen, widths) and the paired comparisons of strategies at equal measured latency."""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import UserError
from ..files import read_predictions
from ..stats import (
    holm,
    interpolation_weights,
    mix,
    paired_bootstrap,
    shared_latencies,
    upper_hull,
    wilson_interval,
)
from ..timing import DISTURBED, undisturbed
from .strategies import STRATEGIES

PRECISIONS = ("fp32", "int8")
REFERENCE = "plain"  # every other strategy is compared with it
# further pairs compared where a study has both: the coupling alone (the same criterion and fine-tune, no re-fit on
# either side), which with plain vs plain-norefit (the re-fit) splits plain's lead over multibranch in two
PAIRS = (("plain-norefit", "multibranch"),)


def stage_widths(widths: list[int], num_blocks: list[int]) -> list[list[int]]:
    """A plain model's per-layer output widths grouped as stem, stage 1..4 (the head's input is stage 4's)."""
    bounds = [0, 1, *(1 + n for n in itertools.accumulate(num_blocks))]
    return [widths[a:b] for a, b in zip(bounds, bounds[1:])]


def curve(strategy: str, members: list, unpruned: list) -> list:
    """A strategy's points as its curve: a pruning strategy's end at the unpruned model (keep 1: nothing pruned); a
    from-scratch strategy's, and the unpruned model's own, are just its points."""
    return members if strategy == "unpruned" or STRATEGIES[strategy].from_scratch else members + unpruned


class StudyError(UserError, ValueError):
    """A study whose points cannot be compared as they are (one line)."""


def correctness(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-image 0/1 correctness of an exported file, in test-set order, and the labels it was scored against."""
    predicted, label = read_predictions(entry["predictions"])
    return (predicted == label).astype(np.float64), label


# A file's latency in the study is the engine's statistic (`compress.timing`): its fastest timed call, the fastest
# of each round's fastest. Other work on the machine only ever adds time, so the fastest call is the one least
# disturbed; a round's median, or the fastest round's median, moves with how much of the round other work covered.
ROUND_STATISTIC = "round_fastest_ms"


def point_row(point: dict, rounds: dict, macs_params: tuple[float, float], num_blocks: list[int]) -> dict:
    """One point's row: the exported files' top-1 (with 95% Wilson intervals) and measured latencies per batch:
    each bench round's fastest call (`rounds`, keyed (point tag, precision, batch); `ROUND_STATISTIC`) and the
    fastest of them, the file's latency."""
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
        row[f"{precision}_file"], row[f"{precision}_size_bytes"] = name, entry.get("size_bytes")
        row[f"{precision}_rounds_ms"] = {b: ms for (tag, p, b), ms in rounds.items()
                                         if (tag, p) == (point["tag"], precision)}
        row[f"{precision}_ms"] = {b: min(ms) for b, ms in row[f"{precision}_rounds_ms"].items()}
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


def compare(points: list[dict], rows: list[dict], batches: list[int], resamples: int = 2000) -> dict:
    """`REFERENCE` against every other pruning strategy and scratch (and the `PAIRS` a study has both sides of), at
    equal measured latency, along each side's upper hull (`stats.upper_hull`): for each precision and batch, at
    every latency both hulls reach (each hull's own points inside the other's range), each side's per-image
    correctness interpolated between its two hull points around it, the difference bootstrapped over the same
    resampled test images for both sides. Every pruning strategy's curve ends at the unpruned model (keep 1:
    nothing pruned), which is not compared with itself; a from-scratch strategy's points are its own.

    Left out, and listed: latencies where one side's two hull points are not timed in the same order in every
    bench round that timed both undisturbed, or in too few such rounds (`{precision}_rounds_ms`: the interpolation
    would rest on timing noise; `_order_in_noise`).
    `significant` is Holm's call over every comparison made (`significant_uncorrected`: the interval's).
    Returns {"comparisons", "skipped", "off_hull"}."""
    _same_labels(points)
    curves, unpruned = {}, None
    for pt, row in zip(points, rows):
        if pt["strategy"] == "unpruned":
            unpruned = (pt, row)
        else:
            curves.setdefault(pt["strategy"], []).append((pt, row))
    out = {"comparisons": [], "skipped": [], "off_hull": []}
    if REFERENCE not in curves:
        return out
    curves = {strategy: curve(strategy, members, [unpruned] if unpruned is not None else [])
              for strategy, members in curves.items()}
    hulls = {}
    for strategy, precision, batch in itertools.product(curves, PRECISIONS, batches):
        members = curves[strategy]
        on = upper_hull([row[f"{precision}_ms"][batch] for _, row in members],
                        [row[f"{precision}_top1"] for _, row in members])
        hulls[strategy, precision, batch] = [members[i] for i in on]
        out["off_hull"] += [{"strategy": strategy, "keep": row["keep"], "precision": precision, "batch": batch}
                            for k, (_, row) in enumerate(members) if k not in on]
    pairs = [(REFERENCE, s) for s in curves if s != REFERENCE] + [p for p in PAIRS if all(s in curves for s in p)]
    for (first, other), precision, batch in itertools.product(pairs, PRECISIONS, batches):
        sides = []
        for strategy in (first, other):
            hull = hulls[strategy, precision, batch]
            sides.append(([row[f"{precision}_ms"][batch] for _, row in hull],
                          [row.get(f"{precision}_rounds_ms", {}).get(batch) for _, row in hull],
                          np.stack([pt["correct"][precision] for pt, _ in hull])))
        itself = unpruned[1][f"{precision}_ms"][batch] if unpruned is not None else None
        for at in (t for t in shared_latencies(sides[0][0], sides[1][0]) if t != itself):
            where = {"a": first, "b": other, "precision": precision, "batch": batch, "latency_ms": at}
            weights = [interpolation_weights(lat, at) for lat, _, _ in sides]
            gap = next((f"{s} {why}" for s, (lat, rounds, _), w in zip((first, other), sides, weights)
                        if (why := _order_in_noise(lat, rounds, w)) is not None), None)
            if gap:
                out["skipped"].append({**where, "why": gap})
                continue
            a, b = (mix(correct, w) for (_, _, correct), w in zip(sides, weights))
            result = paired_bootstrap(a, b, resamples=resamples)
            result["significant_uncorrected"] = result.pop("significant")
            out["comparisons"].append({**where, "top1_a": 100 * float(a.mean()), "top1_b": 100 * float(b.mean()),
                                       **result})
    for c, call in zip(out["comparisons"], holm([c["p"] for c in out["comparisons"]])):
        c["significant"] = call
    return out


def seed_differences(rows: list[dict], comparisons: list[dict]) -> None:
    """Give every comparison (made on the curves of seed +0) `seed_diffs`: its difference a - b in points on each
    seed's own curves, at the same latency, along each side's upper hull of that seed's points (the unpruned model,
    trained once, ends every pruning strategy's curve in every seed); None for a seed whose curves do not both reach
    that latency. A point with its seed +0 point's widths is the same network and takes that point's latency: two
    timings of one network differ by bench noise alone, which would move a seed's curve sideways (a re-planned
    point keeps its own). Seed +0's equals the comparison's own difference; the others show how much of it one
    more fine-tune (or scratch training) moves, beside the test-set interval."""
    unpruned = [r for r in rows if r["strategy"] == "unpruned"]
    seeds = sorted({r["seed"] for r in rows})
    first = {(r["strategy"], r["keep"]): r for r in rows if r["seed"] == 0}
    hulls = {}  # (strategy, seed, precision, batch) -> the hull's (latencies, top-1s): each built once

    def latency(r: dict, precision: str, batch: int) -> float:
        same = first.get((r["strategy"], r["keep"]))
        return (same if same is not None and same["widths"] == r["widths"] else r)[f"{precision}_ms"][batch]

    def hull_of(strategy: str, seed: int, precision: str, batch: int) -> tuple[list[float], list[float]]:
        own = [r for r in rows if r["strategy"] == strategy and r["seed"] == seed]
        members = curve(strategy, own, unpruned) if own else []
        lat = [latency(r, precision, batch) for r in members]
        on = upper_hull(lat, [r[f"{precision}_top1"] for r in members]) if members else []
        return [lat[i] for i in on], [members[i][f"{precision}_top1"] for i in on]

    def top1_at(strategy: str, seed: int, precision: str, batch: int, at: float) -> float | None:
        key = (strategy, seed, precision, batch)
        if key not in hulls:
            hulls[key] = hull_of(*key)
        lat, top1 = hulls[key]
        weights = interpolation_weights(lat, at) if lat else None
        return None if weights is None else sum(w * top1[i] for i, w in weights.items())

    for c in comparisons:
        c["seed_diffs"] = []
        for seed in seeds:
            a, b = (top1_at(s, seed, c["precision"], c["batch"], c["latency_ms"]) for s in (c["a"], c["b"]))
            c["seed_diffs"].append(None if a is None or b is None else a - b)


# Rounds in which both points of an interpolation must be timed undisturbed (`compress.timing.undisturbed`), and in
# the same order: one disturbed round can swap two points far apart; with `bench.max_rounds`, rounds continue until
# every file has `compress.timing.QUIET_ROUNDS` undisturbed ones.
ORDER_ROUNDS = 2


def _order_in_noise(latencies: list[float], rounds: list[list[float] | None],
                    weights: dict[int, float]) -> str | None:
    """Why a curve's interpolation (`weights`) rests on timing noise, or None when it does not. Its two points must
    be timed in the same order in every bench round that timed both undisturbed (`timing.undisturbed`), and there
    must be ORDER_ROUNDS such rounds: the rounds alternate over all files, so a slow drift of the machine slows both
    points of a round, and their per-round difference tells them apart where each point's own rounds spread wider
    than the gap between them; a round that other work disturbed says nothing of their order.

    Where fewer rounds timed both undisturbed, each point's own undisturbed rounds (ORDER_ROUNDS or more each) must
    lie apart, every one of the faster point's below every one of the slower's: when other work comes in stretches
    longer than a round, two files can each have several undisturbed rounds and few in common.

    A point measured at the latency itself, or points without round timings, interpolate nothing that noise could
    decide."""
    if len(weights) < 2:
        return None
    lo, hi = sorted(weights, key=lambda i: latencies[i])
    if rounds[lo] is None or rounds[hi] is None:
        return None
    calm_lo, calm_hi = undisturbed(rounds[lo]), undisturbed(rounds[hi])
    quiet = [(a, b) for a, b, ca, cb in zip(rounds[lo], rounds[hi], calm_lo, calm_hi) if ca and cb]
    gap = f"interpolates between points {latencies[hi] - latencies[lo]:.3f} ms apart"
    if len(quiet) >= ORDER_ROUNDS:
        diffs = [b - a for a, b in quiet]
        if min(diffs) > 0:
            return None
        return (f"{gap} whose order changes between undisturbed bench rounds (per-round difference "
                f"{min(diffs):+.3f} to {max(diffs):+.3f} ms)")
    own_lo = [t for t, calm in zip(rounds[lo], calm_lo) if calm]
    own_hi = [t for t, calm in zip(rounds[hi], calm_hi) if calm]
    enough = min(len(own_lo), len(own_hi)) >= ORDER_ROUNDS
    if enough and max(own_lo) < min(own_hi):
        return None
    return (f"{gap}, timed both undisturbed (within {DISTURBED - 1:.0%} of their fastest) in {len(quiet)} of "
            f"{len(rounds[lo])} bench rounds, fewer than {ORDER_ROUNDS}, and their own undisturbed rounds "
            f"({len(own_lo)} and {len(own_hi)}) {'overlap' if enough else 'are too few'}")


def _same_labels(points: list[dict]) -> None:
    """Paired comparisons need every point's predictions on the same test images in the same order: one line
    naming the first point whose labels differ from the first's."""
    first = points[0]
    for pt in points[1:]:
        if pt["labels"].shape != first["labels"].shape or not np.array_equal(pt["labels"], first["labels"]):
            raise StudyError(f"study: {pt['tag']} was evaluated on other test images than {first['tag']} "
                             f"({pt['labels'].size} vs {first['labels'].size} labels, or in another order): "
                             f"rerun it with the same data settings")
