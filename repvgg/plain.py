"""The inference-time (plain) RepVGG: a stack of 3x3 conv + bias + ReLU, global pooling and a Linear head.

Unlike the multi-branch model, nothing ties one layer's width to another's, so the model is described by an
explicit list of `LayerSpec`s and can be rebuilt from that list alone, whatever widths pruning left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from .model import LayerSpec

if TYPE_CHECKING:
    from typing_extensions import Self


class PlainLayer(nn.Module):
    """conv3x3(+bias) -> bn -> ReLU. `bn` is Identity except while fine-tuning inserts a temporary BatchNorm."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, 3, spec.stride, 1, groups=spec.groups, bias=True)
        self.bn: nn.Module = nn.Identity()
        self.act = nn.ReLU()

    @property
    def spec(self) -> LayerSpec:
        c = self.conv
        return LayerSpec(c.in_channels, c.out_channels, c.stride[0], c.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class LayerStack(nn.Module):
    """Layers built one per `LayerSpec` by `make_layer`, then global average pooling and a Linear head: any widths
    pruning left, described by the spec list alone."""

    make_layer: Callable[[LayerSpec], nn.Module]

    def __init__(self, layers: list[LayerSpec], num_classes: int):
        super().__init__()
        if not layers:
            raise ValueError(f"a {type(self).__name__} needs at least one layer")
        for i, (spec, nxt) in enumerate(zip(layers, [*layers[1:], None])):
            spec.check(f"layer {i}")
            if nxt is not None and nxt.in_channels != spec.out_channels:
                raise ValueError(
                    f"layer {i + 1}: in_channels={nxt.in_channels} does not match layer {i} out_channels={spec.out_channels}"
                )
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.layers = nn.ModuleList(self.make_layer(s) for s in layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(layers[-1].out_channels, num_classes)

    def layer_specs(self) -> list[LayerSpec]:
        return [layer.spec for layer in self.layers]

    def widths(self) -> list[int]:
        return [s.out_channels for s in self.layer_specs()]

    def config(self) -> dict:
        """JSON-able description that `from_config` rebuilds (per-layer widths survive pruning)."""
        return {"layers": [asdict(s) for s in self.layer_specs()], "num_classes": self.linear.out_features}

    @classmethod
    def from_config(cls, config: dict) -> Self:
        return cls([LayerSpec(**layer) for layer in config["layers"]], int(config["num_classes"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.linear(torch.flatten(self.gap(x), 1))


class PlainRepVGG(LayerStack):
    """The inference-time model: one `PlainLayer` per spec."""

    make_layer = PlainLayer
