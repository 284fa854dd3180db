"""A temporary BatchNorm after each conv of a plain RepVGG, for fine-tuning it: inserted so the model computes what it
computed before, trained, then folded back into the convs so the plain stack stays conv + bias + ReLU."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from .model import fuse_bn
from .plain import PlainRepVGG


def _images(batch) -> torch.Tensor:
    """The images of one batch: a bare image tensor, or the first item of an (images, labels, ...) sequence."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"insert_bn: a batch is {type(batch).__name__}; expected images or (images, labels)")


@torch.no_grad()
def insert_bn(model: PlainRepVGG, batches: Iterable, max_batches: int | None = None) -> PlainRepVGG:
    """Give every plain layer a BatchNorm2d initialised from the statistics of its conv outputs over `batches`
    ((x, y) pairs or bare inputs): each conv is divided by the root of its outputs' per-channel std, and the BN's
    statistics, weight and bias put std and mean back, so the model computes exactly what it did in eval mode until
    training moves it."""
    if not isinstance(model, PlainRepVGG):
        raise TypeError(f"insert_bn needs a PlainRepVGG, got a {type(model).__name__}")
    convs = [layer.conv for layer in model.layers]
    sums = {c: torch.zeros(c.out_channels, dtype=torch.float64, device=c.weight.device) for c in convs}
    squares = {c: s.clone() for c, s in sums.items()}
    counts = dict.fromkeys(convs, 0)

    def record(conv, _inputs, out):
        out = out.detach().double().transpose(0, 1).flatten(1)
        sums[conv] += out.sum(1)
        squares[conv] += out.pow(2).sum(1)
        counts[conv] += out.shape[1]

    was_training = model.training
    model.eval()
    hooks = [c.register_forward_hook(record) for c in convs]
    try:
        for batch in itertools.islice(iter(batches), max_batches):
            model(_images(batch).to(convs[0].weight.device))
    finally:
        for h in hooks:
            h.remove()
    if not counts[convs[0]]:
        raise ValueError("insert_bn got no batches")
    for layer in model.layers:
        conv, n = layer.conv, counts[layer.conv]
        mean = sums[conv] / n
        var = (squares[conv] / n - mean.pow(2)).clamp_min(0)
        bn = nn.BatchNorm2d(conv.out_channels).to(device=conv.weight.device, dtype=conv.weight.dtype)
        sigma = (var + bn.eps).sqrt().to(conv.weight.dtype)
        mean = mean.to(conv.weight.dtype)
        # The conv is divided by sqrt(sigma) and the BN (weight sigma) puts the scale back: a step on the conv then
        # moves the outputs sigma times as far as without the BN. Dividing by sigma (standardising) makes that
        # sigma^2, and re-fitted layers reach sigma ~9 (a fine-tune diverged); not dividing makes it 1, the plain
        # stack's own steps (which blew up on a uniformly pruned model). See docs/pruning.md, "`bn` and its
        # initialisation".
        root = sigma.sqrt()
        conv.weight.div_(root.reshape(-1, 1, 1, 1))
        conv.bias.div_(root)
        bn.running_mean.copy_(mean / root)
        bn.running_var.copy_(sigma - bn.eps)  # the BN divides by sqrt(running_var + eps) = sigma / sqrt(sigma)
        bn.weight.copy_(sigma)
        bn.bias.copy_(mean)
        layer.bn = bn
    return model.train(was_training)


@torch.no_grad()
def fold_bn(model: PlainRepVGG) -> PlainRepVGG:
    """Fold each plain layer's BatchNorm (eval-mode statistics) into its conv and put nn.Identity back."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer.bn, nn.Identity):
            continue
        if not isinstance(layer.bn, nn.BatchNorm2d):
            raise TypeError(f"layer {i}: cannot fold a {type(layer.bn).__name__}")
        conv = layer.conv
        kernel, bias = fuse_bn(conv.weight, layer.bn)
        scaled_conv_bias, _ = fuse_bn(conv.bias.reshape(-1, 1, 1, 1), layer.bn)  # BN scales the conv bias too
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias + scaled_conv_bias.flatten())
        layer.bn = nn.Identity()
    return model
