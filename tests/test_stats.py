import math

import numpy as np
import pytest
from scipy.stats import norm

from compress.stats import (
    holm,
    interpolation_weights,
    mix,
    paired_bootstrap,
    shared_latencies,
    upper_hull,
    wilson_interval,
)


def _wilson_written_out(correct: int, n: int, confidence: float) -> tuple[float, float]:
    """The oracle: the Wilson score interval's formula."""
    z = norm.ppf((1 + confidence) / 2)
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def test_wilson_interval_matches_the_textbook_value_and_formula():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    for correct, n in [(0, 20), (20, 20), (1, 3), (7123, 10000), (3, 1000)]:
        for confidence in (0.95, 0.9):
            expected = _wilson_written_out(correct, n, confidence)
            assert wilson_interval(correct, n, confidence) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert wilson_interval(7123, 10000, 0.9)[0] > wilson_interval(7123, 10000)[0]  # narrower at a lower level
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_interpolation_brackets_in_latency_order_and_never_extrapolates():
    latencies = [3.0, 1.0, 2.0]  # not sorted: points come in keep order, latency is measured
    assert interpolation_weights(latencies, 2.0) == {2: 1.0}
    assert interpolation_weights(latencies, 1.25) == pytest.approx({1: 0.75, 2: 0.25})
    assert interpolation_weights(latencies, 2.5) == pytest.approx({2: 0.5, 0: 0.5})
    assert interpolation_weights(latencies, 0.9) is None and interpolation_weights(latencies, 3.1) is None
    values = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])  # per-image correctness of each point
    assert mix(values, interpolation_weights(latencies, 1.25)).tolist() == pytest.approx([0.0, 0.75])
    assert mix(values, interpolation_weights([2.0], 2.0)).tolist() == [1.0, 1.0]  # a one-point curve: at its latency
    assert shared_latencies([1.0, 2.0, 3.0], [2.5, 4.0]) == [2.5, 3.0]
    assert shared_latencies([1.0, 2.0], [2.0]) == [2.0]
    assert shared_latencies([1.0, 2.0], [3.0]) == []


def test_paired_bootstrap_on_known_inputs():
    same = np.array([1, 0, 1, 1, 0] * 100, dtype=float)
    assert paired_bootstrap(same, same) == {"diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0, "significant": False}
    ones, zeros = np.ones(50), np.zeros(50)
    assert paired_bootstrap(ones, zeros) == {"diff": 100.0, "low": 100.0, "high": 100.0, "p": 0.0,
                                             "significant": True}

    # independent errors at 10,000 images: the interval is the normal one, +-1.96 sd of the mean difference
    rng = np.random.default_rng(1)
    a = (rng.random(10_000) < 0.72).astype(float)
    b = (rng.random(10_000) < 0.70).astype(float)
    result = paired_bootstrap(a, b, resamples=4000, seed=3)
    d = (a - b) * 100
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert result["diff"] == pytest.approx(d.mean())
    assert result["low"] == pytest.approx(d.mean() - half, abs=0.15)
    assert result["high"] == pytest.approx(d.mean() + half, abs=0.15)
    assert result["significant"] == (result["low"] > 0 or result["high"] < 0)
    # pairing: two models that differ on 30 of 10,000 images, all in a's favour, differ significantly even though
    # each one's own interval is about +-0.9 pt wide
    a2 = b.copy()
    a2[np.flatnonzero(b == 0)[:30]] = 1
    paired = paired_bootstrap(a2, b)
    assert paired["diff"] == pytest.approx(0.3) and paired["significant"] and paired["low"] > 0
    assert paired_bootstrap(a2, b) == paired  # seeded: the same draws every time
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:10])


def test_upper_hull_of_a_non_monotone_curve():
    # latency, top-1: 0.46 ms measured slower than 0.457 ms yet less accurate (timing noise around a 47% model),
    # a point under the chord from its neighbours, and two points at one latency
    latencies = [0.457, 0.462, 0.60, 0.80, 1.00, 1.00]
    top1 = [69.0, 47.0, 70.0, 76.0, 79.0, 78.0]
    hull = upper_hull(latencies, top1)
    assert hull == [0, 3, 4]  # 0.46 is dominated; 0.60 lies under the chord 0.457 -> 0.80; at 1.00 the better one
    weights = interpolation_weights([latencies[i] for i in hull], 0.60)
    assert mix(np.array([[top1[i]] for i in hull]), weights)[0] == \
        pytest.approx(69.0 + (76.0 - 69.0) * (0.60 - 0.457) / (0.80 - 0.457))
    assert upper_hull([1.0], [50.0]) == [0]


def test_holm_on_known_p_values():
    # m = 4: the smallest p against 0.05/4, the next against 0.05/3, then 0.05/2 (0.03 fails: stop there)
    assert holm([0.005, 0.04, 0.012, 0.03]) == [True, False, True, False]
    assert holm([0.01, 0.04, 0.03, 0.02]) == [True, False, False, False]  # 0.02 > 0.05/3: the rest fail too
    assert holm([0.0125, 0.0166, 0.025, 0.05]) == [True, True, True, True]  # each exactly at its threshold
    assert holm([0.03, 0.03]) == [False, False]  # each below 0.05 alone, not below 0.05/2
    assert holm([]) == []
