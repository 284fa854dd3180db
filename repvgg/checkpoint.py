"""Loading public RepVGG checkpoints, the official release's or timm's, training-time or inference-time, with
nothing but the keys."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch

from .model import LayerSpec, RepVGG
from .plain import PlainRepVGG

_KEY = re.compile(r"^stage(\d)(?:\.(\d+))?\.(rbr_dense|rbr_1x1|rbr_identity|rbr_reparam)\.(.+)$")
_HEAD = ("linear.weight", "linear.bias")

# timm's ByobNet (timm/models/byobnet.py, RepVggBlock) names the same tensors differently; its repvgg_* models
# are the public release's architectures, so its keys map one to one onto the release's.
_TIMM_BLOCK = re.compile(r"^(?:stem|stages\.(\d+)\.(\d+))\.(conv_kxk|conv_1x1|identity|reparam_conv)\.(.+)$")
_TIMM_BRANCH = {"conv_kxk": "rbr_dense", "conv_1x1": "rbr_1x1", "identity": "rbr_identity", "reparam_conv": "rbr_reparam"}
_TIMM_HEAD = {"head.fc.weight": "linear.weight", "head.fc.bias": "linear.bias"}
_TIMM_PREFIXES = ("stem.", "stages.", "head.")
# Squeeze-excitation modules: the release's `se`/`post_se` (RepVGG-D2se, RepVGGplus), timm's `attn` (repvgg_d2se).
_SE = re.compile(r"(?:^|\.)(?:se|post_se|attn)\.")


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


def _build(state_dict: dict, stem_stride: int) -> RepVGG | PlainRepVGG:
    """The model an official-layout state dict (no prefix) describes, with its weights loaded."""
    deploy = any(".rbr_reparam." in k for k in state_dict)
    weights = _layer_weights(state_dict, "rbr_reparam" if deploy else "rbr_dense")
    specs = _specs(weights, stem_stride)
    num_classes = state_dict["linear.weight"].shape[0]
    # the checkpoint overwrites every tensor (strictly), so a random init would be wasted time
    with torch.device("meta"):
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
    model.to_empty(device="cpu")
    load_strict(model, state_dict)
    return model


def from_state_dict(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike, stem_stride: int = 2
) -> RepVGG | PlainRepVGG:
    """A ready model from a public RepVGG checkpoint: `RepVGG` from training-time weights, `PlainRepVGG` from
    deployed ones (the release's `rbr_reparam`, timm's `reparam_conv`).

    Takes a state dict (or a training checkpoint holding one under 'state_dict') or a `.pth`/`.safetensors`
    path, in the official release's layout (`stage0.rbr_dense...`, `linear`, maybe `module.`-prefixed) or
    timm's (`repvgg_a0` ... `repvgg_b3g4`, e.g. the `rvgg_in1k` hub weights: `stem.conv_kxk...`,
    `stages.N.M...`, `head.fc`). Depth, widths and groups come from the keys and shapes; the stem stride does
    not show in them, hence `stem_stride` (2 for the ImageNet models). Squeeze-excitation variants
    (RepVGG-D2se, timm's `repvgg_d2se`) raise `ValueError`.
    """
    state_dict = state_dict_or_path
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = _read(Path(state_dict))
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"not a state dict ({type(state_dict).__name__})")
    state_dict = _strip_prefix(state_dict)
    se_key = next((k for k in state_dict if _SE.search(k)), None)
    if se_key is not None:
        raise ValueError(
            f"checkpoint key '{se_key}' is a squeeze-excitation module: "
            "SE variants (RepVGG-D2se, timm's repvgg_d2se) are not supported"
        )
    if not any(k.startswith(_TIMM_PREFIXES) for k in state_dict):
        return _build(state_dict, stem_stride)
    state_dict = _timm_to_official(state_dict)
    try:
        return _build(state_dict, stem_stride)
    except ValueError as e:  # the message names keys as the release does: say how timm's map onto them
        raise ValueError(f"{e} (timm's stem, stages.N, head.fc read as the release's stage0, stage<N+1>, linear)") from None


# The name from when only the official layout loaded.
load_official_state_dict = from_state_dict


def _read(path: Path) -> object:
    """What a `.safetensors` file or a torch file holds (weights only: unpickling runs no code)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind = "safetensors" if path.suffix == ".safetensors" else "torch"
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file  # only these files need the package

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # both libraries raise many types for a damaged or foreign file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} cannot be read as a {kind} file (truncated or foreign): {reason}") from None


def _timm_to_official(state_dict: dict) -> dict:
    """timm's keys under the release's names: stem -> stage0, stages.N.M -> stage{N+1}.M, conv_kxk -> rbr_dense,
    conv_1x1 -> rbr_1x1, identity -> rbr_identity, reparam_conv -> rbr_reparam, head.fc -> linear."""
    renamed = {}
    for key, value in state_dict.items():
        if key in _TIMM_HEAD:
            renamed[_TIMM_HEAD[key]] = value
            continue
        m = _TIMM_BLOCK.match(key)
        if m is None:
            raise ValueError(f"checkpoint key '{key}' is not a timm RepVGG key")
        stage, index, branch, rest = m.groups()
        block = "stage0" if stage is None else f"stage{int(stage) + 1}.{index}"
        renamed[f"{block}.{_TIMM_BRANCH[branch]}.{rest}"] = value
    return renamed


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
