"""Structural re-parameterization: any model of RepVGGBlocks (training-time or re-branched) folded into the plain
stack of 3x3 convs that computes exactly the same in eval mode."""

from __future__ import annotations

import torch

from .model import RepVGG
from .plain import PlainRepVGG
from .rebranch import RebranchedRepVGG


@torch.no_grad()
def reparameterize(model: RepVGG | RebranchedRepVGG) -> PlainRepVGG:
    """A new plain model computing exactly what `model` (any model of RepVGGBlocks with a Linear head) computes in
    eval mode; `model` is left untouched."""
    blocks = model.blocks()
    plain = PlainRepVGG([b.spec for b in blocks], model.linear.out_features)
    ref = model.linear.weight
    plain.to(device=ref.device, dtype=ref.dtype)
    for block, layer in zip(blocks, plain.layers):
        kernel, bias = block.equivalent_kernel_bias()
        layer.conv.weight.copy_(kernel)
        layer.conv.bias.copy_(bias)
    plain.linear.load_state_dict(model.linear.state_dict())
    return plain.train(model.training)
