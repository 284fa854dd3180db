"""`export.stem: auto` (and `stem_fp32`): the stem rewrite (`compress.stem`) that runs the first conv fastest on the
deployment target's runtime, chosen at the door by timing the stem alone, cached like the latency table.

The stem is timed as the latency table times a first layer (`prune.onnx_layers.layer_model`: the image in, its
input quantizer in INT8, random weights), as exported and through every rewrite that fits it, by the timing engine
(`compress.timing`, counts `STEM_CHOICE`); a rewrite's speed-up is the engine's ratio, as exported / rewritten: the
median over rounds of the ratio of their fastest calls in the same round. It wins only
by more than MARGIN: below that the choice would follow the timing's noise, and the file as exported is the one
every other check has seen most of. The choice is then copied into `prune.latency.stem`, so a latency-targeted
prune times the same graph the export writes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compress.deploy import TARGET_RUNTIMES
from compress.files import write_json
from compress.prune.latency import cache_dir, cache_path, machine_key, read_cached
from compress.prune.onnx_layers import layer_input_type, layer_model
from compress.prune.timing import Timing, jobs
from compress.recipe import Recipe, RecipeError
from compress.runtime import get_runtime
from compress.stem import FP32_STEM_REWRITES, STEM_REWRITES
from compress.timing import STEM_CHOICE, ratio, run_rounds
from repvgg import LayerSpec

MARGIN = 0.03  # a rewrite must be this much faster than the stem as exported to be chosen
STEM_FORMAT = 2  # bump when the cache's JSON changes meaning


def time_stem_rewrites(spec: LayerSpec, image_size: int, int8: bool, runtime: str, threads: int | None, batch: int,
                       rounds: int = STEM_CHOICE.rounds) -> dict[str, float]:
    """Each rewrite's speed-up over the stem `spec` as exported (`none`: 1.0) at `image_size`, batch `batch`, on
    `runtime` with `threads` threads: the engine's ratio over `rounds` alternating rounds. Rewrites
    that do not fit the stem (space-to-depth of a stride-1 conv, say) are left out."""
    names = list(STEM_REWRITES if int8 else FP32_STEM_REWRITES)  # "none" first: the reference of every ratio
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="stem-") as tmp:
        timings, fitting = [], []
        for name in names:
            try:
                model = layer_model(spec, image_size, int8, first=True, stem=name)
            except ValueError:
                continue
            fitting.append(name)
            timings.append(Timing(Path(tmp) / f"{name}.onnx", model, (batch, spec.in_channels, image_size, image_size),
                                  layer_input_type(int8, first=True)))
        counts = dataclasses.replace(STEM_CHOICE, rounds=rounds)
        timed = run_rounds(jobs(timings, runtime, threads, rng), counts)
    return {name: ratio(timed[timings[0]], timed[t]) for name, t in zip(fitting, timings)}


def choose_stem(spec: LayerSpec, image_size: int, int8: bool, runtime: str, threads: int | None, batch: int,
                cache: Path, log: Callable[[str], None] | None = None) -> tuple[str, dict[str, float]]:
    """The rewrite name for the stem `spec` (see the module docstring) and every candidate's speed-up; read from
    `cache` when timed before for this machine, runtime and stem, else timed and cached."""
    key = {"format": STEM_FORMAT, **machine_key(runtime), "provider": runtime, "threads": threads, "batch": batch,
           "precision": "int8" if int8 else "fp32", "image_size": image_size, "rounds": STEM_CHOICE.rounds,
           "stem": [spec.in_channels, spec.out_channels, spec.stride, spec.groups]}
    path = cache_path(cache, "stem", key)
    cached = read_cached(path, key)
    if cached is not None:
        speedups = cached["speedups"]
    else:
        speedups = time_stem_rewrites(spec, image_size, int8, runtime, threads, batch)
        write_json(path, {"key": key, "speedups": speedups})
    best = max(speedups, key=speedups.get)
    choice = best if speedups[best] > 1 + MARGIN else "none"
    if log is not None:
        log(f"[stem] {key['precision']} on {runtime}: {choice} ("
            + ", ".join(f"{n} {v:.2f}x" for n, v in speedups.items()) + f"; {path})")
    return choice, speedups


def resolve_stems(recipe: Recipe, stem: LayerSpec, device_type: str,
                  log: Callable[[str], None] | None = None) -> Recipe:
    """`recipe` (resolved: its deployment target explicit) with `export.stem` / `export.stem_fp32` "auto" replaced
    by the rewrite `choose_stem` picks for the model's first layer `stem` on the target's runtime (at `bench.threads`
    and the bench's main batch), resolved again so `prune.latency.stem` follows."""
    export, target = recipe.export, recipe.quantize.target_device
    runtime = TARGET_RUNTIMES[target]
    update = {}
    for int8 in (True, False):
        field = export.stem_field(int8)
        if getattr(export, field) != "auto":
            continue
        why = get_runtime(runtime).unavailable()
        if why:
            raise RecipeError(f"export.{field}=auto: deployment target {target} runs on '{runtime}', which is {why}; "
                              f"name a rewrite (or none) instead")
        bench = recipe.bench
        choice, _ = choose_stem(stem, recipe.data.image_size, int8, runtime, bench.threads,
                                bench.main_batch or bench.batch_sizes[0],
                                cache_dir(recipe.prune.latency.cache_dir), log)
        update[field] = None if choice == "none" else choice
    if not update:
        return recipe
    return recipe.model_copy(update={"export": export.model_copy(update=update)}).resolved(device_type)
