"""Measuring planned architectures against the unpruned one, the way `compress.bench` compares the artifacts: for a
latency-targeted prune to check (and correct) what its latency table predicted.

The table's sum underestimates some width combinations (bilinear interpolation, and the planner picks the widths the
table happens to favour), so a plan predicted at half the unpruned latency can measure well above it. Here whole
plain models are timed: the unpruned architecture and each candidate, as ONNX graphs with random weights
(`onnx_layers.plain_model`) on the table's runtime, threads, batch and precision, one session alive at a time.

Every model is timed once per round, round-robin, the start shifted by one model each round, for several rounds.
A shared machine drifts (other work, clocks, caches) over seconds to minutes; within one round every model sees
nearly the same machine, so a candidate's time divided by the unpruned time of the same round cancels the drift,
which absolute times would carry. The ratio reported is the median of those per-round ratios: what the bench
stage reports for the pruned model against the plain one, the number the target is checked against.

A model's time in a round is its fastest run, as in the latency table (`timing`) and the study's bench: other work
on the machine only ever adds time. On the 2-core Zen 5 VM, timing one study's four verify plans (and a fifth) four
times over: a plan's ratio from each round's median spread 0.434-0.470 and 0.494-0.517 between repeats, from each
round's fastest run 0.463-0.476 and 0.517-0.527. With the medians, the loop of plain-latency at keep 0.5 measured
its plans at 0.470, 0.535, 0.449 and 0.524, re-planning each time, and kept one that the study's bench times at
0.46, under-using its budget by 8%.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from compress.runtime import RUNTIMES

from .onnx_layers import plain_model
from .options import LatencyOptions, PruneOptions
from .slots import architecture, plain_specs, slot_widths, slots_of
from .timing import Timing, time_round

# Runs per model and round: the benchmark's defaults (`BenchOptions` warmup, iters). The table times hundreds of
# models and affords 2 + 5; here a handful of whole models are timed, so a round has enough runs for one to miss a
# burst, and a fresh session's warm-up (allocation, kernel choice) is over as it is in the benchmark.
WARMUP, ITERS = 10, 20


def measure_ratios(model: nn.Module, candidates: list[tuple[int, ...]], options: LatencyOptions, image_size: int,
                   rounds: int = 5, log: Callable[[str], None] | None = None, agree: float | None = None,
                   max_blocks: int = 4) -> dict:
    """Time the plain models of `model` (PlainRepVGG or training-time RepVGG, unpruned) and of each candidate's slot
    widths on `options.provider` (`options.threads`, `options.batch`, `options.precision`) at `image_size`, over
    `rounds` alternating rounds (see the module docstring); `log` gets a line per round.

    With `agree`, blocks of `rounds` rounds are timed until two blocks in a row give every candidate a ratio within
    `agree` of each other, at most `max_blocks`: one block cannot tell a stretch of other work that slowed one model
    more than the other from the ratio itself (on the 2-core VM, a plan measured 0.489 in five consistent rounds
    with the unpruned model slowed 2.5x, and 0.565 timed again on a quiet one). The two agreeing blocks give the
    result; without agreement, every round does.

    Returns {"unpruned_ms", "candidates": [{"widths", "ms", "ratio"}], "rounds", "blocks", "agreed", "seconds"}:
    medians over rounds of each round's fastest run, and of each round's candidate / unpruned ratio; `blocks`, each
    block's median ratios; `rounds`, how many were timed."""
    if rounds < 1:
        raise ValueError(f"measure_ratios: rounds={rounds}, give at least 1")
    unpruned = slot_widths(slots_of(model, PruneOptions(), 1))  # the model's own widths: what pruning starts from
    for widths in candidates:
        if len(widths) != len(unpruned):
            raise ValueError(f"measure_ratios: widths {list(widths)} give {len(widths)} slots; the model has "
                             f"{len(unpruned)} ({list(unpruned)})")
    start = time.perf_counter()
    int8, classes = options.precision == "int8", model.linear.out_features
    input_shape = (options.batch, plain_specs(model)[0].in_channels, image_size, image_size)
    rng = np.random.default_rng(0)
    blocks: list[np.ndarray] = []  # each [round][model]: that round's fastest run, the unpruned model first
    named = [("unpruned", unpruned), *((f"candidate{k}", tuple(w)) for k, w in enumerate(candidates))]
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        timings = [Timing(Path(tmp) / f"{name}.onnx",
                          plain_model(plain_specs(architecture(model, widths)), image_size, classes, int8, options.stem),
                          input_shape, np.dtype(np.float32))
                   for name, widths in named]
        agreed = agree is None
        while len(blocks) < (1 if agree is None else max_blocks):
            per_round = []
            for r in range(rounds):
                round_start = time.perf_counter()
                time_round(timings, options.provider, options.threads, r % len(timings), rng, WARMUP, ITERS)
                per_round.append([min(t.runs[-ITERS:]) for t in timings])  # this round's runs only
                if log is not None:
                    ratios = " ".join(f"{ms / per_round[-1][0]:.3f}" for ms in per_round[-1][1:])
                    log(f"[measure] block {len(blocks) + 1} round {r + 1}/{rounds}: unpruned {per_round[-1][0]:.3f} "
                        f"ms, ratios {ratios} ({time.perf_counter() - round_start:.1f} s)")
            blocks.append(np.array(per_round))
            if len(blocks) >= 2 and np.all(np.abs(_ratios(blocks[-1]) - _ratios(blocks[-2])) <= agree):
                agreed = True
                break
    ms = np.concatenate(blocks[-2:] if agreed else blocks)
    ratios = _ratios(ms)
    return {
        "unpruned_ms": float(np.median(ms[:, 0])),
        "candidates": [{"widths": [int(w) for w in widths], "ms": float(np.median(ms[:, k + 1])),
                        "ratio": float(ratios[k])} for k, widths in enumerate(candidates)],
        "rounds": rounds * len(blocks),
        "blocks": [_ratios(b).tolist() for b in blocks],
        "agreed": agreed,
        "seconds": time.perf_counter() - start,
    }


def _ratios(block: np.ndarray) -> np.ndarray:
    """Each candidate's median over a block's rounds of its time over the unpruned model's."""
    return np.median(block[:, 1:] / block[:, :1], axis=0)


def fastest_runtime(model: nn.Module, options: LatencyOptions, image_size: int, rounds: int = 3,
                    log: Callable[[str], None] | None = None) -> tuple[str, dict[str, float]]:
    """Of the runtimes that run ONNX files here (`compress.runtime.RUNTIMES`), the one that runs `model`'s unpruned
    plain stack fastest at the options' threads, batch and precision: its name, and each one's median ms."""
    times = {}
    for name, runtime in RUNTIMES.items():
        if runtime.opens == "onnx" and runtime.unavailable() is None:
            on = dataclasses.replace(options, provider=name)
            times[name] = measure_ratios(model, [], on, image_size, rounds)["unpruned_ms"]
    if not times:
        raise ValueError("prune.latency.provider=auto: no runtime of ONNX files can run here")
    chosen = min(times, key=times.get)
    if log is not None:
        log(f"[latency] fastest runtime for {options.precision}: {chosen} ("
            + ", ".join(f"{n} {ms:.3f} ms" for n, ms in times.items()) + ")")
    return chosen, times
