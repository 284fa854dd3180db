"""Timing ONNX models for the latency table: one session alive at a time on the table's runtime (ONNX Runtime's
CPU provider or OpenVINO), each model's fastest run kept, and which timings lie far above their peers' trend (to be
timed again)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from compress.runtime import open_onnx, time_runs

WARMUP, ITERS = 2, 5  # runs per model and round: rounds, not long runs, spread the machine's moods over all
SUSPECT = 1.25  # a timing this many times its peers' trend is timed again (see above_trend)


class Timing:
    """One model to time: its ONNX file, its input, and its timed runs."""

    def __init__(self, path: Path, model: onnx.ModelProto, input_shape: tuple[int, ...], dtype: np.dtype):
        onnx.save(model, str(path))  # written now: hundreds of models must not all sit in memory
        self.path, self.input_shape, self.dtype, self.runs = path, input_shape, dtype, []

    def input(self, rng: np.random.Generator) -> np.ndarray:
        if self.dtype == np.uint8:
            return rng.integers(0, 128, self.input_shape, dtype=np.uint8)
        return rng.standard_normal(self.input_shape, dtype=np.float32)

    @property
    def ms(self) -> float:
        return min(self.runs)


def time_round(timings: list[Timing], runtime: str, threads: int | None, shift: int, rng: np.random.Generator,
               warmup: int = WARMUP, iters: int = ITERS) -> None:
    """Time each model once on `runtime` (a name in compress.runtime.RUNTIMES that runs ONNX files) with `threads`
    threads (None: all cores), round-robin from `timings[shift]`, one session alive at a time: `warmup` untimed runs,
    then `iters` timed ones added to its `runs`."""
    for t in timings[shift:] + timings[:shift]:
        session = open_onnx(t.path, runtime, threads)
        t.runs += time_runs(session.step(t.input(rng)), warmup, iters)
        del session  # the only reference to the session: freed before the next one starts


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
