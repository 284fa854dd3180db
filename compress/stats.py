"""How sure a study's numbers are: a Wilson interval for one top-1, and paired-bootstrap intervals (and p-values)
for the difference of two strategies at equal measured latency, each interpolated along the upper hull of its
accuracy-latency points, with Holm's correction for the number of comparisons made.

All of them cover the sampling of test images only (one trained model per point), not training seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion `correct` / `n`, as fractions (scipy's `binomtest`)."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: {correct} correct of {n}")
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def interpolation_weights(latencies: Sequence[float], at: float) -> dict[int, float] | None:
    """The weights, by point index, that interpolate a curve linearly at latency `at`: its two points bracketing
    `at` (in latency order), or the one point measured at it. None outside the curve's latency range: no
    extrapolation."""
    order = sorted(range(len(latencies)), key=lambda i: latencies[i])
    for i in order:
        if latencies[i] == at:
            return {i: 1.0}
    for lo, hi in zip(order, order[1:]):
        if latencies[lo] < at < latencies[hi]:
            w = (at - latencies[lo]) / (latencies[hi] - latencies[lo])
            return {lo: 1.0 - w, hi: w}
    return None


def mix(values: np.ndarray, weights: dict[int, float]) -> np.ndarray:
    """The rows of `values` summed with `weights` (by row index), in float64."""
    return sum(w * np.asarray(values[i], dtype=np.float64) for i, w in weights.items())


def upper_hull(latencies: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """The indices, in latency order, of a curve's points on its upper hull: the Pareto points (none faster and at
    least as accurate) on the concave envelope from above. Every latency between two hull points is achievable at
    the straight line between them, by sending that share of the inputs to each model, so a point under the
    hull (slower for its accuracy, or a noisy timing) never sets the curve; of points at one latency, the most
    accurate stands for it."""
    order = sorted(range(len(latencies)), key=lambda i: (latencies[i], -accuracies[i]))
    pareto = []
    for i in order:
        if not pareto or (accuracies[i] > accuracies[pareto[-1]] and latencies[i] > latencies[pareto[-1]]):
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:  # monotone chain: drop a middle point on or under the line from its neighbours
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = ((latencies[b] - latencies[a]) * (accuracies[i] - accuracies[a])
                     - (accuracies[b] - accuracies[a]) * (latencies[i] - latencies[a]))
            if cross < 0:
                break
            hull.pop()
        hull.append(i)
    return hull


def shared_latencies(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """The latencies two curves can be compared at without extrapolating: each curve's measured points that lie
    inside the other's range."""
    lo, hi = max(min(a), min(b)), min(max(a), max(b))
    return sorted({t for t in (*a, *b) if lo <= t <= hi})


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Top-1 difference a - b (percentage points) of two per-image scores on the same test images (0/1
    correctness, or its interpolation), with its percentile interval over `resamples` bootstrap draws of the
    images, the same draw for both sides. `significant`: the interval excludes 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap: per-image scores of one test set needed, got {a.shape} and {b.shape}")
    diff = (a - b) * 100
    rng = np.random.default_rng(seed)
    means = np.concatenate([diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
                            for n in _chunks(resamples, max(1, 2_000_000 // diff.size))])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    # two-sided bootstrap p-value: twice the share of resampled differences on the far side of 0 (at most 1)
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"diff": float(diff.mean()), "low": float(lo), "high": float(hi), "p": p,
            "significant": bool(lo > 0 or hi < 0)}


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which of `p_values` are significant with the family-wise error rate held at
    `alpha` over all of them (the i-th smallest tested at alpha / (m - i), stopping at the first that fails)."""
    m, out = len(p_values), [False] * len(p_values)
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        if p_values[i] > alpha / (m - rank):
            break
        out[i] = True
    return out


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]
