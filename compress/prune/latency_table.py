"""A latency table: per-layer latency grids over (input width, output width), looked up bilinearly, with the
calibration that maps their sum onto whole-model timings; its JSON form and its text view. `latency` builds it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from compress.runtime import describe_cpu
from repvgg import LayerSpec

from .slots import plain_specs


@dataclass
class LayerShape:
    """One measured table: the layers of this resolution, stride, groups and width ranges share it."""

    size: int  # input height and width
    stride: int
    groups: int
    first: bool  # reads the image
    cin: list[int]  # the grid's input widths, ascending
    cout: list[int]  # the grid's output widths, ascending
    measured_ms: list[list[float]] = field(default_factory=list)  # [i][j]: fastest run at (cin[i], cout[j])
    ms: list[list[float]] = field(default_factory=list)  # what the table says: measured_ms made monotone

    def settle(self) -> None:
        """`ms` from `measured_ms`: no point costs more than a point at least as wide on both axes. A wider conv
        does at least the narrower one's work, so a narrower point timed slower was slowed by other work (its
        fastest run still waited on a busy core), and the wider point's time bounds it."""
        ms = np.minimum.accumulate(np.asarray(self.measured_ms)[::-1, ::-1], axis=0)
        self.ms = np.minimum.accumulate(ms, axis=1)[::-1, ::-1].tolist()

    def ms_at(self, cin: int, cout: int) -> float:
        """Bilinear interpolation over the grid."""
        (i0, i1, a), (j0, j1, b) = _bracket(self.cin, cin), _bracket(self.cout, cout)
        row0 = (1 - b) * self.ms[i0][j0] + b * self.ms[i0][j1]
        row1 = (1 - b) * self.ms[i1][j0] + b * self.ms[i1][j1]
        return (1 - a) * row0 + a * row1


def _bracket(grid: list[int], x: int) -> tuple[int, int, float]:
    """Indices of the grid values around `x` and x's fraction of the way between them."""
    if not grid[0] <= x <= grid[-1]:
        raise ValueError(f"latency table: width {x} is outside the measured range {grid[0]}..{grid[-1]}")
    j = min(int(np.searchsorted(grid, x)), len(grid) - 1)
    if grid[j] == x or j == 0:
        return j, j, 0.0
    return j - 1, j, (x - grid[j - 1]) / (grid[j] - grid[j - 1])


@dataclass
class LatencyTable:
    """Per-layer latency (ms) of a plain stack over its widths, calibrated to whole-model measurements:
    `offset + scale * sum(layer_ms(l, cin_l, cout_l))` predicts a model's latency."""

    key: dict
    shapes: list[LayerShape]
    layers: list[int]  # the shape of each plain layer
    image_channels: int
    scale: float = 1.0
    offset: float = 0.0
    calibration: dict = field(default_factory=dict)
    held_out: dict = field(default_factory=dict)
    build_s: float = 0.0
    measured: int = 0  # models timed to make this object: 0 when it was read from the cache
    path: Path | None = None

    def layer_ms(self, layer: int, cin: int, cout: int) -> float:
        """Plain layer `layer`'s latency at `cin` -> `cout` channels, uncalibrated."""
        return self.shapes[self.layers[layer]].ms_at(cin, cout)

    def predict_ms(self, widths: list[tuple[int, int]]) -> float:
        """A whole plain model's latency from its layers' (input, output) widths, calibrated."""
        return self.offset + self.scale * sum(self.layer_ms(i, cin, cout) for i, (cin, cout) in enumerate(widths))

    def summary(self) -> dict:
        """What a prune report records about the table it used."""
        return {"path": str(self.path) if self.path else None, "key": self.key, "scale": self.scale,
                "offset_ms": self.offset, "calibration": self.calibration, "held_out": self.held_out,
                "build_s": self.build_s}

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("measured")
        data.pop("path")
        return data

    @classmethod
    def from_json(cls, data: dict, path: Path) -> LatencyTable:
        shapes = [LayerShape(**s) for s in data.pop("shapes")]
        return cls(shapes=shapes, **data, path=path)


def layer_io(specs: list[LayerSpec]) -> list[tuple[int, int]]:
    """The (input, output) widths of each layer."""
    return [(s.in_channels, s.out_channels) for s in specs]


def format_table(table: LatencyTable, model: nn.Module) -> str:
    """A readable table: each layer's shape and its latency at a few widths, the calibration and the error."""
    k, cal, held = table.key, table.calibration, table.held_out
    lines = [
        f"latency table: {k['runtime']} ({k['provider']}), {k['precision']}, batch {k['batch']}, "
        f"threads {k['threads'] or 'all'}, image {k['image_size']}, round_to {k['round_to']}",
        f"cpu: {describe_cpu(k)}; AVX-512 VNNI: {'yes' if 'avx512_vnni' in k['isa'] else 'no'}",
        f"file: {table.path}  (built in {table.build_s:.1f} s{'' if table.measured else ', read from the cache'})",
        "",
        f"{'layer':>5}  {'shape (in->out, stride, groups @ size)':<40}  ms at widths in->out (uncalibrated)",
    ]
    for i, (spec, (cin, cout)) in enumerate(zip(plain_specs(model), layer_io(plain_specs(model)))):
        s = table.shapes[table.layers[i]]
        samples = {}
        for f in (1.0, 0.5, 0.25):
            a = min(s.cin, key=lambda w, f=f: abs(w - f * cin))
            b = min(s.cout, key=lambda w, f=f: abs(w - f * cout))
            samples[f"{a}->{b}"] = f"{a}->{b}: {s.ms_at(a, b):.3f}"
        shape = f"{cin}->{cout}, s{spec.stride}, g{spec.groups} @ {s.size}"
        lines.append(f"{i:>5}  {shape:<40}  {'   '.join(samples.values())}")
    lines += [
        "",
        f"calibration: unpruned {cal['unpruned_measured_ms']:.2f} ms measured, {cal['unpruned_table_ms']:.2f} ms by the "
        f"table; half widths {cal['half_measured_ms']:.2f} ms measured, {cal['half_table_ms']:.2f} ms by the table "
        f"-> predicted = {table.offset:.3f} ms + {table.scale:.3f} x table",
    ]
    if held.get("layer_points"):
        lines.append(f"held-out layers: {held['layer_points']} off-grid widths, error mean "
                     f"{held['layer_mean_abs_error']:.1%}, max {held['layer_max_abs_error']:.1%}")
    for name, m in held.get("models", {}).items():
        lines.append(f"held-out model {name}: measured {m['measured_ms']:.2f} ms, predicted {m['predicted_ms']:.2f} ms "
                     f"({(m['predicted_ms'] - m['measured_ms']) / m['measured_ms']:+.1%})")
    return "\n".join(lines)
