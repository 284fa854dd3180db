"""Where an INT8 model loses its accuracy, layer by layer (`compress.py int8-diagnosis`):

- PTQ of the FP32 model with the run's calibration settings, then PTQ again with one layer at a time kept in FP32
  (NNCF's IgnoredScope), each scored in PyTorch (fake-quant) on the same test images: a layer whose FP32 copy wins
  back many points is where quantization hurts.
- the QAT model against its PTQ start (the same calibration, so the very model QAT began from): how far QAT moved
  each weight and activation quantizer's scale, as |log2(after / before)|. Scales QAT moved far are those
  calibration set badly.

Both tables are sorted by what they measure, the largest loss or move first."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .quant import first_last_node_names, layer_node_names, quantize_model
from .train import evaluate

# an NNCF quantizer's scale in a wrapped model's state dict: pre-hooks of port 1 quantize a layer's weight, the
# others (post-hooks, port-0 pre-hooks) an activation
SCALE = re.compile(r"__nncf_hooks\.(pre|post)_hooks\.(.+?)__(\d+)\.\d+\.scale$")


@dataclass
class LayerLoss:
    """PTQ with one layer kept in FP32: its top-1 and what it wins back over full PTQ (None: FP32 in every
    variant, as the recipe's `fp32_first_last` keeps it)."""

    index: int
    node: str
    out_channels: int
    top1: float | None
    gain: float | None


@dataclass
class ScaleMove:
    """How far QAT moved one quantizer's scales from their PTQ values: |log2(after / before)| over its channels."""

    node: str
    kind: str  # "weight" or "activation"
    scales: int
    median: float
    largest: float
    before: float  # median scale
    after: float


@dataclass
class Diagnosis:
    """The per-layer tables of one INT8 model and what they were measured on."""

    name: str
    images: int
    settings: str
    fp32_top1: float
    ptq_top1: float
    layers: list[LayerLoss]
    qat_top1: float | None = None
    scales: list[ScaleMove] = field(default_factory=list)


def quantizer_scales(qmodel: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """Every quantizer's scale (flattened), by (NNCF node name, 'weight' or 'activation')."""
    out = {}
    for key, value in qmodel.state_dict().items():
        m = SCALE.match(key)
        if m:
            hook, node, port = m.groups()
            out[(node, "weight" if hook == "pre" and port == "1" else "activation")] = value.detach().flatten().cpu()
    return out


def layer_losses(model: nn.Module, calibration: Iterable, example: torch.Tensor, test: Iterable,
                 options: dict, log: Callable[[str], None] | None = None) -> tuple[float, float, nn.Module,
                                                                                  list[LayerLoss]]:
    """PTQ of the plain FP32 `model` with `options` (`quantize_model`'s calibration settings) on `calibration`, then
    once per layer with that layer kept in FP32, each scored on `test`. Returns (FP32 top-1, PTQ top-1, the PTQ
    model, the layers sorted by what keeping them in FP32 wins back, largest first)."""
    cpu = torch.device("cpu")
    model = model.cpu().eval()

    def ptq(keep_fp32: Sequence[str] = ()) -> tuple[float, nn.Module]:
        qmodel = quantize_model(model, calibration, example, keep_fp32=keep_fp32, **options)
        return evaluate(qmodel, test, cpu)["top1"], qmodel

    fp32_top1 = evaluate(model, test, cpu)["top1"]
    ptq_top1, ptq_model = ptq()
    names = layer_node_names(model, example)
    widths = [*model.widths(), model.linear.out_features]
    fp32_already = set(first_last_node_names(model, example)) if options.get("fp32_first_last") else set()
    layers = []
    for i, (name, width) in enumerate(zip(names, widths)):
        if name in fp32_already:
            layers.append(LayerLoss(i, name, width, None, None))
            continue
        top1, _ = ptq([name])
        layers.append(LayerLoss(i, name, width, top1, top1 - ptq_top1))
        if log:
            log(f"[int8-diagnosis] layer {i + 1}/{len(names)} {name}: {top1:.2f}% with it in FP32")
    layers.sort(key=lambda r: (r.gain is None, -(r.gain or 0.0), r.index))
    return fp32_top1, ptq_top1, ptq_model, layers


def scale_moves(ptq_model: nn.Module, qat_model: nn.Module) -> list[ScaleMove]:
    """Each quantizer both models share, by how far QAT moved its scales from PTQ's (median |log2 ratio| over its
    channels), largest first."""
    before, after = quantizer_scales(ptq_model), quantizer_scales(qat_model)
    moves = []
    for key in before.keys() & after.keys():
        a, b = before[key].abs().clamp_min(1e-12), after[key].abs().clamp_min(1e-12)
        moved = (b / a).log2().abs()
        moves.append(ScaleMove(key[0], key[1], a.numel(), float(moved.median()), float(moved.max()),
                               float(a.median()), float(b.median())))
    return sorted(moves, key=lambda m: (-m.median, -m.largest, m.node, m.kind))


def format_diagnosis(d: Diagnosis) -> str:
    """Both tables as markdown, with what they were measured on."""
    lines = [f"{d.name}: FP32 {d.fp32_top1:.2f}%, PTQ {d.ptq_top1:.2f}%"
             + (f", QAT {d.qat_top1:.2f}%" if d.qat_top1 is not None else "")
             + f" top-1 in PyTorch on {d.images} test images ({d.settings})", "",
             "PTQ with one layer kept in FP32, the layer whose quantization costs most first:", "",
             "| layer | node | out channels | PTQ top-1 with it in FP32 | gain over PTQ (pt) |", "|---|---|---|---|---|"]
    for r in d.layers:
        top1, gain = ("FP32 in the recipe", "-") if r.top1 is None else (f"{r.top1:.2f}", f"{r.gain:+.2f}")
        lines.append(f"| {r.index} | {r.node} | {r.out_channels} | {top1} | {gain} |")
    if d.scales:
        lines += ["", "QAT against its PTQ start, |log2(after / before)| of each quantizer's scales, the scale QAT "
                  "moved most first:", "",
                  "| node | kind | scales | median | largest | median scale before -> after |", "|---|---|---|---|---|---|"]
        lines += [f"| {m.node} | {m.kind} | {m.scales} | {m.median:.3f} | {m.largest:.3f} | {m.before:.4g} -> "
                  f"{m.after:.4g} |" for m in d.scales]
    return "\n".join(lines)
