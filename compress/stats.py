"""How sure a study's numbers are: a Wilson interval for one top-1, and paired-bootstrap intervals for the
difference of two strategies at equal measured latency, each interpolated along its accuracy-latency curve.

All of them cover the sampling of test images only (one trained model per point), not training seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of the proportion `correct` / `n`, as fractions."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: {correct} correct of {n}")
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


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


def interpolate(latencies: Sequence[float], values: np.ndarray, at: float) -> np.ndarray | None:
    """`values` (one row per point: a top-1, or per-image correctness) interpolated at latency `at` along the
    curve; None outside its range."""
    weights = interpolation_weights(latencies, at)
    if weights is None:
        return None
    return sum(w * np.asarray(values[i], dtype=np.float64) for i, w in weights.items())


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
    return {"diff": float(diff.mean()), "low": float(lo), "high": float(hi), "significant": bool(lo > 0 or hi < 0)}


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]
