"""Re-branching a pruned plain RepVGG for fine-tuning ("Boosting Pruned Networks with Linear Over-parameterization",
Qian et al., 2022): every plain 3x3 conv becomes a RepVGG block again at its pruned widths, trained with its
branches, then re-parameterized back to the same plain widths.

At the start the block computes exactly what the plain layer did (eval mode):

    BN_3x3(conv3x3(x)) + BN_1x1(conv1x1(x)) [+ BN_id(x)] = (W x + b) + 0 [+ 0]

the 3x3 branch carries the plain conv (its bias moved into the BN), the new branches have BN scale and shift 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from .model import LayerSpec, RepVGGBlock
from .plain import LayerStack, PlainRepVGG
from .temporary_bn import insert_bn


class RebranchedRepVGG(LayerStack):
    """A multi-branch RepVGG with explicit per-layer widths: one `RepVGGBlock` per `LayerSpec`, the plain model's
    pooling and Linear head. `reparameterize` folds it into a `PlainRepVGG` of the same specs."""

    @staticmethod
    def make_layer(spec: LayerSpec) -> RepVGGBlock:
        return RepVGGBlock(spec.in_channels, spec.out_channels, spec.stride, spec.groups)

    def blocks(self) -> list[RepVGGBlock]:
        return list(self.layers)


@torch.no_grad()
def rebranch(plain: PlainRepVGG, batches: Iterable, max_batches: int | None = None, seed: int = 0) -> RebranchedRepVGG:
    """A `RebranchedRepVGG` computing exactly what `plain` computes in eval mode; `plain` is left untouched.

    Each 3x3 branch is the plain conv with a BN initialised from the statistics of the conv outputs over `batches`
    (fixed, unaugmented (x, y) pairs or bare inputs; at most `max_batches`), as `insert_bn` does; the fresh 1x1
    convs are drawn from `seed` (the same model on every rank and every resume); the 1x1 and identity BNs start
    with scale and shift 0. The global RNG is not used."""
    if not isinstance(plain, PlainRepVGG):
        raise TypeError(f"rebranch needs a PlainRepVGG, got a {type(plain).__name__}")
    if not all(isinstance(layer.bn, nn.Identity) for layer in plain.layers):
        raise ValueError("rebranch needs a plain model without temporary BNs: fold_bn it first")
    # insert_bn divides each conv by the root of its outputs' std and gives it a BN that puts mean and std back.
    calibrated = insert_bn(copy.deepcopy(plain), batches, max_batches)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same weights whatever the device
    ref = plain.linear.weight
    with torch.device("meta"):  # every tensor is set below: no random init wasted
        model = RebranchedRepVGG(plain.layer_specs(), plain.linear.out_features)
    model.to_empty(device=ref.device).to(ref.dtype)
    for layer, block in zip(calibrated.layers, model.blocks()):
        dense, conv = block.rbr_dense, layer.conv
        dense.conv.weight.copy_(conv.weight)
        dense.bn.load_state_dict(layer.bn.state_dict())
        # The conv bias moves into the BN's mean: BN with mean m of (W x + b) is BN with mean m - b of W x. The
        # running mean is then the mean of the bias-free conv outputs over the batches, as training will see them.
        dense.bn.running_mean.sub_(conv.bias)
        fresh = torch.empty(block.rbr_1x1.conv.weight.shape, dtype=ref.dtype)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)  # nn.Conv2d's own init
        block.rbr_1x1.conv.weight.copy_(fresh)
        for bn in (block.rbr_1x1.bn, block.rbr_identity):
            if bn is not None:  # a new branch adds exactly 0 until training moves its scale and shift
                bn.reset_parameters()
                bn.weight.zero_()
    model.linear.load_state_dict(plain.linear.state_dict())
    return model.train(plain.training)
