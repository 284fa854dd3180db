"""The recipe's starting model: the architecture it names, or its checkpoint (ours or official) checked against
that architecture, with the head resized to the data."""

from __future__ import annotations

import sys

from torch import nn

from repvgg import RepVGG, create_model

from .io import CheckpointError, load_model
from .recipe import Recipe


def recipe_architecture(recipe: Recipe, num_classes: int) -> RepVGG | None:
    cfg = recipe.model
    if cfg.name is not None:
        return create_model(cfg.name, num_classes=num_classes, stem_stride=cfg.stem_stride)
    if cfg.num_blocks is not None:
        return RepVGG(cfg.num_blocks, cfg.width_multiplier, cfg.override_groups_map, num_classes, cfg.stem_stride,
                      widths=cfg.widths)
    return None


def architecture_mismatch(expected: RepVGG, got: nn.Module) -> str | None:
    """The first layer where `got` differs from the recipe's architecture (heads excluded), or None."""
    if isinstance(got, RepVGG):
        want, have = expected.state_dict(), got.state_dict()
        for key in want:
            if key.startswith("linear."):
                continue
            if key not in have:
                return f"'{key}' is missing"
            if want[key].shape != have[key].shape:
                return f"'{key}' has shape {tuple(have[key].shape)}, the recipe's model {tuple(want[key].shape)}"
        extra = next((k for k in have if k not in want), None)
        return f"'{extra}' is not in the recipe's model" if extra else None
    specs, wanted = got.layer_specs(), [b.spec for b in expected.blocks()]
    for i, want in enumerate(wanted):
        if i >= len(specs) or specs[i] != want:
            return f"layer {i} is {specs[i] if i < len(specs) else 'missing'}, the recipe's model {want}"
    return f"layer {len(wanted)} is not in the recipe's model" if len(specs) > len(wanted) else None


def initial_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's architecture, or its checkpoint (ours or official) with the head resized to the data; a
    checkpoint must match the architecture the recipe names, if it names one."""
    cfg = recipe.model
    classes = cfg.num_classes or num_classes
    expected = recipe_architecture(recipe, classes)
    if cfg.checkpoint is None:
        return expected
    model = load_model(cfg.checkpoint)
    mismatch = architecture_mismatch(expected, model) if expected is not None else None
    if mismatch:
        raise CheckpointError(f"model.checkpoint {cfg.checkpoint} does not match the recipe's model: {mismatch}")
    if model.linear.out_features != classes:  # transfer: new head for the new classes
        print(f"[model] new {classes}-class head on {cfg.checkpoint}", file=sys.stderr)
        model.linear = nn.Linear(model.linear.in_features, classes)
    return model
