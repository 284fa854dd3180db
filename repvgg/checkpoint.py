"""Loading the public release's checkpoints, training-time or inference-time, with nothing but the keys."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from .model import LayerSpec, RepVGG
from .plain import PlainRepVGG

_KEY = re.compile(r"^stage(\d)(?:\.(\d+))?\.(rbr_dense|rbr_1x1|rbr_identity|rbr_reparam)\.(.+)$")
_HEAD = ("linear.weight", "linear.bias")


def _strip_prefix(state_dict: dict) -> dict:
    return {(k.removeprefix("module.")): v for k, v in state_dict.items()}


def _layer_weights(state_dict: dict, branch: str) -> list[tuple[str, torch.Tensor]]:
    """(prefix, 3x3 weight) per block in network order, validating every key on the way."""
    blocks: dict[tuple[int, int], str] = {}
    for key in state_dict:
        if key in _HEAD:
            continue
        m = _KEY.match(key)
        if m is None or (int(m.group(1)) == 0) != (m.group(2) is None) or int(m.group(1)) > 4:
            raise ValueError(f"checkpoint key '{key}' is not a RepVGG key")
        stage, idx = int(m.group(1)), int(m.group(2) or 0)
        blocks[(stage, idx)] = key[: m.start(3) - 1]
    for key in _HEAD:
        if key not in state_dict:
            raise ValueError(f"checkpoint has no '{key}'")
    per_stage = defaultdict(list)
    for stage, idx in sorted(blocks):
        per_stage[stage].append(idx)
    for stage in range(5):
        if per_stage[stage] != list(range(len(per_stage[stage]))) or not per_stage[stage]:
            raise ValueError(f"checkpoint stage{stage} has blocks {per_stage[stage]}, expected 0..n-1")
    out = []
    for key in sorted(blocks):
        wkey = f"{blocks[key]}.{branch}.weight" if branch == "rbr_reparam" else f"{blocks[key]}.{branch}.conv.weight"
        if wkey not in state_dict:
            raise ValueError(f"checkpoint misses '{wkey}'")
        out.append((blocks[key], state_dict[wkey]))
    return out


def _specs(weights: list[tuple[str, torch.Tensor]], stem_stride: int) -> list[LayerSpec]:
    specs, cin = [], weights[0][1].shape[1]
    for prefix, w in weights:
        if w.dim() != 4 or w.shape[-1] != 3 or cin % w.shape[1]:
            raise ValueError(f"checkpoint key '{prefix}' has a weight of shape {tuple(w.shape)} that does not follow {cin} channels")
        first_of_stage = prefix == "stage0" or prefix.endswith(".0")
        stride = (stem_stride if prefix == "stage0" else 2) if first_of_stage else 1
        specs.append(LayerSpec(cin, w.shape[0], stride, cin // w.shape[1]))
        cin = w.shape[0]
    return specs


def load_official_state_dict(state_dict: dict, stem_stride: int = 2) -> RepVGG | PlainRepVGG:
    """A ready model from an official state dict: training-time keys give `RepVGG`, `rbr_reparam` keys give
    `PlainRepVGG`. Widths, groups and depth come from the keys and shapes; strides follow the architecture."""
    state_dict = _strip_prefix(state_dict)
    deploy = any(".rbr_reparam." in k for k in state_dict)
    weights = _layer_weights(state_dict, "rbr_reparam" if deploy else "rbr_dense")
    specs = _specs(weights, stem_stride)
    num_classes = state_dict["linear.weight"].shape[0]
    if deploy:
        model = PlainRepVGG(specs, num_classes)
        renamed = {f"layers.{i}.conv.{p}": state_dict[f"{prefix}.rbr_reparam.{p}"]
                   for i, (prefix, _) in enumerate(weights) for p in ("weight", "bias")}
        renamed.update({k: state_dict[k] for k in _HEAD})
        state_dict = renamed
    else:
        num_blocks = [sum(1 for p, _ in weights if p.startswith(f"stage{s}.")) for s in range(1, 5)]
        firsts = [0, 1] + [1 + sum(num_blocks[:s]) for s in range(1, 4)]
        model = RepVGG(
            num_blocks,
            widths=[specs[i].out_channels for i in firsts],
            override_groups_map={i: s.groups for i, s in enumerate(specs) if i > 0 and s.groups > 1},
            num_classes=num_classes,
            stem_stride=stem_stride,
            in_channels=specs[0].in_channels,
        )
    load_strict(model, state_dict)
    return model


def load_strict(model: torch.nn.Module, state_dict: dict) -> None:
    """`load_state_dict(strict=True)`, but the error names the first offending key in one line."""
    expected = model.state_dict()
    for key in state_dict:
        if key not in expected:
            raise ValueError(f"checkpoint key '{key}' does not belong to the inferred architecture")
        if state_dict[key].shape != expected[key].shape:
            raise ValueError(
                f"checkpoint key '{key}' has shape {tuple(state_dict[key].shape)}, expected {tuple(expected[key].shape)}"
            )
    for key in expected:
        if key not in state_dict:
            raise ValueError(f"checkpoint misses '{key}'")
    model.load_state_dict(state_dict, strict=True)
