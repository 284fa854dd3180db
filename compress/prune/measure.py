"""Measuring planned architectures against the unpruned one, the way `compress.bench` compares the artifacts: for a
latency-targeted prune to check (and correct) what its latency table predicted.

The table's sum underestimates some width combinations (bilinear interpolation, and the planner picks the widths the
table happens to favour), so a plan predicted at half the unpruned latency can measure well above it. Here whole
plain models are timed: the unpruned architecture and each candidate, as ONNX graphs with random weights
(`onnx_layers.plain_model`) on the table's runtime, threads, batch and precision, by the timing engine
(`compress.timing`, counts `MEASURE`): alternating rounds, one session alive at a time.

A shared machine drifts (other work, clocks, caches) over seconds to minutes; within one round every model sees
nearly the same machine, so a candidate's time divided by the unpruned time of the same round cancels the drift,
which absolute times would carry. A model's time in a round is its fastest call: other work only ever adds time.
The ratio reported is the median over rounds of those per-round ratios (`compress.timing.ratio`): the statistic the
bench stage reports for the pruned model against the plain one, the number the target is checked against.
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
from compress.timing import (
    MEASURE,
    RUNTIME_CHOICE,
    Timings,
    block_ratios,
    blocks_agree,
    ratio,
    run_rounds,
    until_blocks_agree,
)

from .onnx_layers import plain_model
from .options import LatencyOptions, PruneOptions
from .slots import architecture, plain_specs, slot_widths, slots_of
from .timing import Timing, jobs


def measure_ratios(model: nn.Module, candidates: list[tuple[int, ...]], options: LatencyOptions, image_size: int,
                   rounds: int = MEASURE.rounds, log: Callable[[str], None] | None = None, agree: float | None = None,
                   max_blocks: int = MEASURE.max_rounds // MEASURE.rounds) -> dict:
    """Time the plain models of `model` (PlainRepVGG or training-time RepVGG, unpruned) and of each candidate's slot
    widths on `options.provider` (`options.threads`, `options.batch`, `options.precision`) at `image_size`, over
    `rounds` alternating rounds (see the module docstring); `log` gets a line per round.

    With `agree`, blocks of `rounds` rounds are timed until two blocks in a row give every candidate a ratio within
    `agree` of each other, at most `max_blocks` (`compress.timing.until_blocks_agree`): one block cannot tell a
    stretch of other work that slowed one model more than the other from the ratio itself. The two agreeing blocks
    give the result; without agreement, every round does.

    Returns {"unpruned_ms", "candidates": [{"widths", "ms", "ratio"}], "rounds", "blocks", "agreed", "seconds"}:
    each model's fastest call and each candidate's median over rounds of its same-round ratio to the unpruned
    model (`compress.timing.ratio`), over the rounds that give the result; `blocks`, each block's ratios;
    `rounds`, how many were timed."""
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
    named = [("unpruned", unpruned), *((f"candidate{k}", tuple(w)) for k, w in enumerate(candidates))]
    counts = dataclasses.replace(MEASURE, rounds=rounds, max_rounds=rounds * (1 if agree is None else max_blocks))
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        timings = [Timing(Path(tmp) / f"{name}.onnx",
                          plain_model(plain_specs(architecture(model, widths)), image_size, classes, int8, options.stem),
                          input_shape, np.dtype(np.float32))
                   for name, widths in named]
        reference, others = timings[0], timings[1:]

        def said(r: int, _jobs: list, seconds: float, timed: Timings) -> None:
            if log is None:
                return
            now = {t: s.since(r) for t, s in timed.items()}
            ms = now[reference].fastest
            ratios = " ".join(f"{now[t].fastest / ms:.3f}" for t in others)
            log(f"[measure] block {r // rounds + 1} round {r % rounds + 1}/{rounds}: unpruned {ms:.3f} ms, "
                f"ratios {ratios} ({seconds:.1f} s)")

        more = None if agree is None else until_blocks_agree(others, reference, rounds, agree)
        timed = run_rounds(jobs(timings, options.provider, options.threads, rng), counts, more=more, on_round=said)
    blocks = block_ratios(timed, others, reference, rounds) if others else [[] for _ in range(timed.rounds // rounds)]
    agreed = agree is None or (timed.rounds % rounds == 0 and blocks_agree(blocks, agree))
    used = timed.since(timed.rounds - 2 * rounds) if agree is not None and agreed else timed
    return {
        "unpruned_ms": used[reference].fastest,
        "candidates": [{"widths": [int(w) for w in widths], "ms": used[t].fastest,
                        "ratio": ratio(used[t], used[reference])} for t, widths in zip(others, candidates)],
        "rounds": timed.rounds,
        "blocks": blocks,
        "agreed": agreed,
        "seconds": time.perf_counter() - start,
    }


def fastest_runtime(model: nn.Module, options: LatencyOptions, image_size: int, rounds: int = RUNTIME_CHOICE.rounds,
                    log: Callable[[str], None] | None = None) -> tuple[str, dict[str, float]]:
    """Of the runtimes that run ONNX files here (`compress.runtime.RUNTIMES`), the one that runs `model`'s unpruned
    plain stack fastest at the options' threads, batch and precision: its name, and each one's fastest call (ms)."""
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
