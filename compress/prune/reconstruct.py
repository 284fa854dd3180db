"""Layer-wise reconstruction of a pruned plain RepVGG: re-fit each layer's weights so that it reproduces what the
unpruned model computed, as ThiNet (Luo, Wu, Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
Compression", ICCV 2017) and He, Zhang, Sun ("Channel Pruning for Accelerating Very Deep Neural Networks", ICCV
2017) do after removing channels.

Layer by layer, in order, on calibration images: layer i of the pruned model reads what its already re-fitted
layers 0..i-1 compute (so each fit also absorbs the error left by those before it), and its conv weight and bias are
re-fitted by ridge least squares so that its outputs match the unpruned layer's outputs at the channels it kept.
Last, the head is re-fitted on the pooled features to match the unpruned logits.

Why least squares on pre-activations: a conv + bias is linear in its weights, so matching the pre-activation
outputs is an exact, closed-form linear regression on im2col patches (one solve per layer, no learning rate), and
matching the pre-activation keeps the information the ReLU would throw away (how negative an output is). The normal
equations are summed over batches, so no more than one batch's (subsampled) patches is ever held.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from repvgg import PlainRepVGG

MAX_ROWS = 4096  # patch rows one batch adds to a layer's normal equations; above it, positions are subsampled


class _NormalEquations:
    """X^T X and X^T Y of a grouped linear map, summed in float64 over rows (X gains a ones column for the bias)."""

    def __init__(self, in_features: int, out_features: int, groups: int, device: torch.device):
        self.groups, self.d_in, self.d_out = groups, in_features // groups, out_features // groups
        self.xtx = torch.zeros(groups, self.d_in + 1, self.d_in + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(groups, self.d_in + 1, self.d_out, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows `x` (rows, in_features) with targets `y` (rows, out_features)."""
        x = x.double().reshape(len(x), self.groups, self.d_in).transpose(0, 1)
        x = torch.cat([x, x.new_ones(self.groups, x.shape[1], 1)], 2)
        self.xtx += x.transpose(1, 2) @ x
        self.xty += x.transpose(1, 2) @ y.double().reshape(len(y), self.groups, self.d_out).transpose(0, 1)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, (X^T X + ridge * mean(diag(X^T X)) * I) W = X^T Y, the bias row unregularized. Returns the
        weight (out_features, in_features / groups) and bias (out_features)."""
        diag = self.xtx.diagonal(dim1=1, dim2=2)[:, :-1]
        penalty = torch.zeros_like(self.xtx)
        penalty.diagonal(dim1=1, dim2=2)[:, :-1] = ridge * diag.mean(1, keepdim=True)
        w = torch.linalg.solve(self.xtx + penalty, self.xty)  # (groups, d_in + 1, d_out)
        return w[:, :-1].transpose(1, 2).reshape(-1, self.d_in), w[:, -1].reshape(-1)


class _Error:
    """||Y_hat - Y|| / ||Y|| summed over batches."""

    def __init__(self):
        self.diff = self.ref = 0.0

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        self.diff += (out.double() - ref.double()).square().sum().item()
        self.ref += ref.double().square().sum().item()

    def value(self) -> float:
        if not self.ref:
            return float("inf") if self.diff else 0.0
        return (self.diff / self.ref) ** 0.5


def _patch_rows(x: torch.Tensor, y: torch.Tensor, conv: nn.Conv2d,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """im2col rows of `x` under `conv` and the matching rows of its target `y` (N, C, H', W'): every output
    position while a batch gives at most MAX_ROWS, else ceil(MAX_ROWS / N) random positions per image (drawn from
    `gen`, seeded, so a run is repeatable), unfolding one image at a time so memory stays bounded at 224x224."""
    n, positions = len(x), y.shape[2] * y.shape[3]
    per_image = -(-MAX_ROWS // n)
    y = y.flatten(2)
    if per_image >= positions:
        cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), y.transpose(1, 2).reshape(-1, y.shape[1])
    xs, ys = [], []
    for j in range(n):
        pick = torch.randperm(positions, generator=gen)[:per_image].to(x.device)
        xs.append(F.unfold(x[j:j + 1], conv.kernel_size, conv.dilation, conv.padding, conv.stride)[0][:, pick].T)
        ys.append(y[j][:, pick].T)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def reconstruct(model: PlainRepVGG, reference: PlainRepVGG, kept: list[torch.Tensor], batches: Iterable,
                ridge: float = 1e-3) -> dict:
    """Re-fit `model` (pruned, in place) to the unpruned `reference` (same layers, same device) on the calibration
    `batches` ((x, y) pairs or x tensors), `kept[i]` naming the reference output channels layer i kept.

    Each conv is fitted in layer order on its pre-activation outputs, per conv group, by ridge regression solved in
    float64: (X^T X + ridge * mean(diag(X^T X)) * I) W = X^T Y, X the im2col patches plus a ones column for the bias
    (not regularized); then the head likewise on the pooled features against the reference logits. A layer (or head)
    that already reproduces its target exactly (an unpruned first layer) keeps its weights. The calibration set's
    activations at the current layer (the model's and the reference's) are held on the device while it runs.

    Returns {"ridge", "images", "layers": [{"error_before", "error_after"}, ...], "head": {...}, "seconds"}: the
    relative output error ||Y_hat - Y|| / ||Y|| on the calibration data before and after each re-fit ("before" is
    the layer's old weights on the already re-fitted layers' outputs)."""
    if len(model.layers) != len(reference.layers) or len(kept) != len(model.layers):
        raise ValueError(f"reconstruct: {len(model.layers)} layers, {len(reference.layers)} in the reference and "
                         f"{len(kept)} kept-channel lists")
    if not all(isinstance(m.bn, nn.Identity) for m in (*model.layers, *reference.layers)):
        raise ValueError("reconstruct: a layer has a BatchNorm inserted; fold it (repvgg.fold_bn) first")
    start, modes = time.perf_counter(), (model.training, reference.training)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    model.eval()
    reference.eval()
    try:
        acts = [(x, x) for x in ((b[0] if isinstance(b, (tuple, list)) else b).to(device) for b in batches)]
        if not acts:
            raise ValueError("reconstruct: no calibration batches")
        layers = []
        for layer, ref, keep in zip(model.layers, reference.layers, kept):
            conv, keep = layer.conv, keep.to(device)
            eqs = _NormalEquations(conv.weight[0].numel() * conv.groups, conv.out_channels, conv.groups, device)
            before, after = _Error(), _Error()
            for a, r in acts:
                target = ref.conv(r)[:, keep]
                before.add(conv(a), target)
                eqs.add(*_patch_rows(a, target, conv, gen))
            if before.diff:  # a layer that already matches (an unpruned first layer) keeps its weights, unbiased
                weight, bias = eqs.solve(ridge)
                conv.weight.copy_(weight.view_as(conv.weight))
                conv.bias.copy_(bias)
            for k, (a, r) in enumerate(acts):
                out, full = conv(a), ref.conv(r)
                after.add(out, full[:, keep])
                acts[k] = (layer.act(out), ref.act(full))
            layers.append({"error_before": before.value(), "error_after": after.value()})
        head, ref_head = model.linear, reference.linear
        feats = [(torch.flatten(model.gap(a), 1), ref_head(torch.flatten(reference.gap(r), 1))) for a, r in acts]
        eqs, before, after = _NormalEquations(head.in_features, head.out_features, 1, device), _Error(), _Error()
        for f, logits in feats:
            before.add(head(f), logits)
            eqs.add(f, logits)
        if before.diff:
            weight, bias = eqs.solve(ridge)
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        for f, logits in feats:
            after.add(head(f), logits)
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    return {
        "ridge": ridge,
        "images": sum(len(a) for a, _ in acts),
        "layers": layers,
        "head": {"error_before": before.value(), "error_after": after.value()},
        "seconds": time.perf_counter() - start,
    }
