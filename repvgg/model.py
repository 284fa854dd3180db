"""Training-time RepVGG (paper section 3.3), with the public release's module and parameter names.

A block computes ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)); the identity branch exists only when the
block keeps channels and resolution. `RepVGGBlock.equivalent_kernel_bias` collapses the three branches into
one 3x3 kernel and bias, differentiably, which is all re-parameterization needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STAGES = 5
A_BLOCKS = (1, 2, 4, 14, 1)
B_BLOCKS = (1, 4, 6, 16, 1)
# The public release's `optional_groupwise_layers`: blocks after stage0 counted from 1.
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


def _groups_map(groups: int) -> dict[int, int]:
    return {layer: groups for layer in GROUPWISE_LAYERS}


# name -> (num_blocks, width_multiplier, override_groups_map)
CONFIGS: dict[str, tuple[tuple[int, ...], tuple[float, float, float, float], dict[int, int] | None]] = {
    "RepVGG-A0": (A_BLOCKS, (0.75, 0.75, 0.75, 2.5), None),
    "RepVGG-A1": (A_BLOCKS, (1, 1, 1, 2.5), None),
    "RepVGG-A2": (A_BLOCKS, (1.5, 1.5, 1.5, 2.75), None),
    "RepVGG-B0": (B_BLOCKS, (1, 1, 1, 2.5), None),
    "RepVGG-B1": (B_BLOCKS, (2, 2, 2, 4), None),
    "RepVGG-B1g2": (B_BLOCKS, (2, 2, 2, 4), _groups_map(2)),
    "RepVGG-B1g4": (B_BLOCKS, (2, 2, 2, 4), _groups_map(4)),
    "RepVGG-B2": (B_BLOCKS, (2.5, 2.5, 2.5, 5), None),
    "RepVGG-B2g2": (B_BLOCKS, (2.5, 2.5, 2.5, 5), _groups_map(2)),
    "RepVGG-B2g4": (B_BLOCKS, (2.5, 2.5, 2.5, 5), _groups_map(4)),
    "RepVGG-B3": (B_BLOCKS, (3, 3, 3, 5), None),
    "RepVGG-B3g2": (B_BLOCKS, (3, 3, 3, 5), _groups_map(2)),
    "RepVGG-B3g4": (B_BLOCKS, (3, 3, 3, 5), _groups_map(4)),
}


@dataclass(frozen=True)
class LayerSpec:
    """One 3x3 conv of the plain stack: everything needed to rebuild it."""

    in_channels: int
    out_channels: int
    stride: int = 1
    groups: int = 1

    def check(self, where: str) -> None:
        if self.in_channels <= 0 or self.out_channels <= 0:
            raise ValueError(f"{where}: channels must be positive, got {self.in_channels}->{self.out_channels}")
        if self.groups <= 0 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{where}: groups={self.groups} must divide in_channels={self.in_channels} "
                f"and out_channels={self.out_channels}"
            )
        if self.stride not in (1, 2):
            raise ValueError(f"{where}: stride must be 1 or 2, got {self.stride}")


def stage_widths(width_multiplier) -> list[int]:
    """Paper section 3.4: stage0 = min(64, 64a), stages 1-4 = 64a, 128a, 256a, 512b."""
    if len(width_multiplier) != 4:
        raise ValueError(f"width_multiplier needs 4 values (a, a, a, b), got {len(width_multiplier)}")
    a = width_multiplier
    return [min(64, int(64 * a[0])), int(64 * a[0]), int(128 * a[1]), int(256 * a[2]), int(512 * a[3])]


def block_specs(
    num_blocks, widths, override_groups_map=None, stem_stride: int = 2, in_channels: int = 3
) -> list[LayerSpec]:
    """Per-block layer specs of a RepVGG; shared by the multi-branch model and its plain twin."""
    if len(num_blocks) != STAGES - 1 or any(int(n) <= 0 for n in num_blocks):
        raise ValueError(f"num_blocks needs 4 positive values (stages 1-4), got {list(num_blocks)}")
    blocks = [1, *num_blocks]  # stage0 is a single block
    if len(widths) != STAGES or any(int(w) <= 0 for w in widths):
        raise ValueError(f"stage widths must be {STAGES} positive numbers, got {list(widths)}")
    groups_map = override_groups_map or {}
    specs, layer_idx, cin = [], 0, in_channels
    for stage, (n, width) in enumerate(zip(blocks, widths)):
        for k in range(n):
            stride = (stem_stride if stage == 0 else 2) if k == 0 else 1
            groups = groups_map.get(layer_idx, 1) if stage > 0 else 1
            spec = LayerSpec(cin, int(width), stride, groups)
            spec.check(f"stage{stage} block {k}")
            specs.append(spec)
            cin = int(width)
            layer_idx += 1
    return specs


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_channels))
    return seq


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = (gamma / sigma) W,  b' = beta - mu gamma / sigma,  sigma = sqrt(running_var + eps)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1):
        super().__init__()
        LayerSpec(in_channels, out_channels, stride, groups).check("RepVGGBlock")
        has_identity = in_channels == out_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if has_identity else None
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.nonlinearity = nn.ReLU()

    @property
    def spec(self) -> LayerSpec:
        conv = self.rbr_dense.conv
        return LayerSpec(conv.in_channels, conv.out_channels, conv.stride[0], conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    def identity_kernel(self) -> torch.Tensor:
        """The identity as a 3x3 grouped kernel: output channel i reads input i mod (C/g) of its group."""
        channels = self.rbr_identity.num_features  # read from the module: pruning narrows it
        per_group = channels // self.rbr_dense.conv.groups
        kernel = torch.zeros(channels, per_group, 3, 3, device=self.rbr_dense.conv.weight.device)
        idx = torch.arange(channels)
        kernel[idx, idx % per_group, 1, 1] = 1.0
        return kernel

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable 3x3 kernel and bias equal to the block's three branches (eval-mode BN)."""
        k3, b3 = fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = fuse_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            kid, bid = fuse_bn(self.identity_kernel(), self.rbr_identity)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias


class RepVGG(nn.Module):
    """The public release's constructor; `widths` (5 stage widths) overrides the multipliers, which is how a
    model whose stages were pruned is rebuilt."""

    def __init__(
        self,
        num_blocks,
        width_multiplier=None,
        override_groups_map: dict[int, int] | None = None,
        num_classes: int = 1000,
        stem_stride: int = 2,
        widths=None,
        in_channels: int = 3,
    ):
        super().__init__()
        if widths is None:
            if width_multiplier is None:
                raise ValueError("RepVGG needs width_multiplier or widths")
            widths = stage_widths(width_multiplier)
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.num_blocks = [int(n) for n in num_blocks]
        widths = [int(w) for w in widths]  # not kept: pruning narrows the modules, `config()` reads them
        self.override_groups_map = dict(override_groups_map or {})
        self.num_classes, self.stem_stride, self.in_channels = num_classes, stem_stride, in_channels
        specs = block_specs(self.num_blocks, widths, self.override_groups_map, stem_stride, in_channels)
        blocks = [RepVGGBlock(s.in_channels, s.out_channels, s.stride, s.groups) for s in specs]
        self.stage0 = blocks[0]
        start = 1
        for stage, n in enumerate(self.num_blocks, start=1):
            setattr(self, f"stage{stage}", nn.Sequential(*blocks[start : start + n]))
            start += n
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def blocks(self) -> list[RepVGGBlock]:
        return [self.stage0, *self.stage1, *self.stage2, *self.stage3, *self.stage4]

    def config(self) -> dict:
        """Constructor arguments that rebuild this exact architecture (used by checkpoints)."""
        return {
            "num_blocks": self.num_blocks,
            # read from the modules: pruning narrows them after construction
            "widths": [self.stage0.spec.out_channels]
            + [getattr(self, f"stage{s}")[0].spec.out_channels for s in range(1, STAGES)],
            "override_groups_map": self.override_groups_map,
            "num_classes": self.linear.out_features,
            "stem_stride": self.stem_stride,
            "in_channels": self.in_channels,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            x = stage(x)
        return self.linear(torch.flatten(self.gap(x), 1))


def create_model(name: str, num_classes: int = 1000, **kwargs) -> RepVGG:
    """A named config (RepVGG-A0 ... RepVGG-B3g4); `RepVGG-` may be omitted. kwargs go to `RepVGG`."""
    key = name if name in CONFIGS else f"RepVGG-{name}"
    if key not in CONFIGS:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(CONFIGS)}")
    num_blocks, multiplier, groups = CONFIGS[key]
    kwargs.setdefault("override_groups_map", groups)
    return RepVGG(list(num_blocks[1:]), multiplier, num_classes=num_classes, **kwargs)
