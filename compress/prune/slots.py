"""What can be pruned: the model's channel groups ("slots"), the widths each may take, and the model's layers in
terms of slots (which slot each conv reads and writes), for plain and multi-branch RepVGGs alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from repvgg import LayerSpec, PlainRepVGG, RepVGG

from .options import PruneOptions


def width_axis(init: int, unit: int) -> list[int]:
    """Every width a slot of `init` channels may take at `unit` granularity: the multiples of `unit` below `init`,
    and `init` itself (kept whole, whatever its divisibility)."""
    return [*range(unit, init, unit), init]


@dataclass(eq=False)
class Slot:
    """One prunable channel group: the convs writing these channels and the widths they may take."""

    convs: list[nn.Conv2d]
    init: int  # width before pruning
    groups: int  # conv groups touching these channels: pruning stays symmetric over them
    unit: int  # widths are multiples of this: lcm(round_to, groups)
    min_width: int  # the largest of max_layer_ratio's floor and prune.min_width, rounded up to a unit
    prunable: bool

    def legal(self, width: int) -> int:
        """Floor to a unit (as TP's round_to), never below `min_width`; an untouched slot keeps its width."""
        if not self.prunable or width >= self.init:
            return self.init
        return max(self.min_width, width // self.unit * self.unit)

    def step(self, width: int, direction: int) -> int | None:
        """The next legal width below (direction -1) or above (+1) `width`, None at the end of the range."""
        if not self.prunable:
            return None
        if direction < 0:
            nxt = (width - 1) // self.unit * self.unit
            return nxt if nxt >= self.min_width else None
        nxt = width // self.unit * self.unit + self.unit
        return min(nxt, self.init) if width < self.init else None

    def choices(self) -> list[int]:
        """The widths this prune may give the slot, ascending."""
        if not self.prunable:
            return [self.init]
        return [w for w in width_axis(self.init, self.unit) if w >= self.min_width]

    def ratio_for(self, width: int) -> float:
        """TP pruning ratio that leaves exactly `width` channels (TP counts per conv group and truncates)."""
        per_group = self.init // self.groups
        return 1.0 - (width // self.groups + 0.5) / per_group


def slots_of(model: nn.Module, options: PruneOptions, round_to: int) -> list[Slot]:
    """The slots of a PlainRepVGG (one per layer) or of a training-time RepVGG (one per stage: its identity adds tie
    the blocks of a stage together), in order."""
    if isinstance(model, PlainRepVGG):
        convs = [[layer.conv] for layer in model.layers]
        # a plain layer's channels are read by the next layer's conv
        readers = [[layer.conv] for layer in model.layers[1:]] + [[]]
    else:
        stages = [[model.stage0], *(list(getattr(model, f"stage{s}")) for s in range(1, 5))]
        convs = [[c for b in blocks for c in (b.rbr_dense.conv, b.rbr_1x1.conv)] for blocks in stages]
        readers = [[blocks[0].rbr_dense.conv] for blocks in stages[1:]] + [[]]
    slots = []
    for i, (own, read) in enumerate(zip(convs, readers)):
        init = own[0].out_channels
        conv_groups = {c.groups for c in own + read}
        groups = math.lcm(*conv_groups)
        if groups != max(conv_groups):  # TP removes the same positions from max(groups) equal chunks
            raise ValueError(f"prune: convs sharing channels have groups {sorted(conv_groups)}, which do not nest")
        unit = math.lcm(round_to, groups)
        floor = max(math.ceil(round(init * (1 - options.max_layer_ratio), 6)), options.min_width or round_to)
        min_width = min(init, max(unit, -(-floor // unit) * unit))
        prunable = (i > 0 or options.prune_first_layer) and min_width < init
        slots.append(Slot(own, init, groups, unit, min_width, prunable))
    return slots


def plain_specs(model: nn.Module) -> list[LayerSpec]:
    """The layers of the plain stack `model` is or re-parameterizes into."""
    if isinstance(model, PlainRepVGG):
        return model.layer_specs()
    return [b.spec for b in model.blocks()]


def layer_slots(model: nn.Module) -> list[tuple[int | None, int]]:
    """For each layer of `plain_specs(model)`: the slot its input channels belong to (None: the image) and the
    slot it writes."""
    if isinstance(model, PlainRepVGG):
        return [(i - 1 if i else None, i) for i in range(len(model.layers))]
    depths = [1, *(len(getattr(model, f"stage{s}")) for s in range(1, 5))]
    return [((s - 1 if s else None) if k == 0 else s, s) for s, depth in enumerate(depths) for k in range(depth)]


def ignored_layers(model: nn.Module, options: PruneOptions) -> list[nn.Module]:
    """The head's outputs are the classes; the first layer reads the image and is kept unless asked."""
    if options.prune_first_layer:
        return [model.linear]
    return [model.linear, model.layers[0] if isinstance(model, PlainRepVGG) else model.stage0]


def layer_widths(model: nn.Module) -> list[int]:
    return [s.out_channels for s in plain_specs(model)]


def slot_widths(slots: list[Slot]) -> tuple[int, ...]:
    return tuple(s.convs[0].out_channels for s in slots)


def architecture(model: nn.Module, widths: tuple[int, ...]) -> nn.Module:
    """An uninitialised model like `model` whose slots have `widths` (only its shapes matter)."""
    with torch.device("meta"):
        if isinstance(model, PlainRepVGG):
            specs, cin = [], model.layers[0].conv.in_channels
            for spec, width in zip(model.layer_specs(), widths):
                specs.append(LayerSpec(cin, width, spec.stride, spec.groups))
                cin = width
            arch = PlainRepVGG(specs, model.linear.out_features)
            for layer, src in zip(arch.layers, model.layers):
                if isinstance(src.bn, nn.BatchNorm2d):
                    layer.bn = nn.BatchNorm2d(layer.conv.out_channels)
        else:
            arch = RepVGG(**{**model.config(), "widths": list(widths)})
    return arch
