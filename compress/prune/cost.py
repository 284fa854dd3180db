"""What a prune spends: the cost of an architecture given by its slot widths, in MACs or in milliseconds.

The searches are written against `CostModel` (and the chain search against `ChainCost`), so a MAC target and a
latency target run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch_pruning as tp
from torch import nn

from repvgg import PlainRepVGG

from .latency_table import LatencyTable
from .slots import architecture, layer_slots


class CostModel(Protocol):
    """The cost of a planned architecture, from its slot widths."""

    unit: str  # what cost() counts: "MACs", "ms"

    def cost(self, widths: Sequence[int]) -> float: ...


class ChainCost(CostModel, Protocol):
    """A cost that is a sum over slots, each term depending on the slot's width and its input's: the layers that
    write slot i cost `slot_cost(i, widths[i - 1], widths[i])` (`width_in` None for the first slot, which reads
    the image), and `cost(widths)` is that sum plus a constant."""

    def slot_cost(self, i: int, width_in: int | None, width: int) -> float: ...


class MacCost:
    """MACs of planned architectures as Torch-Pruning counts them, memoised by their slot widths."""

    unit = "MACs"

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model, self.example_input, self.cache = model, example_input, {}

    def cost(self, widths: Sequence[int]) -> float:
        widths = tuple(widths)
        if widths not in self.cache:
            arch = architecture(self.model, widths).to_empty(device=self.example_input.device).eval()
            self.cache[widths] = float(tp.utils.count_ops_and_params(arch, self.example_input)[0])
        return self.cache[widths]


class ChainMacCost(MacCost):
    """MACs of a plain model as a `ChainCost`, for the budget search: Torch-Pruning counts a plain layer (3x3 conv,
    bias, ReLU) writing `cout` channels of an HxW map from `cin` as H W cout (9 cin / groups + 2), and the head as
    a constant plus a term in the last width; checked against TP's count of the unpruned model when built. (A
    training-time RepVGG is no chain: its identity branches come and go with the widths.)"""

    def __init__(self, model: PlainRepVGG, example_input: torch.Tensor):
        super().__init__(model, example_input)
        size, self.layers = example_input.shape[-1], []
        for spec in model.layer_specs():
            size = (size - 1) // spec.stride + 1  # 3x3, padding 1
            self.layers.append((size * size, spec.groups))
        self.head_per_channel = size * size + model.linear.out_features  # pooling, then the Linear's weights
        widths = model.widths()
        counted = self.cost(widths)
        self.constant = counted - sum(self.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths))
        if self.constant != model.linear.out_features:  # the head's bias adds
            raise RuntimeError(f"prune: Torch-Pruning counts {counted:.0f} MACs for the plain model, the per-layer "
                               f"formula {counted - self.constant + model.linear.out_features:.0f}")

    def summed(self, widths: Sequence[int]) -> float:
        """`cost(widths)` from the per-layer formula, without building the model: for searches that ask often."""
        return self.constant + sum(self.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths))

    def slot_cost(self, i: int, width_in: int | None, width: int) -> float:
        area, groups = self.layers[i]
        cin = self.example_input.shape[1] if width_in is None else width_in
        head = self.head_per_channel * width if i == len(self.layers) - 1 else 0
        return area * width * (9 * cin / groups + 2) + head


class LatencyCost:
    """Milliseconds of planned architectures, predicted by a latency table: each plain layer's latency at its
    (input, output) widths, summed, then the table's calibration (scale and offset) applied."""

    unit = "ms"

    def __init__(self, table: LatencyTable, model: nn.Module):
        self.table = table
        self.io = layer_slots(model)  # (input slot, output slot) of each plain layer
        self.writers = [[layer for layer, (_, out) in enumerate(self.io) if out == i] for i in range(self.io[-1][1] + 1)]

    def slot_cost(self, i: int, width_in: int | None, width: int) -> float:
        total = 0.0
        for layer in self.writers[i]:
            source = self.io[layer][0]
            cin = self.table.image_channels if source is None else (width if source == i else width_in)
            total += self.table.layer_ms(layer, cin, width)
        return self.table.scale * total

    def cost(self, widths: Sequence[int]) -> float:
        return self.table.offset + sum(
            self.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths)
        )
