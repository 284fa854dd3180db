"""ONNX models as jobs of the timing engine (`compress.timing`), for the latency table, the check of a latency plan
(`measure`) and the stem choice; and which timings lie far above their peers' trend (to be timed again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from compress.runtime import open_onnx
from compress.timing import Opener, Timings

SUSPECT = 1.25  # a timing this many times its peers' trend is timed again (see above_trend)


class Timing:
    """One model to time: its ONNX file, its input, and, once timed, its latency `ms` (the engine's statistic: its
    fastest call, `compress.timing.Series.fastest`)."""

    def __init__(self, path: Path, model: onnx.ModelProto, input_shape: tuple[int, ...], dtype: np.dtype):
        onnx.save(model, str(path))  # written now: hundreds of models must not all sit in memory
        self.path, self.input_shape, self.dtype = path, input_shape, dtype
        self.ms: float | None = None

    def input(self, rng: np.random.Generator) -> np.ndarray:
        if self.dtype == np.uint8:
            return rng.integers(0, 128, self.input_shape, dtype=np.uint8)
        return rng.standard_normal(self.input_shape, dtype=np.float32)

    def opener(self, runtime: str, threads: int | None, rng: np.random.Generator) -> Opener:
        """The engine's job: the file opened on `runtime` (a name in compress.runtime.RUNTIMES that runs ONNX files)
        with `threads` threads (None: all cores), one step on a fresh input, its series keyed by this Timing."""
        return lambda: {self: open_onnx(self.path, runtime, threads).step(self.input(rng))}


def jobs(timings: list[Timing], runtime: str, threads: int | None, rng: np.random.Generator) -> dict[Timing, Opener]:
    """The engine's jobs of `timings`, in order."""
    return {t: t.opener(runtime, threads, rng) for t in timings}


def record(timed: Timings) -> None:
    """Give every Timing timed so far its latency (`ms`): its fastest call."""
    for t, series in timed.items():
        t.ms = series.fastest


def above_trend(ms: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Which of the timings `ms` lie more than SUSPECT times above the trend of the others: a least-squares fit of
    ms on `features` (one row per timing, fitted to relative error), refitted without the points above it until no
    new one is. Other work on the machine only ever adds time, so a timing far above its peers' trend is more likely
    a slowed run than the model's cost."""
    above = np.zeros(len(ms), dtype=bool)
    while (~above).sum() > np.linalg.matrix_rank(features[~above]):  # points to spare: a trend to leave out of
        weighted = features[~above] / ms[~above, None]
        coef = np.linalg.lstsq(weighted, np.ones((~above).sum()), rcond=None)[0]
        now = ms > SUSPECT * (features @ coef)
        if not (now & ~above).any():
            break
        above |= now
    return above
