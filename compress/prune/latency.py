"""Latency tables: what each layer of the plain stack costs on this machine's runtime, measured, for pruning to a
latency budget.

A plain layer's latency depends on its input and output widths together (one layer's output width is the next one's
input), at its resolution, stride and groups. Layers sharing those (and their width ranges) share one table: a grid
of (input width, output width) measurements over the legal widths (multiples of the slot's unit, see
`slots.width_axis`), every legal width of an axis when it has at most `grid_points` of them, else `grid_points`
spread over it; widths in between are interpolated bilinearly.

Each grid point is timed as a one-layer ONNX model (`onnx_layers`) with batch `batch` on `threads` threads, by ONNX
Runtime's CPU provider or OpenVINO's CPU device, by the timing engine (`compress.timing`, counts
`LATENCY_TABLE`): every model once per round, alternating over all of them, one session alive at a time, for
`rounds` rounds, so slow drifts of the machine hit every point alike. The table keeps each model's fastest call,
the engine's statistic: on a shared machine other work only ever adds time, and in bursts (a call that waits for
a descheduled thread takes several times longer, while the fastest calls agree closely), so the fastest call is
what the model itself costs; the whole-model timings of the calibration are taken the same way. A timing still
far above its peers' trend (a layer's over the widths of its shape, a whole model's over the other whole models)
is timed again, in up to `rounds` more rounds (`timing.above_trend`).

Calibration: a layer timed alone is not a layer inside a model (the runtime reorders the layout at each graph's
ends; the head and the input quantizer are not in any layer). Two whole plain models are timed too, the unpruned
one and one at about half its widths, and a scale and an offset map the table's sum onto both. Held out: a few
(input, output) widths per shape off the grid, and a few whole models at random widths, are timed and compared with
the prediction: the table's error.

Cache: JSON under `prune.latency.cache_dir`, named by a hash of everything the numbers depend on: CPU model and
flags, runtime and version, provider, threads, batch, precision, image size, the layers' shapes and units, the grid
and the rounds. A table whose key matches is read back, anything else is measured afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx
from torch import nn

from compress.files import write_json
from compress.runtime import cpu_flags, cpu_model, get_runtime, isa_flags
from compress.timing import LATENCY_TABLE, Timings, run_rounds
from repvgg import LayerSpec

from .errors import PruneError
from .latency_table import LatencyTable, LayerShape, format_table, layer_io
from .onnx_layers import layer_input_type, layer_model, plain_model
from .options import LatencyOptions, PruneOptions
from .slots import architecture, layer_slots, plain_specs, slots_of, width_axis
from .timing import Timing, above_trend, jobs, record

TABLE_FORMAT = 1  # bump when the JSON changes meaning: older files are then rebuilt, not misread
HELD_OUT_POINTS = 2  # off-grid (input, output) widths timed per layer shape
HELD_OUT_MODELS = 2  # whole models at random widths timed


def _grid(axis: list[int], points: int) -> list[int]:
    """All of `axis` if it has at most `points` widths, else `points` of them spread over it, both ends included."""
    if len(axis) <= points:
        return list(axis)
    return sorted({axis[round(k * (len(axis) - 1) / (points - 1))] for k in range(points)})


def _layer_shapes(model: nn.Module, round_to: int, image_size: int, grid_points: int):
    """The distinct layer shapes of `model`'s plain stack with their full width axes, and each layer's shape."""
    slots = slots_of(model, PruneOptions(), round_to)  # units only: they depend on round_to and groups
    axes = [width_axis(s.init, s.unit) for s in slots]
    shapes, index, layers, size = [], {}, [], image_size
    for spec, (source, out) in zip(plain_specs(model), layer_slots(model)):
        cin_axis = [spec.in_channels] if source is None else axes[source]
        shape = (size, spec.stride, spec.groups, source is None, tuple(cin_axis), tuple(axes[out]))
        if shape not in index:
            index[shape] = len(shapes)
            shapes.append((shape, LayerShape(size, spec.stride, spec.groups, source is None,
                                             _grid(cin_axis, grid_points), _grid(axes[out], grid_points))))
        layers.append(index[shape])
        size = (size - 1) // spec.stride + 1
    return shapes, layers, axes


def _runtime(provider: str) -> str:
    """The library and version the table is timed with, on `provider` (a runtime that runs ONNX files)."""
    runtime = get_runtime(provider)
    why = runtime.unavailable() if runtime.opens == "onnx" else "it does not run the table's ONNX layer models"
    if why:
        raise PruneError(f"prune.latency.provider={provider}: {why}")
    return runtime.version()


def machine_key(provider: str) -> dict:
    """What any timing here depends on besides the model: the CPU (model, ISA, every flag), its cores, and the
    runtime's library and version on `provider`."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "isa": isa_flags(flags),
        "cpu_flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "logical_cores": os.cpu_count(),
        "runtime": _runtime(provider),
    }


def cache_path(directory: Path, prefix: str, key: dict) -> Path:
    """The cache file of `key` under `directory`: `prefix`-<hash of key>.json."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory) / f"{prefix}-{digest}.json"


def table_key(model: nn.Module, cfg: LatencyOptions, image_size: int, round_to: int) -> dict:
    """Everything a latency table's numbers depend on (its cache file is named by a hash of it)."""
    specs = plain_specs(model)
    return {
        "format": TABLE_FORMAT,
        **machine_key(cfg.provider),
        **cfg.cache_key(),  # provider, threads, batch, precision, grid_points, rounds, stem
        "image_size": image_size,
        "round_to": round_to,
        "layers": [[s.in_channels, s.out_channels, s.stride, s.groups] for s in specs],
        "num_classes": model.linear.out_features,
    }


# ---- building -----------------------------------------------------------------------------------------------------
def build_table(model: nn.Module, options: LatencyOptions, image_size: int, round_to: int,
                log: Callable[[str], None] | None = None) -> LatencyTable:
    """Measure the latency table of `model`'s plain stack (see the module docstring); not cached here."""
    log = log or _stderr
    start = time.perf_counter()
    key = table_key(model, options, image_size, round_to)
    shapes, layers, axes = _layer_shapes(model, round_to, image_size, options.grid_points)
    specs = plain_specs(model)
    int8, batch, classes = options.precision == "int8", options.batch, model.linear.out_features
    rng = np.random.default_rng(0)
    # whole models, by slot widths: the calibration's two, then the held-out ones
    architectures = {"unpruned": [a[-1] for a in axes], "half": [min(a, key=lambda w: abs(2 * w - a[-1])) for a in axes],
                     **{f"random{k}": [int(rng.choice(a)) for a in axes] for k in range(HELD_OUT_MODELS)}}
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp:
        timings: list[Timing] = []

        def timing(model_proto: onnx.ModelProto, input_shape: tuple[int, ...], dtype: np.dtype) -> Timing:
            timings.append(Timing(Path(tmp) / f"m{len(timings)}.onnx", model_proto, input_shape, dtype))
            return timings[-1]

        def layer_timing(shape: LayerShape, cin: int, cout: int) -> Timing:
            spec = LayerSpec(cin, cout, shape.stride, shape.groups)
            return timing(layer_model(spec, shape.size, int8, shape.first, options.stem),
                          (batch, cin, shape.size, shape.size),
                          layer_input_type(int8, shape.first))

        grid = [[[layer_timing(s, a, b) for b in s.cout] for a in s.cin] for _, s in shapes]
        held_out = []
        for (*_, cin_axis, cout_axis), s in shapes:
            off_grid = [(a, b) for a in cin_axis for b in cout_axis if a not in s.cin or b not in s.cout]
            for k in rng.permutation(len(off_grid))[:HELD_OUT_POINTS]:
                held_out.append((s, *off_grid[k], layer_timing(s, *off_grid[k])))
        whole = {}
        for name, slot_widths in architectures.items():
            arch = plain_specs(architecture(model, tuple(slot_widths)))
            whole[name] = (arch, timing(plain_model(arch, image_size, classes, int8, options.stem),
                                        (batch, specs[0].in_channels, image_size, image_size), np.dtype(np.float32)))
        log(f"[latency] timing {len(timings)} models ({options.precision}, batch {batch}, "
            f"threads {options.threads or 'all'}, {key['runtime']}, {options.provider}) over {options.rounds} rounds")

        def again(timed: Timings, _jobs: list) -> list[Timing]:
            record(timed)
            return _slowed(shapes, grid, held_out, whole, layers, specs[0].in_channels)

        def said(r: int, timed_now: list, seconds: float, _timed: Timings) -> None:
            what = f"round {r + 1}/{options.rounds}" if r < options.rounds else "again, above their peers' trend"
            log(f"[latency] {what}: {len(timed_now)} models in {seconds:.1f} s")

        # the rounds, then as many again at most for the timings above their peers' trend
        counts = dataclasses.replace(LATENCY_TABLE, rounds=options.rounds, max_rounds=2 * options.rounds)
        record(run_rounds(jobs(timings, options.provider, options.threads, rng), counts, more=again, on_round=said))

    table = _assemble(key, shapes, grid, layers, specs[0].in_channels)
    table.measured = len(timings)
    _calibrate(table, whole)
    errors = [abs(s.ms_at(a, b) - t.ms) / t.ms for s, a, b, t in held_out]
    models = {name: {"measured_ms": t.ms, "predicted_ms": table.predict_ms(layer_io(arch))}
              for name, (arch, t) in whole.items() if name.startswith("random")}
    model_errors = [abs(m["predicted_ms"] - m["measured_ms"]) / m["measured_ms"] for m in models.values()]
    table.held_out = {
        "layer_points": len(errors),
        "layer_mean_abs_error": float(np.mean(errors)) if errors else None,
        "layer_max_abs_error": float(np.max(errors)) if errors else None,
        "models": models,
        "model_mean_abs_error": float(np.mean(model_errors)) if model_errors else None,
    }
    table.build_s = time.perf_counter() - start
    log(f"[latency] built in {table.build_s:.1f} s")
    return table


def _assemble(key: dict, shapes: list, grid: list, layers: list[int], image_channels: int) -> LatencyTable:
    """The table from the grid timings so far: each shape's fastest runs, made monotone."""
    for (_, s), rows in zip(shapes, grid):
        s.measured_ms = [[t.ms for t in row] for row in rows]
        s.settle()
    return LatencyTable(key, [s for _, s in shapes], layers, image_channels)


def _slowed(shapes: list, grid: list, held_out: list, whole: dict, layers: list[int], image_channels: int) -> list:
    """The timings far above their peers' trend: a layer's against the other widths of its shape (latency ~ a + b cin +
    c cout + d cin cout: work grows with cin x cout, memory traffic with each), a whole model's against the other
    whole models (latency ~ a + b x the table's sum)."""
    slowed = []
    for (_, s), rows in zip(shapes, grid):
        points = [(a, b, t) for a, row in zip(s.cin, rows) for b, t in zip(s.cout, row)]
        points += [(a, b, t) for shape, a, b, t in held_out if shape is s]
        features = np.array([[1.0, a, b, a * b] for a, b, _ in points])
        above = above_trend(np.array([t.ms for *_, t in points]), features)
        slowed += [t for (*_, t), up in zip(points, above) if up]
    table = _assemble({}, shapes, grid, layers, image_channels)
    sums = [sum(table.layer_ms(i, a, b) for i, (a, b) in enumerate(layer_io(arch))) for arch, _ in whole.values()]
    above = above_trend(np.array([t.ms for _, t in whole.values()]), np.array([[1.0, x] for x in sums]))
    return slowed + [t for (_, t), up in zip(whole.values(), above) if up]


def _calibrate(table: LatencyTable, whole: dict) -> None:
    """Scale and offset that map the table's sum onto the measured unpruned and half-width models."""
    (full_specs, full), (half_specs, half) = whole["unpruned"], whole["half"]
    sums = {name: sum(table.layer_ms(i, a, b) for i, (a, b) in enumerate(layer_io(specs)))
            for name, specs in (("unpruned", full_specs), ("half", half_specs))}
    if sums["unpruned"] > sums["half"] and full.ms > half.ms:
        table.scale = (full.ms - half.ms) / (sums["unpruned"] - sums["half"])
    else:  # a model too small to narrow, or noise that inverted the two: scale alone
        table.scale = full.ms / sums["unpruned"]
    table.offset = full.ms - table.scale * sums["unpruned"]
    table.calibration = {"unpruned_measured_ms": full.ms, "unpruned_table_ms": sums["unpruned"],
                         "half_measured_ms": half.ms, "half_table_ms": sums["half"],
                         "half_widths": [s.out_channels for s in half_specs]}


# ---- cache and ranks ----------------------------------------------------------------------------------------------
def cache_dir(given: Path | None) -> Path:
    """The latency caches' directory: `given` (`prune.latency.cache_dir`), else $XDG_CACHE_HOME/repvgg-compress,
    else ~/.cache/repvgg-compress."""
    if given is not None:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "repvgg-compress"


def read_cached(path: Path, key: dict) -> dict | None:
    """The JSON cache file `path` when it was written for exactly `key` (its "key" entry), else None (missing,
    unreadable or another key)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _read(path: Path, key: dict) -> LatencyTable | None:
    data = read_cached(path, key)
    return None if data is None else LatencyTable.from_json(data, path)


def load_or_build_table(
    model: nn.Module,
    options: LatencyOptions,
    image_size: int,
    round_to: int,
    *,
    rank: int = 0,
    wait: Callable[[], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> LatencyTable:
    """The latency table of `model`'s plain stack measured as `options` says, at `image_size`, on the widths
    multiples of `round_to` allow: read from the cache when its key matches, else measured and cached.
    Under torchrun, rank 0 reads or builds it while the other ranks wait in `wait()` (a barrier every rank calls),
    then read it from the cache, which must be on a filesystem every rank sees."""
    key = table_key(model, options, image_size, round_to)
    path = cache_path(cache_dir(options.cache_dir), "latency", key)
    table = None
    if rank == 0:
        table = _read(path, key)
        if table is None:
            table = build_table(model, options, image_size, round_to, log)
            write_json(path, table.to_json())
            table.path = path
    if wait is not None:
        wait()
    if table is None:
        table = _read(path, key)
        if table is None:
            raise RuntimeError(f"latency table {path} is missing after rank 0 built it: prune.latency.cache_dir must "
                               f"be on a filesystem every rank reads")
    return table


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def print_latency_table(model: nn.Module, options: LatencyOptions, image_size: int, round_to: int,
                        file: TextIO | None = None) -> LatencyTable:
    """For `compress.py latency-table`: read or build the latency table of `model` (multi-branch or plain) that
    `load_or_build_table` gives for these arguments, and print it to `file` (stdout)."""
    table = load_or_build_table(model, options, image_size, round_to)
    print(format_table(table, model), file=file or sys.stdout)
    return table
